"""The family contract, one row per model family (tiny random-weight pipeline folders): the generic sampler equals
the diffusers pipeline, DRaFT-K carries grad in the last K denoiser calls only and reaches only LoRA (gradient
checkpointing gives the same gradients), DRaFT-LV stacks its re-noised copies, an exported LoRA loads in the
pipeline (and in ``fnf sample``) and reproduces our images, one trainer step moves only LoRA, resume is exact, bad
input is a clear error. A new family is one more row; what only one family has is in its own test file here."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass, field

import pytest
import torch

from tests.families.common import (
                                   PROMPTS,
                                   SEED,
                                   STEPS,
                                   index_of,
                                   pipeline,
                                   pipeline_images,
                                   randomize_lora,
                                   rows_of,
                                   sample_loop,
)
from tests.fnf_tiny_models import cached_model, one_torch_thread, tiny_config  # noqa: F401
from tests.tiny_flux import cached_flux
from tests.tiny_flux2 import cached_flux2, have_flux2
from tests.tiny_flux2_klein import cached_flux2_klein, have_klein
from tests.tiny_qwenimage import cached_qwenimage, have_qwenimage
from tests.tiny_sd3 import cached_sd3
from tests.tiny_zimage import cached_zimage, have_zimage

from fnf import cli, config, preflight, sampling
from fnf.config import ConfigError
from fnf.core import LORA_WEIGHTS, ModelLoadError
from fnf.encoding import encode_negative, encode_prompts
from fnf.families.registry import family_by_name, load_model
from fnf.lora import add_lora, load_lora, lora_state_dict, save_lora
from fnf.train import Session, train, vae_memory

os.environ.setdefault("HF_HUB_OFFLINE", "1")
SIZE = 32   # every tiny folder's native size
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass(frozen=True)
class Row:
    family: str
    make: object                    # root -> folder
    pipeline: str                   # the diffusers pipeline class
    guidance: float
    cfg_rows: int                   # denoiser rows per image in a guided call (2: CFG doubles the batch)
    negative: bool                  # whether our own loop passes the negative (the pipeline's default call)
    targeted: object                # default LoRA targets: names -> bool
    export_targets: tuple           # LoRA targets of the export round trip
    export_names: tuple             # parameter names those targets must create
    bad_size: tuple | None          # (height, width) initial_latents refuses (None: the UNets round any size)
    broken: tuple                   # (component left out of a copied folder, the error's match)
    flow: bool = True               # flow-matching Euler: eta, steps=0, a non-flow scheduler and str prompts refused
    sepen: bool = False             # Separate-and-Enhance supported (else refused: joint attention)
    randomize: str = "lora_B"       # which LoRA tensors get random values
    shipped: tuple | None = None    # (configs/ file, {section.key: value}) of the family's shipped config
    resume_train: dict = field(default_factory=dict)
    model: dict = field(default_factory=dict)

    def __str__(self):
        return self.family


SD, SDXL = family_by_name("sd"), family_by_name("sdxl")
SD3 = family_by_name("sd3")
FLUX = family_by_name("flux")
FLUX2 = family_by_name("flux2")
QWEN_IMAGE = family_by_name("qwen-image")
ZIMAGE = family_by_name("z-image")
UNET_TARGETS = SD.lora_targets
ROWS = [
    Row("sd", lambda root: cached_model("sd", root), "StableDiffusionPipeline", 3.0, 2, True,
        lambda t: any(n.endswith("attn2.to_k") for n in t) and all(n.endswith(UNET_TARGETS) for n in t),
        UNET_TARGETS, ("attn1.to_q.lora_A",), None, ("unet", "'unet'"), flow=False, sepen=True),
    Row("sdxl", lambda root: cached_model("sdxl", root), "StableDiffusionXLPipeline", 3.0, 2, True,
        lambda t: any(n.endswith("attn2.to_k") for n in t) and all(n.endswith(UNET_TARGETS) for n in t),
        UNET_TARGETS, ("attn1.to_q.lora_A",), None, ("text_encoder_2", "text_encoder_2"), flow=False, sepen=True),
    Row("sd3", cached_sd3, "StableDiffusion3Pipeline", 3.0, 2, True,
        lambda t: any(n.endswith("attn2.to_q") for n in t) and not any(n.endswith(("add_q_proj", "to_add_out"))
                                                                         for n in t),
        SD3.joint_lora_targets, ("add_q_proj.lora_A",), (30, 33), ("transformer", "'transformer'"),
        randomize="lora_", resume_train={"grad_accum": 2},
        shipped=("sd35_medium_focus_n_fix.yaml", {"sampling.height": 1024, "sampling.width": 1024,
                                                  "sampling.truncation_k": 2})),
    Row("flux", cached_flux, "FluxPipeline", 3.5, 1, False,
        lambda t: any(n.startswith("single_transformer_blocks.0.attn.to_q") for n in t)
        and not any(n.endswith(("add_q_proj", "to_add_out", "proj_mlp")) for n in t),
        FLUX.lora_targets + FLUX.lora_targets_text + FLUX.lora_targets_single, ("add_q_proj.lora_A",), (2, 32.0),
        ("text_encoder_2", "T5"),
        shipped=("flux1_dev_focus_n_fix.yaml", {"sampling.height": 1024, "sampling.width": 1024,
                                                "sampling.guidance_scale": 3.5})),
    Row("flux2", cached_flux2, "Flux2Pipeline", 4.0, 1, False,
        lambda t: "transformer_blocks.0.attn.to_out.0" in t
        and not any(n.startswith("single_transformer_blocks") or "add_" in n for n in t),
        FLUX2.lora_targets + FLUX2.lora_targets_text + FLUX2.lora_targets_single + FLUX2.lora_targets_ff,
        ("add_q_proj.lora_A", "to_qkv_mlp_proj.lora_A", "ff_context.linear_in.lora_A"), (2, 32.0),
        ("text_encoder", "text_encoder"), resume_train={"prompts": [PROMPTS[0]]}, model={"kind": "flux2"},
        shipped=("flux2_dev_focus_n_fix.yaml", {"sampling.height": 1024, "sampling.width": 1024,
                                                "sampling.guidance_scale": 4.0, "sampling.truncation_k": 1})),
    Row("flux2-klein", cached_flux2_klein, "Flux2KleinPipeline", 4.0, 2, True,
        lambda t: "transformer_blocks.0.attn.to_out.0" in t
        and not any(n.startswith("single_transformer_blocks") or "add_" in n for n in t),
        FLUX2.lora_targets + FLUX2.lora_targets_text + FLUX2.lora_targets_single + FLUX2.lora_targets_ff,
        ("add_q_proj.lora_A", "to_qkv_mlp_proj.lora_A", "ff_context.linear_in.lora_A"), (2, 32.0),
        ("text_encoder", "text_encoder"), resume_train={"prompts": [PROMPTS[0]]}, model={"kind": "flux2-klein"},
        shipped=("flux2_klein_4b_focus_n_fix.yaml", {"sampling.height": 1024, "sampling.width": 1024,
                                                     "sampling.steps": 4, "sampling.truncation_k": 2})),
    Row("qwen-image", cached_qwenimage, "QwenImagePipeline", 1.0, 1, False,
        lambda t: "transformer_blocks.1.attn.to_out.0" in t and not any("add_" in n or "mlp" in n for n in t),
        QWEN_IMAGE.lora_targets + QWEN_IMAGE.lora_targets_text + QWEN_IMAGE.lora_targets_ff,
        ("add_q_proj.lora_A", "img_mlp.net.0.proj.lora_A", "txt_mlp.net.2.lora_A"), (2, 32.0),
        ("text_encoder", "text_encoder"), model={"kind": "qwen-image"},
        shipped=("qwen_image_focus_n_fix.yaml", {"sampling.height": 1024, "sampling.width": 1024,
                                                 "sampling.guidance_scale": 4.0})),
    Row("z-image", cached_zimage, "ZImagePipeline", 3.0, 2, True,
        lambda t: {"layers.0.attention.to_q", "noise_refiner.0.attention.to_out.0",
                   "context_refiner.0.attention.to_k"} <= t and not any("feed_forward" in n for n in t),
        ZIMAGE.lora_targets + ZIMAGE.lora_targets_ff, ("feed_forward.w1.lora_A", "feed_forward.w3.lora_A"),
        (30, 34), ("text_encoder", "'text_encoder'"), resume_train={"prompts": [PROMPTS[0]]},
        model={"kind": "z-image"},
        shipped=("zimage_focus_n_fix.yaml", {"sampling.height": 1024, "sampling.width": 1024,
                                             "sampling.guidance_scale": 0.0, "sampling.steps": 9})),
]
PARAMS = [pytest.param(r, id=r.family, marks=pytest.mark.skipif(
    r.family == "flux2" and not have_flux2(), reason="the installed diffusers has no Flux2Pipeline (0.34 floor)"))
    for r in ROWS]
PARAMS = [p if p.id != "flux2-klein" or have_klein() else pytest.param(*p.values, id=p.id, marks=pytest.mark.skip(
    reason="the installed diffusers has no Flux2KleinPipeline (0.34 floor)")) for p in PARAMS]
PARAMS = [p if p.id != "qwen-image" or have_qwenimage() else pytest.param(*p.values, id=p.id, marks=pytest.mark.skip(
    reason="the installed diffusers has no QwenImagePipeline (0.34 floor)")) for p in PARAMS]
PARAMS = [p if p.id != "z-image" or have_zimage() else pytest.param(*p.values, id=p.id, marks=pytest.mark.skip(
    reason="the installed diffusers has no ZImagePipeline (0.34 floor)")) for p in PARAMS]


@pytest.fixture(params=PARAMS)
def row(request):
    return request.param


@pytest.fixture
def folder(row, tmp_path_factory):
    return row.make(str(tmp_path_factory.getbasetemp()))


def _sample(row, m, **kw):
    return sample_loop(m.family, m, SIZE, kw.pop("guidance", row.guidance), negative=row.negative, **kw)


def _config(row, folder, out, **sections):
    sections.setdefault("sampling", {"height": SIZE, "width": SIZE})
    if row.model:
        sections.setdefault("model", dict(row.model))
    return tiny_config(folder, out, **sections)


def test_generic_sampler_and_load_model_equal_pipeline(row, folder):
    """load_model (model_index.json -> the family) and fnf.sampling.sample_images give the pipeline's images;
    a guided call has cfg_rows denoiser rows per image."""
    print("seed", SEED)
    m = load_model(folder)
    assert m.family.name == row.family and m.kind == row.family
    cond = encode_prompts(m, PROMPTS, height=SIZE, width=SIZE)
    uncond = encode_negative(m, "", len(PROMPTS), height=SIZE, width=SIZE)
    x_T = sampling.initial_latents(m, len(PROMPTS), SIZE, SIZE, torch.Generator().manual_seed(SEED), "cpu")
    calls = []
    hook = m.denoiser.register_forward_hook(lambda mod, a, kw, out: calls.append(rows_of(a, kw)), with_kwargs=True)
    try:
        ours = sampling.sample_images(m, x_T, cond, uncond, steps=STEPS, guidance_scale=row.guidance, height=SIZE,
                                      width=SIZE)
    finally:
        hook.remove()
    assert calls == [row.cfg_rows * len(PROMPTS)] * STEPS
    ref = pipeline_images(pipeline(folder, row.pipeline), SIZE, row.guidance)
    assert (ours - ref).abs().max() < 1e-4, (ours - ref).abs().max()


def test_draft_k2_grads_only_lora_and_last_two_calls(row, folder):
    """Our loop and fnf.sampling.draft_k: grad in the last 2 of 4 denoiser calls; the gradient reaches every LoRA
    tensor and nothing else; denoiser and VAE gradient checkpointing give the same gradients (float32)."""
    print("seed", SEED)
    m = load_model(folder)
    params = add_lora(m, rank=4, alpha=8, target_modules=m.family.lora_targets)
    lora_names = {n for n, p in m.denoiser.named_parameters() if p.requires_grad}
    assert lora_names and all("lora_" in n for n in lora_names)
    assert row.targeted({n.rsplit(".lora_", 1)[0] for n in lora_names})
    randomize_lora(m, SEED, names=row.randomize)
    calls = []
    images = _sample(row, m, grad_steps=2, calls=calls)
    assert [g for _, g in calls] == [False, False, True, True]
    images.mean().backward()
    grads = [p.grad for p in params]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
    for mod in [m.denoiser, m.vae, *m.text_encoders]:
        for n, p in mod.named_parameters():
            assert p.grad is None or "lora_" in n, n
    m.denoiser.enable_gradient_checkpointing()
    if m.vae._supports_gradient_checkpointing:
        m.vae.enable_gradient_checkpointing()
    else:   # Qwen-Image's VAE has no diffusers checkpointing: fnf's per-ResNet one (the trainer's default)
        vae_memory.apply(m.vae, "resnet")
    for p in params:
        p.grad = None
    _sample(row, m, grad_steps=2).mean().backward()
    for p, g in zip(params, grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-8)
    cond = encode_prompts(m, PROMPTS, height=SIZE, width=SIZE)
    x_T = sampling.initial_latents(m, len(PROMPTS), SIZE, SIZE, torch.Generator().manual_seed(SEED), "cpu")
    seen = []
    hook = m.denoiser.register_forward_hook(lambda mod, args, out: seen.append(torch.is_grad_enabled()))
    try:
        z = sampling.draft_k(m, x_T, sampling.schedule(m, STEPS, SIZE, SIZE, "cpu"), cond, None,
                             guidance_scale=row.guidance, grad_steps=2)
    finally:
        hook.remove()
    assert seen == [False, False, True, True] and z.requires_grad


def test_draft_lv_copies_renoise_along_the_schedule(row, folder):
    """DRaFT-LV through the generic sampler: n copies of the last step, each with grad, stacked copy-major."""
    print("seed", SEED)
    m = load_model(folder)
    add_lora(m, rank=2, alpha=2, target_modules=m.family.lora_targets)
    randomize_lora(m, SEED)
    cond = encode_prompts(m, PROMPTS, height=SIZE, width=SIZE)
    x_T = sampling.initial_latents(m, len(PROMPTS), SIZE, SIZE, torch.Generator().manual_seed(SEED), "cpu")
    plan = sampling.schedule(m, STEPS, SIZE, SIZE, "cpu")
    z = sampling.draft_lv(m, x_T, plan, cond, None, copies=2, guidance_scale=row.guidance,
                          generator=torch.Generator().manual_seed(SEED))
    assert z.shape == (2 * len(PROMPTS), *x_T.shape[1:]) and z.requires_grad
    assert (z[:2] - z[2:]).abs().max() > 0   # two different re-noisings
    assert sampling.decode(m, z, plan).shape == (4, 3, SIZE, SIZE)


def test_exported_lora_loads_in_pipeline_and_reproduces(row, folder, tmp_path):
    """A random LoRA on every export target -> save_lora -> pipeline.load_lora_weights gives our fine-tuned images;
    our load_lora into a fresh model does too; `fnf sample` with the exported LoRA writes the pipeline's
    fine-tuned image (8-bit PNG)."""
    import numpy as np
    from PIL import Image

    print("seed", SEED)
    m = load_model(folder)
    add_lora(m, rank=4, alpha=8, target_modules=row.export_targets)
    names = [n for n, _ in m.denoiser.named_parameters()]
    for t in row.export_names:
        assert any(t in n for n in names), t
    randomize_lora(m, SEED + 1, names=row.randomize)
    ours = _sample(row, m)
    save_lora(m, str(tmp_path / "lora"))
    assert os.path.isfile(tmp_path / "lora" / LORA_WEIGHTS)
    pipe = pipeline(folder, row.pipeline)
    base = pipeline_images(pipe, SIZE, row.guidance)
    pipe.load_lora_weights(str(tmp_path / "lora"), weight_name=LORA_WEIGHTS)
    ref = pipeline_images(pipe, SIZE, row.guidance)
    assert (ours - base).abs().max() > 1e-2   # the LoRA changes the images, so the next check can fail
    assert (ours - ref).abs().max() < 1e-4, (ours - ref).abs().max()
    fresh = load_model(folder)
    load_lora(fresh, str(tmp_path / "lora"), "ft")
    assert (_sample(row, fresh) - ours).abs().max() < 1e-5
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(f"sampling: {{steps: {STEPS}, guidance_scale: {row.guidance}, height: {SIZE}, "
                        f"width: {SIZE}}}\n")
    rc = cli.main(["sample", "--config", str(cfg_file), "--model", folder, "--lora", str(tmp_path / "lora"),
                   "--out", str(tmp_path / "out"), "--prompts", PROMPTS[1], "--seeds", str(SEED)])
    assert rc == 0
    manifest = json.loads((tmp_path / "out" / "samples_compare" / "manifest.json").read_text())
    tuned_file = next(f["file"] for f in manifest["files"] if f["image"].startswith("LoRA "))   # the LoRA's image
    assert tuned_file.startswith(f"p000_s{SEED}_")
    png = np.array(Image.open(tmp_path / "out" / "samples_compare" / tuned_file).convert("RGB"))
    tuned = torch.from_numpy(png).permute(2, 0, 1).float() / 255
    single = pipeline_images(pipe, SIZE, row.guidance, prompts=[PROMPTS[1]])[0]
    assert (tuned - single).abs().max() <= 1 / 255 + 1e-4, (tuned - single).abs().max()


def test_clear_errors(row, folder, tmp_path):
    m = load_model(folder)
    family = m.family
    if row.bad_size is not None:
        bad_h, bad_w = row.bad_size
        with pytest.raises(ValueError, match="height"):
            family.initial_latents(m, 1, bad_h, SIZE, torch.Generator(), "cpu")
        with pytest.raises(ValueError, match="width"):
            family.initial_latents(m, 1, SIZE, bad_w, torch.Generator(), "cpu")
    if row.flow:
        with pytest.raises(ValueError, match="steps"):
            family.schedule(m, 0, SIZE, SIZE, "cpu")
        x = family.initial_latents(m, 1, SIZE, SIZE, torch.Generator(), "cpu")
        plan = family.schedule(m, STEPS, SIZE, SIZE, "cpu")
        with pytest.raises(ValueError, match="eta"):
            family.step(m, plan, 0, x, x, eta=0.5)
        with pytest.raises(TypeError, match="prompts"):
            family.encode(m, "a cat", height=SIZE, width=SIZE)
        with pytest.raises(ModelLoadError, match="FlowMatchEulerDiscreteScheduler"):
            family.load(folder, dict(index_of(folder), scheduler=["diffusers", "DDIMScheduler"]),
                        weight_dtype=torch.float32)
    with pytest.raises(ValueError, match="weight_dtype"):
        family.load(folder, index_of(folder), weight_dtype="fp64")
    with pytest.raises(FileNotFoundError, match="LoRA folder"):
        family.load_lora(m, str(tmp_path / "nope"), "x")
    left_out, match = row.broken
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken, ignore=shutil.ignore_patterns(left_out))
    with pytest.raises(ModelLoadError, match=match):
        load_model(str(broken))


def test_session_optimizer_step_and_sepen_refused(row, folder, tmp_path):
    """One trainer step (Focus-N-Fix objective, brightness reward, T=4, K=2): finite, applied, only LoRA moves;
    Separate-and-Enhance passes preflight where the family supports it, else is refused (joint attention)."""
    print("seed", SEED)
    cfg = _config(row, folder, str(tmp_path / "run"))
    s = Session(cfg)
    assert s.model.family.name == row.family
    before = {n: p.detach().clone() for n, p in s.model.denoiser.named_parameters()}
    record, _ = s.optimizer_step(0)
    assert not record["skipped"], record
    assert all(torch.isfinite(torch.as_tensor(v)).all() for k, v in record.items()
               if isinstance(v, float)), record
    moved = {n for n, p in s.model.denoiser.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert moved and all("lora_" in n for n in moved), sorted(moved)[:3]
    cfg.objective.name = "sepen"
    if row.sepen:
        preflight.check_objective(cfg)
    else:
        with pytest.raises(ConfigError, match="joint attention"):
            preflight.check_objective(cfg)


def test_resume_is_exact(row, folder, tmp_path):
    """3 steps straight == 2 steps, then resumed from the latest checkpoint for the third (torch.equal)."""
    print("seed", SEED)
    extra = {"train": {"steps": 3, "checkpoint_every": 1, **row.resume_train}}
    full = train(_config(row, folder, str(tmp_path / "full"), **extra))
    part_cfg = _config(row, folder, str(tmp_path / "part"), **extra)
    part_cfg.train.steps = 2
    train(part_cfg)
    resumed_cfg = _config(row, folder, str(tmp_path / "part"), **extra)
    resumed_cfg.train.resume = "latest"
    resumed = train(resumed_cfg)
    a, b = lora_state_dict(full.model.denoiser), lora_state_dict(resumed.model.denoiser)
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed.history[0]["loss"] == full.history[2]["loss"]


def test_shipped_config_validates_on_the_tiny_folder(row, folder):
    """The family's shipped config has its documented values and default LoRA targets, validates on the tiny
    folder, preflight names the family; Separate-and-Enhance is refused with a reason (joint attention)."""
    if row.shipped is None:
        pytest.skip(f"no shipped config for {row.family} (tests/test_configs.py checks every shipped config)")
    name, expected = row.shipped
    cfg = config.load(os.path.join(ROOT, "configs", name))
    for key, value in expected.items():
        section, field_name = key.split(".")
        assert getattr(getattr(cfg, section), field_name) == value, key
    assert list(cfg.lora.target_modules) == list(family_by_name(row.family).lora_targets)
    cfg.model.path = folder
    config.validate(cfg)
    assert preflight.check_model_folder(folder) == row.family
    cfg.objective.name = "sepen"
    with pytest.raises(ConfigError, match="joint attention"):
        preflight.check_objective(cfg)


def test_schedule_is_a_value_and_the_scheduler_keeps_its_state(row, folder):
    """family.schedule returns a frozen Schedule and leaves model.scheduler as loaded (no attribute set or
    replaced, by scheduling or by sampling); the load-time settings are read-only."""
    m = load_model(folder)
    state = dict(vars(m.scheduler))
    plan = sampling.schedule(m, STEPS, SIZE, SIZE, "cpu")
    other = sampling.schedule(m, 2, SIZE, SIZE, "cpu")
    assert len(plan) == plan.steps == STEPS and len(other) == 2 and (plan.height, plan.width) == (SIZE, SIZE)
    assert (plan.sigmas is not None) == row.flow and (plan.sigmas is None or len(plan.sigmas) == STEPS + 1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.height = 64
    cond = encode_prompts(m, PROMPTS, height=SIZE, width=SIZE)
    x_T = sampling.initial_latents(m, len(PROMPTS), SIZE, SIZE, torch.Generator().manual_seed(SEED), "cpu")
    with torch.no_grad():
        sampling.run_steps(m, x_T, plan, cond, None, guidance_scale=row.guidance)
    assert vars(m.scheduler).keys() == state.keys()
    assert all(vars(m.scheduler)[k] is v for k, v in state.items()), [k for k, v in state.items()
                                                                     if vars(m.scheduler)[k] is not v]
    assert "image_size" not in m.settings
    with pytest.raises(TypeError):
        m.settings["max_sequence_length"] = 1
