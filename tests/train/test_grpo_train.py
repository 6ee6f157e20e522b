"""objective grpo in the trainer: the first inner step's ratio is 1 and its gradient is the REINFORCE gradient
(computed here by hand in float64); the region term in the reward (float64 check, I0 from the same noise, the
pool's cache); exact resume; two processes keep groups whole; a flow family trains."""
import math
import os
import sys

import pytest
import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fnf_tiny_models import (IMAGE_SIZE, cached_model, float64_session, one_torch_thread,  # noqa: E402,F401
                             randomize_lora_B, tiny_config)
from fnf.images import save_png  # noqa: E402
from fnf.lora import adapters_disabled, lora_state_dict  # noqa: E402
from fnf.policy import sample_generators, sde_sample  # noqa: E402
from fnf.sampling import decode  # noqa: E402
from fnf.train import Session, train  # noqa: E402

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return cached_model("sd", str(tmp_path_factory.getbasetemp()))


@pytest.fixture(scope="module")
def left_mask(tmp_path_factory):
    folder = tmp_path_factory.mktemp("grpo_mask")
    m = torch.zeros(IMAGE_SIZE, IMAGE_SIZE)
    m[:, : IMAGE_SIZE // 2] = 1
    save_png(m, str(folder / "left.png"))
    return f"file:{folder}/*.png"


def grpo_config(model, out, *, grpo=None, **sections):
    """4 DDIM steps, groups of 4, micro-batches of 2 rows: 8 micro-batches (2 optimizer steps) per rollout."""
    objective = {"name": "grpo", "beta": 0.0, **sections.pop("objective", {})}
    train_kw = {"batch_size": 2, "grad_accum": 4, **sections.pop("train", {})}
    return tiny_config(model, out, objective=objective, grpo={"group_size": 4, **(grpo or {})}, train=train_kw,
                       **sections)


def _by_hand_ddim(model, plan, i, x, x_next, eps):
    """(log N(x_next; mean, std^2) (mean over elements), mean, var) of stochastic DDIM with eta 1, in float64 from
    the scheduler's alphas (DDIM eq. 12 and 16), the log-density by torch.distributions."""
    sched = model.scheduler
    t = int(plan.timesteps[i])
    prev_t = t - sched.config.num_train_timesteps // len(plan)
    a_t = sched.alphas_cumprod[t].double()
    a_prev = sched.alphas_cumprod[prev_t].double() if prev_t >= 0 else torch.as_tensor(
        sched.final_alpha_cumprod).double()
    x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    var = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    mean = a_prev.sqrt() * x0 + (1 - a_prev - var).sqrt() * eps
    lp = torch.distributions.Normal(mean, var.sqrt()).log_prob(x_next)
    return lp.mean(dim=(1, 2, 3)), mean, var


@pytest.mark.parametrize("kl_beta,region_kl_beta", [(0.0, 0.0), (0.5, 0.0), (0.0, 0.7), (0.2, 0.7)])
def test_first_inner_step_ratio_is_one_and_the_gradient_is_reinforce(sd, left_mask, tmp_path, kl_beta,
                                                                     region_kl_beta):
    """At the first micro-batch of a rollout the LoRA is the sampling policy: rho = 1 (float64: to 1e-12) and the
    clipped loss's gradient is -mean(A grad log p) over the micro-batch's rows, A the clamped group-normalised
    reward. Here log p is rebuilt from the UNet's guided output with the DDIM Gaussian written by hand, A from
    the rollout's rewards. With kl_beta: + kl_beta x mean ||mean - mean_ref||^2 / (2 var), mean_ref from the same
    UNet with its adapters off; with region_kl_beta (mask: the left half of the image): + region_kl_beta x the
    same per-element KL times (1 - M on the latent grid), M's latent cell set where any of its 8x8 pixels is."""
    region = {"objective": {"beta": 0.5}, "localize": {"spec": left_mask}} if region_kl_beta else {}
    cfg = grpo_config(sd, str(tmp_path / "r"), train={"grad_accum": 1},
                      grpo={"kl_beta": kl_beta, "region_kl_beta": region_kl_beta}, **region)
    session = float64_session(cfg)
    randomize_lora_B(session.model.denoiser, seed=0, std=0.05)
    obj = session.objective
    obj.start_step(0)
    ro = obj.rollout
    out = session.micro_batch(0, 0)
    assert abs(out.stats["ratio"] - 1) < 1e-12 and out.stats["clip_fraction"] == 0
    out.loss.backward()
    ours = [p.grad.clone() for p in session.params]
    for p in session.params:
        p.grad = None

    rows, j = ro.micro[0]
    i = ro.steps[j]
    x, x_next = (s[rows].double() for s in ro.states[i])
    model, plan = session.model, obj.schedule()
    cond = obj.embeds.index(ro.prompt_idx[rows])
    eps = model.family.predict(model, model.denoiser, x, plan.timesteps[i], cond, obj.negative.repeat(len(rows)),
                               cfg.sampling.guidance_scale, plan)
    lp, mean, var = _by_hand_ddim(model, plan, i, x, x_next, eps)
    torch.testing.assert_close(lp.detach(), ro.old_log_probs[j, rows].double(), rtol=0, atol=1e-10)
    total = ro.extra["total"].double().reshape(-1, 4)
    adv = ((total - total.mean(1, keepdim=True)) / (total.std(1, unbiased=False, keepdim=True) + 1e-4)).reshape(-1)
    adv = adv.clamp(-5, 5)[rows]
    assert adv.abs().max() > 0.1                       # the rewards differ within the group
    surrogate, value = -(adv * lp).mean(), -adv.mean()   # same gradient; the loss's value at rho = 1 is -mean(A)
    if kl_beta or region_kl_beta:
        with torch.no_grad(), adapters_disabled(model.denoiser):
            eps_ref = model.family.predict(model, model.denoiser, x, plan.timesteps[i], cond,
                                           obj.negative.repeat(len(rows)), cfg.sampling.guidance_scale, plan)
        mean_ref = _by_hand_ddim(model, plan, i, x, x_next, eps_ref)[1]
        per_element = (mean - mean_ref) ** 2 / (2 * var)
    if kl_beta:
        kl = per_element.mean(dim=(1, 2, 3))
        assert kl.min() > 0
        assert abs(out.stats["kl"] - kl.mean().item()) < 1e-9 * kl.mean().item() + 1e-15
        surrogate, value = surrogate + kl_beta * kl.mean(), value + kl_beta * kl.mean()
    if region_kl_beta:
        m = ro.mask[rows].double()[:, 0]                                   # (B, H, W), the left half
        h, w = x.shape[-2:]
        f = m.shape[-1] // w
        cells = m.reshape(len(rows), h, f, w, f).amax(dim=(2, 4))[:, None]  # (B, 1, h, w)
        assert bool((cells[..., : w // 2] == 1).all()) and bool((cells[..., w // 2:] == 0).all())
        region = (per_element * (1 - cells)).mean(dim=(1, 2, 3))
        assert region.min() > 0 and (region < per_element.mean(dim=(1, 2, 3))).all()
        assert abs(out.stats["region_kl"] - region.mean().item()) < 1e-9 * region.mean().item() + 1e-15
        surrogate, value = surrogate + region_kl_beta * region.mean(), value + region_kl_beta * region.mean()
    torch.testing.assert_close(out.loss.detach().double(), value.detach(), rtol=1e-9, atol=1e-12)
    theirs = torch.autograd.grad(surrogate, session.params, allow_unused=True)
    norm = math.sqrt(sum(float((g ** 2).sum()) for g in ours))
    assert norm > 0
    for a, b in zip(ours, theirs):
        b = torch.zeros_like(a) if b is None else b
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8 * norm)


def _by_hand_flow(plan, i, x, x_next, v, a=0.7):
    """(log-prob, mean, var) of Flow-GRPO's SDE step written in the paper's form, float64."""
    s64 = plan.sigmas.double()
    t, t_next = s64[i], s64[i + 1]
    st = a * torch.sqrt(t / (1 - (s64[1] if t == 1 else t)))
    dt = t_next - t
    mean = x + (v + st ** 2 / (2 * t) * (x + (1 - t) * v)) * dt
    var = st ** 2 * (-dt)
    lp = torch.distributions.Normal(mean, var.sqrt()).log_prob(x_next)
    return lp.mean(dim=tuple(range(1, lp.dim()))), mean, var


def test_flow_first_inner_step_gradient_is_reinforce(tmp_path_factory, tmp_path):
    """The same on the SD3 family (float64): log p of the flow SDE step in the paper's form, by hand."""
    from tiny_sd3 import cached_sd3

    cfg = grpo_config(cached_sd3(str(tmp_path_factory.getbasetemp())), str(tmp_path / "r"),
                      grpo={"group_size": 2, "kl_beta": 0.3}, train={"grad_accum": 1})
    session = float64_session(cfg)
    randomize_lora_B(session.model.denoiser, seed=0, std=0.05)
    obj = session.objective
    obj.start_step(0)
    ro = obj.rollout
    out = session.micro_batch(0, 0)
    assert abs(out.stats["ratio"] - 1) < 1e-12
    out.loss.backward()
    ours = [p.grad.clone() for p in session.params]
    rows, j = ro.micro[0]
    i = ro.steps[j]
    x, x_next = (s[rows].double() for s in ro.states[i])
    model, plan = session.model, obj.schedule()
    cond, uncond = obj.embeds.index(ro.prompt_idx[rows]), obj.negative.repeat(len(rows))
    v = model.family.predict(model, model.denoiser, x, plan.timesteps[i], cond, uncond, cfg.sampling.guidance_scale,
                             plan)
    lp, mean, var = _by_hand_flow(plan, i, x, x_next, v)
    torch.testing.assert_close(lp.detach(), ro.old_log_probs[j, rows].double(), rtol=0, atol=1e-9)
    with torch.no_grad(), adapters_disabled(model.denoiser):
        v_ref = model.family.predict(model, model.denoiser, x, plan.timesteps[i], cond, uncond,
                                     cfg.sampling.guidance_scale, plan)
    kl = ((mean - _by_hand_flow(plan, i, x, x_next, v_ref)[1]) ** 2).mean(dim=(1, 2, 3)) / (2 * var)
    total = ro.extra["total"].double().reshape(-1, 2)
    adv = ((total - total.mean(1, keepdim=True)) / (total.std(1, unbiased=False, keepdim=True) + 1e-4)).reshape(-1)
    adv = adv.clamp(-5, 5)[rows]
    assert adv.abs().max() > 0.1 and kl.min() > 0
    theirs = torch.autograd.grad(-(adv * lp).mean() + 0.3 * kl.mean(), session.params, allow_unused=True)
    norm = math.sqrt(sum(float((g ** 2).sum()) for g in ours))
    assert norm > 0
    for a, b in zip(ours, theirs):
        b = torch.zeros_like(a) if b is None else b
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8 * norm)


def test_region_term_is_in_the_reward_with_i0_from_the_same_noise(sd, left_mask, tmp_path):
    """beta > 0 with a mask: R = r(I) - beta ||(1 - M) (I0 - I)||_F per sample (float64 by hand from the rollout's
    images), I0 is the adapters-off trajectory from the same seeds (its x_T and per-step noise), advantages are R
    normalised per group; with the pool, I0 and the mask are cached per (prompt, seed)."""
    beta = 2.0
    cfg = grpo_config(sd, str(tmp_path / "r"), objective={"beta": beta}, localize={"spec": left_mask},
                      train={"seeds_per_prompt": 4})
    session = Session(cfg)
    randomize_lora_B(session.model.denoiser, seed=1, std=0.05)
    obj = session.objective
    obj.start_step(0)
    ro = obj.rollout
    images, ref, mask = ro.images.double(), ro.ref.double(), ro.mask.double()
    assert mask.shape == (4, 1, IMAGE_SIZE, IMAGE_SIZE) and bool((mask[..., : IMAGE_SIZE // 2] == 1).all())
    assert (images - ref).abs().amax() > 1e-3          # the LoRA changes I
    penalty = ((1 - mask) * (ref - images)).pow(2).sum(dim=(1, 2, 3)).sqrt()
    reward = images.mean(dim=(1, 2, 3))                 # brightness
    torch.testing.assert_close(ro.extra["total"].double(), reward - beta * penalty, rtol=1e-5, atol=1e-6)
    total = ro.extra["total"].double().reshape(-1, 4)
    adv = (total - total.mean(1, keepdim=True)) / (total.std(1, unbiased=False, keepdim=True) + 1e-4)
    torch.testing.assert_close(ro.advantages.double(), adv.reshape(-1), rtol=1e-4, atol=1e-5)
    # I0: the frozen model from the same seeds, sampled here in the same row batches
    model, plan = session.model, obj.schedule()
    with torch.no_grad(), adapters_disabled(model.denoiser):
        for rows in (slice(0, 2), slice(2, 4)):
            cond = obj.embeds.index(ro.prompt_idx[rows])
            traj = sde_sample(model, plan, cond, obj.negative.repeat(2), generators=sample_generators(ro.seeds[rows]),
                              guidance_scale=cfg.sampling.guidance_scale, noise_level=1.0)
            torch.testing.assert_close(decode(model, traj.final, plan).double(), ref[rows], rtol=0, atol=1e-6)
    # cached per (prompt, seed): a second rollout's rows found in the cache are the same tensors' values
    keys = set(zip(ro.prompt_idx.tolist(), ro.seeds))
    assert keys <= set(obj.references) and len(obj.references) == len(keys)
    before = {k: v[0].clone() for k, v in obj.references.items()}
    obj.start_step(2)
    again = obj.rollout
    assert again.index == 1
    for n, k in enumerate(zip(again.prompt_idx.tolist(), again.seeds)):
        if k in before:
            torch.testing.assert_close(again.ref[n:n + 1], before[k], rtol=0, atol=0)


def test_plain_grpo_has_no_reference_and_beta_zero_rollout_rewards_are_the_reward(sd, tmp_path):
    session = Session(grpo_config(sd, str(tmp_path / "r"), localize={"spec": "none"}))
    obj = session.objective
    obj.start_step(0)
    ro = obj.rollout
    assert ro.ref is None and obj.localizer is None
    torch.testing.assert_close(ro.extra["total"], ro.images.mean(dim=(1, 2, 3)), rtol=1e-6, atol=1e-7)
    assert sorted(ro.prompt_idx.tolist()) == [ro.prompt_idx[0].item()] * 4     # one group, one prompt
    assert len(set(ro.seeds)) == 4
    assert len(ro.micro) == 8 and [j for _, j in ro.micro] == [0, 1, 2, 3] * 2
    # 8 micro-batches / grad_accum 4 = 2 optimizer steps per rollout: step 1 starts at micro-batch 4 of rollout 0
    obj.start_step(1)
    assert obj.rollout is ro and obj.position == 4
    obj.start_step(2)
    assert obj.rollout.index == 1 and obj.position == 0 and set(obj.rollout.seeds).isdisjoint(ro.seeds)


def test_a_non_finite_reward_skips_that_rollouts_steps(sd, tmp_path):
    """The second reward call (rollout 1) is NaN: its two optimizer steps are skipped and logged, the LoRA stays
    finite, and the next rollout trains again."""
    cfg = grpo_config(sd, str(tmp_path / "nan"), reward={"spec": f"{TESTS}/fnf_tiny_models.py:NanOnSecondCall"},
                      train={"steps": 6})
    res = train(cfg)
    assert [h["skipped"] for h in res.history] == [False, False, True, True, False, False]
    assert "non-finite" in res.history[2]["skip_reason"]
    assert all(torch.isfinite(p).all() for p in lora_state_dict(res.model.denoiser).values())


def test_resume_is_exact(sd, left_mask, tmp_path):
    """Bit for bit: rollouts are seeded by (seed, rollout, rank), checkpoints fall on rollout boundaries."""
    extra = dict(objective={"beta": 1.0}, localize={"spec": left_mask}, lora={"dropout": 0.1},
                 grpo={"kl_beta": 0.1, "steps": "random", "train_steps": 2},
                 train={"steps": 4, "grad_accum": 2, "checkpoint_every": 2, "seeds_per_prompt": 4, "lr": 2e-2})
    full = train(grpo_config(sd, str(tmp_path / "full"), **extra))
    part_cfg = grpo_config(sd, str(tmp_path / "part"), **extra)
    part_cfg.train.steps = 2
    train(part_cfg)
    resumed_cfg = grpo_config(sd, str(tmp_path / "part"), **extra)
    resumed_cfg.train.resume = "latest"
    resumed = train(resumed_cfg)
    a, b = lora_state_dict(full.model.denoiser), lora_state_dict(resumed.model.denoiser)
    assert any(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [h["step"] for h in resumed.history] == [3, 4]
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history[2:]]
    assert all(not h["skipped"] for h in full.history)


def test_sd3_flow_family_trains_with_the_region_term(tmp_path_factory, left_mask, tmp_path):
    """The flow SDE through the SD3 family: the first inner step's ratio is 1, the region term is on, the LoRA
    moves."""
    from tiny_sd3 import cached_sd3

    model = cached_sd3(str(tmp_path_factory.getbasetemp()))
    cfg = grpo_config(model, str(tmp_path / "sd3"), objective={"beta": 1.0}, localize={"spec": left_mask},
                      grpo={"group_size": 2, "steps": "window", "train_steps": 2},
                      train={"steps": 2, "grad_accum": 2, "lr": 2e-2})
    res = train(cfg)
    first = res.history[0]
    assert abs(first["ratio"] - 1) < 1e-6 and first["penalty"] >= 0 and "change_outside" in first
    assert all(math.isfinite(h["loss"]) and not h["skipped"] for h in res.history)
    assert any(v.abs().sum() > 0 for k, v in lora_state_dict(res.model.denoiser).items() if "lora_B" in k)


# ------------------------------------------------------------------------------------------ two processes
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, model: str, out: str, tests_dir: str) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world),
                       "HF_HUB_OFFLINE": "1"})
    torch.set_num_threads(1)
    sys.path.insert(0, tests_dir)
    import torch.distributed as dist

    from fnf.train import Session
    from fnf.train.trainer import make_accelerator

    cfg = grpo_config(model, out, grpo={"group_size": 2, "prompts_per_rollout": 2},
                      train={"steps": 2, "device": "cpu", "grad_accum": 8, "lr": 2e-2})
    session = Session(cfg, make_accelerator(cfg))
    assert dist.is_initialized() and dist.get_world_size() == world
    records = []
    for step in range(2):
        records.append(session.optimizer_step(step)[0])
    ro = session.objective.rollout
    torch.save({"lora": lora_state_dict(session.model.denoiser), "records": records, "prompt_idx": ro.prompt_idx,
                "seeds": ro.seeds, "total": ro.extra["total"], "advantages": ro.advantages},
               os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow  # two spawned interpreters importing torch + diffusers
def test_two_processes_keep_groups_whole_and_lora_identical(sd, tmp_path):
    """Each process samples whole groups (its own prompts and seeds; every group's G rows share one prompt) and
    normalises advantages within them, with nothing gathered; the averaged gradient keeps the LoRA identical."""
    out = str(tmp_path / "ddp")
    os.makedirs(out)
    mp.start_processes(_worker, args=(2, _free_port(), sd, out, TESTS), nprocs=2, join=True, start_method="spawn")
    r0, r1 = (torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in (0, 1))
    for k in r0["lora"]:
        assert torch.equal(r0["lora"][k], r1["lora"][k]), k
    assert any(v.abs().sum() > 0 for k, v in r0["lora"].items() if "lora_B" in k)
    assert [r["loss"] for r in r0["records"]] == [r["loss"] for r in r1["records"]]   # logged: cross-rank means
    assert set(r0["seeds"]).isdisjoint(r1["seeds"])
    for r in (r0, r1):
        groups = r["prompt_idx"].reshape(-1, 2)
        assert bool((groups[:, 0] == groups[:, 1]).all())          # a group is one prompt, on one process
        total = r["total"].double().reshape(-1, 2)
        adv = (total - total.mean(1, keepdim=True)) / (total.std(1, unbiased=False, keepdim=True) + 1e-4)
        torch.testing.assert_close(r["advantages"].double(), adv.reshape(-1), rtol=1e-4, atol=1e-5)
