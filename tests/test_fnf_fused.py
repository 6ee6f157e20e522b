"""memory.fused_lora: I0 and I's no-grad steps in one UNet batch (LoRA scale 0 | 1) = two separate passes.

Float32 on CPU (the fused processor's plain-torch backend; one case through the Triton kernels under
TRITON_INTERPRET=1, set by conftest.py). Reference: today's path, an unpatched peft UNet with I0 sampled
with adapters disabled and I with the adapter on.
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fnf_tiny_models import IMAGE_SIZE, cached_model, tiny_config, one_torch_thread  # noqa: E402,F401
import fnf_kernels  # noqa: E402
from fnf import cli, config, fused_lora  # noqa: E402
from fnf.config import ConfigError  # noqa: E402
from fnf.models import (adapters_disabled, add_lora, encode_prompts, load_model,  # noqa: E402
                        lora_state_dict)
from fnf.sampling import denoise, denoise_batched, grad_start, initial_latents, sample_images  # noqa: E402
from fnf.train import train  # noqa: E402

TOL = dict(atol=2e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return cached_model("sd", str(tmp_path_factory.getbasetemp()))


@pytest.fixture(scope="module")
def setup(sd):
    """Tiny SD with a rank-4 LoRA (non-zero B: every LoRA error shows), two prompts, batch 2."""
    m = load_model(sd)
    params = add_lora(m, rank=4, alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in m.unet.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    m.unet.enable_gradient_checkpointing()  # the trainer's default: recompute must see the same LoRA scale
    cond = encode_prompts(m, ["a photo of a cat", "a red car"], height=IMAGE_SIZE, width=IMAGE_SIZE)
    uncond = encode_prompts(m, [""], height=IMAGE_SIZE, width=IMAGE_SIZE).repeat(2)
    x_T = initial_latents(m, 2, IMAGE_SIZE, IMAGE_SIZE, torch.Generator().manual_seed(3), "cpu")
    return m, params, cond, uncond, x_T


def _draft(m, params, run):
    """(z_ref, z, LoRA grads of a fixed linear functional of z) for one way of sampling both trajectories."""
    for p in params:
        p.grad = None
    z_ref, z = run()
    weights = torch.linspace(-1, 1, z.numel()).reshape(z.shape)
    (z * weights).sum().backward()
    grads = [p.grad.clone() for p in params]
    return z_ref, z.detach(), grads


def _two_passes(m, cond, uncond, x_T, kw, seed):
    with torch.no_grad(), adapters_disabled(m.unet):
        z_ref = denoise(m, x_T, cond, uncond, grad_steps=0, generator=torch.Generator().manual_seed(seed),
                        **{k: v for k, v in kw.items() if k not in ("grad_steps", "lv_copies")})
    z = denoise(m, x_T, cond, uncond, generator=torch.Generator().manual_seed(seed), **kw)
    return z_ref, z


def _batched(m, cond, uncond, x_T, kw, seed):
    gens = (torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed))
    z_ref, x_ft = denoise_batched(m, x_T, cond, uncond, generators=gens, **kw)
    start = grad_start(kw["steps"], kw["grad_steps"], kw["lv_copies"])
    z = denoise(m, x_ft, cond, uncond, generator=gens[1], start=start, **kw)
    return z_ref, z


def _batch_sizes(unet, fn):
    sizes = []
    handle = unet.register_forward_pre_hook(lambda mod, args: sizes.append(args[0].shape[0]))
    try:
        out = fn()
    finally:
        handle.remove()
    return out, sizes


CASES = {  # name: (guidance, K, lv_copies, eta)
    "cfg-K2": (3.0, 2, 0, 0.0),
    "cfg-K1-eta": (3.0, 1, 0, 0.7),
    "nocfg-K2-eta": (1.0, 2, 0, 0.7),
    "nocfg-K1": (1.0, 1, 0, 0.0),
    "cfg-LV2-eta": (3.0, 1, 2, 0.7),
}


@pytest.mark.parametrize("case", list(CASES))
def test_batched_sampling_matches_two_passes_values_and_lora_grads(setup, case):
    m, params, cond, uncond, x_T = setup
    guidance, k, lv, eta = CASES[case]
    steps = 4
    kw = dict(steps=steps, guidance_scale=guidance, grad_steps=k, lv_copies=lv, eta=eta)
    ref_ref, ref_z, ref_g = _draft(m, params, lambda: _two_passes(m, cond, uncond, x_T, kw, seed=11))
    assert (ref_ref - ref_z[:2]).abs().max() > 1e-2  # the LoRA changes I: a wrong row scale would show
    fnf_kernels.patch_lora(m.unet)
    try:
        (got_ref, got_z, got_g), sizes = _batch_sizes(
            m.unet, lambda: _draft(m, params, lambda: _batched(m, cond, uncond, x_T, kw, seed=11)))
    finally:
        fnf_kernels.unpatch_lora(m.unet)
    rows = 2 * (2 if guidance > 1 else 1)  # UNet rows of one trajectory for B = 2
    shared = grad_start(steps, k, lv)
    grad_calls = lv if lv else k
    # shared steps: I0 + I in one batch; then I0's tail alone; then I's grad steps
    assert sizes == [2 * rows] * shared + [rows] * (steps - shared) + [rows] * grad_calls
    torch.testing.assert_close(got_ref, ref_ref, **TOL)
    torch.testing.assert_close(got_z, ref_z, **TOL)
    for p, a, b in zip(params, got_g, ref_g):
        assert b.abs().max() > 0
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-3)


def test_batched_sampling_sdxl_conditioning(tmp_path_factory):
    """SDXL's pooled embeds and time ids follow the stacked batch (CFG on, eta > 0)."""
    m = load_model(cached_model("sdxl", str(tmp_path_factory.getbasetemp())))
    add_lora(m, rank=4, alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    with torch.no_grad():
        for n, p in m.unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    cond = encode_prompts(m, ["a photo of a cat", "a red car"], height=IMAGE_SIZE, width=IMAGE_SIZE)
    uncond = encode_prompts(m, [""], height=IMAGE_SIZE, width=IMAGE_SIZE, zero=True).repeat(2)
    x_T = initial_latents(m, 2, IMAGE_SIZE, IMAGE_SIZE, torch.Generator().manual_seed(3), "cpu")
    kw = dict(steps=3, guidance_scale=3.0, grad_steps=1, lv_copies=0, eta=0.5)
    with torch.no_grad():
        ref_ref, ref_z = _two_passes(m, cond, uncond, x_T, kw, seed=5)
        fnf_kernels.patch_lora(m.unet)
        z_ref, z = _batched(m, cond, uncond, x_T, kw, seed=5)
    assert (ref_ref - ref_z).abs().max() > 1e-3
    torch.testing.assert_close(z_ref, ref_ref, **TOL)
    torch.testing.assert_close(z, ref_z, **TOL)


def test_batched_sampling_through_triton_kernels(setup):
    """One batched step (scale 0 | 1 rows) through the Triton kernels = the two peft passes."""
    from fnf_kernels.triton_kernels import lora_linear as tk
    if not torch.cuda.is_available() and type(tk._down_kernel).__name__ != "InterpretedFunction":
        pytest.skip("triton was imported without TRITON_INTERPRET=1 and there is no GPU")
    m, params, cond, uncond, x_T = setup
    cond, x_T = cond.index(torch.tensor([1])), x_T[1:]  # 1 sample, no CFG, 1 step: the interpreter is slow
    kw = dict(steps=1, guidance_scale=1.0, grad_steps=0, lv_copies=0, eta=0.0)
    with torch.no_grad():
        ref_ref, ref_z = _two_passes(m, cond, None, x_T, kw, seed=0)
    fnf_kernels.patch_lora(m.unet, backend="triton")
    try:
        z_ref, z = denoise_batched(m, x_T, cond, None, **kw)
    finally:
        fnf_kernels.unpatch_lora(m.unet)
    assert (ref_ref - ref_z).abs().max() > 1e-3  # 50x the tolerance: a wrong row scale would show
    torch.testing.assert_close(z_ref, ref_ref, **TOL)
    torch.testing.assert_close(z, ref_z, **TOL)


# ------------------------------------------------------------------------------------------ training
def _cfg(sd, out, mode, **sections):
    return tiny_config(sd, out, memory={"unet_checkpointing": True, "fused_lora": mode}, **sections)


@pytest.mark.parametrize("sampling,pool", [({}, 0), ({"truncation_k": 1, "lv_copies": 2, "eta": 0.5,
                                                        "guidance_scale": 1.0}, 0), ({}, 2)],
                         ids=["cfg-K2", "nocfg-LV2-eta", "cfg-K2-reference-pool"])
def test_training_fused_on_gives_the_same_lora_as_off(sd, tmp_path, sampling, pool):
    steps, lr = 2, 1e-2
    extra = dict(sampling=sampling, train={"steps": steps, "batch_size": 2, "lr": lr, "seeds_per_prompt": pool})
    off = train(_cfg(sd, str(tmp_path / "off"), "off", **extra))
    on = train(_cfg(sd, str(tmp_path / "on"), "on", **extra))
    for a, b in zip(off.history, on.history):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    wa, wb = lora_state_dict(off.model.unet), lora_state_dict(on.model.unet)
    assert wa.keys() == wb.keys()
    assert max(wa[k].abs().max().item() for k in wa if "lora_B" in k) > 0.5 * lr  # training moved B off zero
    # AdamW's first steps are about lr * sign(g): a gradient entry near 0 turns float rounding into an O(lr)
    # difference, so the weights are compared within 2 % of the largest distance training can move them.
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], atol=0.02 * lr * steps, rtol=0, msg=key)
    # the returned model is a plain peft UNet again
    assert {type(p.processor).__name__ for p in on.model.unet.modules() if hasattr(p, "to_q")} == {"AttnProcessor2_0"}


def test_resume_with_fused_on_is_exact(sd, tmp_path):
    extra = dict(train={"steps": 3, "grad_accum": 2, "warmup_steps": 2, "checkpoint_every": 1})
    full = train(_cfg(sd, str(tmp_path / "full"), "on", **extra))
    part_cfg = _cfg(sd, str(tmp_path / "part"), "on", **extra)
    part_cfg.train.steps = 2
    train(part_cfg)
    resumed_cfg = _cfg(sd, str(tmp_path / "part"), "on", **extra)
    resumed_cfg.train.resume = "latest"
    resumed = train(resumed_cfg)
    a, b = lora_state_dict(full.model.unet), lora_state_dict(resumed.model.unet)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [h["step"] for h in resumed.history] == [3]
    assert resumed.history[0]["loss"] == full.history[2]["loss"]


def test_exported_lora_from_a_fused_run_loads_with_load_lora_weights(sd, tmp_path):
    from diffusers import StableDiffusionPipeline

    res = train(_cfg(sd, str(tmp_path / "run"), "on", train={"steps": 2, "lr": 5e-2}))
    m = res.model
    cond = encode_prompts(m, ["a red car"], height=IMAGE_SIZE, width=IMAGE_SIZE)
    uncond = encode_prompts(m, [""], height=IMAGE_SIZE, width=IMAGE_SIZE)
    x_T = initial_latents(m, 1, IMAGE_SIZE, IMAGE_SIZE, torch.Generator().manual_seed(7), "cpu")
    ours = sample_images(m, x_T, cond, uncond, steps=4, guidance_scale=3.0)
    pipe = StableDiffusionPipeline.from_pretrained(sd, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(latents=x_T.clone(), num_inference_steps=4, guidance_scale=3.0, output_type="pt",
              height=IMAGE_SIZE, width=IMAGE_SIZE)
    with torch.no_grad():
        base = pipe("a red car", **kw).images
        pipe.load_lora_weights(res.lora_dir)
        tuned = pipe("a red car", **kw).images
    assert (tuned - base).abs().max() > 1e-3
    torch.testing.assert_close(tuned, ours, atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------------ config, CLI, modes
def test_config_key_aliases_and_errors(tmp_path):
    assert config.from_dict({}).memory.fused_lora == "off"
    for given, want in ((True, "on"), (False, "off"), ("auto", "auto"), ("on", "on"), ("yes", "on")):
        assert config.from_dict({"memory": {"fused_lora": given}}).memory.fused_lora == want
    cfg = config.load(None, ["memory.fused_lora=on"])  # YAML reads `on` as true
    assert cfg.memory.fused_lora == "on"
    assert config.load(None, ["memory.fused_lora=off"]).memory.fused_lora == "off"
    with pytest.raises(ConfigError, match="'memory.fused_lora'.*one of auto, on, off"):
        config.from_dict({"memory": {"fused_lora": "fast"}})
    with pytest.raises(ConfigError, match="'lora.dropout'.*memory.fused_lora=on"):
        config.from_dict({"memory": {"fused_lora": "on"}, "lora": {"dropout": 0.1}})
    config.from_dict({"memory": {"fused_lora": "auto"}, "lora": {"dropout": 0.1}})  # auto falls back instead
    args = cli.build_parser().parse_args(["train", "--fused-lora"])
    assert cli.config_from_args(args).memory.fused_lora == "on"
    args = cli.build_parser().parse_args(["train", "--fused-lora", "auto"])
    assert cli.config_from_args(args).memory.fused_lora == "auto"
    assert cli.config_from_args(cli.build_parser().parse_args(["train"])).memory.fused_lora == "off"


def test_enable_modes(sd):
    m = load_model(sd)
    add_lora(m, rank=2, alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    assert fused_lora.enable(m.unet, "off", "cpu")[0] is False
    on, why = fused_lora.enable(m.unet, "auto", "cpu")
    assert on is False and "CUDA" in why  # auto: CPU training stays on peft
    assert not any(isinstance(p.processor, fnf_kernels.FusedLoRAAttnProcessor)
                   for p in m.unet.modules() if hasattr(p, "to_q"))
    assert fused_lora.enable(m.unet, "on", "cpu")[0] is True
    fused_lora.disable(m.unet)
    conv = load_model(sd)  # LoRA on a conv cannot take a per-sample scale
    add_lora(conv, rank=2, alpha=2, target_modules=["to_q", "conv_in"])
    with pytest.raises(ValueError, match="memory.fused_lora=on"):
        fused_lora.enable(conv.unet, "on", "cpu")
    assert not hasattr(conv.unet, "_fnf_lora_state")  # left unpatched
