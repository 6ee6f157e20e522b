"""The one place that decides which backend runs an op, and why the others cannot.

Backends: "cuda" (CUDA C++ in the extension), "triton", "cpu" (C++/OpenMP in the extension) and
"reference" (pure torch, the spec). Per op and device, ``op_availability`` says which can run and
``AUTO_ORDER`` is what "auto" tries, first usable wins:

* masked_frobenius_penalty, threshold_dilate: cuda > triton > reference on CUDA tensors, cpu > reference on CPU.
* lora_linear: triton > torch on CUDA tensors (torch = the plain-torch custom op, any device; float64 never
  takes Triton), torch on CPU tensors; its explicit "cpu" means the plain-torch op on CPU tensors.
* separate_enhance_losses: triton > reference on CUDA tensors, reference on CPU tensors.
* group_norm_silu, rms_norm_silu: cuda > triton > torch on CUDA tensors; on CPU tensors torch > cpu for
  group_norm_silu and cpu > torch for rms_norm_silu ("torch": the plain-torch op, chunked, saving only the input;
  "cpu": the C++ CPU kernel, the same memory; which is faster was measured per op: benchmarks/RESULTS.md, issue 26).
  With an extension that predates the C++ kernels an explicit "cpu" means the plain-torch op.

Triton runs on CPU tensors only under TRITON_INTERPRET=1 and only when asked for explicitly.
Input limits: a backend that cannot take an input (``input_problem``: today the CUDA dilation kernel of an
extension that does not report larger limits, at most 65535 images per call) is skipped by "auto", which
says why once (a RuntimeWarning), and refused with that reason when asked for explicitly. Empty inputs never
reach a backend: every op returns its correctly-shaped empty or zero result from the reference.
``select`` resolves a backend for the ops; ``info`` (``python -m fnf_kernels info``) prints these tables and
the same ``select("auto")`` result.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import re
import warnings
from typing import Optional

import torch

from . import _extension

BACKENDS = ("cuda", "triton", "cpu", "reference")
OPS = ("masked_frobenius_penalty", "threshold_dilate", "lora_linear", "separate_enhance_losses", "group_norm_silu",
       "rms_norm_silu")
# Ops whose explicit "cpu" backend is their plain-torch custom op ("torch").
_TORCH_CPU_OPS = ("lora_linear",)
# Ops with C++ CPU and CUDA kernels besides their plain-torch op (an older extension may lack them).
_NORM_OPS = ("group_norm_silu", "rms_norm_silu")
# "torch": lora_linear's plain-torch custom op (hand-written backward), which runs on any device.
AUTO_ORDER = {
    ("masked_frobenius_penalty", "cuda"): ("cuda", "triton", "reference"),
    ("masked_frobenius_penalty", "cpu"): ("cpu", "reference"),
    ("threshold_dilate", "cuda"): ("cuda", "triton", "reference"),
    ("threshold_dilate", "cpu"): ("cpu", "reference"),
    ("lora_linear", "cuda"): ("triton", "torch"),
    ("lora_linear", "cpu"): ("torch",),
    ("separate_enhance_losses", "cuda"): ("triton", "reference"),
    ("separate_enhance_losses", "cpu"): ("reference",),
    ("group_norm_silu", "cuda"): ("cuda", "triton", "torch"),
    ("group_norm_silu", "cpu"): ("torch", "cpu"),
    ("rms_norm_silu", "cuda"): ("cuda", "triton", "torch"),
    ("rms_norm_silu", "cpu"): ("cpu", "torch"),
}
_TORCH_OP = (True, "plain-torch custom op with a hand-written backward")
# Largest batch per call of a backend, when it has one (CUDA grid y/z axes stop at 65535). An extension that
# handles more reports it through ``cuda_limits()`` -> {"<op>_batch": max or -1 for no limit}.
BATCH_LIMITS = {("threshold_dilate", "cuda"): 65535}
_WARNED: set = set()


def triton_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _find_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


try:  # dynamo before torch 2.13 refuses to trace importlib.util.find_spec: it runs it once and keeps the answer
    _find_triton_traced = torch._dynamo.assume_constant_result(_find_triton)
except AttributeError:
    _find_triton_traced = _find_triton


def triton_installed() -> bool:
    """Whether the triton package can be imported (not cached: torch.compile traces this call)."""
    return _find_triton_traced()


def _version(package: str) -> tuple[int, ...]:
    try:
        text = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return ()
    return tuple(int(p) for p in re.findall(r"\d+", text)[:2])


# triton 3.6's CPU interpreter fails on numpy >= 2.4 ("only 0-dimensional arrays can be converted to Python
# scalars"); compiled Triton on a GPU is not affected.
INTERPRETER_PROBLEM = ("the Triton interpreter of triton < 3.7 does not run with numpy >= 2.4 (install numpy < 2.4 "
                       "or a newer triton for CPU tests)"
                       if () < _version("triton") < (3, 7) and _version("numpy") >= (2, 4) else None)


def _device_type(device) -> str:
    return "cuda" if torch.device(device).type == "cuda" else "cpu"


def availability(device_type: str) -> dict[str, tuple[bool, str]]:
    """For tensors on ``device_type`` ("cpu" or "cuda"): backend -> (usable, reason), for the ops that have
    every backend (masked_frobenius_penalty, threshold_dilate)."""
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
        out["triton"] = (True, "triton installed") if triton_installed() else (False, "triton is not installed")
        out["cpu"] = (False, "CPU kernels take CPU tensors only")
    else:
        out["cuda"] = (False, "CUDA kernels take CUDA tensors only" if torch.cuda.is_available()
                       else "no CUDA device")
        if not triton_installed():
            out["triton"] = (False, "triton is not installed")
        elif triton_interpreter() and INTERPRETER_PROBLEM:
            out["triton"] = (False, INTERPRETER_PROBLEM)
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
    """Like :func:`availability`, for one op (lora_linear's extra "torch" entry is its plain-torch op)."""
    if op not in OPS:
        raise ValueError(f"op must be one of {', '.join(OPS)}, got {op!r}")
    table = availability(device_type)
    if op == "lora_linear":
        table["cuda"] = (False, "lora_linear has no CUDA C++ kernel; use 'triton' (CUDA tensors), "
                                "'cpu' (CPU tensors) or 'auto'")
        table["cpu"] = (_TORCH_OP if device_type == "cpu"
                        else (False, "the plain-torch path behind 'cpu' takes CPU tensors only"))
        table["torch"] = _TORCH_OP
    if op == "separate_enhance_losses":
        table["cuda"] = (False, "no CUDA C++ kernel for this op: Triton is its GPU path")
        table["cpu"] = (False, "no C++ kernel for this op: the reference is its CPU path")
    if op in _NORM_OPS:
        if device_type != "cpu":
            table["cpu"] = (False, "the C++ CPU kernels take CPU tensors only")
        elif _has_kernel(op, "CPU"):
            table["cpu"] = (True, "C++ CPU kernel (at::parallel_for; stats in one pass, backward in two)")
        else:
            table["cpu"] = (True, "plain-torch op (the loaded extension has no C++ CPU kernel of this op; rebuild "
                                  "it)")
        table["torch"] = (True, "plain-torch custom op, chunked, saving only the input and the statistics")
        if table["cuda"][0] and not _has_kernel(op, "CUDA"):
            table["cuda"] = (False, f"the loaded extension predates the CUDA {op} kernels; rebuild it")
    return table


def cpu_is_torch(op: str) -> bool:
    """Whether an explicit backend="cpu" runs ``op``'s plain-torch op ("torch") rather than a C++ kernel."""
    return op in _TORCH_CPU_OPS or (op in _NORM_OPS and not _has_kernel(op, "CPU"))


_KERNELS: dict = {}


def _has_kernel_eager(op: str, key: str) -> bool:
    """Whether the loaded extension registers ``fnf_kernels::op`` for dispatch key ``key`` (asked once)."""
    if (op, key) not in _KERNELS:
        try:
            found = (_extension.load() is not None
                     and torch._C._dispatch_has_kernel_for_dispatch_key(f"fnf_kernels::{op}", key))
        except RuntimeError:
            found = False
        _KERNELS[(op, key)] = bool(found)
    return _KERNELS[(op, key)]


try:  # dynamo cannot trace the dispatcher query (it returns a bool): a constant for the traced graph
    _has_kernel = torch._dynamo.assume_constant_result(_has_kernel_eager)
except AttributeError:
    _has_kernel = _has_kernel_eager


def _dtype_problem(op: str, backend: str, dtype: Optional[torch.dtype]) -> Optional[str]:
    """Why ``backend`` cannot take ``dtype`` for ``op`` (None when it can, or dtype is not given)."""
    if op == "lora_linear" and backend == "triton" and dtype == torch.float64:
        return ("backend='triton' takes float16, bfloat16 or float32 tensors, got torch.float64; "
                "use backend='cpu' or 'auto'")
    return None


def batch_limit(op: str, backend: str) -> Optional[int]:
    """The largest batch ``backend`` takes per call of ``op``, or None when it has no limit."""
    limit = BATCH_LIMITS.get((op, backend))
    if limit is None or backend != "cuda":
        return limit
    ext = _extension.load()
    reported = getattr(ext, "cuda_limits", None) if ext is not None else None
    if reported is not None:
        value = dict(reported()).get(f"{op}_batch", limit)
        return None if value is None or value < 0 else int(value)
    return limit


def input_problem(op: str, backend: str, batch: Optional[int]) -> Optional[str]:
    """Why ``backend`` cannot take an input of ``batch`` samples (None when it can, or batch is not given)."""
    if batch is None:
        return None
    limit = batch_limit(op, backend)
    if limit is not None and batch > limit:
        return f"the {backend} kernel of {op} takes at most {limit} samples per call, got {batch}"
    return None


def _say_once(op: str, skipped: str, chosen: str, reason: str) -> None:
    key = (op, skipped, reason.split(", got")[0])
    if key in _WARNED or torch.compiler.is_compiling():
        return
    _WARNED.add(key)
    warnings.warn(f"fnf_kernels: {op} backend='auto' runs {chosen!r} instead of {skipped!r}: {reason}",
                  RuntimeWarning, stacklevel=4)


def select(op: str, backend: str, device, dtype: Optional[torch.dtype] = None, batch: Optional[int] = None) -> str:
    """Resolve ``backend`` ("auto" or one of BACKENDS) for ``op`` on tensors of ``device`` (and ``dtype``, and
    ``batch`` samples).

    Returns the implementation to run: one of BACKENDS, or "torch" for lora_linear's plain-torch op.
    "auto" skips a backend that cannot take the input (``input_problem``), warning once why.
    Raises ValueError when an explicit backend cannot run on that device or input, TypeError when it cannot
    take ``dtype``.
    """
    device_type = _device_type(device)
    table = op_availability(op, device_type)
    if backend == "auto":
        skipped = []
        for name in AUTO_ORDER[(op, device_type)]:
            if not table[name][0] or _dtype_problem(op, name, dtype) is not None:
                continue
            problem = input_problem(op, name, batch)
            if problem is not None:
                skipped.append((name, problem))
                continue
            for other, why in skipped:
                _say_once(op, other, name, why)
            return "torch" if (name == "cpu" and cpu_is_torch(op)) else name
        raise RuntimeError(f"no backend of {op} can take this input: {skipped}")  # the reference always can
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
    usable, reason = table[backend]
    if not usable:
        raise ValueError(f"backend={backend!r} cannot run on {torch.device(device).type} tensors: {reason}")
    problem = _dtype_problem(op, backend, dtype)
    if problem is not None:
        raise TypeError(problem)
    problem = input_problem(op, backend, batch)
    if problem is not None:
        raise ValueError(f"backend={backend!r} cannot take this input: {problem}; use backend='auto'")
    return "torch" if (backend == "cpu" and cpu_is_torch(op)) else backend


def info() -> str:
    """A human-readable table of the backends per op and device, with what "auto" picks (via :func:`select`)."""
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
            chosen = select(op, "auto", device_type)
            note = " (float64: " + select(op, "auto", device_type, torch.float64) + ")" \
                if select(op, "auto", device_type, torch.float64) != chosen else ""
            lines.append(f"  {device_type} tensors (auto -> {chosen}{note}):")
            for name in BACKENDS + (("torch",) if "torch" in table else ()):
                usable, reason = table[name]
                lines.append(f"    {'+' if usable else '-'} {name:<9} {reason}")
    return "\n".join(lines)
