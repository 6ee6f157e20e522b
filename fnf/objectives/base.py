"""The objective seam of the trainer: :class:`Objective`, its frozen :class:`Context`, :class:`StepOutput`."""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..core import DiffusionModel
from ..encoding import PromptCache
from ..lora import save_lora


class NoProbe:
    """The trainer's estimation hook when nothing estimates: phases and placements are not recorded."""

    def phase(self, name: str, host: bool = False):
        """Context for one phase of a step (``host``: what is allocated inside stays on the host)."""
        return contextlib.nullcontext()

    def placed(self, modules, on_device: bool) -> None:
        """``modules`` (a list of nn.Modules) now live on the device (True) or on the host (False)."""


@dataclass(frozen=True)
class Context:
    """What an objective may read of the trainer, fixed once the model is placed and its memory levers are set."""

    model: DiffusionModel
    device: torch.device
    autocast_dtype: torch.dtype | None   # None: no autocast
    probe: object                        # NoProbe, or fnf estimate-memory's counter
    height: int
    width: int
    is_main: bool                        # the main process (progress bars)
    prompt_cache: PromptCache | None     # prompts encoded before the denoiser reached the device
    fused_lora: bool                     # fnf_kernels' fused LoRA attention is installed (memory.fused_lora)

    def autocast(self):
        """The training autocast (a no-op context without mixed precision)."""
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)


class StepOutput(NamedTuple):
    """One micro-batch: the loss to back-propagate, detached float stats for the log, images for the sample grid."""

    loss: torch.Tensor
    stats: dict
    images: dict


class Objective:
    """One training objective.

    Lifecycle: :meth:`add_params` (a classmethod) creates the trainable parameters on the model; the trainer then
    sets its memory levers (checkpointing, fused LoRA), builds the :class:`Context` and the objective once,
    ``cls(cfg, ctx)`` (rewards, prompts, hooks); each optimizer step calls :meth:`start_step` and then
    :meth:`loss` per micro-batch; at the end of a run :meth:`finish` (every process) and :meth:`export` (main
    process)."""

    progress_keys: tuple[str, ...] = ("loss",)   # the stats shown next to the progress bar
    denoiser_checkpointing: bool = True          # whether memory.denoiser checkpointing may apply
    # True: the objective encodes only cfg.all_prompts() and sampling.negative_prompt (fnf.encoding.encode_prompts /
    # encode_negative); with memory.offload_text_encoder the trainer then encodes them before the denoiser reaches
    # the device (fnf.train.placement.encode_before_denoiser) and the text encoders stay off it. False: it encodes
    # other prompts while training, so its text encoders stay on the device.
    encodes_prompts_once: bool = False

    @classmethod
    def add_params(cls, cfg, model: DiffusionModel, probe) -> list[torch.Tensor]:
        """Create the trainable parameters on ``model`` (before the memory levers); returns them."""
        raise NotImplementedError

    def __init__(self, cfg, ctx: Context):
        self.cfg, self.ctx = cfg, ctx

    def start_step(self, step: int) -> None:
        """Called by the trainer at the start of optimizer step ``step`` (0-based; every process, before its
        micro-batches, also the first step after a resume). Default: nothing. An objective whose micro-batches
        share state across steps (GRPO: one sampled rollout feeds several optimizer steps) learns here where in
        that state a step starts, whatever happened before (a resume, a step skipped part way)."""

    def loss(self, generator: torch.Generator) -> StepOutput:
        """One micro-batch; ``generator`` is seeded per (seed, step, micro-step, rank) and is its only randomness."""
        raise NotImplementedError

    def finish(self) -> None:
        """Undo what the constructor installed on the model (every process, before the fused LoRA path is removed)."""

    def export(self, out: str) -> str:
        """Write the trained result under ``out`` (main process); returns its path. Default: the LoRA folder in
        the format the family's ``pipe.load_lora_weights`` reads."""

        path = os.path.join(out, "lora")
        save_lora(self.ctx.model, path)
        return path
