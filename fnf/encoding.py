"""Prompt encoding as the model's diffusers pipeline computes it (``model.family.encode``), with an optional cache
of embeddings computed before the denoiser reached the device (:class:`PromptCache`)."""
from __future__ import annotations

import torch

from .core import DiffusionModel, PromptEmbeds


class PromptCache:
    """Embeddings on the host by (prompts, size, zero, the model's T5 length), filled by the trainer while only the
    text encoders are on the device; :func:`encode_prompts` reads it before running any encoder."""

    def __init__(self):
        self.entries: dict[tuple, PromptEmbeds] = {}

    @staticmethod
    def key(model: DiffusionModel, prompts, height: int, width: int, zero: bool) -> tuple:
        return (tuple(prompts), int(height), int(width), bool(zero), model.settings.get("max_sequence_length"))

    def get(self, model: DiffusionModel, prompts, height: int, width: int, zero: bool) -> PromptEmbeds | None:
        return self.entries.get(self.key(model, prompts, height, width, zero))

    @torch.no_grad()
    def fill(self, model: DiffusionModel, prompts, height: int, width: int, zero: bool) -> None:
        """Encode ``prompts`` now (their encoders must be on the device) and keep the result on the host."""
        self.entries[self.key(model, prompts, height, width, zero)] = model.family.encode(
            model, list(prompts), height=height, width=width, zero=zero).to("cpu")


@torch.no_grad()
def encode_prompts(model: DiffusionModel, prompts: list[str], *, height: int, width: int, zero: bool = False,
                   cache: PromptCache | None = None) -> PromptEmbeds:
    """Text conditioning as the model's diffusers pipeline computes it (``model.family.encode``).

    ``zero`` gives the all-zero negative conditioning of pipelines that use it (SDXL's
    force_zeros_for_empty_prompt); families without it ignore it. Prompts held by ``cache`` come from it (moved
    to the denoiser's device)."""
    cached = cache.get(model, prompts, height, width, zero) if cache is not None else None
    if cached is not None:
        return cached.to(model.denoiser.device)
    return model.family.encode(model, prompts, height=height, width=width, zero=zero)


def negative_is_zero(model: DiffusionModel, negative_prompt: str) -> bool:
    """Whether the negative conditioning is all zeros (an empty negative prompt with force_zeros_for_empty_prompt)."""
    return not negative_prompt and model.force_zeros_for_empty_prompt


@torch.no_grad()
def encode_negative(model: DiffusionModel, negative_prompt: str, batch: int, *, height: int, width: int,
                    cache: PromptCache | None = None) -> PromptEmbeds:
    """The negative (unconditional) conditioning for ``batch`` rows: all zeros for an empty negative prompt
    when the folder's pipeline sets force_zeros_for_empty_prompt."""
    return encode_prompts(model, [negative_prompt] * batch, height=height, width=width,
                          zero=negative_is_zero(model, negative_prompt), cache=cache)


def offload_text_encoders(model: DiffusionModel) -> None:
    """Move the text encoders to CPU once all embeddings exist (frees their device memory)."""
    for enc in model.text_encoders:
        enc.to("cpu")
