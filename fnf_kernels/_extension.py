"""Loads the compiled extension ``fnf_kernels._C`` (CPU C++ and, when built with it, CUDA kernels).

Importing never fails: when the extension is missing, ``load()`` returns None, warns once, and the
dispatcher falls back to Triton on CUDA tensors and to the torch reference on CPU tensors.
"""
from __future__ import annotations

import importlib
import os
import warnings

_state: dict = {}


def load():
    """Import the extension once; return the module or None."""
    if "module" not in _state:
        try:
            if os.environ.get("FNF_KERNELS_DISABLE_EXTENSION") == "1":
                raise ImportError("disabled by FNF_KERNELS_DISABLE_EXTENSION=1")
            module = importlib.import_module("fnf_kernels._C")
            _state["module"], _state["error"] = module, None
        except ImportError as exc:  # not built, or built against another torch
            _state["module"], _state["error"] = None, f"{type(exc).__name__}: {exc}"
            warnings.warn(
                "fnf_kernels: the compiled extension fnf_kernels._C is not available "
                f"({_state['error']}); falling back to Triton on CUDA tensors and to the torch reference "
                "on CPU tensors. Reinstall with `pip install --no-build-isolation .` to build it; "
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
