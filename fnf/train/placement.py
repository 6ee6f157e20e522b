"""Where the trainer puts each model part: the text encoders before the denoiser when the objective allows it.

:func:`text_encoders_first` is the policy, :func:`encode_before_denoiser` carries it out into a
:class:`~fnf.encoding.PromptCache`; the estimator (fnf/memory/) reads the same policy.
"""
from __future__ import annotations

import torch

from .. import quantize
from ..core import DiffusionModel
from ..encoding import PromptCache, negative_is_zero, offload_text_encoders
from ..objectives import objective_class
from ..objectives.base import NoProbe


def text_encoders_first(cfg) -> bool:
    """Whether training encodes the prompts before the denoiser reaches the device (:func:`encode_before_denoiser`):
    ``memory.offload_text_encoder`` with an objective that encodes only its fixed prompts
    (``Objective.encodes_prompts_once``)."""
    return bool(cfg.memory.offload_text_encoder and objective_class(cfg.objective.name).encodes_prompts_once)


@torch.no_grad()
def encode_before_denoiser(model: DiffusionModel, prompts: list[str], negative_prompt: str, *, height: int,
                           width: int, device, probe=None, move_denoiser: bool = True) -> PromptCache:
    """Encode ``prompts`` and the negative prompt (one row) with only the text encoders on ``device``, keep the
    embeddings on the host (the returned cache, read by :func:`fnf.encoding.encode_prompts`), move the encoders
    back to the host, then the denoiser onto ``device``: the device never holds the text encoders beside the
    denoiser. The denoiser must still be on the host; ``move_denoiser=False`` leaves it there (FSDP shards it
    later). A bitsandbytes denoiser is already on its GPU (diffusers quantizes it there while loading) and stays
    there: then the prompts are encoded on the host, where the text encoders already are (slower, once per run:
    a quantized FLUX.1 or Qwen-Image transformer beside T5-XXL or a 7B text encoder would not fit the cards the
    quantization is for). ``probe``: phases and placements for ``fnf estimate-memory``."""
    probe = probe if probe is not None else NoProbe()
    on_gpu_already = quantize.method_of(model.denoiser) == "bitsandbytes"
    probe.placed([model.denoiser], on_device=on_gpu_already)
    if not on_gpu_already:
        for enc in model.text_encoders:
            enc.to(device)
        probe.placed(model.text_encoders, on_device=True)
    cache = PromptCache()
    with probe.phase("prompt encoding"):
        for rows, zero in ((list(prompts), False), ([negative_prompt], negative_is_zero(model, negative_prompt))):
            if rows:
                cache.fill(model, rows, height, width, zero)
    offload_text_encoders(model)
    probe.placed(model.text_encoders, on_device=False)
    if move_denoiser:
        quantize.move(model.denoiser, device)
        probe.placed([model.denoiser], on_device=True)
    return cache
