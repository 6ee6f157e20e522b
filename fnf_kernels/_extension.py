"""Loads the compiled extension ``fnf_kernels._C`` (CPU C++ and, when built with it, CUDA kernels).

Importing never fails: when the extension is missing, ``load()`` returns None, warns once, and the
dispatcher falls back to Triton on CUDA tensors and to the torch reference on CPU tensors. No warning when the
user left it out on purpose: FNF_NO_EXTENSION=1 at run time, or an install made with FNF_NO_EXTENSION=1 (setup.py
records that in fnf_kernels/_build.json).
"""
from __future__ import annotations

import importlib
import json
import os
import warnings

_state: dict = {}
_BUILD_INFO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_build.json")


def skipped_on_purpose() -> str | None:
    """Why the extension is absent by the user's choice, or None."""
    if os.environ.get("FNF_NO_EXTENSION") == "1":
        return "FNF_NO_EXTENSION=1 is set"
    try:
        with open(_BUILD_INFO, encoding="utf-8") as f:
            built = json.load(f).get("extension", True)
    except (OSError, ValueError, AttributeError):
        return None
    return None if built else "installed with FNF_NO_EXTENSION=1"


def load():
    """Import the extension once; return the module or None."""
    if "module" not in _state:
        try:
            if os.environ.get("FNF_KERNELS_DISABLE_EXTENSION") == "1":
                raise ImportError("disabled by FNF_KERNELS_DISABLE_EXTENSION=1")
            if os.environ.get("FNF_NO_EXTENSION") == "1":
                raise ImportError("not loaded: FNF_NO_EXTENSION=1 is set")
            module = importlib.import_module("fnf_kernels._C")
            _state["module"], _state["error"] = module, None
        except ImportError as exc:  # not built, or built against another torch
            _state["module"], _state["error"] = None, f"{type(exc).__name__}: {exc}"
            chosen = skipped_on_purpose()
            if chosen is not None:
                _state["error"] = f"left out on purpose ({chosen})"
                return None
            warnings.warn(
                "fnf_kernels: the compiled extension fnf_kernels._C is not available "
                f"({_state['error']}); falling back to Triton on CUDA tensors and to the torch reference "
                "on CPU tensors. Reinstall with `pip install .` to build it against this torch (README, "
                "Install), or install with FNF_NO_EXTENSION=1 to leave it out without this warning; "
                "`python -m fnf_kernels info` shows the backends.",
                RuntimeWarning,
                stacklevel=3,
            )
    return _state["module"]


def error() -> str | None:
    """Why the extension is missing, or None when it loaded."""
    load()
    return _state["error"]


def has_cuda_kernels() -> bool:
    """Whether the loaded extension was compiled with its CUDA kernels."""
    module = load()
    return bool(module is not None and module.built_with_cuda())
