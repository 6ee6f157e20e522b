"""DDIM sampling with truncated backpropagation (DRaFT-K, DRaFT-LV) and a differentiable VAE decode.

The stepping follows the diffusers pipelines exactly (same CFG formula, ``scheduler.step``, decode and
``x / 2 + 0.5`` post-processing), so a LoRA trained here reproduces its images through
``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` with ``pipe.load_lora_weights``.

:func:`denoise_batched` runs the no-grad steps of the pretrained and the fine-tuned trajectory as one UNet
batch with a per-sample LoRA scale (0 | 1) on a UNet switched to ``fnf_kernels``' fused LoRA path.
"""
from __future__ import annotations

import contextlib

import torch

import fnf_kernels

from .models import DiffusionModel, PromptEmbeds, lora_dropout_active


def initial_latents(model: DiffusionModel, batch: int, height: int, width: int,
                    generator: torch.Generator, device) -> torch.Tensor:
    """x_T ~ N(0, I) * init_noise_sigma, drawn on CPU from ``generator`` (device independent)."""
    f = model.vae_scale_factor
    shape = (batch, model.unet.config.in_channels, height // f, width // f)
    x = torch.randn(shape, generator=generator, dtype=torch.float32)
    return (x * model.scheduler.init_noise_sigma).to(device)


def uses_cfg(uncond: PromptEmbeds | None, guidance_scale: float) -> bool:
    """Whether :func:`predict_noise` runs classifier-free guidance (and so doubles the UNet batch)."""
    return uncond is not None and guidance_scale > 1.0


def predict_noise(model: DiffusionModel, unet, x: torch.Tensor, t, cond: PromptEmbeds,
                  uncond: PromptEmbeds | None, guidance_scale: float) -> torch.Tensor:
    """One UNet call and the guided model output, in float32 (float64 for a float64 UNet).

    With CFG the UNet batch is ``[uncond rows of x, cond rows of x]`` (both halves in x's row order)."""
    cfg = uses_cfg(uncond, guidance_scale)
    emb = PromptEmbeds.cat(uncond, cond) if cfg else cond
    x_in = torch.cat([x, x]) if cfg else x
    x_in = model.scheduler.scale_model_input(x_in, t)
    dtype = model.unet.dtype
    kwargs = {}
    if emb.pooled is not None:
        kwargs["added_cond_kwargs"] = {"text_embeds": emb.pooled.to(dtype), "time_ids": emb.time_ids.to(dtype)}
    out = unet(x_in.to(dtype), t, encoder_hidden_states=emb.hidden.to(dtype), return_dict=False, **kwargs)[0]
    out = out.to(torch.promote_types(out.dtype, torch.float32))  # half -> float32; float64 stays float64
    if cfg:
        out_uncond, out_cond = out.chunk(2)
        out = out_uncond + guidance_scale * (out_cond - out_uncond)
    return out


def grad_start(steps: int, grad_steps: int, lv_copies: int = 0) -> int:
    """Index of the first timestep that carries gradient (``steps`` for DRaFT-LV and for plain sampling)."""
    return steps - (0 if lv_copies else grad_steps)


def run_steps(model: DiffusionModel, x: torch.Tensor, timesteps, cond: PromptEmbeds, uncond: PromptEmbeds | None,
              *, guidance_scale: float, eta: float = 0.0, generator: torch.Generator | None = None,
              unet=None) -> torch.Tensor:
    """DDIM steps over ``timesteps`` (a slice of ``scheduler.timesteps``) from x, in the caller's grad mode."""
    unet = unet if unet is not None else model.unet
    for t in timesteps:
        out = predict_noise(model, unet, x, t, cond, uncond, guidance_scale)
        x = model.scheduler.step(out, t, x, eta=eta, generator=generator, return_dict=False)[0]
    return x


def denoise(model: DiffusionModel, x_T: torch.Tensor, cond: PromptEmbeds, uncond: PromptEmbeds | None, *,
            steps: int, guidance_scale: float, grad_steps: int = 0, lv_copies: int = 0, eta: float = 0.0,
            generator: torch.Generator | None = None, unet=None, start: int = 0) -> torch.Tensor:
    """Run DDIM from x_T to clean latents.

    The first ``steps - grad_steps`` steps run under no_grad; the last ``grad_steps`` (DRaFT-K) carry
    gradient. ``grad_steps=0`` is a plain no-grad sample (the pretrained trajectory I0 uses it).
    ``lv_copies=n > 0`` is DRaFT-LV: all steps run without grad, then the final latents are re-noised to
    the last timestep n times and that step is redone with grad; the n results are stacked along the
    batch (copy-major: shape (n*B, ...)).
    ``start=i`` continues a trajectory: x_T is then the latent after the first i steps (e.g. from
    :func:`denoise_batched`) and ``generator`` must have drawn what those steps drew (eta > 0).
    LoRA dropout (peft's lora_dropout) acts only in the grad-carrying UNet calls, and only when grad is
    enabled (:func:`fnf.models.lora_dropout_active`): the no-grad steps are those of a no-dropout model.
    """
    unet = unet if unet is not None else model.unet
    sched = model.scheduler
    sched.set_timesteps(steps, device=x_T.device)
    timesteps = sched.timesteps
    if not 0 <= start <= len(timesteps):
        raise ValueError(f"start must be in [0, steps={len(timesteps)}], got {start}")
    first_grad = max(start, grad_start(len(timesteps), grad_steps, lv_copies))
    kw = dict(guidance_scale=guidance_scale, eta=eta, generator=generator, unet=unet)
    x = x_T
    with torch.no_grad():
        x = run_steps(model, x, timesteps[start:first_grad], cond, uncond, **kw)
    with lora_dropout_active(model.unet, torch.is_grad_enabled()):
        if first_grad < len(timesteps):
            x = run_steps(model, x.detach(), timesteps[first_grad:], cond, uncond, **kw)
        if lv_copies <= 0:
            return x
        x0 = x.detach()
        t_last = timesteps[-1]
        copies = []
        for _ in range(lv_copies):
            noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device) \
                if generator is not None else torch.randn_like(x0)
            x_t = sched.add_noise(x0, noise, t_last.reshape(1))
            out = predict_noise(model, unet, x_t, t_last, cond, uncond, guidance_scale)
            copies.append(sched.step(out, t_last, x_t, eta=eta, generator=generator, return_dict=False)[0])
        return torch.cat(copies)


@torch.no_grad()
def denoise_batched(model: DiffusionModel, x_T: torch.Tensor, cond: PromptEmbeds, uncond: PromptEmbeds | None, *,
                    steps: int, guidance_scale: float, grad_steps: int = 0, lv_copies: int = 0, eta: float = 0.0,
                    generators: tuple = (None, None)) -> tuple[torch.Tensor, torch.Tensor]:
    """The no-grad part of both trajectories with one UNet call per shared step; returns (z_ref, x_ft).

    Needs a UNet switched to the fused LoRA path (``fnf_kernels.patch_lora``). For each of the first
    ``s = grad_start(steps, grad_steps, lv_copies)`` timesteps, the pretrained rows (LoRA scale 0) and the
    fine-tuned rows (scale 1) of the B samples run as one UNet batch: without CFG ``[I0 rows, ft rows]``,
    with CFG ``[uncond·I0, uncond·ft, cond·I0, cond·ft]`` (predict_noise doubles the stacked batch), so the
    scale is ``trajectory_scale(B, B, cfg_copies=1 or 2)``. Then the pretrained trajectory finishes its
    last ``steps - s`` steps alone at scale 0, giving z_ref (I0's latents). x_ft is the fine-tuned
    trajectory after s steps: continue it with ``denoise(..., start=s, generator=generators[1])``
    (its grad steps, or DRaFT-LV's re-noised copies).

    eta > 0: each half is stepped with its own generator (``generators = (g_ref, g_ft)``, both advanced);
    the DDIM step is stateless, so with both seeded alike the noise equals that of two separate
    ``denoise`` calls. Rows at scale 0 compute the base model exactly (up to GEMM rounding).
    """
    g_ref, g_ft = generators
    unet, sched = model.unet, model.scheduler
    sched.set_timesteps(steps, device=x_T.device)
    timesteps = sched.timesteps
    shared = grad_start(len(timesteps), grad_steps, lv_copies)
    b = x_T.shape[0]
    copies = 2 if uses_cfg(uncond, guidance_scale) else 1
    scale = fnf_kernels.trajectory_scale(b, b, cfg_copies=copies, device=x_T.device)
    cond2 = cond.repeat(2)
    uncond2 = uncond.repeat(2) if uncond is not None else None
    x_ref = x_ft = x_T
    with fnf_kernels.lora_scale(unet, scale):
        for t in timesteps[:shared]:
            out_ref, out_ft = predict_noise(model, unet, torch.cat([x_ref, x_ft]), t, cond2, uncond2,
                                            guidance_scale).chunk(2)
            x_ref = sched.step(out_ref, t, x_ref, eta=eta, generator=g_ref, return_dict=False)[0]
            x_ft = sched.step(out_ft, t, x_ft, eta=eta, generator=g_ft, return_dict=False)[0]
    with fnf_kernels.lora_scale(unet, 0.0):
        x_ref = run_steps(model, x_ref, timesteps[shared:], cond, uncond, guidance_scale=guidance_scale, eta=eta,
                          generator=g_ref, unet=unet)
    return x_ref, x_ft


def decode(model: DiffusionModel, latents: torch.Tensor) -> torch.Tensor:
    """VAE decode (with grad whenever grad is enabled) to float32 images in [0, 1], (B, 3, H, W).

    With ``model.vae_upcast`` (the VAE config's force_upcast with fp16 in play) the float32 VAE runs with
    autocast off: an fp16 decode of SD/SDXL VAEs overflows to NaN images."""
    vae = model.vae
    z = (latents.float() if model.vae_upcast else latents) / vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None)
    if shift:
        z = z + shift
    with torch.autocast(z.device.type, enabled=False) if model.vae_upcast else contextlib.nullcontext():
        x = vae.decode(z.to(vae.dtype), return_dict=False)[0]
    return (x.to(torch.promote_types(x.dtype, torch.float32)) / 2 + 0.5).clamp(0, 1)


@torch.no_grad()
def sample_images(model: DiffusionModel, x_T, cond, uncond, *, steps: int, guidance_scale: float,
                  eta: float = 0.0, seed: int | None = None, unet=None) -> torch.Tensor:
    """No-grad sample decoded to [0, 1] images (used for I0, `fnf localize` and `fnf sample`); ``unet``
    replaces model.unet in the denoising calls (e.g. a wrapper that records attention)."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    z = denoise(model, x_T, cond, uncond, steps=steps, guidance_scale=guidance_scale, eta=eta, generator=gen,
                unet=unet)
    return decode(model, z)
