"""fnf/train/vae_memory.py: checkpointed decodes give the plain decode's images and gradients (float64); the tiled
decode is differentiable and differs from the full one by a stated amount; the config keys are validated."""
import os
import sys

import pytest
import torch

from fnf import config
from fnf.train import vae_memory
from fnf.config import ConfigError
from fnf.memory.counter import StorageCounter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fnf_tiny_models import _vae, one_torch_thread  # noqa: F401

SEED = 1234


def _decode_with_grads(vae, z, weight):
    z = z.detach().clone().requires_grad_(True)
    image = vae.decode(z, return_dict=False)[0]
    (image * weight).sum().backward()
    return image.detach(), z.grad.detach()


def _setup(size: int = 16):
    print("seed", SEED)
    torch.manual_seed(SEED)
    vae = _vae(SEED).double().requires_grad_(False)
    z = torch.randn(2, 4, size, size, dtype=torch.float64)
    weight = torch.randn(2, 3, 2 * size, 2 * size, dtype=torch.float64)
    return vae, z, weight


def _conv1_calls(vae, z, weight) -> int:
    """How many times the first ResNet of the last up block runs its conv1 in one forward + backward."""
    calls = []
    handle = vae.decoder.up_blocks[-1].resnets[0].conv1.register_forward_hook(lambda *_: calls.append(1))
    try:
        _decode_with_grads(vae, z, weight)
    finally:
        handle.remove()
    return len(calls)


@pytest.mark.parametrize("mode", ["resnet", "blocks"])
def test_checkpointed_decode_same_images_and_gradients(mode):
    vae, z, weight = _setup()
    plain_image, plain_grad = _decode_with_grads(vae, z, weight)
    assert _conv1_calls(vae, z, weight) == 1
    vae_memory.apply(vae, mode)
    image, grad = _decode_with_grads(vae, z, weight)
    assert _conv1_calls(vae, z, weight) == 2  # recomputed in backward: the checkpoint is active
    torch.testing.assert_close(image, plain_image, rtol=0, atol=1e-12)
    torch.testing.assert_close(grad, plain_grad, rtol=1e-12, atol=1e-12)
    with torch.no_grad():  # no checkpoint without grad
        torch.testing.assert_close(vae.decode(z, return_dict=False)[0], plain_image, rtol=0, atol=1e-12)
    vae_memory.apply(vae, "off")  # undone: the plain decode again, parameter names unchanged
    assert _conv1_calls(vae, z, weight) == 1
    assert set(vae.state_dict()) == set(_vae(SEED).state_dict())


def test_resnet_checkpointing_holds_less_than_blocks():
    """Real-tensor counter: the peak of a float32 decode + backward, per-ResNet < per-block < none."""
    vae = _vae(SEED).requires_grad_(False)
    z = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(SEED))
    peaks = {}
    for mode in ("off", "blocks", "resnet"):
        vae_memory.apply(vae, mode)
        with StorageCounter(round_to=1) as counter:
            zz = z.clone().requires_grad_(True)
            vae.decode(zz, return_dict=False)[0].square().sum().backward()
            del zz
        peaks[mode] = counter.peak
    print(peaks)
    assert peaks["resnet"] < peaks["blocks"] < peaks["off"]


def test_tiled_decode_gradient_and_difference_from_full_decode():
    vae, z, weight = _setup()
    full_image, _ = _decode_with_grads(vae, z, weight)
    vae_memory.apply(vae, "off", tile=16)  # 32-pixel image, 16-pixel tiles: diffusers' tiled_decode, no checkpoint
    tiled_image, tiled_grad = _decode_with_grads(vae, z, weight)
    vae_memory.apply(vae, "resnet", tile=16)  # a checkpoint per tile, parts nested: same numbers
    image, grad = _decode_with_grads(vae, z, weight)
    torch.testing.assert_close(image, tiled_image, rtol=0, atol=1e-12)
    torch.testing.assert_close(grad, tiled_grad, rtol=1e-12, atol=1e-12)
    # the gradient is the tiled image's: a central difference along a random direction (float64)
    direction = torch.randn_like(z)
    eps = 1e-5
    def f(x):
        return (vae.decode(x, return_dict=False)[0] * weight).sum()

    with torch.no_grad():
        numeric = (f(z + eps * direction) - f(z - eps * direction)) / (2 * eps)
    torch.testing.assert_close((grad * direction).sum(), numeric, rtol=1e-6, atol=1e-8)
    # a different image from the full decode: group norms and attention see one tile (stated in the docs)
    diff = (image - full_image).abs()
    print(f"tiled vs full decode: max |diff| {diff.max():.3g}, mean {diff.mean():.3g}, "
          f"image std {full_image.std():.3g}")
    assert diff.max() > 1e-6
    # a tile as large as the image: no tiling, the full decode exactly
    vae_memory.apply(vae, "resnet", tile=32)
    torch.testing.assert_close(_decode_with_grads(vae, z, weight)[0], full_image, rtol=0, atol=1e-12)


def test_bad_levers_are_refused():
    vae = _vae(SEED)
    with pytest.raises(ValueError, match="memory.vae_checkpointing"):
        vae_memory.apply(vae, "all")
    with pytest.raises(ValueError, match="memory.vae_tile: expected a positive multiple of 2"):
        vae_memory.apply(vae, "resnet", tile=15)


def test_config_keys():
    assert config.load(None, []).memory.vae_checkpointing == "resnet"
    assert config.load(None, ["memory.vae_checkpointing=true"]).memory.vae_checkpointing == "resnet"
    assert config.load(None, ["memory.vae_checkpointing=false"]).memory.vae_checkpointing == "off"
    assert config.from_dict({"memory": {"vae_checkpointing": False}}).memory.vae_checkpointing == "off"
    assert config.load(None, ["memory.vae_checkpointing=blocks"]).memory.vae_checkpointing == "blocks"
    with pytest.raises(ConfigError, match="memory.vae_checkpointing.*one of resnet, blocks, off"):
        config.load(None, ["memory.vae_checkpointing=per-resnet"])
    assert config.load(None, ["memory.vae_tile=512"]).memory.vae_tile == 512
    for bad in ("500", "-8", "32"):
        with pytest.raises(ConfigError, match="memory.vae_tile"):
            config.load(None, [f"memory.vae_tile={bad}"])


def test_ladder_rows_are_valid_configs_and_tile_half_the_side():
    import copy

    from fnf.memory.estimate import HALF_SIDE, LADDER, _apply, half_side_tile

    cfg = config.load(None, [])
    cfg.sampling.height = cfg.sampling.width = 1024
    for name, overrides in LADDER:
        cfg = _apply(cfg, overrides)
        row = copy.deepcopy(cfg)
        if row.memory.vae_tile == HALF_SIDE:
            row.memory.vae_tile = half_side_tile(row)
        config.validate(row)
    assert name.endswith("(half-side tiles)") and row.memory.vae_tile == 512
    assert row.memory.vae_checkpointing == "resnet" and row.train.seeds_per_prompt == 0


def test_a_deep_copy_of_a_checkpointed_vae_uses_its_own_weights():
    import copy

    vae, z, weight = _setup(8)
    vae_memory.apply(vae, "resnet")
    twin = copy.deepcopy(vae)
    with torch.no_grad():
        for module in (twin.decoder.up_blocks[-1].resnets[0].conv1, twin.decoder.conv_out):
            module.weight.mul_(2)
    image, grad = _decode_with_grads(twin, z, weight)
    vae_memory.apply(twin, "off")
    plain_image, plain_grad = _decode_with_grads(twin, z, weight)
    torch.testing.assert_close(image, plain_image, rtol=0, atol=1e-12)
    torch.testing.assert_close(grad, plain_grad, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(image, _decode_with_grads(vae, z, weight)[0])


def test_trained_model_decodes_plainly(tmp_path):
    """The training levers end with training: after fnf.train.train with a tiled, checkpointed decode, the returned
    model's VAE has no tiling and no checkpointed forwards (samples from it are full decodes)."""
    from fnf_tiny_models import cached_model, tiny_config

    from fnf.train import train

    cfg = tiny_config(cached_model("sd", str(tmp_path)), str(tmp_path / "run"), train={"steps": 1},
                      sampling={"height": 128, "width": 128},
                      memory={"vae_tile": 64, "vae_checkpointing": "resnet"})
    r = train(cfg)
    vae = r.model.vae
    assert not vae.use_tiling
    assert not any(getattr(m, vae_memory._PATCHED, False) or "forward" in m.__dict__ for m in vae.modules())
