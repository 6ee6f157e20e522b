"""The FLUX.1 family on tiny random-weight FluxPipeline folders (guidance-distilled dev-shaped, and schnell-shaped
without a guidance embedding): samples equal FluxPipeline's, the guidance embedding never doubles the batch,
DRaFT-K gradients reach only LoRA and only the last K transformer calls, LoRA export round-trips through
``FluxPipeline.load_lora_weights``, one trainer step runs, bad input is refused with a clear error."""
from __future__ import annotations

import json
import os
import shutil
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fnf_tiny_models import one_torch_thread  # noqa: F401
from tiny_flux import IMAGE_SIZE, cached_flux

from fnf.families import family_for_index
from fnf.families.flux import FluxFamily, pack_latents, unpack_latents
from fnf.core import LORA_WEIGHTS, ModelLoadError
from fnf.lora import add_lora
from fnf.families.registry import load_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
SEED = 7
PROMPTS = ["a photo of a cat", "a red car"]
STEPS, GUIDANCE = 4, 3.5
FAMILY = FluxFamily()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return cached_flux(str(tmp_path_factory.getbasetemp()))


@pytest.fixture(scope="module")
def schnell(tmp_path_factory):
    return cached_flux(str(tmp_path_factory.getbasetemp()), "flux_schnell")


def _index(path):
    with open(os.path.join(path, "model_index.json")) as f:
        return json.load(f)


def _load(path):
    return FAMILY.load(path, _index(path), weight_dtype=torch.float32)


def _pipeline(path):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _pipeline_images(pipe, guidance=GUIDANCE, **kw):
    with torch.no_grad():
        return pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=guidance, height=IMAGE_SIZE, width=IMAGE_SIZE,
                    output_type="pt", generator=torch.Generator().manual_seed(SEED), **kw).images


def _sample(m, *, guidance=GUIDANCE, negative=False, grad_steps=0, calls=None):
    """Our own loop over the family methods: the first T - grad_steps steps without grad, the rest with grad."""
    cond = FAMILY.encode(m, PROMPTS, height=IMAGE_SIZE, width=IMAGE_SIZE)
    uncond = FAMILY.encode(m, [""] * len(PROMPTS), height=IMAGE_SIZE, width=IMAGE_SIZE) if negative else None
    x = FAMILY.initial_latents(m, len(PROMPTS), IMAGE_SIZE, IMAGE_SIZE, torch.Generator().manual_seed(SEED), "cpu")
    plan = FAMILY.schedule(m, STEPS, IMAGE_SIZE, IMAGE_SIZE, "cpu")
    handle = None
    if calls is not None:
        handle = m.denoiser.register_forward_hook(lambda mod, args, kwargs, out: calls.append(
            (kwargs["hidden_states"].shape[0], out[0].requires_grad)), with_kwargs=True)
    try:
        for i, t in enumerate(plan.timesteps):
            with torch.set_grad_enabled(i >= STEPS - grad_steps):
                out = FAMILY.predict(m, m.denoiser, x if i >= STEPS - grad_steps else x.detach(), t, cond, uncond,
                                     guidance, plan)
                x = FAMILY.step(m, plan, i, out, x)
    finally:
        if handle is not None:
            handle.remove()
    with torch.set_grad_enabled(grad_steps > 0):
        return FAMILY.decode(m, x, plan)


def _randomize_lora(m, seed, std=0.3):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in m.denoiser.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def test_registry_and_packing(folder):
    """model_index.json's FluxPipeline picks this family; pack/unpack are inverse (FluxPipeline's layout)."""
    assert type(family_for_index(_index(folder))).__name__ == "FluxFamily"
    assert FAMILY.supports_sepen is False and FAMILY.lora_targets == ("to_q", "to_k", "to_v", "to_out.0")
    z = torch.randn(2, 16, 6, 8, generator=torch.Generator().manual_seed(SEED))
    from diffusers import FluxPipeline

    packed = pack_latents(z)
    assert torch.equal(packed, FluxPipeline._pack_latents(z, 2, 16, 6, 8))
    assert torch.equal(unpack_latents(packed, 6, 8), z)


@pytest.mark.parametrize("guidance", [GUIDANCE, 1.0])
def test_guidance_distilled_sample_equals_pipeline(folder, guidance):
    """FLUX.1-dev-shaped: the guidance embedding, one transformer row per image even with a negative given."""
    print("seed", SEED)
    m = _load(folder)
    assert m.settings["guidance_embeds"] and not FAMILY.uses_cfg(m, object(), guidance)
    calls = []
    ours = _sample(m, guidance=guidance, negative=True, calls=calls)
    assert [b for b, _ in calls] == [len(PROMPTS)] * STEPS
    ref = _pipeline_images(_pipeline(folder), guidance=guidance)
    assert (ours - ref).abs().max() < 1e-4, (ours - ref).abs().max()
    if guidance != 1.0:   # the embedding matters, so the check above can fail
        assert (ours - _sample(m, guidance=1.0)).abs().max() > 1e-3


def test_true_cfg_sample_equals_pipeline(schnell):
    """Not guidance-distilled (schnell-shaped): guidance > 1 with a negative is the pipeline's true CFG (batch
    doubled); without a negative, the plain conditional sample."""
    print("seed", SEED)
    m = _load(schnell)
    assert not m.settings["guidance_embeds"]
    pipe = _pipeline(schnell)
    calls = []
    ours = _sample(m, guidance=3.0, negative=True, calls=calls)
    assert [b for b, _ in calls] == [2 * len(PROMPTS)] * STEPS
    ref = _pipeline_images(pipe, guidance=0.0, true_cfg_scale=3.0, negative_prompt=[""] * len(PROMPTS))
    assert (ours - ref).abs().max() < 1e-4, (ours - ref).abs().max()
    plain = _sample(m, guidance=3.0)
    ref_plain = _pipeline_images(pipe, guidance=0.0)
    assert (plain - ref_plain).abs().max() < 1e-4
    assert (ours - plain).abs().max() > 1e-3


def test_generic_sampler_and_load_model_equal_pipeline(folder):
    """fnf.models.load_model (model_index.json -> FLUX family) and fnf.sampling.sample_images give the pipeline's
    images."""
    from fnf import sampling
    from fnf.encoding import encode_prompts

    print("seed", SEED)
    m = load_model(folder)
    assert m.family.name == "flux" and m.kind == "flux"
    cond = encode_prompts(m, PROMPTS, height=IMAGE_SIZE, width=IMAGE_SIZE)
    uncond = encode_prompts(m, [""] * len(PROMPTS), height=IMAGE_SIZE, width=IMAGE_SIZE)
    x_T = sampling.initial_latents(m, len(PROMPTS), IMAGE_SIZE, IMAGE_SIZE, torch.Generator().manual_seed(SEED),
                                   "cpu")
    ours = sampling.sample_images(m, x_T, cond, uncond, steps=STEPS, guidance_scale=GUIDANCE, height=IMAGE_SIZE,
                                  width=IMAGE_SIZE)
    ref = _pipeline_images(_pipeline(folder))
    assert (ours - ref).abs().max() < 1e-4, (ours - ref).abs().max()


def test_draft_k2_grads_only_lora_and_last_two_calls(folder):
    print("seed", SEED)
    m = _load(folder)
    params = add_lora(m, rank=4, alpha=8, target_modules=FAMILY.lora_targets)
    lora_names = {n for n, p in m.denoiser.named_parameters() if p.requires_grad}
    assert lora_names and all("lora_" in n for n in lora_names)
    targeted = {n.rsplit(".lora_", 1)[0] for n in lora_names}
    assert any(n.startswith("single_transformer_blocks.0.attn.to_q") for n in targeted)
    assert not any(n.endswith(("add_q_proj", "to_add_out", "proj_mlp")) for n in targeted)
    _randomize_lora(m, SEED)
    calls = []
    images = _sample(m, grad_steps=2, calls=calls)
    assert [g for _, g in calls] == [False, False, True, True]
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
    """All targets (image + text stream projections, single blocks' MLP/out) with a random LoRA -> save_lora ->
    FluxPipeline.load_lora_weights gives our fine-tuned images; our load_lora into a fresh model does too."""
    from fnf.lora import load_lora, save_lora

    print("seed", SEED)
    m = load_model(folder)
    targets = FAMILY.lora_targets + FAMILY.lora_targets_text + FAMILY.lora_targets_single
    add_lora(m, rank=4, alpha=8, target_modules=targets)
    assert any("add_q_proj.lora_A" in n for n, _ in m.denoiser.named_parameters())
    _randomize_lora(m, SEED + 1)
    ours = _sample(m)
    save_lora(m, str(tmp_path / "lora"))
    assert os.path.isfile(tmp_path / "lora" / LORA_WEIGHTS)
    pipe = _pipeline(folder)
    base = _pipeline_images(pipe)
    pipe.load_lora_weights(str(tmp_path / "lora"), weight_name=LORA_WEIGHTS)
    ref = _pipeline_images(pipe)
    assert (ours - base).abs().max() > 1e-2   # the LoRA changes the images, so the next check can fail
    assert (ours - ref).abs().max() < 1e-4, (ours - ref).abs().max()
    fresh = load_model(folder)
    load_lora(fresh, str(tmp_path / "lora"), "ft")
    again = _sample(fresh)
    assert (again - ours).abs().max() < 1e-5


def test_clear_errors(folder, tmp_path):
    m = _load(folder)
    with pytest.raises(ValueError, match="height"):
        FAMILY.initial_latents(m, 1, 2, IMAGE_SIZE, torch.Generator(), "cpu")
    with pytest.raises(ValueError, match="width"):
        FAMILY.schedule(m, STEPS, IMAGE_SIZE, 32.0, "cpu")
    with pytest.raises(ValueError, match="steps"):
        FAMILY.schedule(m, 0, IMAGE_SIZE, IMAGE_SIZE, "cpu")
    x = FAMILY.initial_latents(m, 1, IMAGE_SIZE, IMAGE_SIZE, torch.Generator(), "cpu")
    plan = FAMILY.schedule(m, STEPS, IMAGE_SIZE, IMAGE_SIZE, "cpu")
    with pytest.raises(ValueError, match="eta"):
        FAMILY.step(m, plan, 0, x, x, eta=0.5)
    with pytest.raises(ValueError, match="packed tokens"):
        unpack_latents(x, 8, 8)
    with pytest.raises(TypeError, match="prompts"):
        FAMILY.encode(m, "a cat", height=IMAGE_SIZE, width=IMAGE_SIZE)
    with pytest.raises(ValueError, match="weight_dtype"):
        FAMILY.load(folder, _index(folder), weight_dtype="fp64")
    with pytest.raises(FileNotFoundError, match="LoRA folder"):
        FAMILY.load_lora(m, str(tmp_path / "nope"), "x")
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken, ignore=shutil.ignore_patterns("text_encoder_2"))
    with pytest.raises(ModelLoadError, match="T5"):
        _load(str(broken))
    index = dict(_index(folder), scheduler=["diffusers", "DDIMScheduler"])
    with pytest.raises(ModelLoadError, match="FlowMatchEulerDiscreteScheduler"):
        FAMILY.load(folder, index, weight_dtype=torch.float32)


def test_session_optimizer_step(folder, tmp_path):
    """One trainer step (Focus-N-Fix objective, brightness reward, T=4, K=2) on the tiny FLUX folder: finite,
    applied, only LoRA parameters move."""
    from fnf_tiny_models import tiny_config

    from fnf.train import Session

    print("seed", SEED)
    s = Session(tiny_config(folder, str(tmp_path / "run"), sampling={"height": IMAGE_SIZE, "width": IMAGE_SIZE}))
    assert s.model.family.name == "flux"
    before = {n: p.detach().clone() for n, p in s.model.denoiser.named_parameters()}
    record, _ = s.optimizer_step(0)
    assert not record["skipped"], record
    assert all(torch.isfinite(torch.as_tensor(v)).all() for k, v in record.items()
               if isinstance(v, float)), record
    moved = {n for n, p in s.model.denoiser.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert moved and all("lora_" in n for n in moved), sorted(moved)[:3]


def test_shipped_config_and_preflight(folder):
    """configs/flux1_dev_focus_n_fix.yaml validates on the tiny FLUX folder; preflight names the family; the
    Separate-and-Enhance objective is refused with a reason (joint attention)."""
    from fnf import config, preflight
    from fnf.config import ConfigError

    cfg = config.load(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                                   "flux1_dev_focus_n_fix.yaml"))
    assert (cfg.sampling.height, cfg.sampling.width, cfg.sampling.guidance_scale) == (1024, 1024, 3.5)
    assert list(cfg.lora.target_modules) == list(FAMILY.lora_targets)
    cfg.model.path = folder
    config.validate(cfg)
    assert preflight.check_model_folder(folder) == "flux"
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
             "train": {"steps": 3, "checkpoint_every": 1}}
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


def test_draft_lv_copies_renoise_along_the_flow_path(folder):
    """DRaFT-LV through the generic sampler: n copies of the last step, each with grad, stacked copy-major."""
    from fnf import sampling

    print("seed", SEED)
    m = _load(folder)
    add_lora(m, rank=2, alpha=2, target_modules=FAMILY.lora_targets)
    _randomize_lora(m, SEED)
    cond = FAMILY.encode(m, PROMPTS, height=IMAGE_SIZE, width=IMAGE_SIZE)
    x_T = FAMILY.initial_latents(m, len(PROMPTS), IMAGE_SIZE, IMAGE_SIZE, torch.Generator().manual_seed(SEED), "cpu")
    plan = sampling.schedule(m, STEPS, IMAGE_SIZE, IMAGE_SIZE, "cpu")
    z = sampling.draft_lv(m, x_T, plan, cond, None, copies=2, guidance_scale=GUIDANCE,
                          generator=torch.Generator().manual_seed(SEED))
    assert z.shape == (2 * len(PROMPTS), *x_T.shape[1:]) and z.requires_grad
    assert (z[:2] - z[2:]).abs().max() > 0   # two different re-noisings
    images = sampling.decode(m, z, plan)
    assert images.shape == (4, 3, IMAGE_SIZE, IMAGE_SIZE)
