"""The SD3 / SD3.5 family on a tiny random-weight StableDiffusion3Pipeline folder: samples equal the diffusers
pipeline's, DRaFT-K gradients reach only LoRA and only the last K transformer calls, LoRA export round-trips
through ``StableDiffusion3Pipeline.load_lora_weights``, the folder without T5 works, bad input is refused."""
from __future__ import annotations

import json
import os
import shutil
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fnf_tiny_models import one_torch_thread  # noqa: F401
from tiny_sd3 import IMAGE_SIZE, cached_sd3

from fnf.families import family_for_index
from fnf.families.sd3 import SD3Family
from fnf.core import LORA_WEIGHTS, ModelLoadError
from fnf.lora import add_lora
from fnf.encoding import encode_prompts
from fnf.families.registry import load_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
SEED = 7
PROMPTS = ["a photo of a cat", "a red car"]
STEPS, GUIDANCE = 4, 3.0
FAMILY = SD3Family()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return cached_sd3(str(tmp_path_factory.getbasetemp()))


@pytest.fixture(scope="module")
def folder_no_t5(tmp_path_factory):
    return cached_sd3(str(tmp_path_factory.getbasetemp()), t5=False)


def _index(path):
    with open(os.path.join(path, "model_index.json")) as f:
        return json.load(f)


def _load(path, **kw):
    return FAMILY.load(path, _index(path), weight_dtype=torch.float32, **kw)


def _pipeline(path, **kw):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(path, local_files_only=True, **kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _pipeline_images(pipe, seed=SEED, prompts=PROMPTS):
    with torch.no_grad():
        return pipe(prompts, num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=IMAGE_SIZE,
                    width=IMAGE_SIZE, output_type="pt", generator=torch.Generator().manual_seed(seed)).images


def _sample(model, seed=SEED, prompts=PROMPTS, grad_steps=0, calls=None):
    """Our loop over the family methods: the first STEPS - grad_steps steps under no_grad."""
    cond = FAMILY.encode(model, prompts, height=IMAGE_SIZE, width=IMAGE_SIZE)
    uncond = FAMILY.encode(model, [""] * len(prompts), height=IMAGE_SIZE, width=IMAGE_SIZE)
    x = FAMILY.initial_latents(model, len(prompts), IMAGE_SIZE, IMAGE_SIZE, torch.Generator().manual_seed(seed),
                               "cpu")
    plan = FAMILY.schedule(model, STEPS, IMAGE_SIZE, IMAGE_SIZE, "cpu")
    for i, t in enumerate(plan.timesteps):
        with torch.set_grad_enabled(i >= STEPS - grad_steps):
            out = FAMILY.predict(model, model.denoiser, x, t, cond, uncond, GUIDANCE, plan)
            if calls is not None:
                calls.append(out.requires_grad)
            x = FAMILY.step(model, plan, i, out, x)
    with torch.set_grad_enabled(grad_steps > 0):
        return FAMILY.decode(model, x, plan)


def _randomize_lora(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.denoiser.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def test_registry_and_components(folder):
    assert isinstance(family_for_index(_index(folder)), SD3Family)
    m = _load(folder)
    assert m.kind == "sd3" and m.family is FAMILY and m.denoiser.__class__.__name__ == "SD3Transformer2DModel"
    assert len(m.text_encoders) == 3 and m.settings["t5"] and m.native_size == IMAGE_SIZE
    assert not any(p.requires_grad for mod in [m.denoiser, m.vae, *m.text_encoders] for p in mod.parameters())


@pytest.mark.parametrize("dynamic", [False, True])
def test_sample_equals_pipeline(folder, dynamic):
    """Same seed / steps / guidance: the pipeline's image within 1e-4 (float32), static and dynamic shifting."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    print("seed", SEED)
    m, pipe = _load(folder), _pipeline(folder)
    if dynamic:   # SD3.5-style resolution-dependent shift: mu from the image token count
        for obj in (m, pipe):
            obj.scheduler = FlowMatchEulerDiscreteScheduler.from_config(
                pipe.scheduler.config, use_dynamic_shifting=True, base_image_seq_len=16, max_image_seq_len=256)
    ours, ref = _sample(m), _pipeline_images(pipe)
    assert ours.shape == ref.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert (ours - ref).abs().max() < 1e-4, (ours - ref).abs().max()
    assert ours.std() > 1e-3   # not a constant image


def test_generic_sampler_and_load_model_equal_pipeline(folder):
    """fnf.models.load_model (model_index.json -> SD3 family) and fnf.sampling.sample_images (the generic sampler
    of `fnf sample`): the pipeline's images within 1e-4; fnf.sampling.denoise with K=2 carries grad only in the
    last two transformer calls."""
    from fnf import sampling

    print("seed", SEED)
    m = load_model(folder)
    assert m.family.name == "sd3" and m.kind == "sd3"
    cond = encode_prompts(m, PROMPTS, height=IMAGE_SIZE, width=IMAGE_SIZE)
    uncond = encode_prompts(m, ["", ""], height=IMAGE_SIZE, width=IMAGE_SIZE)
    x_T = sampling.initial_latents(m, 2, IMAGE_SIZE, IMAGE_SIZE, torch.Generator().manual_seed(SEED), "cpu")
    ours = sampling.sample_images(m, x_T, cond, uncond, steps=STEPS, guidance_scale=GUIDANCE)
    ref = _pipeline_images(_pipeline(folder))
    assert (ours - ref).abs().max() < 1e-4, (ours - ref).abs().max()
    add_lora(m, rank=4, alpha=8, target_modules=FAMILY.lora_targets)
    calls = []
    hook = m.denoiser.register_forward_hook(lambda mod, args, out: calls.append(torch.is_grad_enabled()))
    try:
        plan = sampling.schedule(m, STEPS, IMAGE_SIZE, IMAGE_SIZE, "cpu")
        z = sampling.draft_k(m, x_T, plan, cond, uncond, guidance_scale=GUIDANCE, grad_steps=2)
    finally:
        hook.remove()
    assert calls == [False, False, True, True] and z.requires_grad


def test_encode_equals_encode_prompt(folder):
    m, pipe = _load(folder), _pipeline(folder)
    with torch.no_grad():
        pe, ne, pp, npp = pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=True)
    cond = FAMILY.encode(m, PROMPTS, height=IMAGE_SIZE, width=IMAGE_SIZE)
    uncond = FAMILY.encode(m, ["", ""], height=IMAGE_SIZE, width=IMAGE_SIZE)
    for a, b in [(cond.hidden, pe), (cond.pooled, pp), (uncond.hidden, ne), (uncond.pooled, npp)]:
        assert a.shape == b.shape and torch.equal(a, b)
    # layout: 16 CLIP tokens (16 + 24 wide, zero-padded to T5's 48) then 256 T5 tokens; pooled 16 + 24
    assert cond.hidden.shape == (2, 16 + 256, 48) and cond.pooled.shape == (2, 40)
    assert torch.all(cond.hidden[:, :16, 40:] == 0) and cond.hidden[:, 16:].abs().sum() > 0
    zero = FAMILY.encode(m, ["", ""], height=IMAGE_SIZE, width=IMAGE_SIZE, zero=True)
    assert torch.all(zero.hidden == 0) and torch.all(zero.pooled == 0)


def test_without_t5_equals_pipeline_without_t5(folder, folder_no_t5):
    """A folder without text_encoder_3, and text_encoder_3=False on a full folder: zero T5 tokens, as the
    pipeline loaded with text_encoder_3=None."""
    print("seed", SEED)
    no_t5 = {"text_encoder_3": None, "tokenizer_3": None}
    for path, kw in [(folder_no_t5, {}), (folder, {"text_encoder_3": False})]:
        m = _load(path, **kw)
        assert len(m.text_encoders) == 2 and not m.settings["t5"]
        cond = FAMILY.encode(m, PROMPTS, height=IMAGE_SIZE, width=IMAGE_SIZE)
        assert torch.all(cond.hidden[:, 16:] == 0)
        ours, ref = _sample(m), _pipeline_images(_pipeline(path, **no_t5))
        assert (ours - ref).abs().max() < 1e-4, (ours - ref).abs().max()


def test_draft_k2_grads_only_lora_and_last_two_calls(folder):
    print("seed", SEED)
    m = _load(folder)
    params = add_lora(m, rank=4, alpha=8, target_modules=FAMILY.lora_targets)
    lora_names = {n for n, p in m.denoiser.named_parameters() if p.requires_grad}
    assert lora_names and all("lora_" in n for n in lora_names)
    # the default targets: q, k, v, out of the image stream (both attentions of the dual-attention layer)
    targeted = {n.rsplit(".lora_", 1)[0] for n in lora_names}
    assert any(n.endswith("attn2.to_q") for n in targeted)
    assert not any(n.endswith(("add_q_proj", "to_add_out")) for n in targeted)
    _randomize_lora(m, SEED)
    calls = []
    images = _sample(m, grad_steps=2, calls=calls)
    assert calls == [False, False, True, True]
    images.mean().backward()
    grads = [p.grad for p in params]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
    for mod in [m.denoiser, m.vae, *m.text_encoders]:
        for n, p in mod.named_parameters():
            assert p.grad is None or "lora_" in n, n
    # the memory lever: transformer and VAE gradient checkpointing give the same gradients (float32)
    m.denoiser.enable_gradient_checkpointing()
    m.vae.enable_gradient_checkpointing()
    for p in params:
        p.grad = None
    _sample(m, grad_steps=2).mean().backward()
    for p, g in zip(params, grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-8)


def test_exported_lora_loads_in_pipeline_and_reproduces(folder, tmp_path):
    """Joint targets (image + text stream projections) trained (random) LoRA -> save_lora -> the pipeline's
    load_lora_weights gives our fine-tuned images; our load_lora into a fresh model does too."""
    print("seed", SEED)
    m = _load(folder)
    add_lora(m, rank=4, alpha=8, target_modules=FAMILY.joint_lora_targets)
    assert any("add_q_proj.lora_A" in n for n, _ in m.denoiser.named_parameters())
    _randomize_lora(m, SEED + 1)
    ours = _sample(m)
    FAMILY.save_lora(m, str(tmp_path / "lora"))
    assert os.path.isfile(tmp_path / "lora" / LORA_WEIGHTS)
    pipe = _pipeline(folder)
    base = _pipeline_images(pipe)
    pipe.load_lora_weights(str(tmp_path / "lora"), weight_name=LORA_WEIGHTS)
    ref = _pipeline_images(pipe)
    assert (ours - base).abs().max() > 1e-2   # the LoRA changes the images, so the next check can fail
    assert (ours - ref).abs().max() < 1e-4, (ours - ref).abs().max()
    fresh = _load(folder)
    FAMILY.load_lora(fresh, str(tmp_path / "lora"), "ft")
    again = _sample(fresh)
    assert (again - ours).abs().max() < 1e-5


def test_clear_errors(folder, tmp_path):
    m = _load(folder)
    with pytest.raises(ValueError, match="height"):
        FAMILY.initial_latents(m, 1, 30, IMAGE_SIZE, torch.Generator(), "cpu")
    with pytest.raises(ValueError, match="width"):
        FAMILY.initial_latents(m, 1, IMAGE_SIZE, 33, torch.Generator(), "cpu")
    x = torch.zeros(1, 4, 16, 16)
    plan = FAMILY.schedule(m, 4, IMAGE_SIZE, IMAGE_SIZE, "cpu")
    with pytest.raises(ValueError, match="eta"):
        FAMILY.step(m, plan, 0, x, x, eta=0.5)
    with pytest.raises(TypeError, match="prompts"):
        FAMILY.encode(m, "a cat", height=IMAGE_SIZE, width=IMAGE_SIZE)
    with pytest.raises(ValueError, match="weight_dtype"):
        FAMILY.load(folder, _index(folder), weight_dtype="fp64")
    with pytest.raises(FileNotFoundError, match="LoRA folder"):
        FAMILY.load_lora(m, str(tmp_path / "nope"), "x")
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken, ignore=shutil.ignore_patterns("transformer"))
    with pytest.raises(ModelLoadError, match="'transformer'"):
        _load(str(broken))
    index = dict(_index(folder), scheduler=["diffusers", "DDIMScheduler"])
    with pytest.raises(ModelLoadError, match="FlowMatchEulerDiscreteScheduler"):
        FAMILY.load(folder, index, weight_dtype=torch.float32)


def test_session_optimizer_step(folder, tmp_path):
    """One trainer step (Focus-N-Fix objective, brightness reward, T=4, K=2) on the tiny SD3 folder: finite,
    applied, only LoRA parameters move."""
    from fnf_tiny_models import tiny_config

    from fnf.train import Session

    print("seed", SEED)
    s = Session(tiny_config(folder, str(tmp_path / "run"), sampling={"height": IMAGE_SIZE, "width": IMAGE_SIZE}))
    assert s.model.family.name == "sd3"
    before = {n: p.detach().clone() for n, p in s.model.denoiser.named_parameters()}
    record, _ = s.optimizer_step(0)
    assert not record["skipped"], record
    assert all(torch.isfinite(torch.as_tensor(v)).all() for k, v in record.items()
               if isinstance(v, float)), record
    moved = {n for n, p in s.model.denoiser.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert moved and all("lora_" in n for n in moved), sorted(moved)[:3]


def test_shipped_config_and_preflight(folder):
    """configs/sd35_medium_focus_n_fix.yaml validates; on the tiny SD3 folder preflight names the family; the
    Separate-and-Enhance objective is refused with a reason (joint attention)."""
    from fnf import config, preflight
    from fnf.config import ConfigError

    cfg = config.load(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                                   "sd35_medium_focus_n_fix.yaml"))
    assert (cfg.sampling.height, cfg.sampling.width, cfg.sampling.truncation_k) == (1024, 1024, 2)
    assert list(cfg.lora.target_modules) == list(FAMILY.lora_targets)
    cfg.model.path = folder
    config.validate(cfg)
    assert preflight.check_model_folder(folder) == "sd3"
    cfg.objective.name = "sepen"
    with pytest.raises(ConfigError, match="joint attention"):
        preflight.check_objective(cfg)


def test_resume_is_exact(folder, tmp_path):
    """3 steps straight == 2 steps, then resumed from the latest checkpoint for the third (torch.equal)."""
    from fnf_tiny_models import tiny_config

    from fnf.lora import lora_state_dict
    from fnf.train import train

    print("seed", SEED)
    extra = {"sampling": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                 "train": {"steps": 3, "grad_accum": 2, "checkpoint_every": 1}}
    full = train(tiny_config(folder, str(tmp_path / "full"), **extra))
    part_cfg = tiny_config(folder, str(tmp_path / "part"), **extra)
    part_cfg.train.steps = 2
    train(part_cfg)
    resumed_cfg = tiny_config(folder, str(tmp_path / "part"), **extra)
    resumed_cfg.train.resume = "latest"
    resumed = train(resumed_cfg)
    a, b = lora_state_dict(full.model.denoiser), lora_state_dict(resumed.model.denoiser)
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed.history[0]["loss"] == full.history[2]["loss"]
