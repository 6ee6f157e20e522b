"""Stochastic sampling with per-step log-probabilities (policy-gradient objectives: GRPO, DDPO), written once over
the model family (``family.predict`` / ``family.sde_step``, fnf/families/).

Each step of the stochastic sampler is a Gaussian N(mean, std^2) of the next latents given the current ones: for the
UNet families stochastic DDIM (eta > 0, ``DDIMScheduler.step``'s mean and std), for the flow families the SDE that
Flow-GRPO samples with (noise level a; ``fnf.families.flow.sde_mean_std``). ``log_prob`` is that Gaussian's
log-density averaged over the latent elements (as DDPO and Flow-GRPO average it).

Every sample draws its x_T and then its per-step noise from its own generator, seeded by the sample's seed
(:func:`sample_generators`): a second trajectory from the same seeds (the frozen model's, adapters off) sees the
same initial noise and the same per-step noise, so I0 is fixed per (prompt, seed).

* :func:`sde_sample`: a whole trajectory under the caller's grad mode (normally no_grad), keeping (x_i, x_{i+1},
  log p_i) at the steps asked for;
* :func:`step_log_prob`: one recorded step's log-probability under the current denoiser (with grad when enabled).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .core import DiffusionModel, PromptEmbeds
from .families.base import Schedule, gaussian_log_prob

__all__ = ["Trajectory", "gaussian_log_prob", "noise_level_of", "sample_generators", "sde_sample", "step_log_prob",
           "step_noise"]


def noise_level_of(model: DiffusionModel, noise_level: float) -> float:
    """``noise_level``, or the family's default when it is 0 (DDIM eta 1.0; flow SDE a = 0.7)."""
    return float(noise_level) if noise_level > 0 else float(model.family.sde_noise_level)


def sample_generators(seeds) -> list[torch.Generator]:
    """One CPU generator per sample, seeded by its seed."""
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def step_noise(generators: list[torch.Generator], like: torch.Tensor) -> torch.Tensor:
    """One standard-normal row per generator, shaped like ``like``'s rows (float32, drawn on the CPU)."""
    if len(generators) != like.shape[0]:
        raise ValueError(f"generators: expected one per row ({like.shape[0]}), got {len(generators)}")
    return torch.stack([torch.randn(like.shape[1:], generator=g, dtype=torch.float32) for g in generators])


def initial_noise(model: DiffusionModel, generators: list[torch.Generator], height: int, width: int,
                  device) -> torch.Tensor:
    """x_T of each sample from its generator (the family's ``initial_latents`` with batch 1 per row)."""
    return torch.cat([model.family.initial_latents(model, 1, height, width, g, device) for g in generators])


@dataclass
class Trajectory:
    """A sampled trajectory: the final latents, the log-probability of every step (T, B), and (x_i, x_{i+1}) at
    the kept steps."""

    final: torch.Tensor
    log_probs: torch.Tensor
    states: dict = field(default_factory=dict)   # i -> (x_i, x_{i+1})


def sde_sample(model: DiffusionModel, schedule: Schedule, cond: PromptEmbeds, uncond: PromptEmbeds | None, *,
               generators: list[torch.Generator], guidance_scale: float, noise_level: float, keep=(),
               denoiser=None, device=None) -> Trajectory:
    """Sample x_T and every step from ``generators`` (one per sample, consumed in order: x_T, then one noise
    draw per step), in the caller's grad mode; ``keep``: the steps whose (x_i, x_{i+1}) are returned."""
    family = model.family
    denoiser = denoiser if denoiser is not None else model.denoiser
    device = device if device is not None else model.denoiser.device
    x = initial_noise(model, generators, schedule.height, schedule.width, device)
    keep = set(keep)
    log_probs, states = [], {}
    for i in range(len(schedule)):
        out = family.predict(model, denoiser, x, schedule.timesteps[i], cond, uncond, guidance_scale, schedule)
        x_next, lp, _, _ = family.sde_step(model, schedule, i, out, x, noise_level=noise_level,
                                           noise=step_noise(generators, x))
        if i in keep:
            states[i] = (x, x_next)
        log_probs.append(lp)
        x = x_next
    return Trajectory(x, torch.stack(log_probs), states)


def step_log_prob(model: DiffusionModel, schedule: Schedule, i: int, x: torch.Tensor, x_next: torch.Tensor,
                  cond: PromptEmbeds, uncond: PromptEmbeds | None, *, guidance_scale: float, noise_level: float,
                  denoiser=None):
    """``(log_prob, mean, std)`` of the recorded step x -> x_next under ``denoiser`` (default model.denoiser), in
    the caller's grad mode."""
    family = model.family
    denoiser = denoiser if denoiser is not None else model.denoiser
    out = family.predict(model, denoiser, x, schedule.timesteps[i], cond, uncond, guidance_scale, schedule)
    _, lp, mean, std = family.sde_step(model, schedule, i, out, x, noise_level=noise_level, prev=x_next)
    return lp, mean, std
