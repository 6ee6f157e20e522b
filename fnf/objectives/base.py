"""The objective seam of the trainer: trainable parameters, a micro-batch's loss, progress keys and the export."""
from __future__ import annotations

import os

import torch

from ..lora import save_lora


class Objective:
    """One training objective, built by the Session once the model is loaded.

    Lifecycle: ``__init__(session)`` creates the trainable parameters (``params``) on ``session.model``; the
    Session then applies its memory settings (checkpointing, fused LoRA) and calls :meth:`setup`; each
    micro-batch calls :meth:`loss`; at the end of a run :meth:`finish` (every process) and :meth:`export`
    (main process)."""

    progress_keys: tuple[str, ...] = ("loss",)   # the stats shown next to the progress bar
    denoiser_checkpointing: bool = True          # whether memory.unet_checkpointing may apply
    # True: the objective encodes only cfg.all_prompts() and sampling.negative_prompt (through
    # fnf.models.encode_prompts / encode_negative); with memory.offload_text_encoder the Session then encodes
    # them before the denoiser reaches the device (fnf.models.encode_before_denoiser) and the text encoders
    # stay off it. False: it encodes other prompts while training, so its text encoders stay on the device.
    encodes_prompts_once: bool = False

    params: list

    def setup(self, session) -> None:
        """What the objective needs besides its parameters (rewards, prompts, hooks), after the memory settings."""

    def loss(self, session, generator: torch.Generator) -> tuple[torch.Tensor, dict, dict]:
        """(loss, stats, images for the sample grid) of one micro-batch; ``generator`` is seeded per
        (seed, step, micro-step, rank) and is this micro-batch's only source of randomness."""
        raise NotImplementedError

    def finish(self, session) -> None:
        """Undo what :meth:`setup` installed on the model (every process, before the fused LoRA path is removed)."""

    def export(self, session, out: str) -> str:
        """Write the trained result under ``out`` (main process); returns its path. Default: the LoRA folder in
        the format the family's ``pipe.load_lora_weights`` reads."""

        path = os.path.join(out, "lora")
        save_lora(session.model, path)
        return path
