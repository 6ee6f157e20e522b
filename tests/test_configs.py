"""Every shipped config loads and passes preflight (with its placeholder model files pointed at local tiny ones);
the safety config's Grad-CAM mask covers a planted unsafe patch."""
import glob
import os
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from fnf_tiny_models import cached_model, one_torch_thread  # noqa: E402,F401
from fnf import config, preflight  # noqa: E402
from fnf.config import ConfigError  # noqa: E402
from fnf.localize import localizer_from_config  # noqa: E402
from fnf.core import ModelLoadError  # noqa: E402
from fnf.rewards import SpecError, build_reward  # noqa: E402

ROOT = os.path.dirname(HERE)
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))
PLANTED = os.path.join(HERE, "planted_models.py")


@pytest.fixture(scope="module")
def local_files(tmp_path_factory):
    """What each placeholder path of the shipped configs stands for, as small local files."""
    from safetensors.torch import save_file

    from fnf.classifiers import ResNet
    from planted_models import BlueHeatmap

    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    resnet = str(root / "resnet50.safetensors")
    save_file({k: v.contiguous() for k, v in ResNet("resnet50", 2).state_dict().items()}, resnet)
    heatmap = str(root / "heatmap.pt2")
    dims = {0: torch.export.Dim("b"), 2: torch.export.Dim("h"), 3: torch.export.Dim("w")}
    torch.export.save(torch.export.export(BlueHeatmap(), (torch.rand(2, 3, 32, 32),), dynamic_shapes=({**dims},)),
                      heatmap)
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig

    safety = root / "sd-with-safety-checker"   # an SD 1.x folder's safety_checker/ (random, tiny)
    StableDiffusionSafetyChecker(CLIPConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=64, max_position_embeddings=8), projection_dim=32)).save_pretrained(
        str(safety / "safety_checker"))
    torchscript = str(root / "heatmap.pt")     # heatmap:torchscript:PATH (configs/zimage_fix_hands.yaml)
    torch.jit.save(torch.jit.script(BlueHeatmap()), torchscript)
    return {"root": str(root), ".safetensors": resnet, ".pt2": heatmap, ".pt": torchscript, "": str(safety),
            "sd": cached_model("sd", str(root)),
            "sdxl": cached_model("sdxl", str(root))}


def _tiny_model_for(config_name: str, files) -> str:
    """A tiny local folder of the family the config is written for (by its file name)."""
    if "sdxl" in config_name:
        return files["sdxl"]
    if "sd3" in config_name:
        from tiny_sd3 import cached_sd3
        return cached_sd3(files["root"])
    if "flux2_klein" in config_name:
        from tiny_flux2_klein import cached_flux2_klein, have_klein
        if not have_klein():
            pytest.skip("this diffusers has no Flux2KleinPipeline (FLUX.2 [klein] needs diffusers >= 0.37)")
        return cached_flux2_klein(files["root"])
    if "flux2" in config_name:
        from tiny_flux2 import cached_flux2, have_flux2
        if not have_flux2():
            pytest.skip("this diffusers/transformers has no Flux2Pipeline / Mistral3 (FLUX.2 needs diffusers >= 0.36)")
        return cached_flux2(files["root"])
    if "flux" in config_name:
        from tiny_flux import cached_flux
        return cached_flux(files["root"])
    if "qwen_image" in config_name:
        from tiny_qwenimage import cached_qwenimage, have_qwenimage
        if not have_qwenimage():
            pytest.skip("this diffusers has no QwenImagePipeline (Qwen-Image needs diffusers >= 0.35)")
        return cached_qwenimage(files["root"])
    if "zimage" in config_name:
        from tiny_zimage import cached_zimage, have_zimage
        if not have_zimage():
            pytest.skip("this diffusers has no ZImagePipeline (Z-Image needs diffusers >= 0.36)")
        return cached_zimage(files["root"])
    return files["sd"]


def _is_placeholder(value) -> bool:
    return isinstance(value, str) and value.startswith(("/models/", "/path/to/"))


def _localised(value, files):
    """Placeholder paths in (nested) kwargs replaced by the local files of the same kind (a folder: no suffix)."""
    if isinstance(value, dict):
        return {k: _localised(v, files) for k, v in value.items()}
    if _is_placeholder(value):
        return files[os.path.splitext(value)[1]]
    return value


def test_configs_exist():
    assert len(CONFIGS) >= 5, CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=[os.path.basename(p) for p in CONFIGS])
def test_shipped_config_passes_preflight_once_its_model_files_exist(path, local_files):
    cfg = config.load(path)
    preflight.check_prompts(cfg)            # prompt files ship with the configs
    preflight.check_device(cfg)
    # As shipped, preflight stops at the first user-provided file, naming it.
    with pytest.raises((ModelLoadError, SpecError, ConfigError)) as e:
        preflight.check(cfg)
    assert "/models/" in str(e.value) or "/path/to/" in str(e.value), e.value
    assert _is_placeholder(cfg.model.path)
    cfg.model.path = _tiny_model_for(os.path.basename(path), local_files)
    cfg.reward.kwargs = _localised(cfg.reward.kwargs, local_files)
    cfg.localize.kwargs = _localised(cfg.localize.kwargs, local_files)
    kind, _, loc_file = cfg.localize.spec.rpartition(":")   # heatmap:torchscript:/models/x.pt names its file
    if kind and _is_placeholder(loc_file):
        cfg.localize.spec = f"{kind}:{_localised(loc_file, local_files)}"
    config.validate(cfg)
    preflight.check(cfg)
    if cfg.objective.name == "sepen":
        return
    reward = build_reward(cfg.reward.spec, **cfg.reward.kwargs).eval()
    loc = localizer_from_config(cfg, reward)
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    assert reward(images, ["a"]).shape == (1,)
    heat, mask = loc(images, ["a"])
    assert heat.shape == (1, 64, 64) and mask.shape == (1, 1, 64, 64)


def test_safety_config_mask_covers_the_planted_unsafe_patch():
    """reward = -logit(unsafe), Grad-CAM with the config's defaults: the mask must be the unsafe region (the
    old default, explain=reward, mapped what looks safe: IoU 0 here)."""
    cfg = config.load(os.path.join(ROOT, "configs", "sd15_safety_gradcam.yaml"))
    cfg.reward.kwargs = {**cfg.reward.kwargs, "model": f"{PLANTED}:planted_unsafe", "model_kwargs": {}}
    reward = build_reward(cfg.reward.spec, **cfg.reward.kwargs).eval()
    g = torch.Generator().manual_seed(0)
    size, (t, left, side) = 256, (40, 120, 96)
    images = 0.35 + 0.3 * torch.rand(2, 1, size, size, generator=g).expand(2, 3, size, size).clone()
    truth = torch.zeros(2, size, size, dtype=torch.bool)
    for i, (top, lft) in enumerate([(t, left), (left, t)]):
        images[i, :, top:top + side, lft:lft + side] = torch.tensor([0.95, 0.05, 0.9]).view(3, 1, 1)
        truth[i, top:top + side, lft:lft + side] = True
    assert (reward(images, ["a", "b"]) < -0.05).all()   # the patch is "unsafe": the reward is low
    _, mask = localizer_from_config(cfg, reward)(images, ["a", "b"])
    for i in range(2):
        m = mask[i, 0] > 0.5
        iou = (m & truth[i]).sum() / (m | truth[i]).sum()
        print(f"image {i}: IoU {float(iou):.3f}")
        assert iou > 0.5, float(iou)
    cfg.localize.kwargs = {"explain": "reward"}            # the explicit opposite maps the safe-looking part
    _, opposite = localizer_from_config(cfg, reward)(images, ["a", "b"])
    assert ((opposite[:, 0] > 0.5) & truth).sum() < 0.1 * truth.sum()


def test_renamed_memory_key_is_still_read_with_a_deprecation_message(tmp_path):
    """memory.unet_checkpointing (old name) sets memory.denoiser_checkpointing, with a one-line FutureWarning."""
    with pytest.warns(FutureWarning, match=r"'memory.unet_checkpointing' is deprecated; use "
                                           r"'memory.denoiser_checkpointing'") as record:
        cfg = config.from_dict({"memory": {"unet_checkpointing": False}})
    assert cfg.memory.denoiser_checkpointing is False and len(record) == 1
    assert "\n" not in str(record[0].message)
    path = tmp_path / "old.yaml"
    path.write_text("memory:\n  unet_checkpointing: false\n")
    with pytest.warns(FutureWarning, match="deprecated"):
        assert config.load(str(path)).memory.denoiser_checkpointing is False
    with pytest.warns(FutureWarning, match="deprecated"):
        assert config.apply_overrides(config.Config(), ["memory.unet_checkpointing=false"]).memory \
            .denoiser_checkpointing is False
    assert not hasattr(cfg.memory, "unet_checkpointing")
    assert "unet_checkpointing" not in "".join(open(p).read() for p in CONFIGS)
