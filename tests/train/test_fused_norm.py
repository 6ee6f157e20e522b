"""memory.fused_norm (fnf/train/fused_norm.py): the VAE decoder's norm → SiLU pairs through fnf_kernels' fused ops.

Reference: diffusers' own decode of the same VAE with nothing patched (memory.fused_norm off). Float64 checks
(images and latent gradients) have tolerance 1e-10: the fused op recomputes the normalisation in backward from
the saved statistics, the same math in another order (measured: bit-identical on this CPU), so anything but float64
rounding (a missing SiLU, a SiLU applied twice, wrong statistics) moves them by > 1e-2. bf16 VAEs compare at bf16's
tolerance: diffusers' CPU group norm runs in bf16, the fused op's statistics in float32. Every check also asserts
that the fused op ran (its call count), so a lever that silently did nothing fails.
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fnf_tiny_models import (_vae, cached_model, float64_session, one_torch_thread,  # noqa: E402,F401
                             randomize_lora_B, tiny_config)
from tiny_flux import _vae as _flux_vae  # noqa: E402
from tiny_flux2 import _vae as _flux2_vae, have_flux2  # noqa: E402

from fnf import config  # noqa: E402
from fnf.config import ConfigError  # noqa: E402
from fnf.memory.counter import StorageCounter  # noqa: E402
from fnf.train import fused_norm, vae_memory  # noqa: E402

SEED = 4321
TOL64 = dict(rtol=1e-10, atol=1e-10)


def _qwen_vae(seed: int):
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(seed)
    return AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, attn_scales=[],
                                  temperal_downsample=[False], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)


def _have_qwen() -> bool:
    try:
        from diffusers import AutoencoderKLQwenImage  # noqa: F401
    except ImportError:
        return False
    return True


MAKERS = {"sd": (_vae, 4), "flux-16ch": (_flux_vae, 16)}
if have_flux2():
    MAKERS["flux2"] = (_flux2_vae, 4)


@pytest.fixture
def calls(monkeypatch):
    """How many times each fused op ran (forward, including checkpoint recomputation)."""
    import fnf_kernels

    count = {"group": 0, "rms": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            count[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(fused_norm.fnf_kernels, "group_norm_silu", counted("group", fnf_kernels.group_norm_silu))
    monkeypatch.setattr(fused_norm.fnf_kernels, "rms_norm_silu", counted("rms", fnf_kernels.rms_norm_silu))
    return count


def _latents(vae, channels: int, size: int, dtype, qwen: bool = False):
    shape = (2, channels, 1, size, size) if qwen else (2, channels, size, size)
    return torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(SEED))


def _decode(vae, z, weight=None):
    """The decoded image and, with ``weight``, d sum(image * weight) / dz."""
    z = z.detach().clone().requires_grad_(weight is not None)
    image = vae.decode(z, return_dict=False)[0]
    if weight is None:
        return image.detach(), None
    (image * weight).sum().backward()
    return image.detach(), z.grad.detach()


def _pairs_fused(vae) -> int:
    return sum(1 for m in vae.modules() if m.__dict__.get(fused_norm.FUSED) and not isinstance(m, torch.nn.SiLU))


# ------------------------------------------------------------------------------------------ decode parity
@pytest.mark.parametrize("kind", sorted(MAKERS))
@pytest.mark.parametrize("checkpointing,tile", [("off", 0), ("blocks", 0), ("resnet", 0), ("off", 32),
                                                ("resnet", 32)])
def test_fused_decode_equals_diffusers_decode_float64(kind, checkpointing, tile, calls):
    """Images and latent gradients of the fused decode = diffusers' plain decode, under every checkpointing mode
    and with tiles (the tiled decode compared with diffusers' own tiled decode of the same tile size)."""
    print("seed", SEED)
    make, channels = MAKERS[kind]
    vae = make(SEED).double().requires_grad_(False)
    z = _latents(vae, channels, 24, torch.float64)   # 48 px images: 32 px tiles overlap and blend
    weight = torch.randn(2, 3, 48, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(SEED + 1))
    vae_memory.apply(vae, "off", tile, "off")
    assert calls["group"] == 0
    want_image, want_grad = _decode(vae, z, weight)
    n = vae_memory.apply(vae, checkpointing, tile, "on")
    assert n.startswith("on") and _pairs_fused(vae) == 2 * len(vae.decoder.mid_block.resnets) + 2 * sum(
        len(b.resnets) for b in vae.decoder.up_blocks) + 1   # every ResNet's two pairs and the tail
    image, grad = _decode(vae, z, weight)
    assert calls["group"] >= _pairs_fused(vae)
    torch.testing.assert_close(image, want_image, **TOL64)
    torch.testing.assert_close(grad, want_grad, rtol=1e-10, atol=1e-10 * want_grad.abs().max().item())
    assert (image - _decode(make(SEED + 7).double(), z)[0]).abs().max() > 1e-2  # the tolerance can fail


@pytest.mark.parametrize("kind", sorted(MAKERS))
def test_fused_decode_float32_and_bf16_within_the_dtype_tolerance(kind, calls):
    make, channels = MAKERS[kind]
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 4e-2)):  # bf16: 2-3 ulps of O(1) outputs
        vae = make(SEED).to(dtype).requires_grad_(False)
        z = _latents(vae, channels, 16, dtype)
        with torch.no_grad():
            want = vae.decode(z, return_dict=False)[0].float()
            vae_memory.apply(vae, "resnet", 0, "auto")
            got = vae.decode(z, return_dict=False)[0]
        assert got.dtype == dtype
        print(kind, dtype, (got.float() - want).abs().max().item())
        torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)
    assert calls["group"] > 0


def _qwen_decode(vae, z, weight=None):
    """As fnf/families/qwenimage.py decodes one frame: post-quant conv and decoder without the causal frame cache
    (checkpoint recomputation would read a filled cache), clamped to [-1, 1] as diffusers' decode."""
    z = z.detach().clone().requires_grad_(weight is not None)
    image = vae.decoder(vae.post_quant_conv(z)).clamp(-1, 1)
    if weight is None:
        return image.detach(), None
    (image * weight).sum().backward()
    return image.detach(), z.grad.detach()


@pytest.mark.skipif(not _have_qwen(), reason="diffusers without AutoencoderKLQwenImage")
@pytest.mark.parametrize("checkpointing", ["off", "resnet"])
def test_qwen_image_vae_rms_norm_silu(checkpointing, calls):
    """Qwen-Image's VAE: its residual blocks' and head's RMSNorm → SiLU through rms_norm_silu: images equal diffusers'
    vae.decode and latent gradients the unfused decode's (float64), float32 images within 1e-5."""
    vae = _qwen_vae(SEED).double().requires_grad_(False)
    z = _latents(vae, 4, 8, torch.float64, qwen=True)
    weight = torch.randn(2, 3, 1, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(SEED))
    want_image = _decode(vae, z)[0]
    _, want_grad = _qwen_decode(vae, z, weight)
    vae_memory.apply(vae, checkpointing, 0, "on")
    residual = [m for m in vae.decoder.modules() if type(m).__name__ == "QwenImageResidualBlock"]
    assert residual and _pairs_fused(vae) == 2 * len(residual) + 1
    image, grad = _qwen_decode(vae, z, weight)
    assert calls["rms"] >= 2 * len(residual) + 1 and calls["group"] == 0
    torch.testing.assert_close(image, want_image, **TOL64)
    assert want_grad.abs().max() > 0
    torch.testing.assert_close(grad, want_grad, rtol=1e-9, atol=1e-9 * want_grad.abs().max().item())
    vae_memory.reset(vae)
    assert _pairs_fused(vae) == 0 and not any("forward" in m.__dict__ for m in vae.modules())
    vae.float()
    with torch.no_grad():
        want = vae.decode(z.float(), return_dict=False)[0]
        vae_memory.apply(vae, checkpointing, 0, "on")
        torch.testing.assert_close(vae.decode(z.float(), return_dict=False)[0], want, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------ modes, memory, config
def test_off_leaves_the_vae_untouched_and_reset_undoes_on(calls):
    vae = _vae(SEED).requires_grad_(False)
    plain = {id(m): dict(m.__dict__) for m in vae.modules()}
    names = set(vae.state_dict())
    assert fused_norm.enable(vae, "off") == (0, "off (memory.fused_norm=off)")
    assert all(m.__dict__ == plain[id(m)] for m in vae.modules())
    assert vae_memory.apply(vae, "off", 0, "off") == "off (memory.fused_norm=off)"
    plain = {id(m): dict(m.__dict__) for m in vae.modules()}  # (diffusers' disable_gradient_checkpointing adds keys)
    vae_memory.apply(vae, "resnet", 0, "on")
    assert _pairs_fused(vae) == 13 and set(vae.state_dict()) == names  # parameter names unchanged
    vae_memory.apply(vae, "off", 0, "off")      # apply resets first
    assert _pairs_fused(vae) == 0 and all(m.__dict__.keys() == plain[id(m)].keys() for m in vae.modules())
    with torch.no_grad():
        vae.decode(torch.randn(1, 4, 8, 8))
    assert calls["group"] == 0


def test_auto_and_on_without_a_supported_pair():
    class Plain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.decoder = torch.nn.Sequential(torch.nn.GroupNorm(2, 4), torch.nn.SiLU())

    assert fused_norm.enable(Plain(), "auto")[0] == 0
    with pytest.raises(ValueError, match="memory.fused_norm=on: Plain's decoder has no"):
        fused_norm.enable(Plain(), "on")
    with pytest.raises(ValueError, match="memory.fused_norm must be one of auto, on, off"):
        fused_norm.enable(Plain(), "fast")


def test_scale_shift_resnets_are_left_alone():
    """A ResNet whose norm2 output is modulated before the SiLU (scale_shift) is not the supported pattern."""
    from diffusers.models.resnet import ResnetBlock2D

    block = torch.nn.Module()
    block.decoder = torch.nn.Sequential(ResnetBlock2D(in_channels=8, out_channels=8, temb_channels=4, groups=2,
                                                      time_embedding_norm="scale_shift"))
    assert fused_norm.pairs(block.decoder) == []


def test_fused_decode_holds_less_in_backward():
    """Real-tensor storage counter, float32 decode + backward: the fused pairs save their input, not the norm
    output (the SiLU's saved input), so each checkpointing mode holds less with the lever on."""
    vae = _vae(SEED).requires_grad_(False)
    z = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(SEED))
    for mode in ("off", "blocks", "resnet"):
        peaks = {}
        for fused in ("off", "on"):
            vae_memory.apply(vae, mode, 0, fused)
            with StorageCounter(round_to=1) as counter:
                zz = z.clone().requires_grad_(True)
                vae.decode(zz, return_dict=False)[0].square().sum().backward()
                del zz
            peaks[fused] = counter.peak
        print(mode, peaks)
        assert peaks["on"] < peaks["off"]


def test_config_key():
    assert config.from_dict({}).memory.fused_norm == "auto"
    for given, want in ((True, "on"), (False, "off"), ("auto", "auto"), ("on", "on"), ("no", "off")):
        assert config.from_dict({"memory": {"fused_norm": given}}).memory.fused_norm == want
    assert config.load(None, ["memory.fused_norm=off"]).memory.fused_norm == "off"  # YAML reads off as false
    with pytest.raises(ConfigError, match="'memory.fused_norm'.*one of auto, on, off"):
        config.from_dict({"memory": {"fused_norm": "fast"}})


# ------------------------------------------------------------------------------------------ the trainer
@pytest.mark.parametrize("checkpointing", ["resnet", "off"])  # blocks: the decode tests above
def test_trainer_first_step_lora_gradients_equal_unfused_in_float64(tmp_path, checkpointing, calls):
    """The trainer's first step (I0, mask, I, reward, loss, backward) with memory.fused_norm on = off: float64
    sessions with the same non-zero LoRA B. The trainer rounds I0, I and the rewards to float32 before the loss,
    so the paths agree to float32 ulps of those (rtol 1e-6), where a wrong norm or SiLU moves them by > 1e-2."""
    sd = cached_model("sd", str(tmp_path))
    got = {}
    for mode in ("off", "on"):
        cfg = tiny_config(sd, str(tmp_path / mode), memory={"fused_norm": mode, "vae_checkpointing": checkpointing},
                          train={"batch_size": 2})
        before = calls["group"]
        session = float64_session(cfg)
        assert (_pairs_fused(session.model.vae) > 0) == (mode == "on")
        randomize_lora_B(session.model.denoiser, seed=0, std=0.05)
        loss, stats, last = session.micro_batch(0, 0)
        assert last["images"].dtype == torch.float64
        loss.backward()
        assert (calls["group"] > before) == (mode == "on")
        got[mode] = (loss.item(), [p.grad.clone() for p in session.params])
    (loss_off, g_off), (loss_on, g_on) = got["off"], got["on"]
    assert loss_on == pytest.approx(loss_off, rel=1e-6)
    for a, b in zip(g_on, g_off):
        assert b.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 * b.abs().max().item())
