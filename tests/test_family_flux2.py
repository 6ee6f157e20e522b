"""The FLUX.2 family on a tiny random-weight Flux2Pipeline folder (guidance-distilled, FLUX.2-dev-shaped): the
latent layout and mu equal the pipeline's, samples equal Flux2Pipeline's, DRaFT-K gradients reach only LoRA and
only the last K transformer calls, the Focus-N-Fix penalty holds pixels outside the mask, resume is exact, LoRA
export round-trips through ``Flux2Pipeline.load_lora_weights``, bad input is refused with a clear error.

Skipped where diffusers has no Flux2Pipeline (the CI floor, diffusers 0.34)."""
from __future__ import annotations

import json
import os
import shutil
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fnf_tiny_models import one_torch_thread  # noqa: F401,E402
from tiny_flux2 import IMAGE_SIZE, cached_flux2, have_flux2  # noqa: E402

pytestmark = pytest.mark.skipif(not have_flux2(), reason="the installed diffusers/transformers have no "
                                "Flux2Pipeline / Mistral3 (FLUX.2 needs a newer diffusers than the 0.34 floor)")

from fnf.families import family_for_index  # noqa: E402
from fnf.families.flux2 import (  # noqa: E402
    Flux2Family,
    empirical_mu,
    latent_ids,
    pack_latents,
    patchify,
    text_ids,
    unpack_latents,
    unpatchify,
)
from fnf.core import LORA_WEIGHTS, ModelLoadError  # noqa: E402
from fnf.lora import add_lora  # noqa: E402
from fnf.families.registry import load_model  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
SEED = 7
PROMPTS = ["a photo of a cat", "a red car"]
STEPS, GUIDANCE = 4, 4.0
FAMILY = Flux2Family()
SIZE = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return cached_flux2(str(tmp_path_factory.getbasetemp()))


def _index(path):
    with open(os.path.join(path, "model_index.json")) as f:
        return json.load(f)


def _pipeline(path):
    from diffusers import Flux2Pipeline

    pipe = Flux2Pipeline.from_pretrained(path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _pipeline_images(pipe, prompts=PROMPTS, guidance=GUIDANCE, seed=SEED):
    with torch.no_grad():
        return pipe(prompt=prompts, num_inference_steps=STEPS, guidance_scale=guidance, height=IMAGE_SIZE,
                    width=IMAGE_SIZE, output_type="pt", generator=torch.Generator().manual_seed(seed)).images


def _sample(m, *, guidance=GUIDANCE, grad_steps=0, calls=None, negative=False):
    """Our own loop over the family methods: the first T - grad_steps steps without grad, the rest with grad."""
    cond = FAMILY.encode(m, PROMPTS, **SIZE)
    uncond = FAMILY.encode(m, [""] * len(PROMPTS), **SIZE) if negative else None
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


def test_latent_layout_and_mu_equal_the_pipelines():
    """pack / unpack / patchify / ids are Flux2Pipeline's static helpers; empirical_mu is compute_empirical_mu."""
    from diffusers import Flux2Pipeline
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

    print("seed", SEED)
    z = torch.randn(2, 4, 6, 10, generator=torch.Generator().manual_seed(SEED))
    p = patchify(z)
    assert torch.equal(p, Flux2Pipeline._patchify_latents(z)) and torch.equal(unpatchify(p), z)
    packed = pack_latents(p)
    assert torch.equal(packed, Flux2Pipeline._pack_latents(p))
    ids = Flux2Pipeline._prepare_latent_ids(p)
    assert torch.equal(latent_ids(3, 5, "cpu"), ids[0]) and ids.dtype == latent_ids(3, 5, "cpu").dtype
    assert torch.equal(unpack_latents(packed, 3, 5), Flux2Pipeline._unpack_latents_with_ids(packed, ids))
    assert torch.equal(text_ids(7, "cpu"), Flux2Pipeline._prepare_text_ids(torch.zeros(2, 7, 3))[1])
    for seq, steps in [(64, 4), (1024, 28), (4096, 50), (4301, 50), (16384, 10)]:
        assert empirical_mu(seq, steps) == compute_empirical_mu(seq, steps)


def test_registry_and_generic_sampler_equal_pipeline(folder):
    """model_index.json's Flux2Pipeline picks this family; load_model + fnf.sampling.sample_images give the
    pipeline's images; no CFG batch doubling even with a negative; the guidance embedding matters."""
    from fnf import preflight, sampling
    from fnf.encoding import encode_prompts

    print("seed", SEED)
    assert type(family_for_index(_index(folder))).__name__ == "Flux2Family"
    assert preflight.check_model_folder(folder) == "flux2"
    m = load_model(folder)
    assert m.family.name == "flux2" and m.kind == "flux2" and m.settings["guidance_embeds"]
    cond = encode_prompts(m, PROMPTS, **SIZE)
    uncond = encode_prompts(m, [""] * len(PROMPTS), **SIZE)
    assert cond.hidden.shape == (2, 512, 3 * 16) and (cond.hidden[0] - cond.hidden[1]).abs().max() > 0
    assert not FAMILY.uses_cfg(m, uncond, GUIDANCE)
    x_T = sampling.initial_latents(m, len(PROMPTS), IMAGE_SIZE, IMAGE_SIZE, torch.Generator().manual_seed(SEED),
                                   "cpu")
    calls = []
    handle = m.denoiser.register_forward_hook(lambda mod, a, kw, out: calls.append(kw["hidden_states"].shape[0]),
                                          with_kwargs=True)
    ours = sampling.sample_images(m, x_T, cond, uncond, steps=STEPS, guidance_scale=GUIDANCE, **SIZE)
    handle.remove()
    assert calls == [len(PROMPTS)] * STEPS
    pipe = _pipeline(folder)
    ref = _pipeline_images(pipe)
    assert (ours - ref).abs().max() < 1e-4, (ours - ref).abs().max()
    low = _pipeline_images(pipe, guidance=1.0)
    assert (ref - low).abs().max() > 1e-3           # the embedding matters, so the check above can fail
    ours_low = sampling.sample_images(m, x_T, cond, None, steps=STEPS, guidance_scale=1.0, **SIZE)
    assert (ours_low - low).abs().max() < 1e-4


def test_max_sequence_length_equals_encode_prompt(folder):
    """model.max_sequence_length = 64: our embeddings are Flux2Pipeline.encode_prompt(max_sequence_length=64)'s."""
    from fnf.encoding import encode_prompts

    m = load_model(folder, max_sequence_length=64)
    ours = encode_prompts(m, PROMPTS, **SIZE).hidden
    pipe = _pipeline(folder)
    with torch.no_grad():
        ref, ids = pipe.encode_prompt(PROMPTS, device="cpu", max_sequence_length=64)
    assert ours.shape == (2, 64, 48) and torch.equal(ours, ref)
    assert torch.equal(text_ids(64, "cpu"), ids[0])
    with pytest.raises(ValueError, match="max_sequence_length"):
        FAMILY.load(folder, _index(folder), weight_dtype=torch.float32, max_sequence_length=0)


def test_draft_k2_grads_only_lora_and_last_two_calls(folder):
    print("seed", SEED)
    m = load_model(folder)
    params = add_lora(m, rank=4, alpha=8, target_modules=FAMILY.lora_targets)
    lora_names = {n for n, p in m.denoiser.named_parameters() if p.requires_grad}
    assert lora_names and all("lora_" in n for n in lora_names)
    targeted = {n.rsplit(".lora_", 1)[0] for n in lora_names}
    assert "transformer_blocks.0.attn.to_out.0" in targeted
    assert not any(n.startswith("single_transformer_blocks") or "add_" in n for n in targeted)
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
    """Every target (image + text stream attention, single blocks' fused projection, feed-forwards) with a random
    LoRA -> save_lora -> Flux2Pipeline.load_lora_weights gives our fine-tuned images; our load_lora into a fresh
    model does too; `fnf sample` with the exported LoRA writes the pipeline's fine-tuned image (8-bit PNG)."""
    import numpy as np
    from PIL import Image

    from fnf import cli
    from fnf.lora import load_lora, save_lora

    print("seed", SEED)
    m = load_model(folder)
    targets = FAMILY.lora_targets + FAMILY.lora_targets_text + FAMILY.lora_targets_single + FAMILY.lora_targets_ff
    add_lora(m, rank=4, alpha=8, target_modules=targets)
    names = [n for n, _ in m.denoiser.named_parameters()]
    for t in ("add_q_proj.lora_A", "to_qkv_mlp_proj.lora_A", "ff_context.linear_in.lora_A"):
        assert any(t in n for n in names), t
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
    assert (_sample(fresh) - ours).abs().max() < 1e-5
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(f"sampling: {{steps: {STEPS}, guidance_scale: {GUIDANCE}, height: {IMAGE_SIZE}, "
                        f"width: {IMAGE_SIZE}}}\n")
    rc = cli.main(["sample", "--config", str(cfg_file), "--model", folder, "--lora", str(tmp_path / "lora"),
                   "--out", str(tmp_path / "out"), "--prompts", PROMPTS[1], "--seeds", str(SEED)])
    assert rc == 0
    png = np.array(Image.open(tmp_path / "out" / "samples_compare" / "p000_s7.png").convert("RGB"))
    png = torch.from_numpy(png).permute(2, 0, 1).float() / 255   # base | fine-tuned, 2 px white padding
    tuned = png[:, 2:2 + IMAGE_SIZE, IMAGE_SIZE + 4:2 * IMAGE_SIZE + 4]
    single = _pipeline_images(pipe, prompts=[PROMPTS[1]])[0]
    assert (tuned - single).abs().max() <= 1 / 255 + 1e-4, (tuned - single).abs().max()


def test_clear_errors(folder, tmp_path):
    m = load_model(folder)
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
        unpack_latents(x, 4, 4)
    with pytest.raises(TypeError, match="prompts"):
        FAMILY.encode(m, "a cat", **SIZE)
    cond = FAMILY.encode(m, PROMPTS, **SIZE)
    with pytest.raises(ValueError, match="cond"):
        FAMILY.predict(m, m.denoiser, x, plan.timesteps[0], cond, None, GUIDANCE, plan)
    with pytest.raises(ValueError, match="weight_dtype"):
        FAMILY.load(folder, _index(folder), weight_dtype="fp64")
    with pytest.raises(FileNotFoundError, match="LoRA folder"):
        FAMILY.load_lora(m, str(tmp_path / "nope"), "x")
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken, ignore=shutil.ignore_patterns("text_encoder"))
    with pytest.raises(ModelLoadError, match="text_encoder"):
        load_model(str(broken))
    with pytest.raises(ModelLoadError, match="FlowMatchEulerDiscreteScheduler"):
        FAMILY.load(folder, dict(_index(folder), scheduler=["diffusers", "DDIMScheduler"]), weight_dtype=torch.float32)
    with pytest.raises(ModelLoadError, match="tokenizer"):
        FAMILY.load(folder, dict(_index(folder), tokenizer=["transformers", "NoSuchTokenizer"]),
                    weight_dtype=torch.float32)
    import importlib.util

    pixtral = "torchvision" if importlib.util.find_spec("torchvision") is None else "tokenizer"
    with pytest.raises(ModelLoadError, match=pixtral):   # FLUX.2-dev's PixtralProcessor needs torchvision
        FAMILY.load(folder, dict(_index(folder), tokenizer=["transformers", "PixtralProcessor"]),
                    weight_dtype=torch.float32)
    with pytest.raises(ModelLoadError, match="looks like 'flux2'"):
        load_model(folder, kind="flux")


def test_session_optimizer_step_and_sepen_refused(folder, tmp_path):
    """One trainer step (Focus-N-Fix objective, brightness reward, T=4, K=2): finite, applied, only LoRA moves;
    Separate-and-Enhance is refused with a reason (joint attention)."""
    from fnf_tiny_models import tiny_config

    from fnf import preflight
    from fnf.config import ConfigError
    from fnf.train import Session

    print("seed", SEED)
    cfg = tiny_config(folder, str(tmp_path / "run"), sampling=dict(SIZE), model={"kind": "flux2"})
    s = Session(cfg)
    assert s.model.family.name == "flux2"
    before = {n: p.detach().clone() for n, p in s.model.denoiser.named_parameters()}
    record, _ = s.optimizer_step(0)
    assert not record["skipped"], record
    assert all(torch.isfinite(torch.as_tensor(v)).all() for k, v in record.items()
               if isinstance(v, float)), record
    moved = {n for n, p in s.model.denoiser.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert moved and all("lora_" in n for n in moved), sorted(moved)[:3]
    cfg.objective.name = "sepen"
    with pytest.raises(ConfigError, match="joint attention"):
        preflight.check_objective(cfg)


def test_large_beta_holds_pixels_outside_the_mask_beta_zero_lets_them_move(folder, tmp_path):
    """Focus-N-Fix on FLUX.2: with a left-half mask, beta = 20 keeps the right half near I0 during training (the
    logged change_outside of steps 3-4, once the LoRA has moved), beta = 0 lets it move."""
    from fnf_tiny_models import tiny_config

    from fnf.images import save_png
    from fnf.train import train

    print("seed", SEED)
    mask = torch.zeros(IMAGE_SIZE, IMAGE_SIZE)
    mask[:, : IMAGE_SIZE // 2] = 1
    save_png(mask, str(tmp_path / "mask" / "left.png"))
    change = {}
    for beta in (0.0, 20.0):
        cfg = tiny_config(folder, str(tmp_path / f"b{beta}"), sampling=dict(SIZE),
                          localize={"spec": f"file:{tmp_path}/mask/*.png"}, objective={"beta": beta},
                          train={"steps": 4, "lr": 0.3, "prompts": [PROMPTS[0]]})
        res = train(cfg)
        change[beta] = sum(h["change_outside"] for h in res.history[2:]) / len(res.history[2:])
    print("change_outside", change)
    assert change[0.0] > 0.005, change
    assert change[20.0] < 0.5 * change[0.0], change


def test_resume_is_exact(folder, tmp_path):
    """3 steps straight == 2 steps, then resumed from the latest checkpoint for the third (torch.equal)."""
    from fnf_tiny_models import tiny_config

    from fnf.lora import lora_state_dict
    from fnf.train import train

    print("seed", SEED)
    extra = {"sampling": dict(SIZE), "train": {"steps": 3, "checkpoint_every": 1, "prompts": [PROMPTS[0]]}}
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
    m = load_model(folder)
    add_lora(m, rank=2, alpha=2, target_modules=FAMILY.lora_targets)
    _randomize_lora(m, SEED)
    cond = FAMILY.encode(m, PROMPTS, **SIZE)
    x_T = FAMILY.initial_latents(m, len(PROMPTS), IMAGE_SIZE, IMAGE_SIZE, torch.Generator().manual_seed(SEED), "cpu")
    plan = sampling.schedule(m, STEPS, IMAGE_SIZE, IMAGE_SIZE, "cpu")
    z = sampling.draft_lv(m, x_T, plan, cond, None, copies=2, guidance_scale=GUIDANCE,
                          generator=torch.Generator().manual_seed(SEED))
    assert z.shape == (2 * len(PROMPTS), *x_T.shape[1:]) and z.requires_grad
    assert (z[:2] - z[2:]).abs().max() > 0   # two different re-noisings
    assert sampling.decode(m, z, plan).shape == (4, 3, IMAGE_SIZE, IMAGE_SIZE)
