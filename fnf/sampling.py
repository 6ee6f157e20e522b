"""Sampling with truncated backpropagation (DRaFT-K, DRaFT-LV) and a differentiable VAE decode, written once
over the model family (``model.family``: schedule / predict / step / renoise / decode, fnf/families/).

Small functions of (model, x, schedule), k-diffusion style; the schedule is a value
(:class:`~fnf.families.base.Schedule`, from :func:`schedule`):

* :func:`run_steps`: the sampler loop over steps ``[start, stop)`` in the caller's grad mode (plain sampling;
  continuing a trajectory from any step);
* :func:`draft_k`: DRaFT-K, the steps before the last ``grad_steps`` without grad, those with grad;
* :func:`draft_lv`: DRaFT-LV, all steps without grad, then the last step redone with grad on re-noised copies;
* :func:`denoise_batched`: the no-grad steps of the pretrained and the fine-tuned trajectory as one denoiser
  batch with a per-sample LoRA scale (0 | 1), on a denoiser switched to ``fnf_kernels``' fused LoRA path.

The families follow their diffusers pipelines exactly (same CFG formula, scheduler step, decode and
post-processing), so a LoRA trained here reproduces its images through the pipeline with
``pipe.load_lora_weights``.
"""
from __future__ import annotations

import torch

import fnf_kernels

from .core import DiffusionModel, PromptEmbeds
from .families.base import Schedule
from .lora import lora_dropout_active

__all__ = ["Schedule", "decode", "denoise_batched", "draft_k", "draft_lv", "grad_start", "initial_latents",
           "predict_noise", "run_steps", "sample_images", "schedule", "uses_cfg"]


def initial_latents(model: DiffusionModel, batch: int, height: int, width: int,
                    generator: torch.Generator, device) -> torch.Tensor:
    """x_T drawn on CPU from ``generator`` (device independent), as the family's pipeline draws it."""
    return model.family.initial_latents(model, batch, height, width, generator, device)


def schedule(model: DiffusionModel, steps: int, height: int, width: int, device) -> Schedule:
    """The family's :class:`Schedule` of ``steps`` steps for ``height`` x ``width`` images."""
    return model.family.schedule(model, steps, height, width, device)


def uses_cfg(uncond: PromptEmbeds | None, guidance_scale: float, model: DiffusionModel | None = None) -> bool:
    """Whether :func:`predict_noise` runs classifier-free guidance (and so doubles the denoiser batch)."""
    if model is not None:
        return model.family.uses_cfg(model, uncond, guidance_scale)
    return uncond is not None and guidance_scale > 1.0


def predict_noise(model: DiffusionModel, denoiser, x: torch.Tensor, t, cond: PromptEmbeds,
                  uncond: PromptEmbeds | None, guidance_scale: float,
                  schedule: Schedule | None = None) -> torch.Tensor:
    """One denoiser call and the guided model output, in float32 (float64 for a float64 denoiser).

    With CFG the batch is ``[uncond rows of x, cond rows of x]`` (both halves in x's row order). ``t``: one
    timestep or one per row; ``schedule``: gives the image size of packed latents (FLUX)."""
    return model.family.predict(model, denoiser, x, t, cond, uncond, guidance_scale, schedule)


def grad_start(steps: int, grad_steps: int, lv_copies: int = 0) -> int:
    """Index of the first step that carries gradient (``steps`` for DRaFT-LV and for plain sampling)."""
    return steps - (0 if lv_copies else grad_steps)


def _check_range(schedule: Schedule, start: int, stop: int) -> None:
    if not 0 <= start <= stop <= len(schedule):
        raise ValueError(f"start, stop: expected 0 <= start <= stop <= steps={len(schedule)}, got {start}, {stop}")


def run_steps(model: DiffusionModel, x: torch.Tensor, schedule: Schedule, cond: PromptEmbeds,
              uncond: PromptEmbeds | None, *, guidance_scale: float, start: int = 0, stop: int | None = None,
              eta: float = 0.0, generator: torch.Generator | None = None, denoiser=None) -> torch.Tensor:
    """Sampler steps ``start .. stop - 1`` of ``schedule`` from x (the latents after ``start`` steps), in the
    caller's grad mode. ``generator`` must have drawn what the earlier steps drew (eta > 0)."""
    family = model.family
    denoiser = denoiser if denoiser is not None else model.denoiser
    stop = len(schedule) if stop is None else stop
    _check_range(schedule, start, stop)
    for i in range(start, stop):
        out = family.predict(model, denoiser, x, schedule.timesteps[i], cond, uncond, guidance_scale, schedule)
        x = family.step(model, schedule, i, out, x, eta=eta, generator=generator)
    return x


def draft_k(model: DiffusionModel, x: torch.Tensor, schedule: Schedule, cond: PromptEmbeds,
            uncond: PromptEmbeds | None, *, grad_steps: int, guidance_scale: float, start: int = 0,
            eta: float = 0.0, generator: torch.Generator | None = None, denoiser=None) -> torch.Tensor:
    """DRaFT-K from step ``start``: the steps before the last ``grad_steps`` run under no_grad, the last
    ``grad_steps`` carry gradient (``grad_steps=0``: a plain no-grad sample). LoRA dropout acts only in the
    grad-carrying calls, and only when grad is enabled (:func:`fnf.lora.lora_dropout_active`)."""
    n = len(schedule)
    _check_range(schedule, start, n)
    first_grad = max(start, grad_start(n, grad_steps))
    kw = dict(guidance_scale=guidance_scale, eta=eta, generator=generator, denoiser=denoiser)
    with torch.no_grad():
        x = run_steps(model, x, schedule, cond, uncond, start=start, stop=first_grad, **kw)
    if first_grad == n:
        return x
    with lora_dropout_active(model.denoiser, torch.is_grad_enabled()):
        return run_steps(model, x.detach(), schedule, cond, uncond, start=first_grad, **kw)


def draft_lv(model: DiffusionModel, x: torch.Tensor, schedule: Schedule, cond: PromptEmbeds,
             uncond: PromptEmbeds | None, *, copies: int, guidance_scale: float, start: int = 0, eta: float = 0.0,
             generator: torch.Generator | None = None, denoiser=None) -> torch.Tensor:
    """DRaFT-LV from step ``start``: all steps without grad, then the final latents re-noised to the last step's
    noise level ``copies`` times (``family.renoise``, noise from ``generator``) and that step redone with grad;
    the results are stacked along the batch (copy-major: shape (copies*B, ...))."""
    if copies < 1:
        raise ValueError(f"copies: expected >= 1, got {copies!r}")
    family = model.family
    denoiser = denoiser if denoiser is not None else model.denoiser
    n = len(schedule)
    with torch.no_grad():
        x0 = run_steps(model, x, schedule, cond, uncond, guidance_scale=guidance_scale, start=start, eta=eta,
                       generator=generator, denoiser=denoiser).detach()
    i, t = n - 1, schedule.timesteps[n - 1]
    out = []
    with lora_dropout_active(model.denoiser, torch.is_grad_enabled()):
        for _ in range(copies):
            noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device) \
                if generator is not None else torch.randn_like(x0)
            x_t = family.renoise(model, schedule, i, x0, noise)
            pred = family.predict(model, denoiser, x_t, t, cond, uncond, guidance_scale, schedule)
            out.append(family.step(model, schedule, i, pred, x_t, eta=eta, generator=generator))
    return torch.cat(out)


@torch.no_grad()
def denoise_batched(model: DiffusionModel, x_T: torch.Tensor, schedule: Schedule, cond: PromptEmbeds,
                    uncond: PromptEmbeds | None, *, shared: int, guidance_scale: float, eta: float = 0.0,
                    generators: tuple = (None, None)) -> tuple[torch.Tensor, torch.Tensor]:
    """The no-grad part of both trajectories with one denoiser call per shared step; returns (z_ref, x_ft).

    Needs a denoiser switched to the fused LoRA path (``fnf_kernels.patch_lora``). For each of the first
    ``shared`` steps (``grad_start(steps, grad_steps, lv_copies)``), the pretrained rows (LoRA scale 0) and the
    fine-tuned rows (scale 1) of the B samples run as one batch: without CFG ``[I0 rows, ft rows]``, with CFG
    ``[uncond·I0, uncond·ft, cond·I0, cond·ft]`` (predict doubles the stacked batch), so the scale is
    ``trajectory_scale(B, B, cfg_copies=1 or 2)``. Then the pretrained trajectory finishes its last
    ``steps - shared`` steps alone at scale 0, giving z_ref (I0's latents). x_ft is the fine-tuned trajectory
    after ``shared`` steps: continue it with :func:`draft_k` / :func:`draft_lv` (``start=shared``,
    ``generator=generators[1]``).

    eta > 0: each half is stepped with its own generator (``generators = (g_ref, g_ft)``, both advanced);
    the step is stateless, so with both seeded alike the noise equals that of two separate samples. Rows at
    scale 0 compute the base model exactly (up to GEMM rounding).
    """
    g_ref, g_ft = generators
    family, denoiser = model.family, model.denoiser
    _check_range(schedule, 0, shared)
    b = x_T.shape[0]
    copies = 2 if family.uses_cfg(model, uncond, guidance_scale) else 1
    scale = fnf_kernels.trajectory_scale(b, b, cfg_copies=copies, device=x_T.device)
    cond2 = cond.repeat(2)
    uncond2 = uncond.repeat(2) if uncond is not None else None
    x_ref = x_ft = x_T
    with fnf_kernels.lora_scale(denoiser, scale):
        for i in range(shared):
            out_ref, out_ft = family.predict(model, denoiser, torch.cat([x_ref, x_ft]), schedule.timesteps[i],
                                             cond2, uncond2, guidance_scale, schedule).chunk(2)
            x_ref = family.step(model, schedule, i, out_ref, x_ref, eta=eta, generator=g_ref)
            x_ft = family.step(model, schedule, i, out_ft, x_ft, eta=eta, generator=g_ft)
    with fnf_kernels.lora_scale(denoiser, 0.0):
        x_ref = run_steps(model, x_ref, schedule, cond, uncond, guidance_scale=guidance_scale, start=shared,
                          eta=eta, generator=g_ref, denoiser=denoiser)
    return x_ref, x_ft


def decode(model: DiffusionModel, latents: torch.Tensor, schedule: Schedule | None = None) -> torch.Tensor:
    """VAE decode (with grad whenever grad is enabled) to float32 images in [0, 1], (B, 3, H, W), as the family
    decodes (SD/SDXL: a force_upcast VAE with fp16 in play runs in float32 with autocast off). ``schedule``: the
    image size of packed latents (FLUX; without it their token grid must be square)."""
    return model.family.decode(model, latents, schedule)


@torch.no_grad()
def sample_images(model: DiffusionModel, x_T, cond, uncond, *, steps: int, guidance_scale: float,
                  eta: float = 0.0, seed: int | None = None, denoiser=None, height: int | None = None,
                  width: int | None = None) -> torch.Tensor:
    """No-grad sample decoded to [0, 1] images (used for I0, `fnf localize` and `fnf sample`); ``denoiser``
    replaces model.denoiser in the denoising calls (e.g. a wrapper that records attention); ``height``/``width``
    default to the latents' (``family.image_size``)."""
    if height is None or width is None:
        height, width = model.family.image_size(model, x_T)
    plan = schedule(model, steps, height, width, x_T.device)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    z = run_steps(model, x_T, plan, cond, uncond, guidance_scale=guidance_scale, eta=eta, generator=gen,
                  denoiser=denoiser)
    return decode(model, z, plan)
