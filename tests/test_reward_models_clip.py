"""CLIP rewards (aesthetic, pickscore, clipscore) and their differentiable preprocessing.

Tiny random-weight CLIP models are saved in transformers' format (save_pretrained + tokenizer + image processor)
and loaded through the specs; scores are compared with the official formulas computed here with the official
processor and model calls.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from torch import nn

from fnf.reward_models.preprocess import CLIP_MEAN, CLIP_STD, clip_preprocess, read_processor_config
from fnf.rewards import SpecError, build_reward, check_reward_spec
from tests.fnf_tiny_models import write_tokenizer

SEED = 1234
SIZE, CROP = 30, 28  # the tiny processor: short side 30, crop 28 (not CLIP's 224: the folder's settings are read)
MEAN, STD = (0.40, 0.50, 0.60), (0.20, 0.30, 0.25)
PROJ = 24
PROMPTS = ["a red car", "a photo of a dog", "a red car"]  # a repeated prompt: the text cache


# ------------------------------------------------------------------------------------------ fixtures
def _clip_config(logit_scale: float = 3.0):
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config={"vocab_size": 128, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "max_position_embeddings": 16, "bos_token_id": 0, "eos_token_id": 1,
                     "pad_token_id": 2},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": CROP, "patch_size": 7},
        projection_dim=PROJ, logit_scale_init_value=logit_scale)


class OfficialMLP(nn.Module):
    """The improved-aesthetic-predictor MLP (its layout, without pytorch_lightning; small widths for tests)."""

    def __init__(self, widths=(PROJ, 16, 8, 8, 4)):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(widths[0], widths[1]), nn.Dropout(0.2), nn.Linear(widths[1], widths[2]),
                                    nn.Dropout(0.2), nn.Linear(widths[2], widths[3]), nn.Dropout(0.1),
                                    nn.Linear(widths[3], widths[4]), nn.Linear(widths[4], 1))

    def forward(self, x):
        return self.layers(x)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """clip/ (CLIPModel + tokenizer + processor), vision/ (CLIPVisionModelWithProjection), head.pth."""
    from transformers import CLIPImageProcessor, CLIPModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    root = tmp_path_factory.mktemp("clip_rewards")
    torch.manual_seed(SEED)
    print(f"seed {SEED}")
    clip_dir, vision_dir = str(root / "clip"), str(root / "vision")
    model = CLIPModel(_clip_config()).eval()
    model.save_pretrained(clip_dir)
    write_tokenizer(clip_dir)
    processor = CLIPImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": CROP, "width": CROP},
                                   image_mean=list(MEAN), image_std=list(STD))
    processor.save_pretrained(clip_dir)
    vcfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            image_size=CROP, patch_size=7, projection_dim=PROJ)
    CLIPVisionModelWithProjection(vcfg).eval().save_pretrained(vision_dir)
    processor.save_pretrained(vision_dir)
    head = str(root / "head.pth")
    torch.save(OfficialMLP().state_dict(), head)
    return {"root": str(root), "clip": clip_dir, "vision": vision_dir, "head": head}


def smooth_images(n: int, h: int, w: int, seed: int, lo: float = 0.2, hi: float = 0.8) -> torch.Tensor:
    """Real-valued (n, 3, h, w) float64 images, low-frequency so bicubic overshoot stays inside [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 5, 6, generator=g, dtype=torch.float64)
    x = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=True)
    return lo + (hi - lo) * x


# ------------------------------------------------------------------------------------------ official references
def pil_float_resize(image: np.ndarray, size: int) -> np.ndarray:
    """(3, H, W) -> short side ``size`` with PIL's bicubic filter on float ("F") images: no uint8 rounding."""
    from PIL import Image
    from transformers.image_transforms import get_resize_output_image_size

    h, w = get_resize_output_image_size(image, size=size, default_to_square=False, input_data_format="channels_first")
    return np.stack([np.asarray(Image.fromarray(c.astype(np.float32), mode="F").resize((w, h), Image.BICUBIC))
                     for c in image])


def official_pixel_values(images: torch.Tensor, folder: str) -> torch.Tensor:
    """The folder's CLIPImageProcessor on real-valued images: PIL float resize, then its crop + normalise."""
    from transformers import CLIPImageProcessor

    proc = CLIPImageProcessor.from_pretrained(folder)
    resized = [pil_float_resize(x.numpy(), SIZE) for x in images]
    out = proc(images=resized, do_resize=False, do_rescale=False, return_tensors="np",
               input_data_format="channels_first")["pixel_values"]
    return torch.from_numpy(np.asarray(out)).double()


def _features(out) -> torch.Tensor:
    """get_image/text_features return a tensor (transformers 4) or an output with pooler_output (5)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def float64_vision(model):
    """``model`` in float64 except its text tower: transformers 4.x CLIP text models cannot run in float64 (the
    causal mask overflows), so text features are float32 on both sides of a comparison."""
    model.double()
    for name in ("text_model", "text_projection"):
        if hasattr(model, name):
            getattr(model, name).float()
    return model


def official_clip(folder: str):
    from transformers import AutoTokenizer, CLIPModel

    return float64_vision(CLIPModel.from_pretrained(folder)).eval(), AutoTokenizer.from_pretrained(folder)


def official_similarity(images, prompts, folder, logit_scale: bool) -> torch.Tensor:
    """PickScore's published scoring code (batched, padded text), in float64; 100 * cos when not logit_scale."""
    model, tok = official_clip(folder)
    with torch.no_grad():
        image_embs = _features(model.get_image_features(pixel_values=official_pixel_values(images, folder)))
        image_embs = image_embs / torch.norm(image_embs, dim=-1, keepdim=True)
        text = tok(prompts, padding=True, truncation=True, max_length=16, return_tensors="pt")
        text_embs = _features(model.get_text_features(**text)).double()
        text_embs = text_embs / torch.norm(text_embs, dim=-1, keepdim=True)
        scale = model.logit_scale.exp() if logit_scale else 100.0
        return scale * (text_embs @ image_embs.T).diagonal()


def official_aesthetic(images, folder, head, vision_only: bool = False) -> torch.Tensor:
    """The predictor's published code: encode_image, numpy L2 normalisation, MLP (float64 here)."""
    from transformers import CLIPVisionModelWithProjection

    mlp = OfficialMLP().double().eval()
    mlp.load_state_dict(torch.load(head))
    pixels = official_pixel_values(images, folder)
    with torch.no_grad():
        if vision_only:
            vision = CLIPVisionModelWithProjection.from_pretrained(folder).double().eval()
            emb = vision(pixel_values=pixels).image_embeds.numpy()
        else:
            emb = _features(official_clip(folder)[0].get_image_features(pixel_values=pixels)).numpy()
        l2 = np.atleast_1d(np.linalg.norm(emb, 2, -1))
        l2[l2 == 0] = 1
        return mlp(torch.from_numpy(emb / np.expand_dims(l2, -1)))[:, 0]


# ------------------------------------------------------------------------------------------ preprocessing
@pytest.mark.parametrize("hw", [(37, 45), (45, 31), (29, 29), (97, 61), (200, 301)])
def test_preprocess_matches_pil_on_real_valued_images(hw):
    """Odd, non-square, up- and down-sampling: the PIL float pipeline agrees to 1e-6 (PIL's float32 filter;
    measured max 4e-7 after dividing by std 0.2). Random (not smooth) values: no clamp on either side."""
    g = torch.Generator().manual_seed(SEED)
    x = torch.rand(2, 3, *hw, generator=g, dtype=torch.float64)
    ours = clip_preprocess(x, SIZE, MEAN, STD, CROP)
    ref = np.stack([pil_float_resize(im.numpy(), SIZE) for im in x])
    h, w = ref.shape[-2:]
    top, left = (h - CROP) // 2, (w - CROP) // 2
    ref = (ref[..., top:top + CROP, left:left + CROP] - np.array(MEAN)[:, None, None]) / np.array(STD)[:, None, None]
    diff = np.abs(ours.numpy() - ref).max()
    print(f"{hw}: max abs difference {diff:.2e}")
    assert ours.dtype == torch.float64 and ours.shape == (2, 3, CROP, CROP)
    assert diff < 1e-6


@pytest.mark.parametrize("hw", [(37, 45), (61, 40), (28, 28), (113, 90)])
def test_preprocess_matches_clip_image_processor_on_uint8(hw, folders):
    """The full official pipeline (uint8 HWC arrays -> PIL resize -> crop -> rescale -> normalise). PIL rounds to
    uint8 after each of its two 1-D passes: <= 0.5 + 0.5 * sum|w| gray levels (sum|w| <= 1.25 for its bicubic
    filter), so the bound is 1.125/255/min(std) = 0.0221 (+1e-6); measured max 0.018."""
    from transformers import CLIPImageProcessor

    x = (smooth_images(2, *hw, seed=SEED) * 255).round() / 255
    arrays = [(im.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8) for im in x]
    ref = CLIPImageProcessor.from_pretrained(folders["clip"])(images=arrays, return_tensors="np")["pixel_values"]
    ours = clip_preprocess(x, SIZE, MEAN, STD, CROP)
    diff = np.abs(ours.numpy() - np.asarray(ref)).max()
    print(f"{hw}: max abs difference {diff:.2e}")
    assert diff <= (0.5 + 0.5 * 1.25) / 255 / min(STD) + 1e-6


def test_preprocess_gradient_reaches_every_pixel():
    """Square image: every pixel moves the output; non-square: every pixel the crop keeps does, the columns
    the official crop discards do not (that is the pipeline, not a lost gradient)."""
    g = torch.Generator().manual_seed(SEED)
    upstream = torch.randn(1, 3, CROP, CROP, generator=g, dtype=torch.float64)
    x = torch.rand(1, 3, 45, 45, generator=g, dtype=torch.float64, requires_grad=True)
    (clip_preprocess(x, SIZE, MEAN, STD, CROP) * upstream).sum().backward()
    assert torch.isfinite(x.grad).all() and (x.grad != 0).all()
    wide = torch.rand(1, 3, 30, 90, generator=g, dtype=torch.float64, requires_grad=True)  # -> 30x90, crop 28x28
    (clip_preprocess(wide, SIZE, MEAN, STD, CROP) * upstream).sum().backward()
    kept = wide.grad[..., 1:29, 31:59]
    assert (kept != 0).all() and (wide.grad[..., :25] == 0).all() and (wide.grad[..., 65:] == 0).all()


@pytest.mark.parametrize("bad", [[[0.5]], torch.rand(3, 8, 8), torch.rand(1, 4, 8, 8),
                                 torch.zeros(1, 3, 8, 8, dtype=torch.uint8)])
def test_preprocess_bad_images(bad):
    with pytest.raises(ValueError, match="images"):
        clip_preprocess(bad)


def test_preprocess_bad_sizes():
    with pytest.raises(ValueError, match="crop_size"):
        clip_preprocess(torch.rand(1, 3, 20, 20), size=20, crop_size=24)
    with pytest.raises(ValueError, match="size"):
        clip_preprocess(torch.rand(1, 3, 20, 20), size=0)


def test_read_processor_config(tmp_path, folders):
    assert read_processor_config(str(tmp_path)) == {"size": 224, "crop_size": None, "mean": CLIP_MEAN, "std": CLIP_STD}
    assert read_processor_config(folders["clip"]) == {"size": SIZE, "crop_size": (CROP, CROP), "mean": MEAN,
                                                      "std": STD}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"size": 224, "crop_size": 224}))  # old format
    assert read_processor_config(str(tmp_path))["crop_size"] == 224
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5, 0.5]}))
    with pytest.raises(ValueError, match="image_mean"):
        read_processor_config(str(tmp_path))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"resample": 2}))
    with pytest.raises(ValueError, match="only bicubic"):
        read_processor_config(str(tmp_path))


# ------------------------------------------------------------------------------------------ scores
# The reference's pixel values come from PIL's float32 filter (4e-7 from ours); the vision towers and the aesthetic
# head run in float64 on both sides, so aesthetic scores agree to (Lipschitz) x 4e-7: measured max 7e-10 -> 1e-6.
# Text features are float32 (see float64_vision) and computed differently (one prompt vs a padded batch), so the
# cosines agree to a few float32 ulps of a unit vector (6e-8): measured max 8e-8 -> COS_TOL = 1e-6, times the
# score's scale (100 for clipscore, logit_scale.exp() for pickscore). A wrong preprocessing setting moves the
# scores by ~1 (CLIP's default mean/std instead of the folder's: test_scores_can_fail).
AESTHETIC_TOL, COS_TOL = 1e-6, 1e-6


def _images():
    return smooth_images(3, 37, 45, seed=SEED + 1, lo=0.0, hi=1.0)


@pytest.mark.parametrize("tower", ["clip", "vision"])
def test_aesthetic_matches_official(tower, folders):
    """From a CLIPModel folder and from a CLIPVisionModelWithProjection folder."""
    reward = build_reward("aesthetic", clip=folders[tower], head=folders["head"]).double()
    x = _images()
    ours = reward(x, PROMPTS).detach()
    ref = official_aesthetic(x, folders[tower], folders["head"], vision_only=tower == "vision")
    print(f"aesthetic ({tower}): {ours.tolist()} vs {ref.tolist()}, max diff {(ours - ref).abs().max():.2e}")
    assert ours.shape == (3,) and torch.allclose(ours, ref, atol=AESTHETIC_TOL, rtol=0)


@pytest.mark.parametrize("spec", ["pickscore", "clipscore"])
def test_similarity_matches_official(spec, folders):
    reward = build_reward(spec, model=folders["clip"])
    float64_vision(reward.clip)
    x = _images()
    ours = reward(x, PROMPTS).detach()
    ref = official_similarity(x, PROMPTS, folders["clip"], logit_scale=spec == "pickscore")
    scale = reward.clip.logit_scale.exp().item() if spec == "pickscore" else 100.0
    print(f"{spec}: {ours.tolist()} vs {ref.tolist()}, max cos diff {(ours - ref).abs().max() / scale:.2e}")
    assert ours.shape == (3,) and torch.allclose(ours, ref, atol=scale * COS_TOL, rtol=0)
    assert len(reward._text_cache) == 2  # the repeated prompt is encoded once
    again = reward(x, PROMPTS).detach()
    assert torch.equal(again, ours)
    reward.clip.text_model.bfloat16()  # another dtype: the float32 cache must not be reused
    reward.clip.text_projection.bfloat16()
    assert reward.text_features(PROMPTS[:1]).dtype == torch.bfloat16 and len(reward._text_cache) == 1


def test_clipscore_paper_variant(folders):
    """CLIP-S = 2.5 * max(cos, 0) with the 'A photo depicts ' prefix."""
    x = _images()
    reward = build_reward("clipscore", model=folders["clip"], scale=2.5, clamp_negative=True,
                          prefix="A photo depicts ")
    float64_vision(reward.clip)
    ref = official_similarity(x, ["A photo depicts " + p for p in PROMPTS], folders["clip"], logit_scale=False)
    assert torch.allclose(reward(x, PROMPTS).detach(), (ref / 100 * 2.5).clamp(min=0), atol=2.5 * COS_TOL, rtol=0)


def test_scores_can_fail(folders):
    """The tolerance is tight enough to catch a wrong preprocessing setting (CLIP's default mean/std)."""
    reward = build_reward("clipscore", model=folders["clip"])
    float64_vision(reward.clip)
    reward.processor.update(mean=CLIP_MEAN, std=CLIP_STD)
    x = _images()
    gap = (reward(x, PROMPTS).detach() - official_similarity(x, PROMPTS, folders["clip"], False)).abs().max()
    print(f"wrong mean/std: max diff {gap:.2e}")
    assert gap > 1e3 * 100 * COS_TOL


# ------------------------------------------------------------------------------------------ gradients
@pytest.mark.parametrize("spec", ["aesthetic", "pickscore", "clipscore"])
def test_gradients_reach_image_and_gradcam_tokens(spec, folders):
    kwargs = {"clip": folders["clip"], "head": folders["head"]} if spec == "aesthetic" else {"model": folders["clip"]}
    reward = build_reward(spec, **kwargs)
    assert not reward.training and not any(p.requires_grad for p in reward.parameters())
    tokens = {}
    layer = reward.get_submodule(reward.gradcam_layer)

    def keep(module, inputs, output):
        output.retain_grad()
        tokens["t"] = output

    handle = layer.register_forward_hook(keep)
    x = smooth_images(2, 40, 33, seed=SEED + 2).float().requires_grad_(True)
    reward(x, PROMPTS[:2]).sum().backward()
    handle.remove()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    t = tokens["t"]
    n = (CROP // 7) ** 2
    assert reward.gradcam_prefix_tokens == 1 and t.shape == (2, 1 + n, 32)
    assert (t.grad[:, 1:].abs().sum(-1) > 0).all()  # every patch token reaches the score


# ------------------------------------------------------------------------------------------ spec checks
def test_check_reward_spec_good(folders):
    check_reward_spec("aesthetic", {"clip": folders["clip"], "head": folders["head"]})
    check_reward_spec("aesthetic", {"clip": folders["vision"], "head": folders["head"]})
    check_reward_spec("pickscore", {"model": folders["clip"], "processor": folders["clip"]})
    check_reward_spec("clipscore", {"model": folders["clip"], "scale": 2.5, "clamp_negative": True})


def _write_json(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f)


@pytest.fixture(scope="module")
def bad(folders):
    root = folders["root"]
    _write_json(os.path.join(root, "bert", "config.json"), {"model_type": "bert"})
    os.makedirs(os.path.join(root, "empty"), exist_ok=True)
    _write_json(os.path.join(root, "noweights", "config.json"), {"model_type": "clip"})
    torch.save({"fc.weight": torch.zeros(1, 24)}, os.path.join(root, "wrong_keys.pth"))
    torch.save([1, 2, 3], os.path.join(root, "list.pth"))
    with open(os.path.join(root, "text.pth"), "w") as f:
        f.write("not a checkpoint")
    torch.save(OfficialMLP((768, 1024, 128, 64, 16)).state_dict(), os.path.join(root, "l14_head.pth"))
    notok = os.path.join(root, "notok")
    from transformers import CLIPModel

    CLIPModel.from_pretrained(folders["clip"]).save_pretrained(notok)
    return {k: os.path.join(root, k) for k in ("bert", "empty", "noweights", "wrong_keys.pth", "list.pth",
                                                "text.pth", "l14_head.pth", "notok")} | {"missing": root + "/nope"}


@pytest.mark.parametrize("spec,kw,match", [
    ("aesthetic", {"clip": "missing"}, r"clip=.*nope.* is not a folder; expected a local transformers CLIPModel"),
    ("aesthetic", {"clip": "empty"}, r"has no config.json"),
    ("aesthetic", {"clip": "bert"}, r"is a 'bert' model, not CLIP"),
    ("aesthetic", {"clip": "noweights"}, r"has no weights \(model.safetensors"),
    ("aesthetic", {"head": "missing"}, r"head=.*nope.* does not exist; expected the LAION"),
    ("aesthetic", {"head": "wrong_keys.pth"}, r"wrong_keys.pth.* has keys \['fc.weight'\].*layers.0.bias"),
    ("aesthetic", {"head": "list.pth"}, r"list.pth.* holds no tensor state dict"),
    ("aesthetic", {"head": "text.pth"}, r"text.pth.* could not be read as a torch state dict"),
    ("aesthetic", {"head": "l14_head.pth"}, r"takes 768-dim embeddings but clip=.* gives 24-dim"),
    ("aesthetic", {"head": ""}, r"needs reward.kwargs.head"),
    ("pickscore", {"model": "bert"}, r"model=.*bert.* is a 'bert' model"),
    ("pickscore", {"model": "notok"}, r"no CLIP tokenizer in .*notok.*pass reward.kwargs.processor"),
    ("clipscore", {"processor": "missing"}, r"processor=.*nope.* is not a folder"),
    ("clipscore", {"scale": "big"}, r"scale must be a number"),
])
def test_bad_specs_are_clear(spec, kw, match, folders, bad):
    base = {"clip": folders["clip"], "head": folders["head"]} if spec == "aesthetic" else {"model": folders["clip"]}
    kwargs = base | {k: bad.get(v, v) for k, v in kw.items()}
    with pytest.raises(SpecError, match=match):
        check_reward_spec(spec, kwargs)
    with pytest.raises(SpecError, match=match):
        build_reward(spec, **kwargs)


def test_config_with_aesthetic_passes_preflight(folders, tmp_path):
    from fnf import preflight
    from tests.fnf_tiny_models import tiny_config

    cfg = tiny_config("unused", str(tmp_path / "run"),
                      reward={"spec": "aesthetic", "kwargs": {"clip": folders["clip"], "head": folders["head"]}})
    preflight.check(cfg, model=False)
    cfg.reward.kwargs["head"] = str(tmp_path / "missing.pth")
    with pytest.raises(SpecError, match="missing.pth"):
        preflight.check(cfg, model=False)


@pytest.mark.parametrize("spec", ["aesthetic", "pickscore", "clipscore"])
def test_gradcam_on_each_clip_reward_lands_in_its_crop_window(spec, folders):
    """fnf's Grad-CAM on the reward's own gradcam_layer, non-square image: a finite map >= 0, zero outside the
    window the model sees (crop_window of the folder's processor settings), not all zero inside it."""
    from fnf.localize import build_localizer
    from fnf.reward_models.preprocess import crop_window

    kwargs = {"clip": folders["clip"], "head": folders["head"]} if spec == "aesthetic" else {"model": folders["clip"]}
    reward = build_reward(spec, **kwargs)
    x = smooth_images(2, 40, 64, seed=SEED + 3).float()
    top, left, h, w = crop_window(40, 64, SIZE, CROP)
    assert reward.gradcam_crop(40, 64) == (top, left, h, w)
    # 40x64 -> 30x48; the 28x28 crop starts at row 1, column 10 of the resized image
    assert (top, left, h, w) == pytest.approx((40 / 30, 10 * 64 / 48, 28 * 40 / 30, 28 * 64 / 48))
    # both signs: which evidence a random model shows is random, each sign must map somewhere for some image
    cams = [build_localizer("gradcam", reward, kwargs={"explain": e}).heatmap(x, PROMPTS[:2]) for e in
            ("problem", "reward")]
    for cam in cams:
        assert cam.shape == (2, 40, 64) and torch.isfinite(cam).all() and (cam >= 0).all()
        outside = torch.ones(40, 64, dtype=torch.bool)
        outside[round(top):round(top + h), round(left):round(left + w)] = False
        assert cam[:, outside].abs().max() == 0
    assert max(float(c.amax()) for c in cams) > 0
