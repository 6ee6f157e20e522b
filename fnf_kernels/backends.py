"""Which backend runs an op on a given device, and why the others cannot.

Backends: "cuda" (CUDA C++ in the extension), "triton", "cpu" (C++/OpenMP in the extension) and
"reference" (pure torch, the spec). "auto" picks cuda > triton > reference on CUDA tensors and
cpu > reference on CPU tensors. Triton runs on CPU tensors only under TRITON_INTERPRET=1 and only
when asked for explicitly.
"""
from __future__ import annotations

import importlib.util
import os

import torch

from . import _extension

BACKENDS = ("cuda", "triton", "cpu", "reference")
OPS = ("masked_frobenius_penalty", "threshold_dilate", "lora_linear", "separate_enhance_losses")


def triton_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def availability(device_type: str) -> dict[str, tuple[bool, str]]:
    """For tensors on ``device_type`` ("cpu" or "cuda"): backend -> (usable, reason)."""
    ext = _extension.load()
    out: dict[str, tuple[bool, str]] = {}
    if device_type == "cuda":
        if ext is None:
            out["cuda"] = (False, f"extension not built ({_extension.error()})")
        elif not ext.built_with_cuda():
            out["cuda"] = (False, "extension built without CUDA kernels (no CUDA torch or nvcc at build time, "
                                  "or FNF_CUDA=0)")
        else:
            out["cuda"] = (True, "CUDA C++ kernels compiled into fnf_kernels._C")
        if not _triton_installed():
            out["triton"] = (False, "triton is not installed")
        else:
            out["triton"] = (True, "triton installed")
        out["cpu"] = (False, "CPU kernels take CPU tensors only")
    else:
        out["cuda"] = (False, "CUDA kernels take CUDA tensors only" if torch.cuda.is_available()
                       else "no CUDA device")
        if not _triton_installed():
            out["triton"] = (False, "triton is not installed")
        elif triton_interpreter():
            out["triton"] = (True, "TRITON_INTERPRET=1: Triton interpreter on CPU (slow; for tests)")
        else:
            out["triton"] = (False, "Triton needs CUDA tensors (or TRITON_INTERPRET=1 for the interpreter)")
        if ext is None:
            out["cpu"] = (False, f"extension not built ({_extension.error()})")
        else:
            out["cpu"] = (True, "C++/OpenMP kernels compiled into fnf_kernels._C")
    out["reference"] = (True, "pure torch, always available")
    return out


def op_availability(op: str, device_type: str) -> dict[str, tuple[bool, str]]:
    """Like :func:`availability`, for one op (lora_linear has no C++ kernels: its "cpu" is plain torch)."""
    table = availability(device_type)
    if op == "lora_linear":
        table["cuda"] = (False, "no CUDA C++ kernel for this op: Triton is its GPU path")
        table["cpu"] = ((True, "plain-torch custom op with a hand-written backward") if device_type == "cpu"
                        else (False, "the plain-torch path takes CPU tensors only"))
    if op == "separate_enhance_losses":
        table["cuda"] = (False, "no CUDA C++ kernel for this op: Triton is its GPU path")
        table["cpu"] = (False, "no C++ kernel for this op: the reference is its CPU path")
    return table


def _first_usable(table: dict[str, tuple[bool, str]], device_type: str) -> str:
    """The backend "auto" picks from an availability table: cuda > triton > reference, or cpu > reference."""
    order = ("cuda", "triton", "reference") if device_type == "cuda" else ("cpu", "reference")
    return next(name for name in order if table[name][0])


def _auto_for(op: str, device_type: str) -> str:
    table = op_availability(op, device_type)
    if op == "lora_linear" and device_type == "cuda" and not table["triton"][0]:
        return "torch (plain torch custom op)"
    return _first_usable(table, device_type)


def select(backend: str, device: torch.device) -> str:
    """Resolve "auto" or check that an explicit backend can run on ``device``."""
    device_type = "cuda" if device.type == "cuda" else "cpu"
    table = availability(device_type)
    if backend == "auto":
        return _first_usable(table, device_type)
    usable, reason = table[backend]
    if not usable:
        raise ValueError(f"backend={backend!r} cannot run on {device.type} tensors: {reason}")
    return backend


def info() -> str:
    """A human-readable table of the backends per op and device."""
    import platform

    lines = [f"fnf_kernels backends (torch {torch.__version__}, python {platform.python_version()})"]
    ext_error = _extension.error()
    lines.append(f"extension fnf_kernels._C: {'loaded' if ext_error is None else 'missing: ' + ext_error}")
    if ext_error is None:
        lines.append(f"  built with CUDA kernels: {_extension.has_cuda_kernels()}; "
                     f"OpenMP threads: {torch.get_num_threads()}")
    lines.append(f"CUDA device visible: {torch.cuda.is_available()}"
                 + (f" ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else ""))
    lines.append(f"TRITON_INTERPRET: {os.environ.get('TRITON_INTERPRET', 'unset')}")
    for op in OPS:
        lines.append(f"\n{op}:")
        for device_type in ("cuda", "cpu"):
            table = op_availability(op, device_type)
            chosen = _auto_for(op, device_type)
            lines.append(f"  {device_type} tensors (auto -> {chosen}):")
            for name in BACKENDS:
                usable, reason = table[name]
                lines.append(f"    {'+' if usable else '-'} {name:<9} {reason}")
    return "\n".join(lines)
