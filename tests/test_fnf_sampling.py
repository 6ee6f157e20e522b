"""DRaFT-K truncation, DRaFT-LV, and where gradients flow (LoRA parameters only).

Which UNet calls carry grad is checked here; the values of dL/dLoRA against a hand-unrolled DDIM loop in float64
are in test_draft_gradients.py."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fnf_tiny_models import cached_model, one_torch_thread  # noqa: E402,F401
from fnf.lora import adapters_disabled, add_lora
from fnf.encoding import encode_prompts
from fnf.families.registry import load_model
from fnf.sampling import decode, draft_k, draft_lv, initial_latents, schedule

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _setup(kind, root):
    m = load_model(cached_model(kind, root))
    add_lora(m, rank=4, alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    torch.manual_seed(0)
    with torch.no_grad():  # non-zero B so that every LoRA tensor gets a gradient
        for n, p in m.denoiser.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    m.denoiser.enable_gradient_checkpointing()
    m.vae.enable_gradient_checkpointing()
    cond = encode_prompts(m, ["a photo of a cat"], height=32, width=32)
    uncond = encode_prompts(m, [""], height=32, width=32, zero=kind == "sdxl")
    x_T = initial_latents(m, 1, 32, 32, torch.Generator().manual_seed(0), "cpu")
    return m, cond, uncond, x_T


def _record_grad_calls(unet):
    calls = []
    handle = unet.register_forward_hook(lambda mod, args, out: calls.append(
        (out[0] if isinstance(out, tuple) else out.sample).requires_grad))
    return calls, handle


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_only_last_k_unet_calls_carry_grad_and_grads_reach_lora_only(kind, tmp_path_factory):
    m, cond, uncond, x_T = _setup(kind, str(tmp_path_factory.getbasetemp()))
    calls, handle = _record_grad_calls(m.denoiser)
    z = draft_k(m, x_T, schedule(m, 5, 32, 32, "cpu"), cond, uncond, guidance_scale=3.0, grad_steps=2)
    handle.remove()
    assert calls == [False, False, False, True, True]
    images = decode(m, z)
    assert images.requires_grad and images.min() >= 0 and images.max() <= 1
    images.mean().backward()
    for name, p in m.denoiser.named_parameters():
        if "lora_" in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    for module in (m.vae, *m.text_encoders):
        assert all(p.grad is None for p in module.parameters())


def test_k_equals_steps_and_pretrained_pass_without_grad(tmp_path_factory):
    m, cond, uncond, x_T = _setup("sd", str(tmp_path_factory.getbasetemp()))
    calls, handle = _record_grad_calls(m.denoiser)
    plan = schedule(m, 3, 32, 32, "cpu")
    draft_k(m, x_T, plan, cond, uncond, guidance_scale=3.0, grad_steps=3)
    with torch.no_grad(), adapters_disabled(m.denoiser):
        draft_k(m, x_T, plan, cond, uncond, guidance_scale=3.0, grad_steps=2)
    handle.remove()
    assert calls == [True, True, True, False, False, False]


def test_draft_lv_copies(tmp_path_factory):
    m, cond, uncond, x_T = _setup("sd", str(tmp_path_factory.getbasetemp()))
    calls, handle = _record_grad_calls(m.denoiser)
    z = draft_lv(m, x_T, schedule(m, 4, 32, 32, "cpu"), cond, uncond, guidance_scale=3.0, copies=3,
                generator=torch.Generator().manual_seed(1))
    handle.remove()
    assert calls == [False] * 4 + [True] * 3
    assert z.shape[0] == 3 and not torch.allclose(z[0], z[1])
    decode(m, z).mean().backward()
    assert all(p.grad is not None for n, p in m.denoiser.named_parameters() if "lora_" in n)
