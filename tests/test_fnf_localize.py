"""Localization: Grad-CAM finds where a planted reward looks, saliency, heatmap models, mask files,
normalisation, thresholds and the fnf_kernels dilation."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fnf.images import save_png  # noqa: E402
from fnf_tiny_models import one_torch_thread  # noqa: E402,F401
from fnf.localize import (GradCAM, LocalizerError, build_localizer, heatmap_to_mask,  # noqa: E402
                          normalize_heatmap, overlay)
from fnf.rewards import build_reward  # noqa: E402

HELPER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fnf_tiny_models.py")


def _planted_images(b=2, size=32):
    """Grey noise with a red square at a different place in each image."""
    g = torch.Generator().manual_seed(0)
    x = 0.4 + 0.1 * torch.rand(b, 1, size, size, generator=g).expand(b, 3, size, size).clone()
    boxes = [(4, 12, 18, 28), (20, 30, 2, 10)][:b]
    truth = torch.zeros(b, 1, size, size)
    for i, (t, bt, l, r) in enumerate(boxes):
        x[i, :, t:bt, l:r] = torch.tensor([0.9, 0.1, 0.1]).view(3, 1, 1)
        truth[i, 0, t:bt, l:r] = 1
    return x, truth


def test_gradcam_mask_lands_where_the_planted_reward_looks():
    reward = build_reward(f"{HELPER}:red_detector")
    images, truth = _planted_images()
    # explain=reward maps the evidence for r (the red square). Since the default became explain=problem, this
    # test asks for it; the default with reward_weight=-1 (training lowers redness) must give the same map.
    loc = build_localizer("gradcam:features", reward, kwargs={"explain": "reward"}, threshold=0.5, radius=1)
    heat, mask = loc(images, ["a", "b"])
    heat_w, mask_w = build_localizer("gradcam:features", reward, threshold=0.5, radius=1, reward_weight=-1.0)(
        images, ["a", "b"])
    assert torch.allclose(heat_w, heat) and torch.equal(mask_w, mask)
    assert heat.shape == (2, 32, 32) and mask.shape == (2, 1, 32, 32)
    assert not heat.requires_grad and not mask.requires_grad
    for i in range(2):
        inter = (mask[i] * truth[i]).sum()
        union = ((mask[i] + truth[i]) > 0).sum()
        assert inter / union > 0.6, (i, inter, union)
        assert heat[i][truth[i, 0] > 0].mean() > 5 * heat[i][truth[i, 0] == 0].mean()
    # default layer = the last Conv2d
    assert GradCAM(reward).layer == "features"
    with pytest.raises(LocalizerError, match="no layer 'nope'"):
        build_localizer("gradcam:nope", reward)
    with pytest.raises(LocalizerError, match="nn.Module"):
        build_localizer("gradcam", lambda x, p: x.mean())


def test_saliency_of_a_region_reward_marks_the_region():
    reward = build_reward("region", box=(0.0, 0.5, 0.5, 1.0))
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    heat, mask = build_localizer("saliency", reward, threshold=0.5, radius=0)(images, ["a", "b"])
    expected = torch.zeros(32, 32)
    expected[:16, 16:] = 1
    assert torch.equal(mask[:, 0], expected.expand(2, 32, 32))
    _, dilated = build_localizer("saliency", reward, threshold=0.5, radius=2)(images, ["a", "b"])
    assert dilated.sum() > mask.sum() and torch.all(dilated >= mask)


def test_heatmap_model_and_mask_files(tmp_path):
    images = torch.zeros(3, 3, 32, 32)
    heat, mask = build_localizer("heatmap:box", kwargs={"box": [0.5, 1.0, 0.0, 0.5]}, radius=0)(images, ["a"] * 3)
    assert mask[:, 0, 16:, :16].min() == 1 and mask[:, 0, :16].max() == 0
    m0, m1 = torch.zeros(1, 16, 16), torch.zeros(1, 16, 16)   # files at another resolution are resized
    m0[:, :8] = 1
    m1[:, :, 8:] = 1
    save_png(m0[0], str(tmp_path / "a.png"))
    save_png(m1[0], str(tmp_path / "b.png"))
    loc = build_localizer(f"file:{tmp_path}/*.png", radius=0)
    _, mask = loc(images, ["x"] * 3, [0, 1, 2])
    assert mask[0, 0, :16].min() == 1 and mask[0, 0, 16:].max() == 0
    assert mask[1, 0, :, 16:].min() == 1 and mask[1, 0, :, :16].max() == 0
    assert torch.equal(mask[2], mask[0])  # index 2 wraps to the first file
    with pytest.raises(LocalizerError, match="no files match"):
        build_localizer(f"file:{tmp_path}/*.jpg")
    _, none = build_localizer("none")(images, ["x"] * 3)
    assert none.sum() == 0


def test_normalisation_thresholds_and_overlay():
    heat = torch.tensor([[[0.0, 1.0], [2.0, 4.0]], [[5.0, 5.0], [5.0, 5.0]]])
    n = normalize_heatmap(heat, "minmax")
    assert torch.allclose(n[0], torch.tensor([[0.0, 0.25], [0.5, 1.0]])) and n[1].abs().sum() == 0
    assert torch.allclose(normalize_heatmap(heat, "max")[0], heat[0] / 4)
    rel = heatmap_to_mask(heat, threshold=0.4, mode="relative", radius=0)  # 0.4 * max per image
    assert rel[0, 0].tolist() == [[0, 0], [1, 1]] and rel[1].sum() == 4  # 5 > 0.4 * 5 everywhere
    assert heatmap_to_mask(torch.zeros(1, 2, 2), threshold=0.0, mode="relative", radius=0).sum() == 0
    absolute = heatmap_to_mask(heat, threshold=3.0, mode="absolute", radius=0)
    assert absolute[0, 0].tolist() == [[0, 0], [0, 1]] and absolute[1].sum() == 4
    img = torch.zeros(2, 3, 2, 2)
    ov = overlay(img, absolute)
    assert ov.shape == img.shape and ov[0, 0, 1, 1] > 0 and ov[0, 0, 0, 0] == 0


class _Negated(torch.nn.Module):
    """A higher-is-better reward that penalises red: r = -red_detector."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, images, prompts):
        return -self.inner(images, prompts)


def test_gradcam_explain_problem_maps_what_lowers_the_reward():
    images, truth = _planted_images()
    reward = _Negated(build_reward(f"{HELPER}:red_detector"))
    problem = build_localizer("gradcam:inner.features", reward, kwargs={"explain": "problem"}, threshold=0.5,
                              radius=1)
    heat, mask = problem(images, ["a", "b"])
    for i in range(2):
        inter = (mask[i] * truth[i]).sum()
        union = ((mask[i] + truth[i]) > 0).sum()
        assert inter / union > 0.6, (i, inter, union)
    # explain=problem is the default: the same mask without kwargs; explain=reward maps the opposite evidence.
    _, default_mask = build_localizer("gradcam:inner.features", reward, threshold=0.5, radius=1)(images, ["a", "b"])
    assert torch.equal(default_mask, mask)
    _, reward_mask = build_localizer("gradcam:inner.features", reward, kwargs={"explain": "reward"}, threshold=0.5,
                                     radius=1)(images, ["a", "b"])
    for i in range(2):
        assert (reward_mask[i] * truth[i]).sum() < 0.5 * truth[i].sum(), i
    with pytest.raises(LocalizerError, match="explain must be"):
        build_localizer("gradcam:inner.features", reward, kwargs={"explain": "bad"})
    with pytest.raises(LocalizerError, match="not gradcam options"):
        build_localizer("gradcam:inner.features", reward, kwargs={"layer": "x"})
