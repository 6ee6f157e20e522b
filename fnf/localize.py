"""Problem masks M(I0): heatmaps from a model, Grad-CAM or input-gradient saliency of a scalar reward, or
mask files; per-image normalisation; then ``fnf_kernels.threshold_dilate``. Overlays for inspection.

Everything here runs on the pretrained image I0 and returns tensors with no autograd history: no gradient
ever flows from the mask into training.
"""
from __future__ import annotations

import glob as globlib
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

import fnf_kernels

from .reward_models.heatmaps import BoxDetectorHeatmap, check_boxes
from .rewards import build_heatmap_model, check_heatmap_spec


class LocalizerError(ValueError):
    """A localizer spec cannot be built (unknown kind, missing layer, no mask files...)."""


# ------------------------------------------------------------------------------------------ heatmaps
class GradCAM:
    """Grad-CAM of a scalar reward: ReLU(sum_c mean_hw(dr/dA_c) * A_c) on a named layer, upsampled
    bilinearly to the image size. ``layer`` is a dotted submodule name of the reward module; by default the
    reward's ``gradcam_layer`` attribute when it has one, else the last Conv2d.

    The layer may output feature maps (B, C, h, w) or tokens (B, L, C) (also (L, B, C), or a tuple / model
    output whose first item is that): tokens drop the first ``prefix_tokens`` (CLS etc.; default the reward's
    ``gradcam_prefix_tokens``, else 1) and the N patch tokens are laid on the patch grid (``grid=(h, w)``, or
    a sqrt(N) square). For a ViT whose score reads the CLS token, hook a block *before* the last one: the
    last block's patch outputs never reach the CLS token.

    The CAM covers the window of the image the model sees. A reward that crops (e.g. resize the short side
    and center crop) says where through ``gradcam_crop(height, width) -> (top, left, crop_h, crop_w)`` in
    image pixels (see :func:`center_crop_window`); the CAM is pasted there and is 0 outside. Without it the
    CAM is stretched over the whole image (right for square images).

    ``explain="problem"`` (default) maps the evidence against the quantity training maximises, ``w * r``:
    Grad-CAM of ``-sign(w) * r``. With r = -logit(unsafe) and w = 1 that is the unsafe region; with an
    artifact score and w = -1 it is the artifact. ``explain="reward"`` maps the evidence for r itself."""

    def __init__(self, reward: torch.nn.Module, layer: str | None = None, explain: str = "problem",
                 reward_weight: float = 1.0, prefix_tokens: int | None = None, grid=None):
        if explain not in ("reward", "problem"):
            raise LocalizerError(f"gradcam: explain must be 'reward' or 'problem', got {explain!r}")
        self.sign = 1.0 if explain == "reward" else (1.0 if reward_weight < 0 else -1.0)
        if not isinstance(reward, torch.nn.Module):
            raise LocalizerError("gradcam needs the reward to be an nn.Module (it hooks a layer); use "
                                 "'saliency' or 'heatmap:SPEC' for plain callables")
        names = dict(reward.named_modules())
        if not layer:
            layer = getattr(reward, "gradcam_layer", None)
        if not layer:
            convs = [n for n, m in reward.named_modules() if isinstance(m, torch.nn.Conv2d)]
            if not convs:
                raise LocalizerError("gradcam: the reward has no Conv2d layer; name one with 'gradcam:<layer>'")
            layer = convs[-1]
        if layer not in names:
            some = [n for n in names if n][:12]
            raise LocalizerError(f"gradcam: reward has no layer {layer!r}; layers include {some}")
        if prefix_tokens is None:
            prefix_tokens = getattr(reward, "gradcam_prefix_tokens", 1)
        _check_gradcam_options({"prefix_tokens": prefix_tokens, "grid": grid})
        self.reward, self.layer, self.module = reward, layer, names[layer]
        self.prefix_tokens, self.grid = int(prefix_tokens), (None if grid is None else tuple(int(g) for g in grid))

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        captured = {}

        def hook(_module, _inputs, output):
            captured["a"] = _first_tensor(output)

        handle = self.module.register_forward_hook(hook)
        try:
            with torch.enable_grad():
                x = images.detach().float().requires_grad_(True)
                score = self.sign * torch.as_tensor(self.reward(x, prompts)).reshape(images.shape[0], -1)[:, 0]
                act = captured.get("a")
                if act is None or act.dim() not in (3, 4):
                    raise LocalizerError(f"gradcam: layer {self.layer!r} must output (B, C, h, w) feature maps "
                                         f"or (B, L, C) tokens, got "
                                         f"{None if act is None else tuple(act.shape)}")
                (grad,) = torch.autograd.grad(score.sum(), act, allow_unused=True)
        finally:
            handle.remove()
        if grad is None:
            grad = torch.zeros_like(act)
        if act.dim() == 3:
            act, grad = self._token_maps(act.detach(), grad, images.shape[0])
        weights = grad.mean(dim=(2, 3), keepdim=True)
        cam = torch.relu((weights * act).sum(dim=1, keepdim=True)).detach()
        crop = getattr(self.reward, "gradcam_crop", None)
        if crop is None:
            cam = F.interpolate(cam.float(), size=images.shape[-2:], mode="bilinear", align_corners=False)
            return cam[:, 0]
        return _paste_in_window(cam.float(), crop(*images.shape[-2:]), images.shape[-2:])

    def _token_maps(self, act: torch.Tensor, grad: torch.Tensor, batch: int):
        """(B, L, C) (or (L, B, C)) tokens and their gradient -> (B, C, gh, gw) patch maps."""
        if act.shape[0] != batch and act.shape[1] == batch:
            act, grad = act.transpose(0, 1), grad.transpose(0, 1)
        n = act.shape[1] - self.prefix_tokens
        gh, gw = self.grid if self.grid is not None else (math.isqrt(max(n, 0)),) * 2
        if n <= 0 or gh * gw != n:
            raise LocalizerError(
                f"gradcam: layer {self.layer!r} gives {act.shape[1]} tokens; after prefix_tokens="
                f"{self.prefix_tokens} the {n} patch tokens do not fill "
                + (f"grid={list(self.grid)}" if self.grid else "a square grid; pass localize.kwargs grid: [h, w]"))

        def to_map(t):
            return t[:, self.prefix_tokens:].transpose(1, 2).reshape(t.shape[0], t.shape[2], gh, gw)
        return to_map(act), to_map(grad)


def layer_name(root: torch.nn.Module, module: torch.nn.Module) -> str:
    """The dotted name of ``module`` inside ``root``, for a reward's ``gradcam_layer``: found by identity, so it
    survives library renames (transformers 5's CLIPVisionModel dropped the ``vision_model.`` level)."""
    for name, candidate in root.named_modules():
        if candidate is module:
            return name
    raise LocalizerError(f"{type(module).__name__} is not a submodule of {type(root).__name__}")


def _first_tensor(output):
    """A layer's output, or the first item of a tuple / list / transformers model output."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return output[0] if output else None
    try:
        first = output[0]
    except (TypeError, KeyError, IndexError):
        return None
    return first if isinstance(first, torch.Tensor) else None


def _paste_in_window(cam: torch.Tensor, window, size) -> torch.Tensor:
    """(B, 1, gh, gw) CAM -> (B, H, W): resized onto the window (top, left, h, w) of the image, 0 elsewhere."""
    height, width = size
    try:
        top, left, crop_h, crop_w = (float(v) for v in window)
    except (TypeError, ValueError):
        raise LocalizerError(f"gradcam: the reward's gradcam_crop must return (top, left, height, width), "
                             f"got {window!r}") from None
    top_i, left_i = round(top), round(left)
    win_h, win_w = round(top + crop_h) - top_i, round(left + crop_w) - left_i
    t, l = max(0, top_i), max(0, left_i)
    b, r = min(height, top_i + win_h), min(width, left_i + win_w)
    out = cam.new_zeros(cam.shape[0], height, width)
    if b <= t or r <= l:
        raise LocalizerError(f"gradcam: the reward's gradcam_crop window {window!r} lies outside the "
                             f"{height}x{width} image")
    # the CAM covers the whole window; a window reaching past the image (zero-padded inputs) keeps its inner part
    full = F.interpolate(cam, size=(win_h, win_w), mode="bilinear", align_corners=False)[:, 0]
    out[:, t:b, l:r] = full[:, t - top_i:b - top_i, l - left_i:r - left_i]
    return out


def _check_gradcam_options(kwargs: dict) -> None:
    prefix = kwargs.get("prefix_tokens")
    if prefix is not None and (isinstance(prefix, bool) or not isinstance(prefix, int) or prefix < 0):
        raise LocalizerError(f"gradcam: prefix_tokens must be an integer >= 0, got {prefix!r}")
    grid = kwargs.get("grid")
    if grid is not None and (not isinstance(grid, (list, tuple)) or len(grid) != 2
                             or not all(isinstance(g, int) and not isinstance(g, bool) and g > 0 for g in grid)):
        raise LocalizerError(f"gradcam: grid must be two positive integers [h, w], got {grid!r}")


class InputSaliency:
    """|dr/dx| maxed over colour channels: plain input-gradient saliency of any differentiable reward."""

    def __init__(self, reward: Callable):
        self.reward = reward

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        with torch.enable_grad():
            x = images.detach().float().requires_grad_(True)
            score = torch.as_tensor(self.reward(x, prompts)).reshape(images.shape[0], -1)[:, 0]
            (grad,) = torch.autograd.grad(score.sum(), x, allow_unused=True)
        if grad is None:
            return images.new_zeros(images.shape[0], *images.shape[-2:]).float()
        return grad.abs().amax(dim=1).detach()


class HeatmapModel:
    """Any callable images -> (B, H, W) (or (B, 1, H, W), any resolution: resized bilinearly)."""

    def __init__(self, fn: Callable):
        self.fn = fn

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        with torch.no_grad():
            try:
                heat = self.fn(images, prompts)
            except TypeError:
                heat = self.fn(images)
        heat = torch.as_tensor(heat).float()
        if heat.dim() == 4:
            heat = heat[:, 0]
        if heat.dim() != 3 or heat.shape[0] != images.shape[0]:
            raise LocalizerError(f"heatmap model returned shape {tuple(heat.shape)}; expected (B, H, W)")
        if heat.shape[-2:] != images.shape[-2:]:
            heat = F.interpolate(heat[:, None], size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        return heat.to(images.device)


class FileMasks:
    """Masks (or heatmaps) from image files: the i-th sorted file of the glob pairs with prompt index i
    (modulo the file count; a single file applies to every prompt). Grey levels are read in [0, 1]."""

    def __init__(self, pattern: str):
        self.files = sorted(globlib.glob(pattern))
        if not self.files:
            raise LocalizerError(f"file:{pattern}: no files match")
        self._cache: dict[int, torch.Tensor] = {}

    def _load(self, i: int) -> torch.Tensor:
        if i not in self._cache:
            import numpy as np
            from PIL import Image
            arr = np.asarray(Image.open(self.files[i]).convert("L"), dtype=np.float32) / 255.0
            self._cache[i] = torch.from_numpy(arr.copy())
        return self._cache[i]

    def __call__(self, images: torch.Tensor, prompts: list[str], indices=None) -> torch.Tensor:
        b, _, h, w = images.shape
        indices = list(range(b)) if indices is None else [int(i) for i in indices]
        maps = []
        for i in indices:
            m = self._load(i % len(self.files))
            if m.shape != (h, w):
                m = F.interpolate(m[None, None], size=(h, w), mode="nearest")[0, 0]
            maps.append(m)
        return torch.stack(maps).to(images.device)


class NoMask:
    """An empty heatmap: the whole image is held to I0 (a global proximity penalty)."""

    def __call__(self, images, prompts):
        return images.new_zeros(images.shape[0], *images.shape[-2:]).float()


# ------------------------------------------------------------------------------------------ masks
def normalize_heatmap(heat: torch.Tensor, mode: str = "minmax") -> torch.Tensor:
    """Per-image normalisation: minmax -> [0, 1]; max -> divide by the max |value|; none -> unchanged.
    A constant image maps to zeros."""
    if mode == "none":
        return heat
    flat = heat.flatten(1)
    if mode == "minmax":
        lo, hi = flat.amin(dim=1), flat.amax(dim=1)
        span = (hi - lo).clamp_min(1e-12)
        out = (flat - lo[:, None]) / span[:, None]
        out = torch.where((hi - lo)[:, None] > 1e-12, out, torch.zeros_like(out))
        return out.view_as(heat)
    if mode == "max":
        peak = flat.abs().amax(dim=1).clamp_min(1e-12)
        return (flat / peak[:, None]).view_as(heat)
    raise ValueError(f"normalize must be minmax, max or none, got {mode!r}")


def default_radius(height: int, width: int) -> int:
    """Ours: 1/64 of the shorter image side (8 px at 512, 16 px at 1024), at least 1."""
    return max(1, min(height, width) // 64)


def heatmap_to_mask(heat: torch.Tensor, *, threshold: float, mode: str = "relative", radius: int = -1,
                    shape: str = "square") -> torch.Tensor:
    """Threshold (absolute, or ``threshold * max`` per image) and dilate with fnf_kernels.threshold_dilate.
    Returns float32 (B, 1, H, W) in {0, 1}."""
    if radius < 0:
        radius = default_radius(*heat.shape[-2:])
    if mode == "relative":
        thr = (heat.flatten(1).amax(dim=1) * threshold).float()
        # An all-zero (or all-negative) heatmap marks nothing.
        thr = torch.where(heat.flatten(1).amax(dim=1) > 0, thr, torch.full_like(thr, float("inf")))
    else:
        thr = float(threshold)
    mask = fnf_kernels.threshold_dilate(heat.float().contiguous(), thr, int(radius), shape=shape)
    return mask[:, None]


@dataclass
class Localizer:
    """A heatmap source plus the normalise / threshold / dilate settings: images -> (heatmap, mask)."""

    source: Callable
    normalize: str = "minmax"
    threshold: float = 0.5
    threshold_mode: str = "relative"
    radius: int = -1
    shape: str = "square"

    def heatmap(self, images: torch.Tensor, prompts: list[str], indices=None) -> torch.Tensor:
        if isinstance(self.source, FileMasks):
            heat = self.source(images, prompts, indices)
        else:
            heat = self.source(images, prompts)
        return normalize_heatmap(heat.detach().float(), self.normalize)

    def __call__(self, images: torch.Tensor, prompts: list[str], indices=None):
        heat = self.heatmap(images, prompts, indices)
        mask = heatmap_to_mask(heat, threshold=self.threshold, mode=self.threshold_mode, radius=self.radius,
                               shape=self.shape)
        return heat, mask


GRADCAM_KWARGS = ("explain", "prefix_tokens", "grid")
KINDS = "auto, gradcam[:layer], saliency, heatmap:SPEC, boxes:PATH.onnx, file:GLOB or none"


def gradcam_fits(reward) -> bool:
    """Whether bare ``gradcam`` finds a layer in ``reward`` (its ``gradcam_layer`` or a Conv2d)."""
    return isinstance(reward, torch.nn.Module) and bool(
        getattr(reward, "gradcam_layer", None) or any(isinstance(m, torch.nn.Conv2d) for m in reward.modules()))


def auto_kind(reward) -> str:
    """What ``auto`` (the default localizer) is for ``reward``: gradcam where it finds a layer, else saliency
    (any differentiable reward, e.g. the default brightness)."""
    return "gradcam" if gradcam_fits(reward) else "saliency"


def build_localizer(spec: str, reward=None, *, kwargs: dict | None = None, normalize="minmax", threshold=0.5,
                    threshold_mode="relative", radius=-1, shape="square", reward_weight: float = 1.0) -> Localizer:
    """``gradcam[:layer]``, ``saliency``, ``heatmap:SPEC`` (e.g. ``heatmap:torchscript:PATH``),
    ``boxes:PATH.onnx``, ``file:GLOB`` or ``none``; ``kwargs`` are the kind's options (gradcam: explain,
    prefix_tokens, grid; heatmap / boxes: the model's, see :mod:`fnf.reward_models.heatmaps`).

    ``reward_weight`` is w of the loss ``-w * r + ...``: Grad-CAM explains the evidence against ``w * r``
    (see :class:`GradCAM`)."""
    kind, _, arg = spec.partition(":")
    kwargs = dict(kwargs or {})
    if kind == "auto":
        kind = auto_kind(reward)
    if kind == "gradcam":
        _check_gradcam_kwargs(kwargs)
        source = GradCAM(reward, arg or None, explain=kwargs.get("explain", "problem"), reward_weight=reward_weight,
                         prefix_tokens=kwargs.get("prefix_tokens"), grid=kwargs.get("grid"))
    elif kind == "saliency":
        if reward is None:
            raise LocalizerError("saliency needs a reward")
        source = InputSaliency(reward)
    elif kind == "heatmap":
        if not arg:
            raise LocalizerError("heatmap:SPEC needs a heatmap model spec after the colon")
        source = HeatmapModel(build_heatmap_model(arg, **kwargs))
    elif kind == "boxes":
        source = HeatmapModel(BoxDetectorHeatmap(arg, **kwargs))
    elif kind == "file":
        if not arg:
            raise LocalizerError("file:GLOB needs a glob after the colon")
        source = FileMasks(arg)
    elif kind == "none":
        source = NoMask()
    else:
        raise LocalizerError(f"unknown localizer {spec!r}: expected {KINDS}")
    return Localizer(source, normalize, threshold, threshold_mode, radius, shape)


def _check_gradcam_kwargs(kwargs: dict) -> None:
    extra = sorted(set(kwargs) - set(GRADCAM_KWARGS))
    if extra:
        raise LocalizerError(f"localize.kwargs {extra} are not gradcam options (it takes {list(GRADCAM_KWARGS)})")
    if kwargs.get("explain", "problem") not in ("reward", "problem"):
        raise LocalizerError(f"gradcam: explain must be 'reward' or 'problem', got {kwargs['explain']!r}")
    _check_gradcam_options(kwargs)


# ------------------------------------------------------------------------------------------ overlays
def overlay(images: torch.Tensor, mask: torch.Tensor, color=(1.0, 0.0, 0.0), alpha: float = 0.45) -> torch.Tensor:
    """Images with the mask region tinted (B, 3, H, W) in [0, 1]."""
    m = mask.float()
    if m.dim() == 3:
        m = m[:, None]
    tint = torch.tensor(color, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return images * (1 - alpha * m) + tint * alpha * m


def heatmap_rgb(heat: torch.Tensor) -> torch.Tensor:
    """(B, H, W) in [0, 1] -> a (B, 3, H, W) 'hot' colour map (black, red, yellow, white)."""
    h = heat.clamp(0, 1)[:, None]
    return torch.cat([(3 * h).clamp(0, 1), (3 * h - 1).clamp(0, 1), (3 * h - 2).clamp(0, 1)], dim=1)


def check_localizer_spec(spec: str, kwargs: dict | None = None) -> None:
    """Check a localizer spec without building it (cheap; for preflight): the kind, gradcam options, the
    heatmap model spec and kwargs (a TorchScript file is a TorchScript archive), that a box detector's file
    exists and onnxruntime is installed, that a file glob matches files."""
    kind, _, arg = spec.partition(":")
    kwargs = kwargs or {}
    if kind == "gradcam":
        _check_gradcam_kwargs(kwargs)
    elif kind == "heatmap":
        check_heatmap_spec(arg, kwargs)
    elif kind == "boxes":
        check_boxes(arg, **kwargs)
    elif kind == "file":
        if not globlib.glob(arg):
            raise LocalizerError(f"localize.spec file:{arg}: no files match")
    elif kind not in ("auto", "saliency", "none"):
        raise LocalizerError(f"unknown localizer {spec!r}: expected {KINDS}")


def localizer_from_config(cfg, reward) -> Localizer:
    """The localizer a :class:`fnf.config.Config` describes (section ``localize``, ``reward.weight``)."""
    lc = cfg.localize
    return build_localizer(lc.spec, reward, kwargs=lc.kwargs, normalize=lc.normalize, threshold=lc.threshold,
                           threshold_mode=lc.threshold_mode, radius=lc.radius, shape=lc.shape,
                           reward_weight=cfg.reward.weight)
