"""What the family tests share: the tiny folders, a loop over the family methods, the diffusers pipeline's images."""
from __future__ import annotations

import json
import os
import sys

import torch

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, TESTS)
SEED = 7
PROMPTS = ["a photo of a cat", "a red car"]
STEPS = 4


def index_of(path: str) -> dict:
    with open(os.path.join(path, "model_index.json")) as f:
        return json.load(f)


def pipeline(path: str, cls_name: str, **kw):
    """The folder's diffusers pipeline (``cls_name``), progress bar off."""
    import diffusers

    pipe = getattr(diffusers, cls_name).from_pretrained(path, local_files_only=True, **kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_images(pipe, size: int, guidance: float, prompts=PROMPTS, seed=SEED, steps=STEPS, **kw):
    with torch.no_grad():
        # a copy: ZImagePipeline._encode_prompt writes the templated prompts into the list it is given
        return pipe(prompt=list(prompts), num_inference_steps=steps, guidance_scale=guidance, height=size, width=size,
                    output_type="pt", generator=torch.Generator().manual_seed(seed), **kw).images


def rows_of(args, kwargs) -> int:
    """The batch rows of a denoiser call (UNets take x first, transformers ``hidden_states=``; Z-Image's transformer
    takes a list of per-image latents first)."""
    x = args[0] if args else kwargs["hidden_states"]
    return len(x) if isinstance(x, (list, tuple)) else x.shape[0]


def _first_tensor(out):
    """A denoiser's output tensor (Z-Image's transformer returns a list of per-image tensors: the first)."""
    return out[0] if isinstance(out, (list, tuple)) else out


def sample_loop(family, m, size: int, guidance: float, *, negative: bool = False, grad_steps: int = 0,
                calls: list | None = None, prompts=PROMPTS, seed=SEED, steps=STEPS):
    """Our own loop over the family methods: the first T - grad_steps steps without grad, the rest with grad;
    ``calls`` records (denoiser batch rows, output requires grad) per denoiser call."""
    cond = family.encode(m, prompts, height=size, width=size)
    uncond = family.encode(m, [""] * len(prompts), height=size, width=size,
                           zero=m.force_zeros_for_empty_prompt) if negative else None
    x = family.initial_latents(m, len(prompts), size, size, torch.Generator().manual_seed(seed), "cpu")
    plan = family.schedule(m, steps, size, size, "cpu")
    handle = None
    if calls is not None:
        handle = m.denoiser.register_forward_hook(lambda mod, args, kwargs, out: calls.append(
            (rows_of(args, kwargs), _first_tensor(out[0] if isinstance(out, tuple) else out.sample).requires_grad)),
            with_kwargs=True)
    try:
        for i, t in enumerate(plan.timesteps):
            with torch.set_grad_enabled(i >= steps - grad_steps):
                out = family.predict(m, m.denoiser, x if i >= steps - grad_steps else x.detach(), t, cond, uncond,
                                     guidance, plan)
                x = family.step(m, plan, i, out, x)
    finally:
        if handle is not None:
            handle.remove()
    with torch.set_grad_enabled(grad_steps > 0):
        return family.decode(m, x, plan)


def randomize_lora(m, seed: int, std: float = 0.3, names: str = "lora_B") -> None:
    """Random values for the LoRA tensors whose name holds ``names`` ("lora_B"; "lora_": A and B)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in m.denoiser.named_parameters():
            if names in n:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
