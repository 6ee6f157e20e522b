"""The toy world's three small judges: defect classifier, defect heatmap model, attribute classifier.

Inputs are images (B, 3, H, W) in [0, 1] (resized to 64x64 when needed). Each model is a small CNN saved as
safetensors + JSON config in fnf/assets/toy/<name>/ (see :func:`load`)."""
from __future__ import annotations

import json
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ASSETS

SIZE = 64


def _prep(images: torch.Tensor) -> torch.Tensor:
    x = images.float()
    if x.shape[-1] != SIZE or x.shape[-2] != SIZE:
        x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", antialias=True, align_corners=False)
    return x * 2 - 1


def _block(cin, cout, stride=1, dilation=1, norm=False):
    conv = nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation)
    return nn.Sequential(conv, nn.GroupNorm(8, cout), nn.SiLU()) if norm else nn.Sequential(conv, nn.SiLU())


class DefectClassifier(nn.Module):
    """Defect logit of an image (B,). ``features`` is the last conv layer (16x16): the layer Grad-CAM reads."""

    def __init__(self, width: int = 32):
        super().__init__()
        w = width
        self.stem = nn.Sequential(_block(3, w // 2), _block(w // 2, w, 2), _block(w, w), _block(w, 2 * w, 2))
        self.features = nn.Conv2d(2 * w, 2 * w, 3, padding=1)
        self.head = nn.Linear(4 * w, 1)

    def forward(self, images, prompts=None):
        a = F.silu(self.features(self.stem(_prep(images))))
        pooled = torch.cat([a.amax(dim=(2, 3)), a.mean(dim=(2, 3))], dim=1)
        return self.head(pooled)[:, 0]


class DefectHeatmap(nn.Module):
    """Per-pixel defect logits (B, H, W), fully convolutional (32x32 trunk, upsampled bilinearly)."""

    def __init__(self, width: int = 24):
        super().__init__()
        w = width
        self.trunk = nn.Sequential(_block(3, w), _block(w, w, 2), _block(w, w, 1, 2), _block(w, w, 1, 4),
                                   _block(w, w, 1, 1))
        self.out = nn.Conv2d(w, 1, 1)

    def forward(self, images):
        logits = self.out(self.trunk(_prep(images)))
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]


class AttributeClassifier(nn.Module):
    """Multi-label logits (B, 12) over the (shape, colour) pairs of fnf.toy.data.PAIRS."""

    def __init__(self, width: int = 32, n_out: int = 12):
        super().__init__()
        w = width
        self.stem = nn.Sequential(_block(3, w, 1, 1, True), _block(w, w, 2, 1, True), _block(w, w, 1, 1, True),
                                  _block(w, 2 * w, 2, 1, True), _block(2 * w, 2 * w, 1, 1, True),
                                  _block(2 * w, 2 * w, 2, 1, True))
        self.head = nn.Sequential(nn.Linear(4 * w, 2 * w), nn.SiLU(), nn.Linear(2 * w, n_out))

    def forward(self, images):
        a = self.stem(_prep(images))
        return self.head(torch.cat([a.amax(dim=(2, 3)), a.mean(dim=(2, 3))], dim=1))


CLASSES = {"defect_classifier": DefectClassifier, "defect_heatmap": DefectHeatmap,
           "attribute_classifier": AttributeClassifier}


def save(model: nn.Module, name: str, root: str = ASSETS, extra: dict | None = None) -> str:
    """Write <root>/<name>/model.safetensors and config.json; returns the folder."""
    from safetensors.torch import save_file

    folder = os.path.join(root, name)
    os.makedirs(folder, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"class": type(model).__name__, "name": name, **(extra or {})}, f, indent=1)
    return folder


_CACHE: dict = {}


def load(name: str, root: str = ASSETS) -> nn.Module:
    """Load a shipped small model (eval mode, frozen); cached per (root, name)."""
    from safetensors.torch import load_file

    key = (os.path.abspath(root), name)
    if key not in _CACHE:
        folder = os.path.join(root, name)
        with open(os.path.join(folder, "config.json")) as f:
            cfg = json.load(f)
        model = CLASSES[name](**cfg.get("init", {}))
        model.load_state_dict(load_file(os.path.join(folder, "model.safetensors")))
        _CACHE[key] = model.eval().requires_grad_(False)
    return _CACHE[key]
