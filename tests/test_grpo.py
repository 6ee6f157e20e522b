"""GRPO's pieces: the stochastic samplers' per-step Gaussians and log-probabilities against independent float64
computations (stochastic DDIM against DDIMScheduler.step itself, the flow SDE in the paper's form), sampling
through the family (recorded log-probs, same seeds -> same noise), group advantages, the clipped loss, the trained
step subsets, and the config's errors."""
import math
import os
import sys
import types

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fnf_tiny_models import IMAGE_SIZE, cached_model, one_torch_thread, tiny_config  # noqa: E402,F401
from fnf.config import ConfigError, grpo_layout  # noqa: E402
from fnf.families import flow  # noqa: E402
from fnf.families.base import FlowMatchingEuler, Schedule  # noqa: E402
from fnf.families.unet import SD  # noqa: E402
from fnf.objectives.grpo import group_advantages, policy_loss, trained_steps  # noqa: E402

SEED = 2028


class _Model:
    """What sde_step reads of a model: the scheduler."""

    def __init__(self, scheduler):
        self.scheduler = scheduler


def _ddim_scheduler(**kw):
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         steps_offset=1, **{"set_alpha_to_one": False, **kw})


def _normal_log_prob64(value, mean, std):
    """The mean over elements of log N(value; mean, std^2), in float64 by torch.distributions."""
    lp = torch.distributions.Normal(mean.double(), torch.as_tensor(std, dtype=torch.float64)).log_prob(value.double())
    return lp.mean(dim=tuple(range(1, lp.dim())))


# ------------------------------------------------------------------------------------------ stochastic DDIM
@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_ddim_sde_step_is_ddim_scheduler_step_and_its_log_prob_is_the_float64_gaussian(eta):
    """x_next with noise from a generator equals DDIMScheduler.step(eta=, generator=) on the same generator; mean and
    std recomputed by hand in float64 from alphas_cumprod (DDIM eq. 12/16) give the same log-probability."""
    print("seed", SEED)
    steps = 4
    sched, ref = _ddim_scheduler(), _ddim_scheduler()
    ref.set_timesteps(steps)
    plan = Schedule(ref.timesteps, IMAGE_SIZE, IMAGE_SIZE)
    g = torch.Generator().manual_seed(SEED)
    for i, t in enumerate(ref.timesteps):
        x = torch.randn(2, 4, 8, 8, generator=g)
        eps = torch.randn(2, 4, 8, 8, generator=g)
        seed = SEED + i
        ours, lp, mean, std = SD.sde_step(_Model(sched), plan, i, eps, x, noise_level=eta,
                                          generator=torch.Generator().manual_seed(seed))
        theirs = ref.step(eps, t, x, eta=eta, generator=torch.Generator().manual_seed(seed)).prev_sample
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
        # float64 by hand
        a_t = sched.alphas_cumprod[t].double()
        prev_t = int(t) - sched.config.num_train_timesteps // steps
        a_prev = sched.alphas_cumprod[prev_t].double() if prev_t >= 0 else sched.final_alpha_cumprod.double()
        x0 = (x.double() - (1 - a_t).sqrt() * eps.double()) / a_t.sqrt()
        var = eta ** 2 * (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
        mean64 = a_prev.sqrt() * x0 + (1 - a_prev - var).sqrt() * eps.double()
        torch.testing.assert_close(mean.double(), mean64, rtol=0, atol=1e-5)
        # float32's 1 - a_t / a_prev cancels: a few 1e-6 relative in std, so ~1e-5 in the log-prob
        torch.testing.assert_close(std.double(), var.sqrt(), rtol=2e-5, atol=0)
        torch.testing.assert_close(lp.double(), _normal_log_prob64(ours, mean64, var.sqrt()), rtol=0, atol=5e-5)
        # the recorded-step path gives the same log-prob; a wrong x_next a lower one
        again = SD.sde_step(_Model(sched), plan, i, eps, x, noise_level=eta, prev=ours)[1]
        torch.testing.assert_close(again, lp, rtol=0, atol=0)
        worse = SD.sde_step(_Model(sched), plan, i, eps, x, noise_level=eta, prev=ours + 3 * std)[1]
        assert (worse < lp - 1).all()


def test_ddim_sde_step_at_a_zero_variance_step_is_deterministic_with_log_prob_zero():
    """set_alpha_to_one: the last step's variance is 0; its log-prob is 0, not NaN (it carries no policy)."""
    sched = _ddim_scheduler(set_alpha_to_one=True)
    work = _ddim_scheduler(set_alpha_to_one=True)
    work.set_timesteps(4)
    plan = Schedule(work.timesteps, IMAGE_SIZE, IMAGE_SIZE)
    x, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    x_next, lp, mean, std = SD.sde_step(_Model(sched), plan, 3, eps, x, noise_level=1.0,
                                        generator=torch.Generator().manual_seed(0))
    assert float(std) == 0 and torch.equal(x_next, mean) and torch.equal(lp, torch.zeros(2))


# ------------------------------------------------------------------------------------------ the flow SDE
@pytest.mark.parametrize("a", [0.7, 0.3])
def test_flow_sde_step_log_prob_against_the_papers_sde_in_float64(a):
    """Flow-GRPO's Euler-Maruyama step of dx = [v + s_t^2 / (2t) (x + (1 - t) v)] dt + s_t dw,
    s_t = a sqrt(t / (1 - t)) (t = sigma; sigmas[1] in place of sigma = 1), written in that form in float64."""
    print("seed", SEED)
    from diffusers import FlowMatchEulerDiscreteScheduler

    timesteps, sigmas = flow.flow_schedule(FlowMatchEulerDiscreteScheduler(shift=3.0), 5, "cpu")
    plan = Schedule(timesteps, IMAGE_SIZE, IMAGE_SIZE, sigmas)
    fam = FlowMatchingEuler()
    g = torch.Generator().manual_seed(SEED)
    s64 = sigmas.double()
    for i in range(len(plan)):
        x, v = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
        ours, lp, mean, std = fam.sde_step(None, plan, i, v, x, noise_level=a, generator=g)
        t, t_next = s64[i], s64[i + 1]
        st = a * math.sqrt(t / (1 - (s64[1] if t == 1 else t)))
        dt = t_next - t
        x64, v64 = x.double(), v.double()
        mean64 = x64 + (v64 + st ** 2 / (2 * t) * (x64 + (1 - t) * v64)) * dt
        std64 = st * math.sqrt(-dt)
        torch.testing.assert_close(mean.double(), mean64, rtol=0, atol=2e-6)
        assert abs(float(std) - std64) < 1e-6 * std64
        torch.testing.assert_close(lp.double(), _normal_log_prob64(ours, mean64, std64), rtol=1e-5, atol=1e-5)
        again = fam.sde_step(None, plan, i, v, x, noise_level=a, prev=ours)[1]
        torch.testing.assert_close(again, lp, rtol=0, atol=0)


def test_flow_sde_step_without_noise_is_the_euler_step():
    from diffusers import FlowMatchEulerDiscreteScheduler

    timesteps, sigmas = flow.flow_schedule(FlowMatchEulerDiscreteScheduler(shift=3.0), 4, "cpu")
    plan = Schedule(timesteps, IMAGE_SIZE, IMAGE_SIZE, sigmas)
    x, v = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    for i in range(4):
        mean = FlowMatchingEuler().sde_step(None, plan, i, v, x, noise_level=0.0, noise=torch.zeros_like(x))[2]
        torch.testing.assert_close(mean, flow.euler_step(sigmas, v, i, x), rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------ sampling over the family
def test_sde_sample_records_its_log_probs_and_the_same_seeds_give_the_same_noise(tmp_path_factory):
    """The log-probs recorded while sampling equal step_log_prob on the kept (x_i, x_{i+1}); the same seeds give
    the same trajectory; different seeds a different one."""
    from fnf.encoding import encode_prompts
    from fnf.families.registry import load_model
    from fnf.policy import sample_generators, sde_sample, step_log_prob
    from fnf.sampling import schedule

    model = load_model(cached_model("sd", str(tmp_path_factory.getbasetemp())), weight_dtype="fp32", device="cpu")
    plan = schedule(model, 4, IMAGE_SIZE, IMAGE_SIZE, "cpu")
    cond = encode_prompts(model, ["a red car", "a photo of a cat"], height=IMAGE_SIZE, width=IMAGE_SIZE)
    uncond = encode_prompts(model, ["", ""], height=IMAGE_SIZE, width=IMAGE_SIZE)
    kw = dict(guidance_scale=3.0, noise_level=1.0)
    with torch.no_grad():
        a = sde_sample(model, plan, cond, uncond, generators=sample_generators([5, 6]), keep=[0, 2], **kw)
        b = sde_sample(model, plan, cond, uncond, generators=sample_generators([5, 6]), **kw)
        c = sde_sample(model, plan, cond, uncond, generators=sample_generators([5, 7]), **kw)
        for i in (0, 2):
            lp = step_log_prob(model, plan, i, *a.states[i], cond, uncond, **kw)[0]
            torch.testing.assert_close(lp, a.log_probs[i], rtol=0, atol=1e-6)
    assert torch.equal(a.final, b.final) and torch.equal(a.log_probs, b.log_probs)
    assert torch.equal(a.final[0], c.final[0]) and not torch.allclose(a.final[1], c.final[1])
    assert a.log_probs.shape == (4, 2) and torch.isfinite(a.log_probs).all()


# ------------------------------------------------------------------------------------------ the loss pieces
def test_group_advantages_normalise_within_each_group():
    r = torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0, 13.0])
    adv = group_advantages(r, 3, 1e-4)
    want = torch.cat([(g - g.mean()) / (g.std(unbiased=False) + 1e-4) for g in (r[:3].double(), r[3:].double())])
    torch.testing.assert_close(adv, want)
    assert abs(float(adv[:3].sum())) < 1e-6 and abs(float(adv[3:].sum())) < 1e-6
    with pytest.raises(ValueError, match="rewards"):
        group_advantages(r, 4, 1e-4)


def test_policy_loss_clips_the_ratio_only_against_the_advantage():
    old = torch.zeros(4)
    new = torch.log(torch.tensor([1.5, 1.5, 0.5, 0.5]))
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    loss, ratio = policy_loss(new, old, adv, clip_range=0.2, adv_clip_max=5.0)
    # A > 0: the gain stops at 1.2; A < 0 with rho > 1: the full (worse) -A rho; A > 0 with rho < 1: -A rho;
    # A < 0 with rho < 1: stops at 0.8
    torch.testing.assert_close(loss, torch.tensor([-1.2, 1.5, -0.5, 0.8]))
    torch.testing.assert_close(ratio, torch.tensor([1.5, 1.5, 0.5, 0.5]))
    clipped, _ = policy_loss(old, old, torch.tensor([9.0, -9.0, 0.0, 1.0]), clip_range=0.2, adv_clip_max=5.0)
    torch.testing.assert_close(clipped, torch.tensor([-5.0, 5.0, 0.0, -1.0]))


def test_trained_steps_all_window_random():
    g = torch.Generator().manual_seed(0)
    assert trained_steps("all", 0, 5, 3, 1, g) == [0, 1, 2, 3, 4]
    assert [trained_steps("window", 2, 5, r, 1, g) for r in range(5)] == [[0, 1], [1, 2], [2, 3], [3, 4], [0, 1]]
    assert trained_steps("window", 2, 5, 1, 3, g) == [3, 4]
    picks = trained_steps("random", 3, 10, 0, 1, g)
    assert len(set(picks)) == 3 and picks == sorted(picks) and all(0 <= p < 10 for p in picks)


# ------------------------------------------------------------------------------------------ config
def _grpo(tmp_path, **sections):
    grpo = {"group_size": 4, **sections.pop("grpo", {})}
    return tiny_config("/models/sd", str(tmp_path), objective={"name": "grpo"}, grpo=grpo, **sections)


def test_layout_counts_micro_batches_and_optimizer_steps(tmp_path):
    cfg = _grpo(tmp_path, grpo={"prompts_per_rollout": 2, "inner_epochs": 2, "steps": "window", "train_steps": 3},
                train={"batch_size": 4, "grad_accum": 3})
    assert grpo_layout(cfg) == {"samples": 8, "trained_steps": 3, "micro_batches": 12, "optimizer_steps": 4}


@pytest.mark.parametrize("sections, key", [
    ({"grpo": {"group_size": 1}}, "grpo.group_size"),
    ({"grpo": {"clip_range": 0}}, "grpo.clip_range"),
    ({"grpo": {"kl_beta": -1}}, "grpo.kl_beta"),
    ({"grpo": {"region_kl_beta": -0.5}}, "grpo.region_kl_beta"),
    ({"grpo": {"region_kl_beta": 1.0}, "localize": {"spec": "none"}}, "grpo.region_kl_beta"),
    ({"grpo": {"noise_level": float("nan")}}, "grpo.noise_level"),
    ({"grpo": {"steps": "last"}}, "grpo.steps"),
    ({"grpo": {"steps": "window"}}, "grpo.train_steps"),
    ({"grpo": {"steps": "random", "train_steps": 9}}, "grpo.train_steps"),
    ({"grpo": {"train_steps": 2}}, "grpo.train_steps"),
    ({"train": {"batch_size": 3}}, "train.batch_size"),
    ({"train": {"grad_accum": 3}}, "train.grad_accum"),
    ({"train": {"seeds_per_prompt": 2}}, "train.seeds_per_prompt"),
    ({"train": {"pool_reward_below": 0.5}}, "train.pool_reward_below"),
    ({"sampling": {"lv_copies": 2, "truncation_k": 1}}, "sampling.lv_copies"),
])
def test_bad_grpo_config_is_one_clear_config_error(tmp_path, sections, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        _grpo(tmp_path, **sections)


def test_unknown_grpo_key_names_the_section(tmp_path):
    with pytest.raises(ConfigError, match="section 'grpo' has group_size"):
        _grpo(tmp_path, grpo={"groups": 2})


# ------------------------------------------------------------------------------------------ estimate-memory
def _estimate_config(sd, out):
    return tiny_config(sd, out, model={"weight_dtype": "fp32"}, objective={"name": "grpo"},
                       grpo={"group_size": 2, "kl_beta": 0.1}, sampling={"steps": 7},
                       memory={"mixed_precision": "no"}, train={"batch_size": 2})


@pytest.fixture(scope="module")
def grpo_estimate(tmp_path_factory):
    from fnf.memory.estimate import estimate

    sd = cached_model("sd", str(tmp_path_factory.getbasetemp()))
    return estimate(_estimate_config(sd, str(tmp_path_factory.mktemp("est"))), model_dir=sd, fake=True)


def test_estimate_memory_grpo_mode(grpo_estimate):
    """The estimator traces GRPO's own step (rollout, I0, one denoiser step's backward, the frozen forward for KL);
    trained steps beyond the traced T add their kept latents (2 x samples x one latent each, counted by hand)."""
    from fnf.memory.counter import rounded

    est = grpo_estimate
    assert {"rollout sampling", "I0 sampling", "denoiser (grad step)", "frozen model (KL)", "backward"} <= set(
        est.phases)
    latent = rounded(2 * 4 * (IMAGE_SIZE // 2) ** 2 * 4)          # 2 samples x (4, 16, 16) float32
    assert est.grpo_states == {"per_step_bytes": 2 * latent, "steps": 4}   # traced T = K + 2 = 4
    assert est.held_at_peak["GRPO rollout latents (configured T)"] == (7 - 4) * 2 * latent
    assert est.settings["method"].startswith("GRPO: 2 samples per rollout") and "7 of 7 steps" in \
        est.settings["method"]
    assert est.settings["sampler"] == "stochastic DDIM steps (eta 1)"


@pytest.mark.slow
def test_estimate_memory_grpo_fake_trace_equals_the_real_tensor_counter(grpo_estimate, tmp_path_factory, tmp_path):
    from fnf.memory.estimate import estimate

    sd = cached_model("sd", str(tmp_path_factory.getbasetemp()))
    real = estimate(_estimate_config(sd, str(tmp_path)), model_dir=sd, fake=False)
    assert grpo_estimate.peak_bytes == real.peak_bytes > 0 and grpo_estimate.held_at_peak == real.held_at_peak


# ------------------------------------------------------------------------------------------ every family
def _all_families():
    from fnf.families.registry import FAMILY_MODULES

    return [f for mod in FAMILY_MODULES for f in mod.FAMILIES]


@pytest.mark.parametrize("family", _all_families(), ids=lambda f: f.name)
def test_every_family_has_an_sde_step_whose_noiseless_mean_is_its_sampler_step(family):
    """Every registered family (the flow ones through FlowMatchingEuler) samples GRPO's Gaussian: at noise 0 its
    mean is the family's own deterministic step; at its default noise the log-prob of a recorded step is the float64
    Gaussian of (mean, std)."""
    print("seed", SEED)
    from diffusers import FlowMatchEulerDiscreteScheduler

    flowing = isinstance(family, FlowMatchingEuler)
    if flowing:
        sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
        timesteps, sigmas = flow.flow_schedule(sched, 4, "cpu")
        plan = Schedule(timesteps, IMAGE_SIZE, IMAGE_SIZE, sigmas)
    else:
        sched = _ddim_scheduler()
        work = _ddim_scheduler()
        work.set_timesteps(4)
        plan = Schedule(work.timesteps, IMAGE_SIZE, IMAGE_SIZE)
    model = _Model(sched)
    g = torch.Generator().manual_seed(SEED)
    assert family.sde_noise_level == (0.7 if flowing else 1.0)
    for i in range(4):
        x, out = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
        mean0 = family.sde_step(model, plan, i, out, x, noise_level=0.0, noise=torch.zeros_like(x))[2]
        torch.testing.assert_close(mean0, family.step(model, plan, i, out, x), rtol=0, atol=1e-5)
        x_next, lp, mean, std = family.sde_step(model, plan, i, out, x, noise_level=family.sde_noise_level,
                                                generator=g)
        assert float(std) > 0
        torch.testing.assert_close(lp.double(), _normal_log_prob64(x_next, mean.double(), std.double()), rtol=0,
                                   atol=1e-6)


@pytest.mark.parametrize("family", _all_families(), ids=lambda f: f.name)
def test_every_family_puts_an_image_mask_on_its_latent_grid(family):
    """``family.latent_region`` (grpo.region_kl_beta): a latent cell (a packed token: its 2x2 latent patch) is 1
    where any of its pixels is in the image-space mask, shaped to broadcast against the family's latents; checked
    against the cells computed by hand from single masked pixels at odd positions of a non-square image."""
    from fnf.families.base import PackedLatents

    f, height, width = 8, 48, 80
    model = types.SimpleNamespace(vae_scale_factor=f, vae=types.SimpleNamespace(temperal_downsample=[0, 0, 0]))
    plan = types.SimpleNamespace(height=height, width=width)
    packed = isinstance(family, PackedLatents)
    cell = family.latent_factor(model) * 2 if packed else f
    h, w = height // cell, width // cell
    latents = torch.zeros(2, h * w, 16) if packed else torch.zeros(2, 4, h, w)
    mask = torch.zeros(2, 1, height, width, dtype=torch.bool)
    pixels = [(0, 5, 77), (1, 33, 9), (1, 47, 0)]
    for b, y, x in pixels:
        mask[b, 0, y, x] = True
    got = family.latent_region(model, mask, latents, plan)
    want = torch.zeros(2, h, w)
    for b, y, x in pixels:
        want[b, y // cell, x // cell] = 1
    want = want.reshape(2, h * w, 1) if packed else want[:, None]
    assert got.shape == want.shape and torch.equal(got, want)
    torch.testing.assert_close(family.latent_region(model, mask[:, 0], latents, plan), got, rtol=0, atol=0)
    with pytest.raises(ValueError, match="latent_region"):
        family.latent_region(model, mask[:1], latents, plan)
