"""Stand-ins for a reward or localizer whose files are not on this machine (an estimate reads no weights).

* ``classifier`` over ``fnf.classifiers:resnet``: the same ResNet with random weights (exactly its size).
* Any other reward that names a missing file (or cannot be resolved here): the CLIP ViT-L/14-sized stand-in
  (``fnf.memory.archs:clip_l14_reward``, the size of CLIP, HPS and PickScore image towers).
* A ``heatmap:`` / ``boxes:`` / ``file:`` localizer that names missing files: ``auto`` (Grad-CAM of the reward,
  a pass through a network of the reward's size; saliency for a reward without a layer).

Each replacement is said in a note, which the estimate's report prints.
"""
from __future__ import annotations

import copy
import glob as globlib
import os

from ..localize import check_localizer_spec
from ..rewards import check_reward_spec

CLIP_L14 = "fnf.memory.archs:clip_l14_reward"
FILE_ENDINGS = (".safetensors", ".pt", ".pth", ".pt2", ".bin", ".onnx", ".ts", ".ckpt", ".py")


def _missing(path: str) -> bool:
    return not (globlib.glob(path) if any(c in path for c in "*?[") else os.path.exists(path))


def missing_paths(value) -> list[str]:
    """Strings in ``value`` (nested dicts / lists) that name files or folders which do not exist
    (``path/file.py:callable``: the file)."""
    if isinstance(value, dict):
        return [p for v in value.values() for p in missing_paths(v)]
    if isinstance(value, (list, tuple)):
        return [p for v in value for p in missing_paths(v)]
    if isinstance(value, str):
        path = value.split(":", 1)[0] if ".py:" in value else value
        if (os.sep in path or path.endswith(FILE_ENDINGS)) and _missing(path):
            return [path]
    return []


def _spec_path(spec: str) -> list[str]:
    """The missing files a spec names (``path/file.py:callable``, ``heatmap:torchscript:PATH``, ``file:GLOB``)."""
    return [p for p in spec.split(":") if (os.sep in p or p.endswith(FILE_ENDINGS)) and _missing(p)]


def _fails(check, *args) -> str:
    try:
        check(*args)
    except Exception as e:  # noqa: BLE001 - any reason it cannot be built here
        return str(e).splitlines()[0]
    return ""


def reward_stand_in(cfg) -> str:
    """Replace ``cfg.reward`` in place when it needs files that are not here; returns the note ('' if kept)."""
    r = cfg.reward
    missing = missing_paths(r.kwargs) + _spec_path(r.spec)
    why = "" if missing else _fails(check_reward_spec, r.spec, r.kwargs)
    model_kwargs = dict(r.kwargs.get("model_kwargs") or {})
    resnet = r.spec == "classifier" and r.kwargs.get("model") == "fnf.classifiers:resnet" and not _spec_path(r.spec)
    if not (missing or why) and not (resnet and model_kwargs.get("checkpoint")):
        return ""
    reason = f"reads {', '.join(missing)}, not on this machine" if missing else f"cannot be built here ({why})"
    if not (missing or why):  # a checkpoint that is here: fake tensors cannot read it, its values change no memory
        reason = f"checkpoint {model_kwargs['checkpoint']} is not read (an estimate reads no weights)"
    if resnet:
        model_kwargs.pop("checkpoint", None)
        r.kwargs = {**copy.deepcopy(r.kwargs), "model_kwargs": {**model_kwargs, "random_init": True}}
        return (f"reward classifier ({model_kwargs.get('arch', 'resnet50')}) {reason}: the same ResNet with "
                "random weights stands in (same size)")
    old = r.spec
    r.spec, r.kwargs = CLIP_L14, {"dtype": cfg.model.weight_dtype}
    return f"reward {old} {reason}: a CLIP ViT-L/14-sized stand-in ({CLIP_L14}, 304M parameters) is traced instead"


def localizer_stand_in(cfg) -> str:
    """Replace ``cfg.localize`` in place when it needs files that are not here; returns the note ('' if kept)."""
    lc = cfg.localize
    kind = lc.spec.split(":", 1)[0]
    if kind not in ("heatmap", "boxes", "file"):
        return ""
    missing = missing_paths(lc.kwargs) + _spec_path(lc.spec)
    why = "" if missing else _fails(check_localizer_spec, lc.spec, lc.kwargs)
    if not (missing or why):
        return ""
    reason = f"reads {', '.join(missing)}, not on this machine" if missing else f"cannot be built here ({why})"
    old, lc.spec, lc.kwargs = lc.spec, "auto", {}
    return (f"localizer {old} {reason}: Grad-CAM of the reward stands in (localize.spec=auto: a pass through a "
            "network of the reward's size)")


def stand_ins(cfg) -> list[str]:
    """Replace the reward and localizer of ``cfg`` (in place) where their files are missing; the notes."""
    if cfg.objective.name == "sepen":
        return []
    return [n for n in (reward_stand_in(cfg), localizer_stand_in(cfg)) if n]
