"""Differentiable image preprocessing shared by the CLIP/BLIP-style rewards.

Images in [0, 1] -> the model's input: bicubic antialiased resize of the short side, center crop, mean/std
normalisation, as transformers' ``CLIPImageProcessor`` does with PIL (torch's antialiased bicubic is PIL's
filter: they agree to ~1e-7 on real-valued images). No clamp, so gradients reach every pixel that the crop keeps.
"""
from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PROCESSOR_CONFIG = "preprocessor_config.json"


def _pair(value, name: str) -> tuple[int, int]:
    """An int or (h, w) -> (h, w) of positive ints."""
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pair):
        raise ValueError(f"{name}: expected a positive int or (height, width) of positive ints, got {value!r}")
    return pair


def resize_short_side(images: torch.Tensor, size) -> torch.Tensor:
    """Resize (B, C, H, W) so that the short side is ``size`` (the long side ``int(size * long / short)``, as
    the CLIP processors compute it), bicubic with antialiasing. A (height, width) ``size`` resizes to exactly
    that (processors whose ``size`` is ``{"height", "width"}``)."""
    h, w = images.shape[-2:]
    if isinstance(size, int):
        _pair(size, "size")
        if h <= w:
            new_h, new_w = size, int(size * w / h)
        else:
            new_h, new_w = int(size * h / w), size
    else:
        new_h, new_w = _pair(size, "size")
    if (new_h, new_w) == (h, w):
        return images
    return F.interpolate(images, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)


def center_crop(images: torch.Tensor, size) -> torch.Tensor:
    """The central ``size`` x ``size`` (or (height, width)) window (top-left offset ``(H - h) // 2``, as
    transformers crops)."""
    ch, cw = _pair(size, "crop_size")
    h, w = images.shape[-2:]
    if ch > h or cw > w:
        raise ValueError(f"crop_size: the crop {ch}x{cw} is larger than the resized image {h}x{w}")
    top, left = (h - ch) // 2, (w - cw) // 2
    return images[..., top:top + ch, left:left + cw]


def resized_size(height: int, width: int, size) -> tuple[int, int]:
    """The (h, w) that :func:`resize_short_side` gives a ``height`` x ``width`` image."""
    if isinstance(size, int):
        return (size, int(size * width / height)) if height <= width else (int(size * height / width), size)
    return _pair(size, "size")


def crop_window(height: int, width: int, size=224, crop_size=None) -> tuple[float, float, float, float]:
    """Where :func:`clip_preprocess`'s model input lies in a ``height`` x ``width`` image: (top, left, h, w) in
    image pixels (a reward's ``gradcam_crop``, so Grad-CAM maps land on the right pixels of non-square images)."""
    new_h, new_w = resized_size(height, width, size)
    ch, cw = _pair(size if crop_size is None else crop_size, "crop_size")
    sy, sx = height / new_h, width / new_w
    return ((new_h - ch) // 2 * sy, (new_w - cw) // 2 * sx, ch * sy, cw * sx)


def clip_preprocess(images: torch.Tensor, size=224, mean=CLIP_MEAN, std=CLIP_STD,
                    crop_size=None) -> torch.Tensor:
    """(B, 3, H, W) floats in [0, 1] -> normalised (B, 3, crop, crop) model input, differentiable.

    float32 and float64 keep their dtype; half precision is computed in float32."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images: expected a (B, 3, H, W) float tensor in [0, 1], got "
                         f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
    if not images.is_floating_point():
        raise ValueError(f"images: expected a float tensor in [0, 1], got dtype {images.dtype} (divide uint8 "
                         "images by 255)")
    if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
        raise ValueError(f"mean/std: expected 3 values each (std > 0), got mean={mean!r} std={std!r}")
    x = images if images.dtype in (torch.float32, torch.float64) else images.float()
    x = center_crop(resize_short_side(x, size), size if crop_size is None else crop_size)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


def _size_setting(value, key: str, path: str):
    """A processor's ``size`` / ``crop_size`` entry -> int (short side) or (h, w)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, dict):
        if "shortest_edge" in value and key == "size":
            return int(value["shortest_edge"])
        if "height" in value and "width" in value:
            return (int(value["height"]), int(value["width"]))
    raise ValueError(f"{path}: {key!r} must be an int, {{'shortest_edge': n}} or {{'height': h, 'width': w}}, "
                     f"got {value!r}")


def read_processor_config(folder: str | None) -> dict:
    """``size``, ``crop_size``, ``mean``, ``std`` for :func:`clip_preprocess` from ``folder/preprocessor_config.json``
    (transformers' image processor file; ``resample`` must be bicubic); CLIP's defaults (224, 224, CLIP_MEAN, CLIP_STD) for what it lacks or
    when there is no such file. A malformed file is a ValueError naming it."""
    settings = {"size": 224, "crop_size": None, "mean": CLIP_MEAN, "std": CLIP_STD}
    path = os.path.join(folder, PROCESSOR_CONFIG) if folder else ""
    if not path or not os.path.isfile(path):
        return settings
    try:
        with open(path) as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable JSON image processor config ({e})") from e
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a JSON object (transformers' preprocessor_config.json)")
    if cfg.get("resample", 3) != 3:
        raise ValueError(f"{path}: 'resample' is {cfg['resample']!r}; only bicubic (3, what CLIP models use) is "
                         "implemented")
    if "size" in cfg:
        settings["size"] = _size_setting(cfg["size"], "size", path)
    if cfg.get("crop_size") is not None and cfg.get("do_center_crop", True):
        settings["crop_size"] = _size_setting(cfg["crop_size"], "crop_size", path)
    for key, name in (("image_mean", "mean"), ("image_std", "std")):
        if key in cfg:
            value = cfg[key]
            if not (isinstance(value, (list, tuple)) and len(value) == 3
                    and all(isinstance(v, (int, float)) for v in value)):
                raise ValueError(f"{path}: {key!r} must be 3 numbers, got {value!r}")
            settings[name] = tuple(float(v) for v in value)
    if any(s <= 0 for s in settings["std"]):
        raise ValueError(f"{path}: 'image_std' must be positive, got {settings['std']!r}")
    return settings


def center_crop_window(size: int, crop: int | None = None):
    """``gradcam_crop`` of a reward that resizes the short side to ``size`` and center crops ``crop`` (default
    ``size``) as :func:`clip_preprocess` does: (height, width) -> the window
    (top, left, crop_h, crop_w) of the image, in image pixels."""
    return lambda height, width: crop_window(height, width, size, crop)
