"""Reward, heatmap and alignment callables over the shipped toy models, for fnf's spec loading:

    --reward fnf.toy.rewards:defect_reward
    --localizer heatmap:fnf.toy.rewards:defect_heatmap      (the heatmap model)
    --localizer heatmap:fnf.toy.rewards:defect_gradcam      (Grad-CAM of the defect classifier's logit)
    --localizer gradcam:classifier.features                 (Grad-CAM of the problem: evidence against the reward)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..localize import GradCAM
from . import data as toydata
from .models_small import load


class DefectReward(torch.nn.Module):
    """r = log(1 - p(defect)) = -softplus(defect logit): 0 for a clean image, steeply negative for a defect."""

    def __init__(self, root: str | None = None):
        super().__init__()
        self.classifier = load("defect_classifier", *([root] if root else []))

    def forward(self, images, prompts=None):
        return -F.softplus(self.classifier(images))


class DefectLogit(torch.nn.Module):
    """The defect classifier's logit (higher = more defect): what Grad-CAM should explain."""

    def __init__(self, root: str | None = None):
        super().__init__()
        self.classifier = load("defect_classifier", *([root] if root else []))

    def forward(self, images, prompts=None):
        return self.classifier(images)


def defect_reward(*, root: str = "") -> DefectReward:
    """Factory for ``fnf.toy.rewards:defect_reward``."""
    return DefectReward(root or None)


def defect_probability(images: torch.Tensor, root: str = "") -> torch.Tensor:
    """p(defect) per image (B,), no gradient; ``root``: folder of the small models (default the shipped ones)."""
    with torch.no_grad():
        return torch.sigmoid(load("defect_classifier", *([root] if root else []))(images))


def defect_heatmap(*, root: str = ""):
    """Factory for ``heatmap:fnf.toy.rewards:defect_heatmap``: images -> per-pixel p(defect) (B, H, W)."""
    model = load("defect_heatmap", *([root] if root else []))

    def heat(images, prompts=None):
        with torch.no_grad():
            return torch.sigmoid(model(images.float()))
    return heat


def defect_gradcam(*, layer: str = "classifier.features", root: str = ""):
    """Factory for ``heatmap:fnf.toy.rewards:defect_gradcam``: Grad-CAM of the defect *logit* on ``layer``.

    Grad-CAM keeps ReLU(sum_c mean(dS/dA_c) A_c): evidence *for* S, and S is the defect logit, so this asks for
    ``explain="reward"``. (The ``gradcam:classifier.features`` localizer on ``defect_reward`` gives the same map:
    its default, ``explain="problem"``, explains the evidence against the reward -softplus(logit).)"""

    cam = GradCAM(DefectLogit(root or None), layer, explain="reward")

    def heat(images, prompts=None):
        return cam(images.float(), list(prompts) if prompts is not None else [""] * images.shape[0])
    return heat


def attribute_probs(images: torch.Tensor, root: str = "") -> torch.Tensor:
    """p(pair present) (B, 12) for the (shape, colour) pairs of fnf.toy.data.PAIRS, no gradient."""
    with torch.no_grad():
        return torch.sigmoid(load("attribute_classifier", *([root] if root else []))(images.float()))


def alignment(images: torch.Tensor, prompts: list[str], root: str = "") -> dict:
    """Prompt alignment per image: ``recall`` = fraction of the prompt's (shape, colour) pairs detected
    (p > 0.5); ``exact`` = 1 when the detected set is exactly the prompt's set."""
    probs = attribute_probs(images, root) > 0.5
    want = torch.stack([torch.from_numpy(toydata.attrs_for(toydata.parse_caption(p))) > 0.5 for p in prompts])
    recall = (probs & want).sum(1).float() / want.sum(1).float()
    exact = (probs == want).all(1).float()
    return {"recall": recall, "exact": exact}
