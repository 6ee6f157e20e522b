"""Flow-matching Euler helpers shared by the SD3 and FLUX families.

Pure functions over a diffusers ``FlowMatchEulerDiscreteScheduler`` configured by :func:`flow_schedule`
(its ``set_timesteps``): step ``i`` goes from ``sigmas[i]`` to ``sigmas[i + 1]`` and never reads or moves the
scheduler's step counter, so a trajectory can be split into a no-grad and a grad part or resumed at any ``i``.
The arithmetic is the scheduler's own (``scheduler.step``'s float32 upcast and cast back), so a loop over
:func:`euler_step` reproduces the pipeline's latents bit for bit.
"""
from __future__ import annotations

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
                  sigmas=None) -> torch.Tensor:
    """Configure ``scheduler`` as the pipelines' ``retrieve_timesteps`` does and return its timesteps.

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
    if sigmas is not None:
        scheduler.set_timesteps(sigmas=sigmas, device=device, **kwargs)
    else:
        scheduler.set_timesteps(steps, device=device, **kwargs)
    return scheduler.timesteps


def _sigma_pair(scheduler, i: int):
    n = len(scheduler.sigmas) - 1
    if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n:
        raise ValueError(f"i: expected a step index in [0, {n}), got {i!r}")
    return scheduler.sigmas[i], scheduler.sigmas[i + 1]


def euler_step(scheduler, out: torch.Tensor, i: int, x: torch.Tensor, *,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """x at ``sigmas[i]`` -> x at ``sigmas[i + 1]`` given the velocity ``out``, exactly as ``scheduler.step``:
    ``x`` upcast to float32, ``x + (sigma_{i+1} - sigma_i) * out``, cast to ``out``'s dtype. A config with
    ``stochastic_sampling`` re-noises the predicted x0 to ``sigma_{i+1}`` with noise from ``generator``."""
    _check_flow_scheduler(scheduler)
    sigma, sigma_next = _sigma_pair(scheduler, i)
    sample = x.to(torch.float32)
    if scheduler.config.get("stochastic_sampling", False):
        from diffusers.utils.torch_utils import randn_tensor

        x0 = sample - sigma * out
        noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
        prev = (1.0 - sigma_next) * x0 + sigma_next * noise
    else:
        prev = sample + (sigma_next - sigma) * out
    return prev.to(out.dtype)


def renoise(scheduler, x0: torch.Tensor, noise: torch.Tensor, i: int) -> torch.Tensor:
    """DRaFT-LV along the flow path: ``sigma_i * noise + (1 - sigma_i) * x0`` (the scheduler's ``scale_noise``
    at step i, sigma in ``x0``'s dtype)."""
    _check_flow_scheduler(scheduler)
    if noise.shape != x0.shape:
        raise ValueError(f"noise: expected shape {tuple(x0.shape)} (x0's), got {tuple(noise.shape)}")
    n = len(scheduler.sigmas)
    if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n:
        raise ValueError(f"i: expected a sigma index in [0, {n}), got {i!r}")
    sigma = scheduler.sigmas.to(device=x0.device, dtype=x0.dtype)[i]
    return sigma * noise + (1.0 - sigma) * x0


def sigma_at(scheduler, i: int) -> float:
    """The noise level of step ``i`` (``sigmas[i]``; ``i == steps`` is the final 0)."""
    return float(scheduler.sigmas[i])
