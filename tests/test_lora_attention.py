"""FusedLoRAAttnProcessor / patch_lora / lora_scale on a tiny random-weight diffusers UNet with peft LoRA."""
import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

from fnf_kernels import lora as L  # noqa: E402
from fnf_kernels.lora_attention import (FusedLoRAAttnProcessor, lora_scale, patch_lora,  # noqa: E402
                                        trajectory_scale, unpatch_lora)

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def _unet(targets=TARGETS, r=4, seed=0, adapter="default", dropout=0.0):
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24, attention_head_dim=4, norm_num_groups=8)
    unet.requires_grad_(False)
    if targets is not None:
        unet.add_adapter(peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, lora_dropout=dropout,
                                         init_lora_weights="gaussian"), adapter_name=adapter)
        _randomize_lora(unet, seed + 1)
    return unet


def _randomize_lora(unet, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:  # peft starts B at 0, which would hide every LoRA error
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def _inputs(batch=3, seed=10):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, 8, 8, generator=gen), torch.tensor([10, 500, 900, 250][:batch]),
            torch.randn(batch, 7, 24, generator=gen))


def _run(unet, inputs, backward=True):
    unet.zero_grad(set_to_none=True)
    out = unet(*inputs).sample
    grads = {}
    if backward:
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        grads = {n: p.grad.clone() for n, p in unet.named_parameters() if p.requires_grad}
        assert grads and all("lora_" in n for n in grads)
    return out.detach(), grads


def _assert_same(a, b, atol=2e-5):
    (oa, ga), (ob, gb) = a, b
    torch.testing.assert_close(oa, ob, atol=atol, rtol=1e-4)
    assert ga.keys() == gb.keys()
    for k in ga:
        torch.testing.assert_close(ga[k], gb[k], atol=atol * 10, rtol=1e-3, msg=k)


def test_patched_unet_matches_peft_outputs_and_lora_grads():
    unet = _unet()
    inputs = _inputs()
    ref = _run(unet, inputs)
    assert patch_lora(unet) == 8  # 2 transformer blocks x 2 layers... every self- and cross-attention
    assert all(isinstance(m.processor, FusedLoRAAttnProcessor) for m in unet.modules() if hasattr(m, "to_q"))
    _assert_same(_run(unet, inputs), ref)
    assert unpatch_lora(unet) == 8
    assert {type(m.processor).__name__ for m in unet.modules() if hasattr(m, "to_q")} == {"AttnProcessor2_0"}
    _assert_same(_run(unet, inputs), ref, atol=1e-6)


def test_patched_unet_triton_backend():
    pytest.importorskip("triton", reason="triton is not installed (a CPU install without the [triton] extra)")
    from fnf_kernels.triton_kernels import lora_linear as tk
    if not CUDA and type(tk._down_kernel).__name__ != "InterpretedFunction":
        pytest.skip("triton kernels were imported without TRITON_INTERPRET=1 and there is no GPU")
    device = "cuda" if CUDA else "cpu"
    unet = _unet().to(device)
    inputs = tuple(t.to(device) for t in _inputs(batch=1))
    ref = _run(unet, inputs)
    patch_lora(unet, backend="triton")
    _assert_same(_run(unet, inputs), ref, atol=1e-4)


def test_projections_are_fused(monkeypatch):
    """Self-attention q, k, v: one lora_linear with groups=3; cross-attention k, v: groups=2; q and out: 1."""
    unet = _unet()
    patch_lora(unet)
    calls = []
    real = L._lora_linear

    def spy(x, weight, bias, a, b, s_t, s_v, rows, groups, chosen):
        calls.append(groups)
        return real(x, weight, bias, a, b, s_t, s_v, rows, groups, chosen)

    monkeypatch.setattr(L, "_lora_linear", spy)
    _run(unet, _inputs(), backward=False)
    # 4 transformer blocks: attn1 (qkv, out) + attn2 (q, kv, out)
    assert sorted(calls) == sorted([3, 1] * 4 + [1, 2, 1] * 4)


def test_per_sample_scale_in_one_batch():
    """Rows with scale 0 / 1 / 0.5 in one batch = pretrained / fine-tuned / half-scale runs done separately."""
    unet = _unet()
    x, t, ehs = _inputs()
    with torch.no_grad():
        tuned = unet(x, t, ehs).sample
        unet.disable_adapters()
        base = unet(x, t, ehs).sample
        unet.enable_adapters()
    patch_lora(unet)
    s = torch.tensor([0.0, 1.0, 0.5])
    with torch.no_grad():
        with lora_scale(unet, s):
            mixed = unet(x, t, ehs).sample
        with lora_scale(unet, 0.5):
            half = unet(x, t, ehs).sample
        plain = unet(x, t, ehs).sample  # back to scale 1 outside the block
    torch.testing.assert_close(mixed[0], base[0], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(mixed[1], tuned[1], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(mixed[2], half[2], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(plain, tuned, atol=2e-5, rtol=1e-4)
    # LoRA gradients: the scale-0 rows contribute nothing
    unet.zero_grad(set_to_none=True)
    with lora_scale(unet, trajectory_scale(1, 1)):
        unet(x[:2], t[:2], ehs[:2]).sample[1].sum().backward()
    g_mixed = {n: p.grad.clone() for n, p in unet.named_parameters() if p.requires_grad}
    unet.zero_grad(set_to_none=True)
    unet(x[1:2], t[1:2], ehs[1:2]).sample.sum().backward()
    for n, p in unet.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(g_mixed[n], p.grad, atol=2e-5, rtol=1e-3, msg=n)


def test_save_load_roundtrip(tmp_path):
    """After a training step on the patched UNet, diffusers' save/load of the LoRA restores the same model."""
    unet = _unet()
    patch_lora(unet)
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1)
    _run(unet, _inputs())
    opt.step()
    inputs = _inputs(seed=11)
    want = _run(unet, inputs, backward=False)[0]
    unet.save_lora_adapter(str(tmp_path))
    fresh = _unet(targets=None)
    fresh.load_lora_adapter(str(tmp_path), prefix=None, adapter_name="default",
                            weight_name="pytorch_lora_weights.safetensors")
    saved = peft.get_peft_model_state_dict(unet)
    loaded = peft.get_peft_model_state_dict(fresh)
    assert saved.keys() == loaded.keys() and len(saved) == 8 * 4 * 2
    for k in saved:
        torch.testing.assert_close(saved[k], loaded[k], atol=0, rtol=0)
    patch_lora(fresh)
    torch.testing.assert_close(_run(fresh, inputs, backward=False)[0], want, atol=1e-6, rtol=1e-6)


def test_lora_on_feed_forward_and_per_sample_scale():
    """Other peft LoRA Linears (here the feed-forward) follow the per-sample scale too."""
    unet = _unet(targets=TARGETS + ["ff.net.2"])
    x, t, ehs = _inputs(batch=2)
    with torch.no_grad():
        tuned = unet(x, t, ehs).sample
        unet.disable_adapters()
        base = unet(x, t, ehs).sample
        unet.enable_adapters()
    patch_lora(unet)
    with torch.no_grad(), lora_scale(unet, torch.tensor([1.0, 0.0])):
        mixed = unet(x, t, ehs).sample
    torch.testing.assert_close(mixed[0], tuned[0], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(mixed[1], base[1], atol=2e-5, rtol=1e-4)
    unpatch_lora(unet)
    assert not any("forward" in m.__dict__ for m in unet.modules())


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`:UserWarning")
def test_errors():
    with pytest.raises(ValueError, match="no attention module with a peft LoRA"):
        patch_lora(_unet(targets=None))
    with pytest.raises(TypeError, match="unet must be a torch.nn.Module"):
        patch_lora("unet")
    unet = _unet()
    with pytest.raises(ValueError, match="not patched; call fnf_kernels.patch_lora"):
        with lora_scale(unet, 0.5):
            pass
    patch_lora(unet)
    with pytest.raises(TypeError, match="scale must be a float or a"):
        with lora_scale(unet, "1"):
            pass
    with pytest.raises(ValueError, match="the scale has 2 entries but .* runs a batch of 3"):
        with lora_scale(unet, torch.ones(2)):
            unet(*_inputs(batch=3))
    # conv LoRA layers cannot take a per-sample scale
    conv = _unet(targets=TARGETS + ["conv1"])
    patch_lora(conv)
    with pytest.raises(ValueError, match="cannot scale per sample"):
        with lora_scale(conv, torch.ones(3)):
            pass
    # two active adapters
    two = _unet()
    two.add_adapter(peft.LoraConfig(r=2, target_modules=TARGETS), adapter_name="second")
    two.set_adapters(["default", "second"])
    with pytest.raises(ValueError, match="2 active LoRA adapters"):
        patch_lora(two)
    two.set_adapters("second")
    patch_lora(two)  # a single active adapter is fine
    # dropout > 0 while training
    drop = _unet(dropout=0.1)
    with pytest.raises(ValueError, match="lora_dropout p=0.1 in training mode"):
        patch_lora(drop)
    drop.eval()
    patch_lora(drop)
    # a non-plain processor is left alone
    other = _unet()
    other.set_attn_processor(diffusers.models.attention_processor.AttnProcessor2_0())
    first = next(m for m in other.modules() if hasattr(m, "to_q"))

    class Custom:
        def __call__(self, *a, **k):
            raise AssertionError

    first.set_processor(Custom())
    with pytest.raises(ValueError, match="runs Custom"):
        patch_lora(other)
    with pytest.raises(ValueError, match="attention must be one of"):
        FusedLoRAAttnProcessor(attention="flash")
    try:
        import xformers  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="needs the xformers package"):
            FusedLoRAAttnProcessor(attention="xformers")


def test_weight_cache_follows_in_place_updates():
    unet = _unet()
    patch_lora(unet)
    inputs = _inputs(batch=2)
    _run(unet, inputs, backward=False)
    attn = next(m for m in unet.modules() if hasattr(m, "to_q"))
    with torch.no_grad():
        attn.to_k.base_layer.weight.mul_(1.5)  # e.g. load_state_dict copies into the frozen weights
    got = _run(unet, inputs, backward=False)[0]
    unpatch_lora(unet)
    torch.testing.assert_close(got, _run(unet, inputs, backward=False)[0], atol=2e-5, rtol=1e-4)


def test_trajectory_scale():
    s = trajectory_scale(2, 3, cfg_copies=2)
    assert s.tolist() == [0, 0, 1, 1, 1] * 2
    with pytest.raises(ValueError, match="n_pretrained must be an int >= 0"):
        trajectory_scale(-1, 2)


def test_autocast_bf16_matches_peft():
    """Under torch.autocast the projections run in the autocast dtype like peft's F.linear (fp32 LoRA params)."""
    unet = _unet()
    inputs = _inputs(batch=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _run(unet, inputs)
        patch_lora(unet)
        got = _run(unet, inputs)
    torch.testing.assert_close(got[0].float(), ref[0].float(), atol=6e-2, rtol=5e-2)
    for k in ref[1]:
        assert got[1][k].dtype == torch.float32
        scale = ref[1][k].abs().max().item() + 1e-3
        torch.testing.assert_close(got[1][k] / scale, ref[1][k] / scale, atol=6e-2, rtol=1e-1, msg=k)


def test_lora_linear_autocast():
    from fnf_kernels import lora_linear
    torch.manual_seed(0)
    x, w = torch.randn(4, 9), torch.randn(7, 9, dtype=torch.bfloat16)
    a, b = torch.randn(3, 9, requires_grad=True), torch.randn(7, 3, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lora_linear(x, w, None, a, b, 0.5)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert a.grad.dtype == torch.float32 and b.grad.dtype == torch.float32
