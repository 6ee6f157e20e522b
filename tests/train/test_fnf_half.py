"""Half precision: the VAE upcast (force_upcast), fp16 + GradScaler training on tiny SD and SDXL, the three
kinds of non-finite step, and LoRA dropout acting only in the grad-carrying UNet calls."""
import json
import os
import shutil
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fnf_tiny_models import IMAGE_SIZE, cached_model, tiny_config, one_torch_thread  # noqa: E402,F401
from fnf.lora import add_lora, lora_dropout_layers, lora_state_dict  # noqa: E402
from fnf.encoding import encode_prompts  # noqa: E402
from fnf.families.registry import load_model  # noqa: E402
from fnf.families.base import set_vae_precision  # noqa: E402
from fnf.sampling import decode, draft_k, initial_latents, sample_images, schedule  # noqa: E402
from fnf.train import Session, train  # noqa: E402

OVERFLOW_GAIN = 1e4   # decoder.conv_in x 1e4: activations ~1e5 (> fp16's 65504), weights still < 2e3


def _overflowing_copy(src: str, dst: str, force_upcast: bool) -> str:
    """A copy of a tiny pipeline folder whose VAE decoder overflows in float16 (as SD/SDXL VAEs do) but is
    finite in float32 (the GroupNorms after conv_in rescale), with the given force_upcast."""
    from diffusers import AutoencoderKL

    if not os.path.isdir(dst):
        shutil.copytree(src, dst)
        vae = AutoencoderKL.from_pretrained(os.path.join(src, "vae"), local_files_only=True)
        with torch.no_grad():
            vae.decoder.conv_in.weight.mul_(OVERFLOW_GAIN)
            vae.decoder.conv_in.bias.mul_(OVERFLOW_GAIN)
        vae.register_to_config(force_upcast=force_upcast)
        vae.save_pretrained(os.path.join(dst, "vae"))
    return dst


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.getbasetemp())


def _latents(seed=0, batch=2):
    return torch.randn(batch, 4, IMAGE_SIZE // 2, IMAGE_SIZE // 2, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------ VAE upcast
def test_force_upcast_keeps_the_vae_fp32_and_decodes_with_autocast_off(root):
    sd = cached_model("sd", root)
    upcast = _overflowing_copy(sd, os.path.join(root, "sd_overflow_upcast"), True)
    plain = _overflowing_copy(sd, os.path.join(root, "sd_overflow_plain"), False)
    z = _latents().half().float()                              # exactly representable in fp16
    reference = decode(load_model(upcast), z)                  # fp32 weights: the independent reference
    assert torch.isfinite(reference).all() and reference.std() > 0.05

    # Without force_upcast the fp16 VAE overflows: the hazard the upcast exists for.
    m16 = load_model(plain, weight_dtype="fp16")
    assert m16.vae_dtype == torch.float16 and not m16.vae_upcast
    assert not torch.isfinite(m16.vae.decode(z.half() / 0.18215).sample).all()

    m = load_model(upcast, weight_dtype="fp16")
    assert m.denoiser.dtype == torch.float16 and m.vae_dtype == torch.float32 and m.vae_upcast
    with torch.autocast("cpu", dtype=torch.float16):
        images = decode(m, z.half())                           # fp16 latents, fp16 autocast around it
    torch.testing.assert_close(images, reference, rtol=0, atol=1e-6)

    # fp32 weights under fp16 autocast: autocast alone would run the VAE convs in fp16 and overflow.
    m32 = load_model(upcast)
    with torch.autocast("cpu", dtype=torch.float16):
        assert not torch.isfinite(decode(m32, z)).all()        # vae_upcast off: what the old decode did
        assert set_vae_precision(m32, torch.float32, fp16_autocast=True)
        torch.testing.assert_close(decode(m32, z), reference, rtol=0, atol=1e-6)
    assert not set_vae_precision(m32, torch.bfloat16) and m32.vae_dtype == torch.bfloat16  # bf16: no upcast


def test_upcast_decode_carries_gradient_with_and_without_vae_checkpointing(root):
    m = load_model(_overflowing_copy(cached_model("sd", root), os.path.join(root, "sd_overflow_upcast"), True),
                   weight_dtype="fp16")
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            m.vae.enable_gradient_checkpointing()
        z = _latents(1).requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.float16):
            decode(m, z).mean().backward()
        grads.append(z.grad)
    assert torch.isfinite(grads[0]).all() and grads[0].abs().max() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-9)


def test_session_upcasts_an_in_memory_model_and_a_fp16_autocast_run(root):
    upcast = _overflowing_copy(cached_model("sd", root), os.path.join(root, "sd_overflow_upcast"), True)
    cfg = tiny_config(upcast, os.path.join(root, "unused"), model={"weight_dtype": "fp16"},
                      memory={"mixed_precision": "fp16"})
    s = Session(cfg, model=load_model(upcast))                 # in-memory fp32 model cast by the Session
    assert s.model.denoiser.dtype == torch.float16 and s.model.vae_dtype == torch.float32 and s.model.vae_upcast
    cfg = tiny_config(upcast, os.path.join(root, "unused"), memory={"mixed_precision": "fp16"})
    s = Session(cfg)                                           # fp32 weights, fp16 autocast
    assert s.model.vae_dtype == torch.float32 and s.model.vae_upcast


# ------------------------------------------------------------------------------------------ fp16 training
def _data_skips(history):
    return [h for h in history if h["skipped"] and not h["scaler_overflow"]]


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_fp16_weights_with_grad_scaler_train_end_to_end(kind, root, tmp_path):
    """fp16 weights + fp16 autocast + GradScaler on a VAE that overflows in fp16 (force_upcast set): finite
    images, no data skips, the LoRA moves and stays finite. Before the upcast every step was skipped (NaN)."""
    folder = _overflowing_copy(cached_model(kind, root), os.path.join(root, f"{kind}_overflow_upcast"), True)
    cfg = tiny_config(folder, str(tmp_path / "run"), model={"weight_dtype": "fp16"},
                      memory={"mixed_precision": "fp16", "vae_checkpointing": True}, train={"steps": 3})
    res = train(cfg)
    hist = res.history
    print([(h["skipped"], h.get("skip_reason"), h["grad_scale"]) for h in hist])
    assert not _data_skips(hist)
    for h in hist:  # a scaler overflow may only be the scaler backing off: the step is not applied
        assert not h["skipped"] or "scale lowered" in h["skip_reason"], h
    assert sum(not h["skipped"] for h in hist) >= 2
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in hist)
    lora = lora_state_dict(res.model.denoiser)
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in lora.values())
    assert max(p.abs().max().item() for n, p in lora.items() if "lora_B" in n) > 1e-4  # B starts at zero
    m = res.model
    assert m.denoiser.dtype == torch.float16 and m.vae_upcast
    cond = encode_prompts(m, ["a red car"], height=IMAGE_SIZE, width=IMAGE_SIZE)
    uncond = encode_prompts(m, [""], height=IMAGE_SIZE, width=IMAGE_SIZE, zero=kind == "sdxl")
    x_T = initial_latents(m, 1, IMAGE_SIZE, IMAGE_SIZE, torch.Generator().manual_seed(3), "cpu")
    with torch.autocast("cpu", dtype=torch.float16):
        images = sample_images(m, x_T, cond, uncond, steps=4, guidance_scale=3.0)
    assert torch.isfinite(images).all() and images.std() > 0.01
    log = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    assert log and all("scaler_overflow" in r and "grad_scale" in r for r in log)


class InfGradient(torch.autograd.Function):
    """Identity forward, infinite backward: a finite loss whose gradient is not."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("inf")


class InfGradReward(torch.nn.Module):
    def forward(self, images, prompts=None):
        return InfGradient.apply(images).mean(dim=(1, 2, 3))


def test_the_three_kinds_of_non_finite_step_are_told_apart(root, tmp_path):
    sd = cached_model("sd", root)
    half = dict(model={"weight_dtype": "fp16"}, memory={"mixed_precision": "fp16"})

    # (b) the scaler's own overflow: a scale so high that the fp16 backward overflows.
    s = Session(tiny_config(sd, str(tmp_path / "b"), **half))
    s.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 60)
    before = {k: v.clone() for k, v in lora_state_dict(s.model.denoiser).items()}
    record, _ = s.optimizer_step(0)
    assert record["skipped"] and record["scaler_overflow"], record
    assert record["skip_reason"] == f"fp16 grad-scaler overflow (scale lowered to {2.0 ** 59:g})"
    assert record["grad_scale"] == 2.0 ** 59 and s.lr_schedule.last_epoch == 0
    after = lora_state_dict(s.model.denoiser)
    assert all(torch.equal(before[k], after[k]) for k in before)   # not applied; no NaN written
    s.scaler.update(65536.0)                                        # the scale backed off far enough
    record, _ = s.optimizer_step(1)
    assert not record["skipped"] and not record["scaler_overflow"] and record["grad_scale"] == 65536.0
    assert s.lr_schedule.last_epoch == 1

    # (a) data NaN under fp16 + scaler: "non-finite loss or reward", not a scaler overflow.
    s = Session(tiny_config(sd, str(tmp_path / "a"), reward={"spec": "brightness"}, **half))
    s.objective.reward = lambda images, prompts: images.mean(dim=(1, 2, 3)) * float("nan")
    record, _ = s.optimizer_step(0)
    assert record["skipped"] and not record["scaler_overflow"]
    assert record["skip_reason"] == "non-finite loss or reward" and record["grad_scale"] == 65536.0

    # (c) a non-finite gradient without a scaler (fp32): "non-finite gradient".
    s = Session(tiny_config(sd, str(tmp_path / "c")))
    s.objective.reward = InfGradReward()
    record, _ = s.optimizer_step(0)
    assert record["skipped"] and not record["scaler_overflow"] and "grad_scale" not in record
    assert record["skip_reason"] == "non-finite gradient"


def test_a_step_that_would_write_nan_weights_raises(root, tmp_path):
    s = Session(tiny_config(cached_model("sd", root), str(tmp_path / "nan")))

    def poison(optimizer, args, kwargs):
        with torch.no_grad():
            s.params[0][0] = float("nan")

    s.optimizer.register_step_post_hook(poison)
    with pytest.raises(FloatingPointError, match="non-finite"):
        s.optimizer_step(0)


# ------------------------------------------------------------------------------------------ LoRA dropout
def _lora_model(folder, dropout, seed=0):
    m = load_model(folder)
    torch.manual_seed(seed)
    add_lora(m, rank=4, alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"], dropout=dropout)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # LoRA B starts at zero, which would make dropout invisible
        for n, p in m.denoiser.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return m


def _unet_inputs(unet):
    seen = []
    hook = unet.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    return seen, hook


def test_lora_dropout_acts_only_in_the_grad_steps(root):
    sd = cached_model("sd", root)
    drop, nodrop = _lora_model(sd, 0.5), _lora_model(sd, 0.0)
    assert not drop.denoiser.training and any(isinstance(d, torch.nn.Dropout) for d in lora_dropout_layers(drop.denoiser))
    cond = encode_prompts(drop, ["a photo of a cat"], height=IMAGE_SIZE, width=IMAGE_SIZE)
    uncond = encode_prompts(drop, [""], height=IMAGE_SIZE, width=IMAGE_SIZE)
    x_T = initial_latents(drop, 1, IMAGE_SIZE, IMAGE_SIZE, torch.Generator().manual_seed(5), "cpu")
    kw = dict(guidance_scale=3.0, grad_steps=2)
    plan = schedule(drop, 4, IMAGE_SIZE, IMAGE_SIZE, "cpu")

    def run(model, torch_seed):
        seen, hook = _unet_inputs(model.denoiser)
        torch.manual_seed(torch_seed)
        z = draft_k(model, x_T, plan, cond, uncond, **kw)
        hook.remove()
        return z.detach(), seen

    z_nodrop, in_nodrop = run(nodrop, 1)
    z_a, in_a = run(drop, 1)
    z_b, in_b = run(drop, 2)
    # Calls 0 and 1 are the no-grad steps; call 2 receives their result: identical to the no-dropout run.
    for i in range(3):
        assert torch.equal(in_a[i], in_nodrop[i]) and torch.equal(in_b[i], in_nodrop[i]), i
    # The grad steps see dropout: different masks for different seeds, and not the no-dropout result.
    assert (z_a - z_b).abs().max() > 1e-3 and (z_a - z_nodrop).abs().max() > 1e-3
    assert torch.equal(run(nodrop, 2)[0], z_nodrop)           # control: no dropout, no seed dependence
    assert not any(d.training for d in lora_dropout_layers(drop.denoiser))  # restored after the grad steps
    # Control: dropout in the no-grad steps too (the old unet.train()) would change call 2's input.
    drop.denoiser.train()
    assert not torch.equal(run(drop, 1)[1][2], in_nodrop[2])
    drop.denoiser.eval()
    with torch.no_grad():  # plain sampling (no grad anywhere) never drops out
        torch.manual_seed(1)
        a = draft_k(drop, x_T, plan, cond, uncond, **kw)
        torch.manual_seed(2)
        assert torch.equal(a, draft_k(drop, x_T, plan, cond, uncond, **kw))


def test_session_lora_dropout_is_on_exactly_in_grad_carrying_unet_calls(root, tmp_path):
    cfg = tiny_config(cached_model("sd", root), str(tmp_path / "d"), lora={"dropout": 0.5},
                      localize={"spec": "saliency"})
    s = Session(cfg)
    unet = s.model.denoiser
    layers = [d for d in lora_dropout_layers(unet) if isinstance(d, torch.nn.Dropout)]
    assert layers and not unet.training
    calls = []  # (grad enabled, LoRA dropout on) per UNet call
    hook = unet.register_forward_pre_hook(
        lambda mod, args: calls.append((torch.is_grad_enabled(), any(d.training for d in layers))))
    s.micro_batch(0, 0)
    hook.remove()
    # I0: 4 no-grad calls (adapters off); I: 2 no-grad calls, then K = 2 grad-carrying ones.
    assert calls == [(False, False)] * 6 + [(True, True)] * 2, calls
    assert not any(d.training for d in layers)
