"""DDIM sampling with truncated backpropagation (DRaFT-K, DRaFT-LV) and a differentiable VAE decode.

The stepping follows the diffusers pipelines exactly (same CFG formula, ``scheduler.step``, decode and
``x / 2 + 0.5`` post-processing), so a LoRA trained here reproduces its images through
``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` with ``pipe.load_lora_weights``.
"""
from __future__ import annotations

import torch

from .models import DiffusionModel, PromptEmbeds


def initial_latents(model: DiffusionModel, batch: int, height: int, width: int,
                    generator: torch.Generator, device) -> torch.Tensor:
    """x_T ~ N(0, I) * init_noise_sigma, drawn on CPU from ``generator`` (device independent)."""
    f = model.vae_scale_factor
    shape = (batch, model.unet.config.in_channels, height // f, width // f)
    x = torch.randn(shape, generator=generator, dtype=torch.float32)
    return (x * model.scheduler.init_noise_sigma).to(device)


def predict_noise(model: DiffusionModel, unet, x: torch.Tensor, t, cond: PromptEmbeds,
                  uncond: PromptEmbeds | None, guidance_scale: float) -> torch.Tensor:
    """One UNet call (both CFG halves batched together) and the guided model output, in float32."""
    cfg = uncond is not None and guidance_scale > 1.0
    emb = PromptEmbeds.cat(uncond, cond) if cfg else cond
    x_in = torch.cat([x, x]) if cfg else x
    x_in = model.scheduler.scale_model_input(x_in, t)
    dtype = model.unet.dtype
    kwargs = {}
    if emb.pooled is not None:
        kwargs["added_cond_kwargs"] = {"text_embeds": emb.pooled.to(dtype), "time_ids": emb.time_ids.to(dtype)}
    out = unet(x_in.to(dtype), t, encoder_hidden_states=emb.hidden.to(dtype), return_dict=False, **kwargs)[0]
    out = out.float()
    if cfg:
        out_uncond, out_cond = out.chunk(2)
        out = out_uncond + guidance_scale * (out_cond - out_uncond)
    return out


def denoise(model: DiffusionModel, x_T: torch.Tensor, cond: PromptEmbeds, uncond: PromptEmbeds | None, *,
            steps: int, guidance_scale: float, grad_steps: int = 0, lv_copies: int = 0, eta: float = 0.0,
            generator: torch.Generator | None = None, unet=None) -> torch.Tensor:
    """Run DDIM from x_T to clean latents.

    The first ``steps - grad_steps`` steps run under no_grad; the last ``grad_steps`` (DRaFT-K) carry
    gradient. ``grad_steps=0`` is a plain no-grad sample (the pretrained trajectory I0 uses it).
    ``lv_copies=n > 0`` is DRaFT-LV: all steps run without grad, then the final latents are re-noised to
    the last timestep n times and that step is redone with grad; the n results are stacked along the
    batch (copy-major: shape (n*B, ...)).
    """
    unet = unet if unet is not None else model.unet
    sched = model.scheduler
    sched.set_timesteps(steps, device=x_T.device)
    timesteps = sched.timesteps
    first_grad = len(timesteps) - (0 if lv_copies else grad_steps)
    x = x_T
    for i, t in enumerate(timesteps):
        with torch.set_grad_enabled(i >= first_grad and torch.is_grad_enabled()):
            if i == first_grad:
                x = x.detach()
            out = predict_noise(model, unet, x, t, cond, uncond, guidance_scale)
            x = sched.step(out, t, x, eta=eta, generator=generator, return_dict=False)[0]
    if lv_copies <= 0:
        return x
    x0 = x.detach()
    t_last = timesteps[-1]
    copies = []
    for _ in range(lv_copies):
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device) if generator is not None \
            else torch.randn_like(x0)
        x_t = sched.add_noise(x0, noise, t_last.reshape(1))
        out = predict_noise(model, unet, x_t, t_last, cond, uncond, guidance_scale)
        copies.append(sched.step(out, t_last, x_t, eta=eta, generator=generator, return_dict=False)[0])
    return torch.cat(copies)


def decode(model: DiffusionModel, latents: torch.Tensor) -> torch.Tensor:
    """VAE decode (with grad whenever grad is enabled) to float32 images in [0, 1], (B, 3, H, W)."""
    vae = model.vae
    z = latents / vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None)
    if shift:
        z = z + shift
    x = vae.decode(z.to(vae.dtype), return_dict=False)[0]
    return (x.float() / 2 + 0.5).clamp(0, 1)


@torch.no_grad()
def sample_images(model: DiffusionModel, x_T, cond, uncond, *, steps: int, guidance_scale: float,
                  eta: float = 0.0, seed: int | None = None) -> torch.Tensor:
    """No-grad sample decoded to [0, 1] images (used for I0, `fnf localize` and `fnf sample`)."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    z = denoise(model, x_T, cond, uncond, steps=steps, guidance_scale=guidance_scale, eta=eta, generator=gen)
    return decode(model, z)
