"""Helpers shared by the Triton kernels: launch settings, device guard, stride planning."""
from __future__ import annotations

import contextlib
import os

import torch
import triton.language as tl

TL_DTYPES = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}


def interpreter() -> bool:
    """Whether Triton runs under its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def accumulate_tl(dtype: torch.dtype):
    """Triton accumulation dtype: float64 for float64 inputs, float32 otherwise."""
    return tl.float64 if dtype == torch.float64 else tl.float32


# CUDA launch limits: grid x up to 2**31 - 1 programs, y and z up to 65535.
GRID_LIMITS = (2**31 - 1, 65535, 65535)


def check_grid(grid: tuple) -> tuple:
    """Return ``grid`` after checking it against the CUDA launch limits (a clear error instead of a failed
    launch; the interpreter checks nothing)."""
    for axis, (n, limit) in enumerate(zip(grid, GRID_LIMITS)):
        if n > limit:
            raise ValueError(f"Triton launch grid {tuple(grid)}: axis {axis} has {n} programs, the limit is {limit}")
    return grid


def device_guard(t: torch.Tensor):
    """Make t's GPU the current one for the launch (Triton launches on the current device)."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def plan_dims(sizes, strides_per_tensor, order_by: int = 0):
    """Plan how a kernel walks the (C, H, W) elements of one sample of several same-shape tensors.

    Drops size-1 dims, orders the rest by decreasing stride of tensor ``order_by`` (so contiguous and
    channels_last inputs are read in memory order), and merges adjacent dims that are contiguous
    with each other in every tensor. Returns ``(ndim, dims, strides)``: ``ndim`` in 1..3 merged dims
    that matter, ``dims`` the 3 sizes (outermost first, padded in front with 1s) and ``strides`` one
    3-tuple per tensor (padded with 0s). The flat index f of an element splits as
    f = (i0 * dims[1] + i1) * dims[2] + i2.
    """
    keep = [d for d in range(len(sizes)) if sizes[d] != 1]
    keep.sort(key=lambda d: -strides_per_tensor[order_by][d])  # stable: ties keep their order
    merged_sizes: list[int] = []
    merged_strides: list[list[int]] = [[] for _ in strides_per_tensor]
    for d in keep:
        if merged_sizes and all(ms[-1] == st[d] * sizes[d] for ms, st in zip(merged_strides, strides_per_tensor)):
            merged_sizes[-1] *= sizes[d]
            for ms, st in zip(merged_strides, strides_per_tensor):
                ms[-1] = st[d]
        else:
            merged_sizes.append(sizes[d])
            for ms, st in zip(merged_strides, strides_per_tensor):
                ms.append(st[d])
    ndim = max(1, len(merged_sizes))
    pad = 3 - len(merged_sizes)
    dims = (1,) * pad + tuple(merged_sizes)
    strides = [(0,) * pad + tuple(ms) for ms in merged_strides]
    return ndim, dims, strides

