"""Flow-matching Euler helpers shared by the SD3 and FLUX families.

:func:`flow_schedule` computes a schedule's sigmas from the folder's ``FlowMatchEulerDiscreteScheduler`` (its
``set_timesteps`` on a copy); the step and re-noise are pure functions of those sigmas: step ``i`` goes from
``sigmas[i]`` to ``sigmas[i + 1]``, so a trajectory can be split into a no-grad and a grad part or resumed at any
``i``.
The arithmetic is the scheduler's own (``scheduler.step``'s float32 upcast and cast back), so a loop over
:func:`euler_step` reproduces the pipeline's latents bit for bit.
"""
from __future__ import annotations

import copy

import torch


def calculate_shift(image_seq_len, base_seq_len: int = 256, max_seq_len: int = 4096,
                    base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """mu for resolution-dependent shifting, the line through (base_seq_len, base_shift), (max_seq_len, max_shift)
    (diffusers' SD3 / FLUX pipelines' ``calculate_shift``)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


def shift_mu(scheduler, image_seq_len: int, *, default_max_shift: float = 1.15) -> float:
    """:func:`calculate_shift` with the scheduler config's values, as the pipelines read them (SD3's pipeline
    defaults ``max_shift`` to 1.16, FLUX's to 1.15 -- pass the pipeline's as ``default_max_shift``)."""
    cfg = scheduler.config
    return calculate_shift(image_seq_len, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                           cfg.get("base_shift", 0.5), cfg.get("max_shift", default_max_shift))


def _check_flow_scheduler(scheduler) -> None:
    if not (hasattr(scheduler, "sigmas") and hasattr(scheduler, "set_timesteps") and hasattr(scheduler, "config")):
        raise TypeError(f"scheduler: expected a FlowMatchEulerDiscreteScheduler, got {type(scheduler).__name__}")


def flow_schedule(scheduler, steps: int | None, device=None, *, mu: float | None = None,
                  sigmas=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(timesteps, sigmas) as the pipelines' ``retrieve_timesteps`` computes them (``set_timesteps`` on a shallow
    copy: ``scheduler`` itself is left as it is); ``sigmas`` has T + 1 entries, the last 0.

    ``sigmas``: custom sigmas (FluxPipeline passes ``linspace(1, 1/steps, steps)``), then ``steps`` may be None
    and the schedule has ``len(sigmas)`` steps; ``mu``: the dynamic-shifting exponent (:func:`shift_mu`),
    required when the config has ``use_dynamic_shifting``.
    """
    _check_flow_scheduler(scheduler)
    if sigmas is None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps: expected a positive int, got {steps!r}")
    if sigmas is not None and steps is not None and len(sigmas) != steps:
        raise ValueError(f"sigmas: expected {steps} values (steps), got {len(sigmas)}")
    if scheduler.config.get("use_dynamic_shifting", False) and mu is None:
        raise ValueError("mu: required by a scheduler with use_dynamic_shifting (see flow.shift_mu)")
    kwargs = {} if mu is None else {"mu": mu}
    work = copy.copy(scheduler)
    if sigmas is not None:
        work.set_timesteps(sigmas=sigmas, device=device, **kwargs)
    else:
        work.set_timesteps(steps, device=device, **kwargs)
    return work.timesteps, work.sigmas


def _sigma_pair(sigmas: torch.Tensor, i: int):
    n = len(sigmas) - 1
    if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n:
        raise ValueError(f"i: expected a step index in [0, {n}), got {i!r}")
    return sigmas[i], sigmas[i + 1]


def euler_step(sigmas: torch.Tensor, out: torch.Tensor, i: int, x: torch.Tensor, *, stochastic: bool = False,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """x at ``sigmas[i]`` -> x at ``sigmas[i + 1]`` given the velocity ``out``, exactly as the scheduler's
    ``step``: ``x`` upcast to float32, ``x + (sigma_{i+1} - sigma_i) * out``, cast to ``out``'s dtype.
    ``stochastic`` (the config's ``stochastic_sampling``) re-noises the predicted x0 to ``sigma_{i+1}`` with
    noise from ``generator``."""
    sigma, sigma_next = _sigma_pair(sigmas, i)
    sample = x.to(torch.float32)
    if stochastic:
        from diffusers.utils.torch_utils import randn_tensor

        x0 = sample - sigma * out
        noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
        prev = (1.0 - sigma_next) * x0 + sigma_next * noise
    else:
        prev = sample + (sigma_next - sigma) * out
    return prev.to(out.dtype)


def sde_mean_std(sigmas: torch.Tensor, out: torch.Tensor, i: int, x: torch.Tensor, noise_level: float):
    """Step ``i`` of the flow SDE that Flow-GRPO samples with (Liu et al. 2025, arXiv 2505.05470), as the Gaussian
    N(mean, std^2) of x at ``sigmas[i + 1]`` given x at ``sigmas[i]`` and the velocity ``out``:

    ``s = a * sqrt(sigma / (1 - sigma))`` (``1 - sigmas[1]`` in the denominator at sigma = 1), ``dt = sigma_next -
    sigma`` (< 0), ``mean = x * (1 + s^2 dt / (2 sigma)) + out * (1 + s^2 (1 - sigma) / (2 sigma)) * dt``,
    ``std = s * sqrt(-dt)``. With ``a = 0`` the mean is the Euler step. In float32 (float64 stays float64);
    ``std`` is a 0-dim tensor."""
    sigma, sigma_next = _sigma_pair(sigmas, i)
    wide = torch.promote_types(out.dtype, torch.float32)
    sigma = sigma.to(device=out.device, dtype=wide)
    sigma_next = sigma_next.to(device=out.device, dtype=wide)
    sigma_max = sigmas[1].to(device=out.device, dtype=wide) if len(sigmas) > 1 else sigma_next
    x, out = x.to(wide), out.to(wide)
    dt = sigma_next - sigma
    s = torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_max, sigma))) * noise_level
    mean = x * (1 + s ** 2 / (2 * sigma) * dt) + out * (1 + s ** 2 * (1 - sigma) / (2 * sigma)) * dt
    return mean, s * torch.sqrt(-dt)


def renoise(sigmas: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, i: int) -> torch.Tensor:
    """DRaFT-LV along the flow path: ``sigma_i * noise + (1 - sigma_i) * x0`` (the scheduler's ``scale_noise``
    at step i, sigma in ``x0``'s dtype)."""
    if noise.shape != x0.shape:
        raise ValueError(f"noise: expected shape {tuple(x0.shape)} (x0's), got {tuple(noise.shape)}")
    n = len(sigmas)
    if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n:
        raise ValueError(f"i: expected a sigma index in [0, {n}), got {i!r}")
    sigma = sigmas.to(device=x0.device, dtype=x0.dtype)[i]
    return sigma * noise + (1.0 - sigma) * x0


def sigma_at(sigmas: torch.Tensor, i: int) -> float:
    """The noise level of step ``i`` (``sigmas[i]``; ``i == steps`` is the final 0)."""
    return float(sigmas[i])
