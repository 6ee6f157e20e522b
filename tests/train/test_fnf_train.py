"""The training loop: the region constraint, exact resume, NaN steps, LoRA export, and the CLI end to end."""
import json
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fnf_tiny_models import (IMAGE_SIZE, cached_model, float64_session, one_torch_thread,  # noqa: E402,F401
                             ours_and_pipeline_images,
                             randomize_lora_B, tiny_config)
from fnf import cli  # noqa: E402
from fnf.images import save_png  # noqa: E402
from fnf.lora import adapters_disabled, lora_state_dict  # noqa: E402
from fnf.encoding import encode_prompts  # noqa: E402
from fnf.sampling import initial_latents, sample_images  # noqa: E402
from fnf.train import train  # noqa: E402

HELPER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fnf_tiny_models.py")


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return cached_model("sd", str(tmp_path_factory.getbasetemp()))


@pytest.fixture(scope="module")
def left_mask(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mask")
    m = torch.zeros(IMAGE_SIZE, IMAGE_SIZE)
    m[:, : IMAGE_SIZE // 2] = 1
    save_png(m, str(folder / "left.png"))
    return f"file:{folder}/*.png"


def _outside_change(model, prompt, seed, mask):
    cond = encode_prompts(model, [prompt], height=IMAGE_SIZE, width=IMAGE_SIZE)
    uncond = encode_prompts(model, [""], height=IMAGE_SIZE, width=IMAGE_SIZE)
    x_T = initial_latents(model, 1, IMAGE_SIZE, IMAGE_SIZE, torch.Generator().manual_seed(seed), "cpu")
    kw = dict(steps=4, guidance_scale=3.0)
    tuned = sample_images(model, x_T, cond, uncond, **kw)
    with adapters_disabled(model.denoiser):
        base = sample_images(model, x_T, cond, uncond, **kw)
    change = (tuned - base).abs().mean(dim=1)[0]
    return change[mask == 0].mean().item(), change[mask == 1].mean().item()


def test_large_beta_holds_pixels_outside_the_mask_beta_zero_lets_them_move(sd, left_mask, tmp_path):
    mask = torch.zeros(IMAGE_SIZE, IMAGE_SIZE)
    mask[:, : IMAGE_SIZE // 2] = 1
    results = {}
    for beta in (0.0, 20.0):
        cfg = tiny_config(sd, str(tmp_path / f"b{beta}"), localize={"spec": left_mask},
                          objective={"beta": beta}, train={"steps": 6, "lr": 2e-2, "prompts": ["a photo of a cat"]})
        res = train(cfg)
        in_loop = sum(h["change_outside"] for h in res.history[2:]) / len(res.history[2:])
        results[beta] = (in_loop, *_outside_change(res.model, "a photo of a cat", 123, mask))
    zero, big = results[0.0], results[20.0]
    assert zero[0] > 0.01 and zero[1] > 0.01          # plain DRaFT moves the whole image
    assert big[0] < 0.5 * zero[0], results            # Focus-N-Fix holds the outside to I0 during training
    assert big[1] < 0.5 * zero[1], results            # ... and the LoRA learned it (fresh seed, no mask)


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(sd, tmp_path):
    """Bit for bit (torch.equal): the resumed run is the same computation on the same machine, not a second path."""
    extra = dict(lora={"dropout": 0.1}, train={"steps": 3, "grad_accum": 2, "warmup_steps": 2, "checkpoint_every": 1})
    full = train(tiny_config(sd, str(tmp_path / "full"), **extra))
    part_cfg = tiny_config(sd, str(tmp_path / "part"), **extra)
    part_cfg.train.steps = 2
    train(part_cfg)
    ckpts = sorted(os.listdir(tmp_path / "part" / "checkpoints"))
    assert ckpts == ["step-0000001", "step-0000002"]  # keep_checkpoints=2, no temp folders left
    resumed_cfg = tiny_config(sd, str(tmp_path / "part"), **extra)
    resumed_cfg.train.resume = "latest"
    resumed = train(resumed_cfg)
    a, b = lora_state_dict(full.model.denoiser), lora_state_dict(resumed.model.denoiser)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [h["step"] for h in resumed.history] == [3]
    assert resumed.history[0]["loss"] == full.history[2]["loss"]


def test_exported_lora_loads_with_load_lora_weights_and_reproduces_images(sd, tmp_path):
    """fnf's sampler and diffusers' pipeline run the same float32 weights through the same ops (CFG formula,
    scheduler.step, decode): ~1e-6 apart on [0, 1] images, so atol 1e-4, 10x below the LoRA's effect (> 1e-3)."""

    res = train(tiny_config(sd, str(tmp_path / "run"), train={"steps": 2, "lr": 5e-2}))
    assert os.path.isfile(os.path.join(res.lora_dir, "pytorch_lora_weights.safetensors"))
    im = ours_and_pipeline_images(res.model, sd, res.lora_dir)
    assert (im["tuned"] - im["base"]).abs().max() > 1e-3            # the LoRA does something
    torch.testing.assert_close(im["base"], im["ours_base"], rtol=0, atol=1e-4)
    torch.testing.assert_close(im["tuned"], im["ours"], rtol=0, atol=1e-4)


def test_nan_step_is_skipped_and_logged(sd, tmp_path):
    cfg = tiny_config(sd, str(tmp_path / "nan"), reward={"spec": f"{HELPER}:NanOnSecondCall"}, train={"steps": 3})
    res = train(cfg)
    assert [h["skipped"] for h in res.history] == [False, True, False]
    assert "non-finite" in res.history[1]["skip_reason"]
    assert all(torch.isfinite(p).all() for p in lora_state_dict(res.model.denoiser).values())
    lines = [json.loads(line) for line in open(tmp_path / "nan" / "log.jsonl")]
    assert any(r["skipped"] for r in lines)
    for r in lines:
        assert {"reward", "penalty", "loss", "grad_norm", "lr"} <= set(r) or r["skipped"]


def test_cli_train_localize_sample_end_to_end(sd, tmp_path, left_mask):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(f"""
lora: {{rank: 4, alpha: 4}}
sampling: {{steps: 3, truncation_k: 1, lv_copies: 2, guidance_scale: 2.0}}
localize: {{threshold: 0.5, radius: 1}}
memory: {{mixed_precision: no}}
train: {{prompts: ["a photo of a dog", "a blue house"], checkpoint_every: 1, sample_every: 1, progress: false,
        batch_size: 2, tensorboard: false}}
""")
    out = tmp_path / "out"
    rc = cli.main(["train", "--config", str(cfg_file), "--model", sd, "--reward", f"{HELPER}:red_detector",
                   "--localizer", "gradcam:features", "--beta", "0.5", "--steps", "2", "--lr", "1e-3",
                   "--seed", "3", "--out", str(out), "--set", "lora.rank=2"])
    assert rc == 0
    assert sorted(os.listdir(out / "samples")) == ["step-0000001.png", "step-0000002.png"]
    assert len(open(out / "log.jsonl").readlines()) == 2
    assert os.path.isfile(out / "lora" / "pytorch_lora_weights.safetensors")
    saved = open(out / "config.yaml").read()
    assert "rank: 2" in saved and "beta: 0.5" in saved and "seed: 3" in saved
    rc = cli.main(["localize", "--config", str(cfg_file), "--model", sd, "--reward", f"{HELPER}:red_detector",
                   "--localizer", "gradcam", "--out", str(out), "--prompts", "a red car", "--seeds", "0", "1"])
    assert rc == 0
    files = sorted(os.listdir(out / "localize"))   # per (prompt, seed): I0, heatmap, mask, overlay, labelled panel
    assert files == ["manifest.json"] + sorted(f"p000_s{s}_{kind}.png" for s in (0, 1)
                                                for kind in ("heatmap", "i0", "mask", "overlay", "panel"))
    rc = cli.main(["sample", "--config", str(cfg_file), "--model", sd, "--lora", str(out / "lora"),
                   "--out", str(out), "--prompts", "a red car", "--seeds", "5"])
    names = sorted(os.listdir(out / "samples_compare"))   # seed 5 only: base, LoRA, labelled comparison
    assert rc == 0 and names[0] == "manifest.json" and len(names) == 4
    assert all(n.startswith("p000_s5_") for n in names[1:])


def test_bf16_autocast_with_bf16_weights_keeps_lora_fp32(sd, tmp_path):
    cfg = tiny_config(sd, str(tmp_path / "bf16"), model={"weight_dtype": "bf16"},
                      memory={"mixed_precision": "bf16", "denoiser_checkpointing": True, "vae_checkpointing": True,
                              "reward_checkpointing": True},
                      localize={"spec": "saliency", "radius": 1}, train={"steps": 2})
    res = train(cfg)
    assert res.model.denoiser.dtype == torch.bfloat16 or any(p.dtype == torch.bfloat16 for p in res.model.denoiser.parameters())
    lora = [p for n, p in res.model.denoiser.named_parameters() if p.requires_grad]
    assert lora and all(p.dtype == torch.float32 for p in lora)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in res.history if not h["skipped"])
    assert not any(h["skipped"] for h in res.history)


def _first_step(session, lora_seed=0):
    """Loss, stats and LoRA gradients of a session's first micro-batch, from the same non-zero LoRA B."""
    randomize_lora_B(session.model.denoiser, seed=lora_seed, std=0.05)
    loss, stats, _ = session.micro_batch(0, 0)
    finite = bool(torch.isfinite(loss))
    assert finite
    loss.backward()
    return loss.item(), stats, [p.grad.clone() for p in session.params]


def _assert_same_gradients(got, want, rtol):
    """Per LoRA tensor, within rtol of its largest entry; every tensor has a gradient."""
    for a, b in zip(got, want):
        assert b.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * b.abs().max().item())


def test_plain_draft_skips_the_pretrained_trajectory_and_matches_beta_zero(sd, tmp_path, monkeypatch):
    """beta = 0 with localize.spec none runs no I0 trajectory (one UNet pass per step fewer) and has the
    gradient of beta = 0 with a localizer (the penalty then has no gradient anyway).

    Gradient parity on the first step in float64 sessions: the loss-level tensors pass through float32 in
    fnf/objectives/, so the two paths agree to a few float32 ulps (u32 = 6e-8): rtol 1e-6. Not on weights after
    AdamW steps, whose first updates are ~lr * sign(g) and amplify rounding in near-zero entries."""
    import fnf.objectives.focus_n_fix as fnf_objective  # runs the trajectories (was fnf.train before issue 14)

    kw = dict(objective={"beta": 0.0}, train={"steps": 2, "lr": 1e-2, "sample_every": 1})
    calls = []
    real = fnf_objective.draft_k
    monkeypatch.setattr(fnf_objective, "draft_k", lambda *a, **k: calls.append(k.get("grad_steps")) or real(*a, **k))
    plain = train(tiny_config(sd, str(tmp_path / "plain"), localize={"spec": "none"}, **kw))
    assert len(calls) == 2 and all(c > 0 for c in calls)
    assert "penalty" not in plain.history[0] and "reward" in plain.history[0]
    assert os.path.isfile(tmp_path / "plain" / "samples" / "step-0000002.png")
    monkeypatch.setattr(fnf_objective, "draft_k", real)

    masked = float64_session(tiny_config(sd, str(tmp_path / "m64"), localize={"spec": "saliency"}, **kw))
    plain64 = float64_session(tiny_config(sd, str(tmp_path / "p64"), localize={"spec": "none"}, **kw))
    assert plain64.objective.plain_draft and not masked.objective.plain_draft
    loss_m, stats_m, grads_m = _first_step(masked)
    loss_p, stats_p, grads_p = _first_step(plain64)
    assert loss_p == pytest.approx(loss_m, rel=1e-6)
    assert stats_p["reward"] == pytest.approx(stats_m["reward"], rel=1e-6)
    _assert_same_gradients(grads_p, grads_m, rtol=1e-6)


def _count_resnet_calls(unet):
    """Forward calls of every ResnetBlock2D (checkpointing reruns them during backward; a pre-hook, since the
    recompute stops as soon as it has rebuilt what backward needs and may never return from forward)."""
    from diffusers.models.resnet import ResnetBlock2D

    calls = []
    handles = [m.register_forward_pre_hook(lambda *_: calls.append(1)) for m in unet.modules()
               if isinstance(m, ResnetBlock2D)]
    return calls, handles


def test_denoiser_checkpointing_gives_the_same_first_step_gradient_in_float64(sd, tmp_path):
    """memory.denoiser_checkpointing (the production default) recomputes the UNet blocks in backward and changes
    nothing else: first-step loss and LoRA gradients equal those without it (float64 sessions; float32 loss
    inputs in fnf/objectives/, so rtol 1e-6 as above), and the recompute really runs (more block calls)."""
    results = {}
    for on in (False, True):
        cfg = tiny_config(sd, str(tmp_path / f"ckpt{on}"), memory={"denoiser_checkpointing": on},
                          localize={"spec": "saliency"}, train={"batch_size": 2})
        session = float64_session(cfg)
        calls, handles = _count_resnet_calls(session.model.denoiser)
        randomize_lora_B(session.model.denoiser, seed=0, std=0.05)
        loss, stats, _ = session.micro_batch(0, 0)
        finite = bool(torch.isfinite(loss))
        forward_calls = len(calls)
        loss.backward()
        for h in handles:
            h.remove()
        assert finite
        results[on] = (loss.item(), [p.grad.clone() for p in session.params], len(calls) - forward_calls)
    (loss_off, grads_off, rerun_off), (loss_on, grads_on, rerun_on) = results[False], results[True]
    diff = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(grads_on, grads_off))
    print(f"resnet blocks rerun in backward: {rerun_off} off, {rerun_on} on; max gradient difference {diff:.2e}")
    assert rerun_off == 0 and rerun_on > 0, (rerun_off, rerun_on)
    assert loss_on == pytest.approx(loss_off, rel=1e-6)
    _assert_same_gradients(grads_on, grads_off, rtol=1e-6)


def test_training_with_denoiser_checkpointing_on_end_to_end(sd, tmp_path):
    """A few steps with the production memory defaults (UNet and VAE checkpointing on): every step taken,
    finite losses, the LoRA moved off its init and stayed finite."""
    cfg = tiny_config(sd, str(tmp_path / "ckpt"), memory={"denoiser_checkpointing": True, "vae_checkpointing": True},
                      localize={"spec": "saliency"}, train={"steps": 3, "lr": 1e-2})
    res = train(cfg)
    assert [h["skipped"] for h in res.history] == [False] * 3
    assert all(math.isfinite(h["loss"]) and math.isfinite(h["grad_norm"]) and h["grad_norm"] > 0
               for h in res.history)
    lora = lora_state_dict(res.model.denoiser)
    assert all(torch.isfinite(v).all() for v in lora.values())
    assert max(v.abs().max().item() for k, v in lora.items() if "lora_B" in k) > 0.5 * cfg.train.lr  # B started at 0


def test_reference_pool_precomputes_i0_once_and_resumes_exactly(sd, tmp_path, monkeypatch):
    """train.seeds_per_prompt = N: the P x N pretrained images are sampled once (LoRA off) before training, each
    step runs only the fine-tuned trajectory, and a resumed run rebuilds the same pool."""
    import fnf.objectives.focus_n_fix as fnf_objective  # runs the trajectories (was fnf.train before issue 14)
    import fnf.reference_pool as pool_mod
    from fnf.train import trainer as train_mod
    from fnf.reference_pool import entry_seed

    extra = dict(localize={"spec": "saliency"}, train={"steps": 3, "seeds_per_prompt": 2, "batch_size": 2,
                                                       "checkpoint_every": 1})
    calls, pool_calls = [], []
    real = fnf_objective.draft_k
    monkeypatch.setattr(fnf_objective, "draft_k", lambda *a, **k: calls.append(k.get("grad_steps")) or real(*a, **k))
    monkeypatch.setattr(pool_mod, "draft_k", lambda *a, **k: pool_calls.append(a[1].shape[0]) or real(*a, **k))
    full = train(tiny_config(sd, str(tmp_path / "full"), **extra))
    assert len(calls) == 3 and all(c == 2 for c in calls)          # training steps: the fine-tuned chain only
    assert pool_calls == [2, 2]                                     # 2 prompts x 2 seeds, once, in batches of 2
    assert all("penalty" in h and "change_outside" in h for h in full.history)

    # The pool's I0 of entry j is the adapters-off sample from entry_seed(seed, j) -- what the plain path computes.
    cfg = tiny_config(sd, str(tmp_path / "probe"), **extra)
    session = train_mod.Session(cfg)
    p = session.objective.pool
    assert p.size == 2 * len(cfg.train.prompts) and p.prompt_index.tolist() == [0, 0, 1, 1]
    m = session.model
    for j in (0, 3):
        x_T = initial_latents(m, 1, IMAGE_SIZE, IMAGE_SIZE, torch.Generator().manual_seed(entry_seed(0, j)), "cpu")
        cond = session.objective.embeds.index(torch.tensor([int(p.prompt_index[j])]))
        with adapters_disabled(m.denoiser):
            expect = sample_images(m, x_T, cond, session.objective.negative, steps=4, guidance_scale=3.0)
        torch.testing.assert_close(p.ref[j:j + 1], expect, rtol=0, atol=1e-5)

    part_cfg = tiny_config(sd, str(tmp_path / "part"), **extra)
    part_cfg.train.steps = 2
    train(part_cfg)
    resumed_cfg = tiny_config(sd, str(tmp_path / "part"), **extra)
    resumed_cfg.train.resume = "latest"
    resumed = train(resumed_cfg)
    a, b = lora_state_dict(full.model.denoiser), lora_state_dict(resumed.model.denoiser)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_reference_pool_config_errors(sd):
    from fnf import config

    with pytest.raises(config.ConfigError, match="sampling.eta"):
        tiny_config(sd, "x", sampling={"eta": 0.5}, train={"seeds_per_prompt": 2})
    with pytest.raises(config.ConfigError, match="train.seeds_per_prompt"):
        tiny_config(sd, "x", train={"seeds_per_prompt": -1})


def test_logged_records_reach_the_accelerator_trackers(sd, tmp_path):
    """The accelerator's trackers (``log_with``; tensorboard in a configured run) get every logged record's numeric
    fields at its step and are finished at the end; log.jsonl stays the run's full record."""
    from accelerate import Accelerator
    from accelerate.tracking import GeneralTracker

    class Recorder(GeneralTracker):
        name, requires_logging_directory = "recorder", False

        def __init__(self):
            super().__init__()
            self.logged, self.finished = [], False

        @property
        def tracker(self):
            return self

        def store_init_configuration(self, values):
            pass

        def log(self, values, step=None, **kwargs):
            self.logged.append((step, dict(values)))

        def finish(self):
            self.finished = True

    recorder = Recorder()
    cfg = tiny_config(sd, str(tmp_path / "run"), train={"steps": 2})
    train(cfg, accelerator=Accelerator(cpu=True, log_with=[recorder]))
    records = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    assert records and [step for step, _ in recorder.logged] == [r["step"] for r in records]
    for (_, values), r in zip(recorder.logged, records):
        assert values == {k: v for k, v in r.items()
                          if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
        assert "grad_norm" in values and "skipped" not in values
    assert recorder.finished
