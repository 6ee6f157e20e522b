"""Sampling with truncated backpropagation (DRaFT-K, DRaFT-LV) and a differentiable VAE decode, written once
over the model family (``model.family``: schedule / predict / step / renoise / decode, fnf/families/).

The families follow their diffusers pipelines exactly (same CFG formula, scheduler step, decode and
post-processing), so a LoRA trained here reproduces its images through the pipeline with
``pipe.load_lora_weights``.

:func:`denoise_batched` runs the no-grad steps of the pretrained and the fine-tuned trajectory as one UNet
batch with a per-sample LoRA scale (0 | 1) on a UNet switched to ``fnf_kernels``' fused LoRA path.
"""
from __future__ import annotations

import torch

import fnf_kernels

from .core import DiffusionModel, PromptEmbeds
from .lora import lora_dropout_active


def initial_latents(model: DiffusionModel, batch: int, height: int, width: int,
                    generator: torch.Generator, device) -> torch.Tensor:
    """x_T drawn on CPU from ``generator`` (device independent), as the family's pipeline draws it."""
    return model.family.initial_latents(model, batch, height, width, generator, device)


def uses_cfg(uncond: PromptEmbeds | None, guidance_scale: float, model: DiffusionModel | None = None) -> bool:
    """Whether :func:`predict_noise` runs classifier-free guidance (and so doubles the denoiser batch)."""
    if model is not None:
        return model.family.uses_cfg(model, uncond, guidance_scale)
    return uncond is not None and guidance_scale > 1.0


def predict_noise(model: DiffusionModel, denoiser, x: torch.Tensor, t, cond: PromptEmbeds,
                  uncond: PromptEmbeds | None, guidance_scale: float, i: int | None = None) -> torch.Tensor:
    """One denoiser call and the guided model output, in float32 (float64 for a float64 denoiser).

    With CFG the batch is ``[uncond rows of x, cond rows of x]`` (both halves in x's row order). ``i``: the
    step index (families whose schedule is indexed need it; the UNet families read only ``t``)."""
    return model.family.predict(model, denoiser, x, i, t, cond, uncond, guidance_scale)


def grad_start(steps: int, grad_steps: int, lv_copies: int = 0) -> int:
    """Index of the first timestep that carries gradient (``steps`` for DRaFT-LV and for plain sampling)."""
    return steps - (0 if lv_copies else grad_steps)


def _schedule(model: DiffusionModel, steps: int, x: torch.Tensor, height: int | None, width: int | None):
    if height is None or width is None:
        height, width = model.family.image_size(model, x)
    return model.family.schedule(model, steps, height, width, x.device)


def run_steps(model: DiffusionModel, x: torch.Tensor, timesteps, cond: PromptEmbeds, uncond: PromptEmbeds | None,
              *, guidance_scale: float, eta: float = 0.0, generator: torch.Generator | None = None,
              denoiser=None, first: int = 0) -> torch.Tensor:
    """Sampler steps over ``timesteps`` (a slice of the schedule starting at step index ``first``) from x,
    in the caller's grad mode."""
    family = model.family
    denoiser = denoiser if denoiser is not None else model.denoiser
    for j, t in enumerate(timesteps):
        i = first + j
        out = family.predict(model, denoiser, x, i, t, cond, uncond, guidance_scale)
        x = family.step(model, out, i, t, x, eta=eta, generator=generator)
    return x


def denoise(model: DiffusionModel, x_T: torch.Tensor, cond: PromptEmbeds, uncond: PromptEmbeds | None, *,
            steps: int, guidance_scale: float, grad_steps: int = 0, lv_copies: int = 0, eta: float = 0.0,
            generator: torch.Generator | None = None, denoiser=None, start: int = 0, height: int | None = None,
            width: int | None = None) -> torch.Tensor:
    """Run the family's sampler from x_T to clean latents.

    The first ``steps - grad_steps`` steps run under no_grad; the last ``grad_steps`` (DRaFT-K) carry
    gradient. ``grad_steps=0`` is a plain no-grad sample (the pretrained trajectory I0 uses it).
    ``lv_copies=n > 0`` is DRaFT-LV: all steps run without grad, then the final latents are re-noised to
    the last step's noise level n times (``family.renoise``) and that step is redone with grad; the n results
    are stacked along the batch (copy-major: shape (n*B, ...)).
    ``start=i`` continues a trajectory: x_T is then the latent after the first i steps (e.g. from
    :func:`denoise_batched`) and ``generator`` must have drawn what those steps drew (eta > 0).
    ``height``/``width``: the image size (default: from the latents, ``family.image_size``).
    LoRA dropout (peft's lora_dropout) acts only in the grad-carrying denoiser calls, and only when grad is
    enabled (:func:`fnf.models.lora_dropout_active`): the no-grad steps are those of a no-dropout model.
    """
    family = model.family
    denoiser = denoiser if denoiser is not None else model.denoiser
    timesteps = _schedule(model, steps, x_T, height, width)
    n = len(timesteps)
    if not 0 <= start <= n:
        raise ValueError(f"start must be in [0, steps={n}], got {start}")
    first_grad = max(start, grad_start(n, grad_steps, lv_copies))
    kw = dict(guidance_scale=guidance_scale, eta=eta, generator=generator, denoiser=denoiser)
    x = x_T
    with torch.no_grad():
        x = run_steps(model, x, timesteps[start:first_grad], cond, uncond, first=start, **kw)
    with lora_dropout_active(model.denoiser, torch.is_grad_enabled()):
        if first_grad < n:
            x = run_steps(model, x.detach(), timesteps[first_grad:], cond, uncond, first=first_grad, **kw)
        if lv_copies <= 0:
            return x
        x0 = x.detach()
        i_last, t_last = n - 1, timesteps[-1]
        copies = []
        for _ in range(lv_copies):
            noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device) \
                if generator is not None else torch.randn_like(x0)
            x_t = family.renoise(model, x0, noise, i_last, t_last)
            out = family.predict(model, denoiser, x_t, i_last, t_last, cond, uncond, guidance_scale)
            copies.append(family.step(model, out, i_last, t_last, x_t, eta=eta, generator=generator))
        return torch.cat(copies)


@torch.no_grad()
def denoise_batched(model: DiffusionModel, x_T: torch.Tensor, cond: PromptEmbeds, uncond: PromptEmbeds | None, *,
                    steps: int, guidance_scale: float, grad_steps: int = 0, lv_copies: int = 0, eta: float = 0.0,
                    generators: tuple = (None, None), height: int | None = None,
                    width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The no-grad part of both trajectories with one denoiser call per shared step; returns (z_ref, x_ft).

    Needs a denoiser switched to the fused LoRA path (``fnf_kernels.patch_lora``). For each of the first
    ``s = grad_start(steps, grad_steps, lv_copies)`` steps, the pretrained rows (LoRA scale 0) and the
    fine-tuned rows (scale 1) of the B samples run as one batch: without CFG ``[I0 rows, ft rows]``,
    with CFG ``[uncond·I0, uncond·ft, cond·I0, cond·ft]`` (predict doubles the stacked batch), so the
    scale is ``trajectory_scale(B, B, cfg_copies=1 or 2)``. Then the pretrained trajectory finishes its
    last ``steps - s`` steps alone at scale 0, giving z_ref (I0's latents). x_ft is the fine-tuned
    trajectory after s steps: continue it with ``denoise(..., start=s, generator=generators[1])``
    (its grad steps, or DRaFT-LV's re-noised copies).

    eta > 0: each half is stepped with its own generator (``generators = (g_ref, g_ft)``, both advanced);
    the step is stateless, so with both seeded alike the noise equals that of two separate
    ``denoise`` calls. Rows at scale 0 compute the base model exactly (up to GEMM rounding).
    """
    g_ref, g_ft = generators
    family, denoiser = model.family, model.denoiser
    timesteps = _schedule(model, steps, x_T, height, width)
    shared = grad_start(len(timesteps), grad_steps, lv_copies)
    b = x_T.shape[0]
    copies = 2 if family.uses_cfg(model, uncond, guidance_scale) else 1
    scale = fnf_kernels.trajectory_scale(b, b, cfg_copies=copies, device=x_T.device)
    cond2 = cond.repeat(2)
    uncond2 = uncond.repeat(2) if uncond is not None else None
    x_ref = x_ft = x_T
    with fnf_kernels.lora_scale(denoiser, scale):
        for i, t in enumerate(timesteps[:shared]):
            out_ref, out_ft = family.predict(model, denoiser, torch.cat([x_ref, x_ft]), i, t, cond2, uncond2,
                                             guidance_scale).chunk(2)
            x_ref = family.step(model, out_ref, i, t, x_ref, eta=eta, generator=g_ref)
            x_ft = family.step(model, out_ft, i, t, x_ft, eta=eta, generator=g_ft)
    with fnf_kernels.lora_scale(denoiser, 0.0):
        x_ref = run_steps(model, x_ref, timesteps[shared:], cond, uncond, guidance_scale=guidance_scale, eta=eta,
                          generator=g_ref, denoiser=denoiser, first=shared)
    return x_ref, x_ft


def decode(model: DiffusionModel, latents: torch.Tensor) -> torch.Tensor:
    """VAE decode (with grad whenever grad is enabled) to float32 images in [0, 1], (B, 3, H, W), as the family
    decodes (SD/SDXL: a force_upcast VAE with fp16 in play runs in float32 with autocast off)."""
    return model.family.decode(model, latents)


@torch.no_grad()
def sample_images(model: DiffusionModel, x_T, cond, uncond, *, steps: int, guidance_scale: float,
                  eta: float = 0.0, seed: int | None = None, denoiser=None, height: int | None = None,
                  width: int | None = None) -> torch.Tensor:
    """No-grad sample decoded to [0, 1] images (used for I0, `fnf localize` and `fnf sample`); ``denoiser``
    replaces model.denoiser in the denoising calls (e.g. a wrapper that records attention)."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    z = denoise(model, x_T, cond, uncond, steps=steps, guidance_scale=guidance_scale, eta=eta, generator=gen,
                denoiser=denoiser, height=height, width=width)
    return decode(model, z)
