"""dL/dLoRA of the DRaFT-K / DRaFT-LV + Focus-N-Fix loss: fnf's sampler = a hand-unrolled DDIM loop, in float64.

fnf's path: ``fnf.sampling.run_steps`` (I0, adapters off) and ``draft_k`` (I, the last K steps carrying grad)
+ ``decode`` + ``fnf.objectives.focus_n_fix_loss`` (the fused masked-Frobenius kernel). The reference below is written from the
DDIM paper's update (eq. 12, 16) on an ``alphas_cumprod`` computed here from the scaled-linear beta schedule; it
calls the UNet and the VAE decoder directly and never touches ``scheduler.step``, ``add_noise``,
``predict_noise`` or the penalty kernel. Both run on a tiny SD model cast to float64.

Tolerance: the two computations are the same math in a different operation order. In float64 (unit roundoff
u = 1.1e-16) a few thousand chained ops through 3 UNet/VAE passes stay far below 1e-12 relative; rtol = 1e-9
keeps a 1000x margin and still fails on a single float32 rounding anywhere in fnf's path (u32 = 6e-8), on a
wrong step formula, a misplaced no_grad (wrong K) or a wrong penalty gradient: those change the LoRA gradient by
more than 1e-2 relative (checked below for K = 1 vs 2).
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fnf_tiny_models import IMAGE_SIZE, cached_model, one_torch_thread, randomize_lora_B, to_float64  # noqa: E402,F401
from fnf.lora import adapters_disabled, add_lora  # noqa: E402
from fnf.encoding import encode_prompts  # noqa: E402
from fnf.families.registry import load_model  # noqa: E402
from fnf.objectives import focus_n_fix_loss  # noqa: E402
from fnf.sampling import decode, draft_k, draft_lv, initial_latents, run_steps, schedule  # noqa: E402

STEPS = 4
RTOL = 1e-9
NOISE_SEED = 11
F64 = torch.float64


def _alphas_cumprod(n: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """SD's scaled-linear schedule in float64: beta_i = (sqrt(b0) + i/(n-1) (sqrt(b1) - sqrt(b0)))^2."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, n, dtype=F64) ** 2
    return torch.cumprod(1 - betas, dim=0)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Tiny SD in float64 with a rank-4 LoRA (non-zero B), two prompts, a left-half problem mask."""
    m = load_model(cached_model("sd", str(tmp_path_factory.getbasetemp())))
    params = add_lora(m, rank=4, alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    to_float64(m)
    randomize_lora_B(m.denoiser, seed=0, std=0.05)
    acp = _alphas_cumprod(m.scheduler.config.num_train_timesteps)
    # the scheduler's own float32 schedule is this one: then both paths run the float64 values
    torch.testing.assert_close(m.scheduler.alphas_cumprod, acp, rtol=1e-6, atol=0)
    m.scheduler.alphas_cumprod, m.scheduler.final_alpha_cumprod = acp.clone(), acp[0].clone()
    cond = encode_prompts(m, ["a photo of a cat", "a red car"], height=IMAGE_SIZE, width=IMAGE_SIZE)
    uncond = encode_prompts(m, [""], height=IMAGE_SIZE, width=IMAGE_SIZE).repeat(2)
    cond.hidden, uncond.hidden = cond.hidden.double(), uncond.hidden.double()  # text encoders stay float32
    x_T = initial_latents(m, 2, IMAGE_SIZE, IMAGE_SIZE, torch.Generator().manual_seed(3), "cpu").double()
    mask = torch.zeros(2, 1, IMAGE_SIZE, IMAGE_SIZE, dtype=F64)
    mask[0, :, :, : IMAGE_SIZE // 2] = 1        # sample 0: left half free to change
    mask[1, :, IMAGE_SIZE // 4:, :] = 1         # sample 1: bottom three quarters
    weights = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(5), dtype=F64)
    return m, params, cond, uncond, x_T, mask, weights, acp


def _reward(images, weights):
    """A smooth image functional (not under test): a fixed linear map plus a quadratic, per sample."""
    return (images * weights).mean(dim=(1, 2, 3)) + 2.0 * images.square().mean(dim=(1, 2, 3))


# ------------------------------------------------------------------------------------------ the reference
def _eps(m, x, t, cond, uncond, guidance):
    """Guided noise prediction: the UNet on [uncond; cond] rows, eps_u + w (eps_c - eps_u)."""
    if guidance <= 1.0:
        return m.denoiser(x, t, encoder_hidden_states=cond.hidden).sample
    out = m.denoiser(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond.hidden, cond.hidden])).sample
    e_u, e_c = out.chunk(2)
    return e_u + guidance * (e_c - e_u)


def _ddim(x, eps, a_t, a_prev, eta, gen):
    """x_{t-1} = sqrt(a_prev) x0_hat + sqrt(1 - a_prev - sigma^2) eps + sigma z (DDIM eq. 12, 16)."""
    x0_hat = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
    x_prev = a_prev.sqrt() * x0_hat + (1 - a_prev - sigma ** 2).sqrt() * eps
    if eta > 0:
        x_prev = x_prev + sigma * torch.randn(x.shape, generator=gen, dtype=F64)
    return x_prev


def _timesteps(acp, steps):
    """SD's 'leading' spacing with steps_offset 1: t_i = (steps - 1 - i) * 1000 // steps + 1."""
    ratio = len(acp) // steps
    ts = [(steps - 1 - i) * ratio + 1 for i in range(steps)]
    return [(t, acp[t], acp[t - ratio] if t - ratio >= 0 else acp[0]) for t in ts]


def _reference_latents(m, x_T, cond, uncond, acp, *, guidance, k, lv, eta, gen):
    """I's latents: no grad for the first STEPS - K steps (all of them for DRaFT-LV), grad for the rest; DRaFT-LV
    re-noises x_0 to the last timestep lv times (q(x_t | x_0)) and redoes that step with grad."""
    sched = _timesteps(acp, STEPS)
    first_grad = STEPS if lv else STEPS - k
    x = x_T
    for i, (t, a_t, a_prev) in enumerate(sched):
        with torch.set_grad_enabled(i >= first_grad):
            x = _ddim(x.detach() if i == first_grad else x, _eps(m, x, t, cond, uncond, guidance), a_t, a_prev,
                      eta, gen)
    if not lv:
        return x
    x0, (t, a_t, a_prev) = x.detach(), sched[-1]
    copies = []
    for _ in range(lv):
        x_t = a_t.sqrt() * x0 + (1 - a_t).sqrt() * torch.randn(x0.shape, generator=gen, dtype=F64)
        copies.append(_ddim(x_t, _eps(m, x_t, t, cond, uncond, guidance), a_t, a_prev, eta, gen))
    return torch.cat(copies)


def _reference_images(m, z):
    return (m.vae.decode(z / m.vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)


def _reference_loss(setup, *, guidance, k, lv, eta, beta):
    m, params, cond, uncond, x_T, mask, weights, acp = setup
    with torch.no_grad(), adapters_disabled(m.denoiser):
        ref = _reference_images(m, _reference_latents(m, x_T, cond, uncond, acp, guidance=guidance, k=0, lv=0,
                                                      eta=eta, gen=torch.Generator().manual_seed(NOISE_SEED)))
    images = _reference_images(m, _reference_latents(m, x_T, cond, uncond, acp, guidance=guidance, k=k, lv=lv,
                                                     eta=eta, gen=torch.Generator().manual_seed(NOISE_SEED)))
    copies = max(1, lv)
    outside = (1 - mask.repeat(copies, 1, 1, 1)) * (ref.repeat(copies, 1, 1, 1) - images)
    penalty = outside.square().sum(dim=(1, 2, 3)).sqrt()
    return -_reward(images, weights).mean() + beta * penalty.mean(), penalty


# ------------------------------------------------------------------------------------------ fnf's path
def _fnf_loss(setup, *, guidance, k, lv, eta, beta):
    m, params, cond, uncond, x_T, mask, weights, acp = setup
    plan = schedule(m, STEPS, IMAGE_SIZE, IMAGE_SIZE, x_T.device)
    kw = dict(guidance_scale=guidance, eta=eta)
    with torch.no_grad(), adapters_disabled(m.denoiser):
        ref = decode(m, run_steps(m, x_T, plan, cond, uncond, generator=torch.Generator().manual_seed(NOISE_SEED), **kw))
    gen = torch.Generator().manual_seed(NOISE_SEED)
    z = draft_lv(m, x_T, plan, cond, uncond, copies=lv, generator=gen, **kw) if lv else \
        draft_k(m, x_T, plan, cond, uncond, grad_steps=k, generator=gen, **kw)
    images = decode(m, z)
    copies = max(1, lv)
    loss, stats = focus_n_fix_loss(_reward(images, weights), images, ref.repeat(copies, 1, 1, 1),
                                   mask.repeat(copies, 1, 1, 1), beta=beta)
    return loss, stats


def _lora_grads(params, loss_fn):
    for p in params:
        p.grad = None
    out = loss_fn()
    out[0].backward()
    return [p.grad.clone() for p in params], out


CASES = {  # name: (guidance, K, lv_copies, eta, beta)
    "nocfg-K1": (1.0, 1, 0, 0.0, 1.0),
    "nocfg-K2": (1.0, 2, 0, 0.0, 1.0),
    "cfg-K1": (3.0, 1, 0, 0.0, 1.0),
    "cfg-K2": (3.0, 2, 0, 0.0, 1.0),
    "cfg-K2-draft": (3.0, 2, 0, 0.0, 0.0),      # beta = 0: plain DRaFT-K
    "nocfg-K2-eta": (1.0, 2, 0, 0.7, 1.0),
    "cfg-K1-eta": (3.0, 1, 0, 0.7, 1.0),
    "nocfg-LV2": (1.0, 1, 2, 0.0, 1.0),
    "cfg-LV2-eta": (3.0, 1, 2, 0.7, 1.0),
}


@pytest.mark.parametrize("case", list(CASES))
def test_draft_lora_gradient_matches_hand_unrolled_ddim_in_float64(setup, case):
    guidance, k, lv, eta, beta = CASES[case]
    params = setup[1]
    kw = dict(guidance=guidance, k=k, lv=lv, eta=eta, beta=beta)
    want, (want_loss, penalty) = _lora_grads(params, lambda: _reference_loss(setup, **kw))
    got, (got_loss, stats) = _lora_grads(params, lambda: _fnf_loss(setup, **kw))
    assert penalty.min() > 1e-3  # the LoRA moved I off I0 everywhere: the penalty's gradient is well defined
    torch.testing.assert_close(got_loss, want_loss, rtol=RTOL, atol=0)
    assert stats["penalty"] == pytest.approx(penalty.mean().item(), rel=RTOL)
    scale = max(g.abs().max().item() for g in want)
    assert scale > 0
    assert sum(bool((g != 0).any()) for g in want) == len(want)  # every LoRA tensor gets a gradient
    print(f"{case}: max |fnf - reference| / max |grad| = {(_flat(got) - _flat(want)).abs().max().item() / scale:.2e}")
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=RTOL * scale, msg=lambda s: f"LoRA tensor {i}: {s}")


def _flat(grads):
    return torch.cat([g.flatten() for g in grads])


@pytest.mark.parametrize("guidance", [1.0, 3.0], ids=["nocfg", "cfg"])
def test_truncation_and_penalty_change_the_gradient(setup, guidance):
    """The comparison above can fail: K = 2 vs K = 1, and beta = 1 vs 0, move dL/dLoRA by far more than RTOL."""
    params = setup[1]
    base = dict(guidance=guidance, lv=0, eta=0.0)
    g1, _ = _lora_grads(params, lambda: _reference_loss(setup, k=1, beta=1.0, **base))
    g2, _ = _lora_grads(params, lambda: _reference_loss(setup, k=2, beta=1.0, **base))
    g2_draft, _ = _lora_grads(params, lambda: _reference_loss(setup, k=2, beta=0.0, **base))
    g1, g2, g2_draft = _flat(g1), _flat(g2), _flat(g2_draft)
    print(f"|g(K=2) - g(K=1)| / |g| = {((g2 - g1).norm() / g2.norm()).item():.3f}, "
          f"|g(beta=1) - g(beta=0)| / |g| = {((g2 - g2_draft).norm() / g2.norm()).item():.3f}")
    assert (g2 - g1).norm() > 1e-2 * g2.norm(), ((g2 - g1).norm(), g2.norm())
    assert (g2 - g2_draft).norm() > 1e-2 * g2.norm(), ((g2 - g2_draft).norm(), g2.norm())
