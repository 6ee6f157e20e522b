"""fnf.families.flow: the flow-matching Euler helpers against scheduler.step and a float64 reference."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fnf.families import flow

SEED = 1234


def _scheduler(**kw):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**kw)


def _velocity(x, t):
    """A fixed nonlinear 'model' so every step's output differs."""
    return torch.tanh(x * 0.7 + t / 1000.0) - 0.3 * x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("config, mu", [({"shift": 3.0}, None),
                                        ({"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15}, 0.8)])
def test_euler_trajectory_equals_scheduler_step_bitwise(config, mu, dtype):
    print("seed", SEED)
    g = torch.Generator().manual_seed(SEED)
    x_init = torch.randn(2, 4, 8, 8, generator=g).to(dtype)
    ref_sched, our_sched = _scheduler(**config), _scheduler(**config)
    kwargs = {} if mu is None else {"mu": mu}
    ref_sched.set_timesteps(6, **kwargs)
    timesteps, sigmas = flow.flow_schedule(our_sched, 6, "cpu", mu=mu)
    assert torch.equal(timesteps, ref_sched.timesteps) and torch.equal(sigmas, ref_sched.sigmas)
    x_ref, x_ours = x_init.clone(), x_init.clone()
    for i, t in enumerate(ref_sched.timesteps):
        x_ref = ref_sched.step(_velocity(x_ref, t), t, x_ref, return_dict=False)[0]
        x_ours = flow.euler_step(sigmas, _velocity(x_ours, t), i, x_ours)
        assert x_ours.dtype == x_ref.dtype == dtype
        assert torch.equal(x_ours, x_ref), f"step {i}"
    assert our_sched.step_index is None and not hasattr(our_sched, "num_inference_steps")  # the scheduler is untouched


def test_euler_step_against_float64_ode_step():
    print("seed", SEED)
    sched = _scheduler(shift=3.0)
    _, sigmas = flow.flow_schedule(sched, 5, "cpu")
    # independent sigmas: shift * s / (1 + (shift - 1) s) on linspace(1, sigma_min, 5), then a final 0, where
    # diffusers' sigma_min is the training schedule's last sigma, itself already shifted
    def shifted(s):
        return 3.0 * s / (1 + 2.0 * s)

    s = np.linspace(1.0, shifted(1.0 / 1000), 5)
    sig = np.concatenate([shifted(s), [0.0]])
    np.testing.assert_allclose(sigmas.double().numpy(), sig, rtol=1e-6, atol=1e-7)
    g = torch.Generator().manual_seed(SEED)
    x = torch.randn(3, 4, 6, 6, generator=g, dtype=torch.float64)
    v = torch.randn(3, 4, 6, 6, generator=g, dtype=torch.float64)
    for i in range(5):
        ours = flow.euler_step(sigmas, v.float(), i, x.float()).double()
        ref = x + (sig[i + 1] - sig[i]) * v
        # float32 rounding of x, v, dt and one fused multiply-add: a few ulps of |x| + |v|
        torch.testing.assert_close(ours, ref, rtol=0, atol=4e-6 * float((x.abs() + v.abs()).max()))


def test_float64_step_stays_float64():
    sched = _scheduler(shift=1.0)
    _, sigmas = flow.flow_schedule(sched, 4)
    x = torch.randn(1, 2, 3, 3, dtype=torch.float64)
    v = torch.randn(1, 2, 3, 3, dtype=torch.float64)
    assert flow.euler_step(sigmas, v, 0, x).dtype == torch.float64


def test_renoise_is_the_flow_path_and_scale_noise():
    print("seed", SEED)
    sched = _scheduler(shift=3.0)
    timesteps, sigmas = flow.flow_schedule(sched, 8)
    g = torch.Generator().manual_seed(SEED)
    x0, noise = torch.randn(2, 4, 5, 5, generator=g), torch.randn(2, 4, 5, 5, generator=g)
    for i in (0, 3, 7):
        sigma = flow.sigma_at(sigmas, i)
        ours = flow.renoise(sigmas, x0, noise, i)
        torch.testing.assert_close(ours, sigma * noise + (1 - sigma) * x0, rtol=0, atol=1e-6)
        ref = _scheduler(shift=3.0)
        ref.set_timesteps(8)
        ref.set_begin_index(i)
        assert torch.equal(ours, ref.scale_noise(x0, timesteps[i:i + 1].expand(2), noise))
    assert torch.equal(flow.renoise(sigmas, x0, noise, 8), x0)  # the terminal sigma 0


def test_calculate_shift_matches_the_pipelines():
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift as flux_shift
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift as sd3_shift

    for seq in (256, 1024, 4096, 777):
        assert flow.calculate_shift(seq) == flux_shift(seq) == sd3_shift(seq)
        assert flow.calculate_shift(seq, 256, 4096, 0.5, 1.16) == sd3_shift(seq, 256, 4096, 0.5, 1.16)
    assert flow.calculate_shift(256) == pytest.approx(0.5) and flow.calculate_shift(4096) == pytest.approx(1.15)
    sched = _scheduler(use_dynamic_shifting=True, base_shift=0.4, max_shift=1.2)
    assert flow.shift_mu(sched, 1000) == flux_shift(1000, 256, 4096, 0.4, 1.2)


def test_custom_sigmas_as_flux_pipeline_passes_them():
    sigmas = np.linspace(1.0, 1 / 4, 4)
    ours, ref = _scheduler(use_dynamic_shifting=True), _scheduler(use_dynamic_shifting=True)
    ts, levels = flow.flow_schedule(ours, None, "cpu", mu=0.9, sigmas=sigmas)
    ref.set_timesteps(sigmas=sigmas, device="cpu", mu=0.9)
    assert torch.equal(ts, ref.timesteps) and torch.equal(levels, ref.sigmas) and len(ts) == 4


def test_clear_errors():
    sched = _scheduler(use_dynamic_shifting=True)
    with pytest.raises(ValueError, match="mu"):
        flow.flow_schedule(sched, 4)
    with pytest.raises(ValueError, match="steps"):
        flow.flow_schedule(_scheduler(), 0)
    with pytest.raises(ValueError, match="sigmas"):
        flow.flow_schedule(_scheduler(), 3, sigmas=[1.0, 0.5])
    with pytest.raises(TypeError, match="scheduler"):
        flow.flow_schedule(object(), 4)
    _, s = flow.flow_schedule(_scheduler(), 3)
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="i: expected a step index"):
        flow.euler_step(s, x, 3, x)
    with pytest.raises(ValueError, match="noise"):
        flow.renoise(s, x, torch.zeros(2, 2), 0)
