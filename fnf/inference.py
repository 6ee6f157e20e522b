"""What the no-grad commands (sample, localize, eval) share: load a model for inference, seeded sampling, LoRA-folder
checks."""
from __future__ import annotations

import torch

from .core import LORA_WEIGHTS, resolve_device
from .encoding import encode_negative, encode_prompts
from .families import registry
from .lora import check_lora_folder
from .sampling import initial_latents, sample_images


def load_for_inference(cfg):
    """(model, device, height, width) of ``cfg``: the model on train.device, the size sampling.height/width or
    the model's native one."""
    device = resolve_device(cfg.train.device)
    model = registry.load_model(cfg.model.path, kind=cfg.model.kind, weight_dtype=cfg.model.weight_dtype,
                                device=device, **registry.model_options(cfg))
    h = cfg.sampling.height or model.native_size
    w = cfg.sampling.width or model.native_size
    return model, device, h, w


def sample_seeded(model, cfg, prompts: list[str], seeds: list[int], h: int, w: int, device) -> torch.Tensor:
    """Images of ``prompts[i]`` from the noise of ``seeds[i]``: the same x_T for a seed in every command, with or
    without a LoRA. The sampler's own noise (eta > 0) is seeded with ``seeds[0]``."""
    cond = encode_prompts(model, prompts, height=h, width=w)
    uncond = encode_negative(model, cfg.sampling.negative_prompt, len(prompts), height=h, width=w)
    x_T = torch.cat([initial_latents(model, 1, h, w, torch.Generator().manual_seed(s), device) for s in seeds])
    return sample_images(model, x_T, cond, uncond, steps=cfg.sampling.steps,
                         guidance_scale=cfg.sampling.guidance_scale, eta=cfg.sampling.eta, seed=seeds[0],
                         height=h, width=w)


def check_lora_arg(folder: str, flag: str = "--lora") -> None:
    """FileNotFoundError naming ``flag`` when ``folder`` is not a LoRA folder `fnf train` wrote."""
    try:
        check_lora_folder(folder)
    except FileNotFoundError:
        raise FileNotFoundError(f"{flag} {folder!r}: expected a LoRA folder written by `fnf train` "
                                f"(<out>/lora with {LORA_WEIGHTS})") from None
