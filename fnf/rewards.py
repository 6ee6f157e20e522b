"""Rewards: the protocol, a registry of built-ins, and loading user code by spec.

A reward is any callable ``reward(images, prompts) -> (B,)`` with images (B, 3, H, W) float in [0, 1].
Specs name one:

* a registry name: the public models read from local files (``aesthetic``, ``pickscore``, ``clipscore``,
  ``hpsv2``, ``sd-safety``: :mod:`fnf.reward_models`), ``brightness``, ``darkness``, ``redness``, ``saturation``,
  ``contrast``, ``region``, ``classifier`` (see :data:`REWARDS`);
* ``package.module:callable`` (imported);
* ``path/to/file.py:callable`` (loaded from the file);
* ``http://127.0.0.1:PORT/path`` or ``http:PORT``: a reward served by another process (:mod:`fnf.reward_client`).

The loaded object is used as follows: a class is instantiated with the kwargs; a function is a factory
(called with the kwargs, its return value is the reward) when kwargs are given or when it takes no
required arguments and cannot take (images, prompts); otherwise the object itself is the reward. Heatmap models (images -> (B, H, W)) load the same way (:func:`build_heatmap_model`).
"""
from __future__ import annotations

import inspect
from typing import Callable

import numpy as np
import torch

from . import reward_models
from .reward_client import HttpReward, check_http_spec, is_http_spec
from .reward_registry import (
    HEATMAP_LOADERS,
    HEATMAPS,
    REWARDS,
    Reward,
    SpecError,
    _check_call,
    _check_spec,
    _instantiate,
    load_object,
    register_heatmap,
    register_heatmap_loader,
    register_reward,
)


def check_reward_spec(spec: str, kwargs: dict) -> None:
    """Resolve a reward spec and check its kwargs without building the reward (cheap; for preflight)."""
    if is_http_spec(spec):   # a served reward (fnf.reward_client): the URL, its host and the kwargs; no connection
        try:
            inspect.signature(HttpReward).bind(spec, **kwargs)
            check_http_spec(spec, **kwargs)
        except (TypeError, ValueError) as e:
            raise SpecError(f"reward {spec!r}: {e}") from None
        return
    if spec == "classifier":
        kw = dict(kwargs)
        model = kw.pop("model", "")
        if not model:
            raise SpecError("reward 'classifier' needs reward.kwargs.model: a 'module:callable' or "
                            "'file.py:callable' that returns the classifier nn.Module")
        _check_call(load_object(model, "classifier model"), kw.pop("model_kwargs", None) or {}, model,
                    "classifier model")
        kw.pop("logit", None)
        try:
            inspect.signature(ClassifierReward).bind(None, **kw)
        except TypeError as e:
            raise SpecError(f"reward 'classifier' does not accept kwargs {sorted(kw)}: {e}") from None
        return
    _check_spec(spec, kwargs, REWARDS, "reward")


def check_heatmap_spec(spec: str, kwargs: dict) -> None:
    """Resolve a heatmap model spec and check its kwargs without building it."""
    prefix, _, path = spec.partition(":")
    if prefix in HEATMAP_LOADERS:
        HEATMAP_LOADERS[prefix][1](path, **kwargs)
        return
    _check_spec(spec, kwargs, HEATMAPS, "heatmap model")


def build_reward(spec: str, **kwargs) -> Reward:
    """Registry name, ``module:callable`` / ``file.py:callable``, or a server URL (``http://127.0.0.1:PORT/path``,
    ``http:PORT``: :class:`fnf.reward_client.HttpReward`) -> reward callable."""
    if is_http_spec(spec):
        try:
            return HttpReward(spec, **kwargs)
        except (TypeError, ValueError) as e:
            raise SpecError(f"reward {spec!r}: {e}") from None
    if spec in REWARDS:
        try:
            return REWARDS[spec](**kwargs)
        except TypeError as e:
            raise SpecError(f"reward {spec!r} does not accept kwargs {sorted(kwargs)}: {e}") from e
    if ":" not in spec:
        raise SpecError(f"unknown reward {spec!r}: expected one of {', '.join(sorted(REWARDS))}, "
                        "'module:callable' or 'path/to/file.py:callable'")
    return _instantiate(load_object(spec, "reward"), kwargs, spec, "reward")


def build_heatmap_model(spec: str, **kwargs) -> Callable:
    """Registry name, ``PREFIX:PATH`` of a registered loader (``torchscript:model.pt``) or spec -> callable
    images (B,3,H,W) -> heatmap (B,H,W)."""
    prefix, _, path = spec.partition(":")
    if prefix in HEATMAP_LOADERS:
        return HEATMAP_LOADERS[prefix][0](path, **kwargs)
    if spec in HEATMAPS:
        return HEATMAPS[spec](**kwargs)
    if ":" not in spec:
        raise SpecError(f"unknown heatmap model {spec!r}: expected one of {', '.join(sorted(HEATMAPS))}, "
                        "'module:callable' or 'path/to/file.py:callable'")
    return _instantiate(load_object(spec, "heatmap model"), kwargs, spec, "heatmap model")


def prepare_reward(reward, device) -> Reward:
    """Frozen, eval-mode and on ``device`` when the reward is an nn.Module."""
    if isinstance(reward, torch.nn.Module):
        reward.to(device).eval().requires_grad_(False)
    return reward


def score(reward, images: torch.Tensor, prompts: list[str], checkpoint: bool = False, *,
          finite: bool = False) -> torch.Tensor:
    """The reward r(images, prompts) as float32 (B,) on the images' device, optionally under activation
    checkpointing (nn.Module rewards). A reward may return a tensor, a numpy array or a list of numbers (B,) or
    (B, 1); anything else raises TypeError / ValueError. ``finite``: NaN or inf scores raise ValueError (objective
    grpo: a NaN would poison its whole group) instead of reaching the trainer's bad-step check."""
    if checkpoint and torch.is_grad_enabled():
        from torch.utils.checkpoint import checkpoint as ckpt
        out = ckpt(lambda x: reward(x, prompts), images, use_reentrant=False)
    else:
        out = reward(images, prompts)
    if not isinstance(out, torch.Tensor):
        try:
            arr = np.asarray(out)
        except (TypeError, ValueError) as e:
            raise TypeError(f"reward returned {type(out).__name__} that is not numbers (B,): {e}") from None
        if arr.dtype.kind not in "biuf":
            raise TypeError(f"reward returned {type(out).__name__} that is not numbers (B,) (numpy dtype {arr.dtype})")
        out = torch.as_tensor(arr.astype(np.float64))
    if out.dtype.is_complex or not (out.dtype.is_floating_point or out.dtype in _NUMBER_DTYPES):
        raise TypeError(f"reward returned a {out.dtype} tensor; expected real numbers")
    if out.dim() == 2 and out.shape[1] == 1:
        out = out[:, 0]
    if out.shape != (images.shape[0],):
        raise ValueError(f"reward returned shape {tuple(out.shape)}; expected ({images.shape[0]},)")
    out = out.to(device=images.device, dtype=torch.float32)
    if finite and not bool(torch.isfinite(out).all()):
        raise ValueError(f"reward returned non-finite scores {out.tolist()}")
    return out


_NUMBER_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool)


# ------------------------------------------------------------------------------------------ built-ins
class ImageStatisticReward(torch.nn.Module):
    """A per-image statistic as a reward (for tests and sanity runs)."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], name: str):
        super().__init__()
        self.fn, self.name = fn, name

    def forward(self, images, prompts=None):
        return self.fn(images)

    def extra_repr(self):
        return self.name


def _luma(x):
    return 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]


def brightness():
    return ImageStatisticReward(lambda x: x.mean(dim=(1, 2, 3)), "mean intensity")


def darkness():
    return ImageStatisticReward(lambda x: 1 - x.mean(dim=(1, 2, 3)), "1 - mean intensity")


def redness():
    return ImageStatisticReward(lambda x: (x[:, 0] - 0.5 * (x[:, 1] + x[:, 2])).mean(dim=(1, 2)), "mean R - (G+B)/2")


def saturation():
    return ImageStatisticReward(lambda x: (x.amax(dim=1) - x.amin(dim=1)).mean(dim=(1, 2)), "mean max-min channel")


def contrast():
    return ImageStatisticReward(lambda x: _luma(x).flatten(1).std(dim=1), "luma std")


class RegionReward(torch.nn.Module):
    """Mean intensity (or redness) inside a box given as fractions (top, bottom, left, right) of the image."""

    def __init__(self, box=(0.25, 0.75, 0.25, 0.75), statistic: str = "brightness"):
        super().__init__()
        if len(box) != 4 or not all(0 <= b <= 1 for b in box) or box[0] >= box[1] or box[2] >= box[3]:
            raise ValueError(f"region box must be (top, bottom, left, right) fractions with top<bottom, "
                             f"left<right; got {box!r}")
        if statistic not in ("brightness", "redness"):
            raise ValueError(f"region statistic must be brightness or redness, got {statistic!r}")
        self.box, self.statistic = tuple(float(b) for b in box), statistic

    def forward(self, images, prompts=None):
        h, w = images.shape[-2:]
        t, b, l, r = self.box
        crop = images[:, :, int(t * h):max(int(b * h), int(t * h) + 1), int(l * w):max(int(r * w), int(l * w) + 1)]
        if self.statistic == "redness":
            return (crop[:, 0] - 0.5 * (crop[:, 1] + crop[:, 2])).mean(dim=(1, 2))
        return crop.mean(dim=(1, 2, 3))


def region(box=(0.25, 0.75, 0.25, 0.75), statistic="brightness"):
    return RegionReward(box, statistic)


class ClassifierReward(torch.nn.Module):
    """Any image classifier nn.Module as a reward: the chosen logit (or its log-softmax) of resized,
    normalised images. Gradients flow through; Grad-CAM layer names are ``classifier.<layer>``."""

    def __init__(self, classifier: torch.nn.Module, logit: int = 0, *, size: int | None = None,
                 mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), log_softmax: bool = False, sign: float = 1.0):
        super().__init__()
        self.classifier = classifier
        self.logit, self.size, self.log_softmax, self.sign = int(logit), size, bool(log_softmax), float(sign)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, images, prompts=None):
        x = images
        if self.size and x.shape[-1] != self.size:
            x = torch.nn.functional.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True,
                                                align_corners=False)
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        logits = self.classifier(x)
        if hasattr(logits, "logits"):
            logits = logits.logits
        if self.log_softmax:
            logits = logits.log_softmax(dim=-1)
        return self.sign * logits[:, self.logit]


def classifier(model: str = "", logit: int = 0, model_kwargs: dict | None = None, **kw):
    """kwargs: model = spec of a callable returning the nn.Module (e.g. 'my_pkg.nets:load_nsfw'),
    logit, size, mean, std, log_softmax, sign (-1 to push a logit down, e.g. an unsafe class)."""
    if not model:
        raise SpecError("reward 'classifier' needs reward.kwargs.model: a 'module:callable' or "
                        "'file.py:callable' that returns the classifier nn.Module")
    net = _instantiate(load_object(model, "classifier model"), model_kwargs or {}, model, "classifier model")
    if inspect.isfunction(net):
        net = net()
    if not isinstance(net, torch.nn.Module):
        raise SpecError(f"classifier model {model!r} gave {type(net).__name__}, expected an nn.Module")
    return ClassifierReward(net, logit, **kw)


# ------------------------------------------------------------------------------------------ heatmaps
def redness_heatmap():
    """Per-pixel redness R - (G+B)/2: a toy artifact detector for tests and demos."""
    return lambda images: images[:, 0] - 0.5 * (images[:, 1] + images[:, 2])


def box_heatmap(box=(0.25, 0.75, 0.25, 0.75)):
    """A fixed box (top, bottom, left, right fractions): a known region for tests and demos."""
    def heat(images):
        b, _, h, w = images.shape
        out = images.new_zeros(b, h, w)
        out[:, int(box[0] * h):int(box[1] * h), int(box[2] * w):int(box[3] * w)] = 1
        return out
    return heat


# ------------------------------------------------------------------------------------------ the registry's built-ins
for _name, _factory in {"brightness": brightness, "darkness": darkness, "redness": redness, "saturation": saturation,
                        "contrast": contrast, "region": region, "classifier": classifier,
                        **reward_models.REWARDS}.items():
    register_reward(_name, _factory)
for _name, _factory in {"redness": redness_heatmap, "box": box_heatmap}.items():
    register_heatmap(_name, _factory)
for _prefix, (_loader, _check) in reward_models.HEATMAP_LOADERS.items():
    register_heatmap_loader(_prefix, _loader, _check)
