"""Separate-and-Enhance (``objective.name: sepen``) as a trainer objective; the method itself is fnf/sepen/."""
from __future__ import annotations

import torch

from ..lora import lora_dropout_active
from ..preflight import sepen_unsupported
from ..sepen.train_step import SepenObjective
from .base import Objective


class SeparateAndEnhance(Objective):
    """Trains the cross-attention keys (attn2.to_k, or a LoRA on them) with the Separate and Enhance losses.

    Needs separate cross-attention keys: a family with ``supports_sepen`` (the UNet families). UNet gradient
    checkpointing does not apply (a recomputed block would not re-run the attention capture)."""

    progress_keys = ("separate", "enhance")
    denoiser_checkpointing = False

    def __init__(self, session):
        family = session.model.family
        if not family.supports_sepen:
            raise ValueError(sepen_unsupported(family))
        self.method = SepenObjective(session.cfg, session.model)
        self.params = self.method.params

    def setup(self, session) -> None:
        self.method.install(session.model.denoiser)   # after fnf_kernels.patch_lora when the fused path is on

    def loss(self, session, generator: torch.Generator):
        # Its LoRA-on UNet call is the grad-carrying one (the frozen reference runs adapters off, no grad).
        with lora_dropout_active(session.model.denoiser):
            loss, stats, _, images = self.method.micro_batch(session, generator)
        return loss, stats, images

    def finish(self, session) -> None:
        self.method.uninstall(session.model.denoiser)

    def export(self, session, out: str) -> str:
        return self.method.export(session.model, out)   # a LoRA folder or to_k.safetensors
