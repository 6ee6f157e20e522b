"""Model families (:class:`~fnf.families.base.ModelFamily`), chosen from a folder's model_index.json by the
registry (:mod:`fnf.families.registry`): one module per family, each defining ``FAMILIES``."""
from .base import ModelFamily
from .registry import (
                       all_families,
                       detect_kind,
                       family_by_name,
                       family_for_index,
                       family_of,
                       load_model,
                       supported_pipelines,
)

__all__ = ["ModelFamily", "all_families", "detect_kind", "family_by_name", "family_for_index", "family_of",
           "load_model", "supported_pipelines"]
