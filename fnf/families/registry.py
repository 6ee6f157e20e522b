"""Which family loads a folder (its model_index.json ``_class_name``), and :func:`load_model`.

Every family module is imported here, once, explicitly; a family is one module plus one row of
:data:`FAMILY_MODULES`. Only local diffusers folders are read (``local_files_only=True``); nothing is ever
fetched from a hub.
"""
from __future__ import annotations

import inspect
import json
import os

from ..core import DTYPES, DiffusionModel, ModelLoadError
from . import flux, flux2, flux2_klein, qwenimage, sd3, unet, zimage
from .base import ModelFamily

FAMILY_MODULES = (unet, sd3, flux, flux2, flux2_klein, qwenimage, zimage)


def all_families() -> list[ModelFamily]:
    """Every family fnf supports, in a fixed order."""
    return [fam for module in FAMILY_MODULES for fam in module.FAMILIES]


def supported_pipelines() -> list[str]:
    """The model_index.json pipeline classes some family loads."""
    return [cls for fam in all_families() for cls in fam.pipeline_classes]


def family_by_name(name: str) -> ModelFamily:
    for fam in all_families():
        if fam.name == name:
            return fam
    raise ValueError(f"unknown model family {name!r}: expected one of {[f.name for f in all_families()]}")


def family_for_index(index: dict) -> ModelFamily | None:
    """The family whose pipeline class the folder's model_index.json names (None: not one fnf supports)."""
    cls = str(index.get("_class_name", ""))
    for fam in all_families():
        if cls in fam.pipeline_classes:
            return fam
    return None


def refusal(pipeline_class: str) -> str | None:
    """Why fnf refuses a pipeline class that a family knows of (its ``refused_pipelines``: {class: why}), or None."""
    for fam in all_families():
        why = getattr(fam, "refused_pipelines", {}).get(pipeline_class)
        if why:
            return why
    return None


def read_index(path: str) -> dict:
    """The folder's model_index.json; a ModelLoadError saying what is wrong with ``path`` otherwise."""
    if not path:
        raise ModelLoadError("no model folder given: set model.path (or --model DIR) to a local diffusers folder")
    if not os.path.exists(path):
        raise ModelLoadError(f"model folder does not exist: {path!r} (fnf loads local diffusers folders only; "
                             "download the model yourself and point model.path at it)")
    if not os.path.isdir(path):
        raise ModelLoadError(f"model path is not a folder: {path!r}")
    index_file = os.path.join(path, "model_index.json")
    if not os.path.isfile(index_file):
        raise ModelLoadError(f"{path!r} is not a diffusers pipeline folder: model_index.json is missing")
    try:
        with open(index_file, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{index_file} is not valid JSON: {e}") from None


def family_of(path: str, index: dict | None = None) -> ModelFamily:
    """The :class:`~fnf.families.base.ModelFamily` of a folder, from its model_index.json ``_class_name``.

    An index without ``_class_name`` (hand-made folders) is SD or SDXL (SDXL when it lists text_encoder_2);
    a pipeline class fnf does not support is a ModelLoadError naming it and the supported ones."""
    index = index if index is not None else read_index(path)
    if "_class_name" not in index:
        return family_by_name("sdxl" if "text_encoder_2" in index else "sd")
    family = family_for_index(index)
    refused = refusal(str(index["_class_name"]))
    if family is None and refused:
        raise ModelLoadError(f"{path!r} holds a {index['_class_name']!r} (model_index.json _class_name), which fnf "
                             f"refuses: {refused}")
    if family is None:
        raise ModelLoadError(f"{path!r} holds a {index['_class_name']!r} (model_index.json _class_name), which fnf "
                             f"does not support; supported pipelines: {', '.join(supported_pipelines())}")
    return family


def detect_kind(path: str, index: dict | None = None) -> str:
    """The family name of the folder ("sd", "sdxl", ...), see :func:`family_of`."""
    return family_of(path, index).name


# model.* keys passed to a family's ``load`` when they differ from their default; a family supports a key when
# its ``load`` takes the keyword (SD3: all three; FLUX.1: quantize, max_sequence_length).
LOAD_OPTIONS = {"quantize": "none", "text_encoder_3": True, "max_sequence_length": 0}


def model_options(cfg) -> dict:
    """The load options of ``cfg.model`` (:data:`LOAD_OPTIONS`) for :func:`load_model`."""
    return {key: getattr(cfg.model, key) for key in LOAD_OPTIONS}


def families_accepting(option: str) -> list[str]:
    return [f.name for f in all_families() if option in inspect.signature(f.load).parameters]


def family_options(family: ModelFamily, options: dict) -> dict:
    """The options that differ from their default, as keywords for ``family.load``; one the family does not
    take is a ValueError naming the config key and the families that take it."""
    unknown = [k for k in options if k not in LOAD_OPTIONS]
    if unknown:
        raise TypeError(f"load options: unknown {unknown}; expected some of {sorted(LOAD_OPTIONS)}")
    chosen = {k: v for k, v in options.items() if v != LOAD_OPTIONS[k]}
    accepted = inspect.signature(family.load).parameters
    for key, value in chosen.items():
        if key not in accepted:
            raise ValueError(f"config key 'model.{key}': {value!r} applies to {', '.join(families_accepting(key))} "
                             f"models only; this folder is {family.title or family.name!r} (leave model.{key} at "
                             f"{LOAD_OPTIONS[key]!r})")
    return chosen


def load_model(path: str, *, kind: str = "auto", weight_dtype: str = "fp32", device="cpu",
               **options) -> DiffusionModel:
    """Every component of a local diffusers folder, all frozen, through the folder's model family.

    ``options``: ``quantize``, ``text_encoder_3``, ``max_sequence_length`` (the model.* keys of the same names,
    see :data:`LOAD_OPTIONS`), passed on to the family when not at their defaults."""
    index = read_index(path)
    family = family_of(path, index)
    if kind not in ("auto", family.name):
        raise ModelLoadError(f"model.kind is {kind!r} but {path!r} looks like {family.name!r}")
    if weight_dtype not in DTYPES:
        raise ValueError(f"weight_dtype must be one of {', '.join(DTYPES)}, got {weight_dtype!r}")
    return family.load(path, index, weight_dtype=DTYPES[weight_dtype], device=device,
                       **family_options(family, options))
