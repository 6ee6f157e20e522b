"""Model families (:class:`~fnf.families.base.ModelFamily`), chosen from a folder's model_index.json.

Each family module defines ``FAMILIES``, a list of family instances; a folder's ``_class_name`` picks one.
"""
from __future__ import annotations

import importlib

from .base import ModelFamily

# pipeline class in model_index.json -> the module of fnf.families that implements it
PIPELINE_MODULES = {
    "StableDiffusionPipeline": "unet",
    "StableDiffusionXLPipeline": "unet",
    "StableDiffusion3Pipeline": "sd3",
    "FluxPipeline": "flux",
    "Flux2Pipeline": "flux2",
}


def _module_families(module: str) -> list[ModelFamily]:
    try:
        mod = importlib.import_module(f"{__name__}.{module}")
    except ModuleNotFoundError as e:
        if e.name == f"{__name__}.{module}":
            return []
        raise
    return list(getattr(mod, "FAMILIES", []))


def all_families() -> list[ModelFamily]:
    seen, out = set(), []
    for module in dict.fromkeys(PIPELINE_MODULES.values()):
        for fam in _module_families(module):
            if fam.name not in seen:
                seen.add(fam.name)
                out.append(fam)
    return out


def supported_pipelines() -> list[str]:
    """The model_index.json pipeline classes some family loads."""
    return [cls for fam in all_families() for cls in fam.pipeline_classes]


def family_by_name(name: str) -> ModelFamily:
    for module in dict.fromkeys(PIPELINE_MODULES.values()):  # module by module: stop at the first match
        for fam in _module_families(module):
            if fam.name == name:
                return fam
    raise ValueError(f"unknown model family {name!r}: expected one of {[f.name for f in all_families()]}")


def family_for_index(index: dict) -> ModelFamily | None:
    """The family whose pipeline class the folder's model_index.json names (None: not one fnf supports)."""
    cls = str(index.get("_class_name", ""))
    module = PIPELINE_MODULES.get(cls)
    for fam in _module_families(module) if module else []:
        if cls in fam.pipeline_classes:
            return fam
    return None
