"""Compile every launched Triton kernel to sm_80 and sm_90 machine code (cubin), without a GPU.

The kernels' numerical tests run under the Triton interpreter when there is no GPU, which never lowers a
kernel to PTX: a kernel that only fails in the GPU compiler (layout conversion, shared memory, tl.dot
operand types, ptxas) would pass there. This module runs the real compiler pipeline (frontend, TTIR/TTGIR,
LLVM, ptxas) for a target given explicitly: ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch,
32))`` needs no driver and no device.

Arguments are not written by hand: each case calls the real launcher (the custom-op body or the lora
launch path) on ``meta`` tensors of a chosen shape/dtype/layout with the kernel replaced by a recorder, so
the argument list, pointer dtypes, integer values and constexprs (NDIM, WIDE, TILED, BLOCK_*, PRECISION,
num_warps...) are the ones the launcher really uses for that input. Runtime arguments are then specialized
the way ``JITFunction`` does it (an int equal to 1 becomes a constexpr, ints and pointers divisible by 16
get ``tt.divisibility = 16``, ints above 2**31 - 1 are i64). The autotuned ``_fused_kernel`` is compiled
through the autotuner's ``.fn`` with some of its own configs (kwargs, num_warps, num_stages).

Compilation happens in a worker subprocess started without ``TRITON_INTERPRET``: tests/conftest.py sets
TRITON_INTERPRET=1 when there is no GPU, and with it ``@triton.jit`` (including triton.language's own
helpers such as tl.cdiv / tl.max) builds interpreter objects that cannot be compiled. The worker uses a
fresh Triton cache directory, so every case really goes through ptxas. Each (kernel, variant, arch) is
one test; each also checks that the launcher still picks the constexprs the case is named after.

The module is skipped when triton (or ASTSource / GPUTarget, or its NVIDIA backend) is missing, or when
the CUDA toolchain (ptxas) cannot compile a trivial kernel; a compile error in one of our kernels fails.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULES = ("penalty", "dilation", "lora_linear", "attention_losses", "norm_silu")  # fnf_kernels.triton_kernels.*
ARCHS = (80, 90)
# Largest shared memory one block can use (opt-in): A100 163 KiB, H100 227 KiB.
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
WORKER_TIMEOUT_S = 300

# --------------------------------------------------------------------------------------------------------
# Cases (plain data: built identically in the test process and in the worker)
# --------------------------------------------------------------------------------------------------------
# Each case: id, module, kernel, launcher + its inputs ("call"), "pick" (index among that kernel's
# launches in the call), "expect" (constexprs the launcher must choose), optional "config" (index into the
# autotuner's configs) and "tf32" (torch.backends.cuda.matmul.allow_tf32 during the call).

CASES: list[dict] = []


def _case(module, kernel, variant, call, expect, pick=0, config=None, tf32=False):
    CASES.append(dict(id=f"{kernel}-{variant}", module=module, kernel=kernel, call=call, expect=expect, pick=pick,
                      config=config, tf32=tf32))


# penalty: image-shaped walk planned by plan_dims; NDIM 1 (everything merges), 2 (a (B, H, W) mask read
# with a stride-0 channel dim), 3 (a cropped view: nothing merges); WIDE from a 2**32-element sample.
_PENALTY = [  # (dtype, ndim, wide)
    ("float32", 1, False), ("float32", 2, False), ("float32", 3, False), ("float32", 1, True),
    ("bfloat16", 2, False), ("bfloat16", 3, True), ("float16", 3, False), ("float16", 2, True),
    ("float64", 1, False), ("float64", 2, True),
]
for _dt, _nd, _wide in _PENALTY:
    for _kernel, _op in (("_norms_kernel", "penalty_norms"), ("_backward_kernel", "penalty_backward")):
        _case("penalty", _kernel, f"{_dt}-nd{_nd}" + ("-wide" if _wide else ""),
              dict(op=_op, dtype=_dt, ndim=_nd, wide=_wide),
              dict(NDIM=_nd, WIDE=_wide, ACC="fp64" if _dt == "float64" else "fp32"))

# dilation, column pass: (BLOCK_H, BLOCK_W) = (64, 32) small batch, (32, 64) wide images / big batch,
# (64, 16) narrow images; WIDE from a heatmap with a 200000-element row stride.
_COLUMN = [  # (heatmap dtype, (B, H, W), row stride or None, BLOCK_H, BLOCK_W, WIDE)
    ("float32", (2, 64, 64), None, 64, 32, False),
    ("bfloat16", (2, 20000, 12000), 200000, 32, 64, True),
    ("float16", (2, 64, 16), None, 64, 16, False),
    ("float64", (1, 20000, 12000), 200000, 64, 32, True),
]
for _dt, _shape, _sy, _bh, _bw, _wide in _COLUMN:
    _case("dilation", "_column_kernel", f"{_dt}-{_bh}x{_bw}" + ("-wide" if _wide else ""),
          dict(op="dilate", dtype=_dt, shape=_shape, row_stride=_sy, out="bool", disk=False),
          dict(BLOCK_H=_bh, BLOCK_W=_bw, WIDE=_wide, ACC="fp64" if _dt == "float64" else "fp32"))
# WIDE from the column stride alone: a (1, 20000, 12000) view with row stride 1, column stride 200000.
_case("dilation", "_column_kernel", "float32-64x32-wide-colstride",
      dict(op="dilate", dtype="float32", shape=(1, 20000, 12000), row_stride=None, col_stride=200000, out="bool",
           disk=False),
      dict(BLOCK_H=64, BLOCK_W=32, WIDE=True, ACC="fp32"))

# dilation, row pass: output dtype (bool is stored through a uint8 view), DISK, TILED (rows longer than
# 4096), (ROWS, BLOCK) = (64, 64) / (8, 512) / (2, 512) / (1, 4096).
_ROW = [  # (out dtype, (B, H, W), disk, ROWS, BLOCK, TILED)
    ("bool", (2, 64, 64), False, 64, 64, False),
    ("bool", (1, 4, 5000), True, 1, 4096, True),
    ("uint8", (2, 64, 300), True, 8, 512, False),
    ("float32", (1, 8, 9000), False, 1, 4096, True),
    ("bfloat16", (1, 2, 300), False, 2, 512, False),
    ("float16", (2, 64, 64), True, 64, 64, False),
    ("float64", (2, 64, 64), False, 64, 64, False),
]
for _dt, _shape, _disk, _rows, _block, _tiled in _ROW:
    _case("dilation", "_row_kernel",
          f"{_dt}-{'disk' if _disk else 'square'}-{_rows}x{_block}" + ("-tiled" if _tiled else ""),
          dict(op="dilate", dtype="float32", shape=_shape, row_stride=None, out=_dt, disk=_disk),
          dict(DISK=_disk, TILED=_tiled, ROWS=_rows, BLOCK=_block, FLOAT_OUT=_dt not in ("bool", "uint8")))

# lora_linear. Forward: rank <= 64 takes the fused-down path (one _fused_kernel launch, FUSE_DOWN), a larger
# rank the separate _down_kernel + _fused_kernel. Backward: _down (g B), _fused (dx), _wgrad (dA, dB, dW).
# float32 runs tl.dot with input_precision "ieee" (torch's default allow_tf32=False) or "tf32".
# _fused_kernel is autotuned: "cfg" is the index of the config (of _fused_tuned.configs) compiled; the autotuner
# tries only the configs of the operands' width (16-bit or float32), so each is compiled in its own width.
_SD = dict(m=8192, k=320, n=320)  # the SD 64x64 self-attention projection of the module docstring
_BWD = dict(op="lora_backward", r=16, scale=False, m=4096, k=320, n=320)  # M = 4096: BLOCK_M 64 in _down
_WGRAD = {"dA": (0, 16, 128), "dB": (1, 64, 16), "dW": (2, 64, 128)}  # launch order, BLOCK_P, BLOCK_Q


def _lora_cases(dt, prec, fused, down, wgrad):
    """fused: (variant, config) list; down: "fwd" / "bwd" list; wgrad: "dA" / "dB" / "dW" list."""
    name, tf32 = (dt if dt != "float32" else f"float32-{prec}"), prec == "tf32" and dt == "float32"
    for variant, cfg in fused:
        if variant.startswith("fusedown-"):  # rank 64: x Aᵀ computed inside the kernel
            bias, scale = "-bias1" in variant, "-scale1" in variant
            call = dict(op="lora_forward", dtype=dt, r=64, bias=bias, scale=scale, **_SD)
            expect = dict(FUSE_DOWN=True, HAS_BIAS=bias, HAS_SCALE=scale, BLOCK_R=64)
        elif variant == "separate-bias1":  # rank 128: after _down_kernel; the scale was applied there
            call = dict(op="lora_forward", dtype=dt, r=128, bias=True, scale=True, **_SD)
            expect = dict(FUSE_DOWN=False, HAS_BIAS=True, HAS_SCALE=False, BLOCK_R=64)
        else:  # "dx-bias0": backward dx = g W + gbs A
            call = dict(_BWD, dtype=dt)
            expect = dict(FUSE_DOWN=False, HAS_BIAS=False, HAS_SCALE=False, BLOCK_R=16)
        _case("lora_linear", "_fused_kernel", f"{name}-{variant}-cfg{cfg}", call, dict(expect, PRECISION=prec),
              config=cfg, tf32=tf32)
    for which in down:
        if which == "fwd":  # forward at rank 128, per-sample scale
            call = dict(op="lora_forward", dtype=dt, r=128, bias=True, scale=True, **_SD)
            expect = dict(HAS_SCALE=True, BLOCK_M=128, BLOCK_R=64, BLOCK_K=64)
        else:  # backward g B at rank 16, scale given as a float
            call = dict(_BWD, dtype=dt)
            expect = dict(HAS_SCALE=False, BLOCK_M=64, BLOCK_R=16, BLOCK_K=64)
        _case("lora_linear", "_down_kernel", f"{name}-{which}-scale{int(expect['HAS_SCALE'])}", call,
              dict(expect, PRECISION=prec), tf32=tf32)
    for what in wgrad:
        pick, bp, bq = _WGRAD[what]
        _case("lora_linear", "_wgrad_kernel", f"{name}-{what}", dict(_BWD, dtype=dt),
              dict(BLOCK_P=bp, BLOCK_Q=bq, BLOCK_M=64, PRECISION=prec), pick=pick, tf32=tf32)


# Every autotune config is compiled where it needs the most registers (FUSE_DOWN forward; for float32 also the
# ieee dx), and a lora config that spills or needs more shared memory than sm_80 has fails (tests below).
# Config indices: 0-3 the 16-bit configs, 4-6 the float32 ones (fnf_kernels.triton_kernels.lora_linear).
LORA_CONFIGS_16, LORA_CONFIGS_32 = (0, 1, 2, 3), (4, 5, 6)
_lora_cases("bfloat16", "tf32", [("fusedown-bias1-scale1", c) for c in LORA_CONFIGS_16]
            + [("separate-bias1", c) for c in LORA_CONFIGS_16] + [("dx-bias0", 0), ("fusedown-bias0-scale0", 0)],
            ["fwd", "bwd"], ["dA", "dB", "dW"])
_lora_cases("float16", "tf32", [("fusedown-bias1-scale1", 0)], ["fwd"], ["dB"])
_lora_cases("float32", "tf32", [("fusedown-bias1-scale1", c) for c in LORA_CONFIGS_32], ["fwd"], ["dA"])
_lora_cases("float32", "ieee", [("dx-bias0", c) for c in LORA_CONFIGS_32] + [("fusedown-bias1-scale1", 6)],
            ["bwd"], ["dB"])  # ieee + FUSE_DOWN tunes over config 6 only (the others spill there)

# attention_losses: Separate-and-Enhance maxima and their backward, (B, heads, k, H, W) maps; k = 2 and 3.
for _dt in ("float32", "float64", "bfloat16"):
    for _k in (2, 3):
        for _kernel, _op in (("_forward_kernel", "attention_maxima"), ("_backward_kernel", "attention_backward")):
            _case("attention_losses", _kernel, f"attn-{_dt}-k{_k}", dict(op=_op, dtype=_dt, k=_k),
                  dict(K=_k, ACC="fp64" if _dt == "float64" else "fp32"))

# norm_silu (group_norm_silu, rms_norm_silu): the tiles the launchers pick for SD-VAE-sized activations. Group norm
# (1, 512, 64, 64) in 32 groups: contiguous -> (BLOCK_C, BLOCK_S) = (2, 1024), channels_last -> (64, 32). RMS norm over
# dim 1 of (2, 512, 32, 32): contiguous -> (BLOCK_D, BLOCK_I) = (8, 256) (columns on the lanes), channels_last ->
# (128, 16) (D on the lanes); over the last dim of (3, 77, 3072): (128, 1).
_NORM = [("float32", "contiguous"), ("bfloat16", "channels_last"), ("float16", "contiguous"),
         ("float64", "channels_last")]
for _dt, _layout in _NORM:
    _acc = "fp64" if _dt == "float64" else "fp32"
    _bc, _bs = (2, 1024) if _layout == "contiguous" else (64, 32)
    for _kernel, _op in (("_stats_kernel", "gn_forward"), ("_apply_kernel", "gn_forward"),
                         ("_bwd_sums_kernel", "gn_backward"), ("_bwd_dx_kernel", "gn_backward")):
        _expect = dict(BLOCK_C=_bc, BLOCK_S=_bs, ACC=_acc)
        if _kernel != "_stats_kernel":
            _expect.update(HAS_W=True, HAS_B=True, SILU=True)
        _case("norm_silu", _kernel, f"{_dt}-{_layout}", dict(op=_op, dtype=_dt, layout=_layout), _expect)
    _bd, _bi = (8, 256) if _layout == "contiguous" else (128, 16)
    for _kernel, _op in (("_rms_fwd_kernel", "rms_forward"), ("_rms_bwd_kernel", "rms_backward")):
        _expect = dict(BLOCK_D=_bd, BLOCK_I=_bi, ACC=_acc, HAS_W=True, SILU=True)
        if _op == "rms_backward":
            _expect.update(NEED_X=True, NEED_W=True)
        _case("norm_silu", _kernel, f"{_dt}-{_layout}", dict(op=_op, dtype=_dt, layout=_layout), _expect)
for _kernel, _op in (("_rms_fwd_kernel", "rms_forward"), ("_rms_bwd_kernel", "rms_backward")):
    _case("norm_silu", _kernel, "bfloat16-lastdim", dict(op=_op, dtype="bfloat16", layout="lastdim"),
          dict(BLOCK_D=128, BLOCK_I=1, ACC="fp32"))

CASE_BY_ID = {c["id"]: c for c in CASES}
assert len(CASE_BY_ID) == len(CASES), "duplicate case ids"

# --------------------------------------------------------------------------------------------------------
# Worker (runs as ``python tests/test_triton_compile.py --worker``; one JSON request/answer per line)
# --------------------------------------------------------------------------------------------------------

_TORCH_TO_TRITON = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "float64": "fp64",
                    "uint8": "u8", "int8": "i8", "int32": "i32", "int64": "i64", "bool": "i1"}


class _Recorder:
    """Stands in for a kernel (or autotuner): ``rec[grid](*args, **kwargs)`` records the launch."""

    def __init__(self, launches, name):
        self.launches = launches
        self.name = name

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((self.name, args, kwargs))
        return launch


def _body(op):
    """The Python function behind a torch.library custom op (called directly on meta tensors)."""
    return getattr(op, "_init_fn", op)


def _run_launcher(call, tf32):
    """Run the launcher of ``call`` on meta tensors with every kernel recorded; return the launches."""
    import torch

    from fnf_kernels.triton_kernels import attention_losses, dilation, lora_linear, norm_silu, penalty

    launches: list = []
    patches = [(attention_losses, "_forward_kernel"), (attention_losses, "_backward_kernel"), (penalty, "_norms_kernel"), (penalty, "_backward_kernel"), (dilation, "_column_kernel"),
               (dilation, "_row_kernel"), (lora_linear, "_down_kernel"), (lora_linear, "_wgrad_kernel"),
               (lora_linear, "_fused_kernel"), (lora_linear, "_fused_tuned"), (norm_silu, "_stats_kernel"),
               (norm_silu, "_apply_kernel"), (norm_silu, "_bwd_sums_kernel"), (norm_silu, "_bwd_dx_kernel"),
               (norm_silu, "_rms_fwd_kernel"), (norm_silu, "_rms_bwd_kernel")]
    saved = [(mod, name, getattr(mod, name)) for mod, name in patches]
    saved_tf32 = torch.backends.cuda.matmul.allow_tf32
    meta = dict(device="meta")
    try:
        for mod, name in patches:
            setattr(mod, name, _Recorder(launches, "_fused_kernel" if name == "_fused_tuned" else name))
        torch.backends.cuda.matmul.allow_tf32 = tf32
        dt = getattr(torch, call["dtype"])
        op = call["op"]
        if op in ("penalty_norms", "penalty_backward"):
            # (B, C, H, W); wide: a 2**32-element sample (meta tensors allocate nothing)
            b, c, h, w = (1, 4, 32768, 32768) if call["wide"] else (2, 4, 32, 32)
            image = torch.empty((b, c, h, w), dtype=dt, **meta)
            mask = torch.empty((b, h, w) if call["ndim"] == 2 else (b, c, h, w), dtype=dt, **meta)
            if call["ndim"] == 3:
                image = image[..., : h - 2, : w - 2]
                mask = mask[..., : h - 2, : w - 2]
            reference = torch.empty_like(image)
            if op == "penalty_norms":
                _body(penalty.triton_penalty_norms)(image, reference, mask, False)
            else:
                acc = torch.float64 if dt == torch.float64 else torch.float32
                grad, norms = torch.empty((b,), dtype=acc, **meta), torch.empty((b,), dtype=acc, **meta)
                _body(penalty.triton_penalty_backward)(grad, image, reference, mask, norms, False)
        elif op == "dilate":
            b, h, w = call["shape"]
            if call.get("col_stride"):
                sx = call["col_stride"]
                heatmap = torch.empty_strided((b, h, w), (w * sx, 1, sx), dtype=dt, **meta)
            elif call["row_stride"]:
                sy = call["row_stride"]
                heatmap = torch.empty_strided((b, h, w), (h * sy, sy, 1), dtype=dt, **meta)
            else:
                heatmap = torch.empty((b, h, w), dtype=dt, **meta)
            threshold = torch.empty((b,), dtype=dt, **meta)
            _body(dilation.triton_threshold_dilate)(heatmap, threshold, 5, call["disk"], getattr(torch, call["out"]))
        elif op == "lora_forward":
            m, k, n, r = call["m"], call["k"], call["n"], call["r"]
            x = torch.empty((m, k), dtype=dt, **meta)
            weight = torch.empty((n, k), dtype=dt, **meta)
            bias = torch.empty((n,), dtype=dt, **meta) if call["bias"] else None
            lora_a, lora_b = torch.empty((r, k), dtype=dt, **meta), torch.empty((n, r), dtype=dt, **meta)
            scale = torch.empty((2,), dtype=torch.float32, **meta) if call["scale"] else None
            _body(lora_linear.triton_lora_linear)(x, weight, bias, lora_a, lora_b, scale, 0.5, m // 2, 1)
        elif op == "lora_backward":
            m, k, n, r = call["m"], call["k"], call["n"], call["r"]
            grad, x = torch.empty((m, n), dtype=dt, **meta), torch.empty((m, k), dtype=dt, **meta)
            weight = torch.empty((n, k), dtype=dt, **meta)
            lora_a, lora_b = torch.empty((r, k), dtype=dt, **meta), torch.empty((n, r), dtype=dt, **meta)
            xs = torch.empty((m, r), dtype=dt, **meta)
            scale = torch.empty((2,), dtype=torch.float32, **meta) if call["scale"] else None
            _body(lora_linear.triton_lora_linear_backward)(
                grad, x, weight, lora_a, lora_b, xs, scale, 0.5, m // 2, 1,
                True, True, True, True, True)  # need x, weight, bias, A, B
        elif op in ("attention_maxima", "attention_backward"):
            maps = torch.empty((2, 8, call["k"], 16, 16), dtype=dt, **meta)
            if op == "attention_maxima":
                _body(attention_losses.triton_attention_maxima)(maps, 1e-8)
            else:
                acc = torch.float64 if dt == torch.float64 else torch.float32
                sep, en = torch.empty((2, 8), dtype=acc, **meta), torch.empty((2, 8, call["k"]), dtype=acc, **meta)
                idx, en_idx = torch.empty((2, 8), dtype=torch.int64, **meta), torch.empty((2, 8, call["k"]),
                                                                                          dtype=torch.int64, **meta)
                _body(attention_losses.triton_attention_maxima_backward)(maps, sep, idx, en, en_idx, 1e-8)
        elif op in ("gn_forward", "gn_backward", "rms_forward", "rms_backward"):
            layout = call["layout"]
            shape = (1, 512, 64, 64) if op.startswith("gn") else ((3, 77, 3072) if layout == "lastdim"
                                                                  else (2, 512, 32, 32))
            x = torch.empty(shape, dtype=dt, **meta)
            if layout == "channels_last":
                x = x.contiguous(memory_format=torch.channels_last)
            dim = x.dim() - 1 if layout == "lastdim" else 1
            w, b = torch.empty((x.shape[dim],), dtype=dt, **meta), torch.empty((x.shape[dim],), dtype=dt, **meta)
            acc = torch.float64 if dt == torch.float64 else torch.float32
            if op == "gn_forward":
                _body(norm_silu.triton_group_norm_silu)(x, w, b, 32, 1e-5, True)
            elif op == "gn_backward":
                stats = torch.empty((shape[0], 32), dtype=acc, **meta)
                _body(norm_silu.triton_group_norm_silu_backward)(torch.empty_like(x), x, w, b, stats, stats, 32, True,
                                                                 True, True, True)
            elif op == "rms_forward":
                _body(norm_silu.triton_rms_norm_silu)(x, w, dim, 1e-6, True)
            else:
                rstd = torch.empty(shape[:dim] + shape[dim + 1:], dtype=acc, **meta)
                _body(norm_silu.triton_rms_norm_silu_backward)(torch.empty_like(x), x, w, rstd, dim, True, True, True)
        else:
            raise ValueError(f"unknown launcher {op!r}")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved_tf32
        for mod, name, obj in saved:
            setattr(mod, name, obj)
    return launches


def _specialize(value):
    """(signature type, attribute list or None, constexpr value or None) as JITFunction specializes it."""
    import torch

    if isinstance(value, torch.Tensor):
        return "*" + _TORCH_TO_TRITON[str(value.dtype).removeprefix("torch.")], [["tt.divisibility", 16]], None
    if isinstance(value, bool):
        return "u1", None, None
    if isinstance(value, int):
        if value == 1:
            return "constexpr", None, 1
        ty = "i32" if -(2**31) <= value < 2**31 else ("u64" if value >= 2**63 else "i64")
        return ty, ([["tt.divisibility", 16]] if value % 16 == 0 else None), None
    if isinstance(value, float):
        return "fp32", None, None
    raise TypeError(f"cannot specialize {type(value).__name__}")


def _jsonable(v):
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    name = getattr(v, "name", None)  # triton.language dtypes
    return name if isinstance(name, str) else repr(v)


_REGS = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def _compile(fn, signature, constexprs, attrs, options, arch):
    """triton.compile for cuda:arch; returns (kernel, ptxas -v log captured from stdout)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn, signature, constexprs, attrs)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):  # TRITON_DUMP_PTXAS_LOG=1 prints ptxas -v here
        kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    return kernel, log.getvalue()


def _describe(kernel, log):
    regs = [int(x) for x in _REGS.findall(log)]
    spills = [(int(a), int(b)) for a, b in _SPILLS.findall(log)]
    md = kernel.metadata
    return dict(cubin_bytes=len(kernel.asm.get("cubin") or b""), shared=int(getattr(md, "shared", 0) or 0),
                num_warps=getattr(md, "num_warps", None), num_stages=getattr(md, "num_stages", None),
                regs=max(regs) if regs else None,
                spill_stores=max(s for s, _ in spills) if spills else None,
                spill_loads=max(l for _, l in spills) if spills else None)


def _compile_case(case, arch):
    import importlib

    mod = importlib.import_module(f"fnf_kernels.triton_kernels.{case['module']}")
    fn = getattr(mod, case["kernel"])
    if case["config"] is not None:
        tuned = mod._fused_tuned
        assert tuned.fn is fn, "the autotuner does not wrap the module's kernel"
        config = tuned.configs[case["config"]]
    else:
        config = None
    launches = [ln for ln in _run_launcher(case["call"], case["tf32"]) if ln[0] == case["kernel"]]
    if len(launches) <= case["pick"]:
        raise AssertionError(f"the launcher made {len(launches)} launch(es) of {case['kernel']}, "
                             f"case needs #{case['pick']}")
    _, args, kwargs = launches[case["pick"]]
    kwargs = dict(kwargs)
    options = {}
    if config is not None:
        kwargs.update(config.kwargs)
        options.update(num_warps=config.num_warps, num_stages=config.num_stages)
    for opt in ("num_warps", "num_stages", "num_ctas", "maxnreg"):
        if opt in kwargs:
            options[opt] = kwargs.pop(opt)
    names = fn.arg_names
    if len(args) > len(names):
        raise AssertionError(f"{len(args)} positional arguments for {len(names)} parameters")
    bound = dict(zip(names, args))
    for k, v in kwargs.items():
        if k not in names:
            raise AssertionError(f"unknown keyword argument {k!r}")
        if k in bound:
            raise AssertionError(f"argument {k!r} given twice")
        bound[k] = v
    missing = [n for n in names if n not in bound]
    if missing:
        raise AssertionError(f"missing arguments {missing}")
    signature, constexprs, attrs, declared = {}, {}, {}, {}
    for i, p in enumerate(fn.params):
        v = bound[p.name]
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            constexprs[p.name] = v
            declared[p.name] = _jsonable(v)
            continue
        ty, attr, const = _specialize(v)
        signature[p.name] = ty
        if ty == "constexpr":
            constexprs[p.name] = const
        if attr:
            attrs[(i,)] = attr
    t0 = time.perf_counter()
    kernel, log = _compile(fn, signature, constexprs, attrs, options, arch)
    info = _describe(kernel, log)
    info.update(seconds=round(time.perf_counter() - t0, 2), constexprs=declared,
                options={k: v for k, v in options.items()}, tuned=config is not None,
                signature={k: v for k, v in signature.items() if v != "constexpr"})
    return info


def _inventory():
    """Per module, the kernels its source launches (``name[grid](...)``; an autotuner counts as its ``.fn``)."""
    import importlib
    import inspect

    from triton.runtime.jit import JITFunction, KernelInterface

    launched = {}
    for name in MODULES:
        mod = importlib.import_module(f"fnf_kernels.triton_kernels.{name}")
        found = set()
        for ident in set(re.findall(r"\b(\w+)\[", inspect.getsource(mod))):
            obj = getattr(mod, ident, None)
            while isinstance(obj, KernelInterface) and not isinstance(obj, JITFunction):
                obj = getattr(obj, "fn", None)  # Autotuner / Heuristics -> the kernel they wrap
            if isinstance(obj, JITFunction):
                found.add(obj.fn.__name__)
        launched[name] = sorted(found)
    return dict(launched=launched)


def _probe(arch):
    """Compile a trivial kernel for cuda:arch: tells whether the toolchain (NVIDIA backend, ptxas) works."""
    import triton
    import triton.language as tl

    @triton.jit
    def _probe_kernel(x_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) + 1.0, mask=offs < n)

    from triton.backends.nvidia.compiler import get_ptxas  # ImportError: no NVIDIA backend

    get_ptxas(arch).path  # RuntimeError("Cannot find ptxas") without one
    kernel, _ = _compile(_probe_kernel, {"x_ptr": "*fp32", "n": "i32", "BLOCK": "constexpr"}, {"BLOCK": 128}, {},
                         {"num_warps": 4}, arch)
    if not kernel.asm.get("cubin"):
        raise RuntimeError("ptxas produced an empty cubin for a trivial kernel")
    return {}


def _worker_main():
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # stray prints (triton, ptxas) go to the log, not into the protocol
    sys.path.insert(0, str(ROOT))
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("the compile worker must run without TRITON_INTERPRET")
    for line in sys.stdin:
        req = json.loads(line)
        try:
            if req["what"] == "probe":
                result = _probe(req["arch"])
            elif req["what"] == "inventory":
                result = _inventory()
            else:
                result = _compile_case(CASE_BY_ID[req["case"]], req["arch"])
            answer = dict(ok=True, **result)
        except BaseException as e:  # noqa: BLE001 - reported to the test, which decides
            answer = dict(ok=False, error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
        proto.write(json.dumps(answer) + "\n")
    proto.flush()
    sys.stderr.flush()
    os._exit(0)  # skip interpreter teardown (torch, triton): seconds for nothing


if __name__ == "__main__" and "--worker" in sys.argv:
    _worker_main()

# --------------------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------------------

import pytest  # noqa: E402

pytestmark = pytest.mark.slow  # a worker process and ptxas per case: ~1-40 s each on 2 cores

pytest.importorskip("triton")
try:
    from triton.backends.compiler import GPUTarget  # noqa: E402,F401
    from triton.compiler import ASTSource  # noqa: E402,F401
except ImportError as _e:  # pragma: no cover - depends on the triton version
    pytest.skip(f"triton has no ASTSource / GPUTarget ({_e})", allow_module_level=True)

# Messages of a missing or unusable CUDA toolchain (as opposed to an error in a kernel).
_TOOLCHAIN = re.compile(r"ptxas|Cannot find|No module named 'triton\.backends\.nvidia'|"
                        r"cannot import name .* from 'triton\.backends\.nvidia|No such file or directory",
                        re.IGNORECASE)


class _Worker:
    """One long-lived compile subprocess (restarted if it dies); answers one request at a time."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.log_path = tmp / "worker.log"
        self.proc = None
        self.answers: queue.Queue = queue.Queue()

    def _start(self):
        env = dict(os.environ)
        env.pop("TRITON_INTERPRET", None)
        env["TRITON_CACHE_DIR"] = str(self.tmp / "cache")  # fresh: every case really runs ptxas
        env["TRITON_DUMP_PTXAS_LOG"] = "1"  # ptxas -v (registers, spills) printed, captured by the worker
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker"], cwd=str(ROOT),
                                     env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True)
        log.close()
        answers = self.answers = queue.Queue()
        stdout = self.proc.stdout

        def read():
            for line in stdout:
                answers.put(line)
            answers.put(None)

        threading.Thread(target=read, daemon=True).start()

    def log_tail(self, n=4000):
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def ask(self, request: dict) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        try:
            line = self.answers.get(timeout=WORKER_TIMEOUT_S)
        except queue.Empty:
            self.proc.kill()
            self.close()
            pytest.fail(f"compile worker gave no answer in {WORKER_TIMEOUT_S} s for {request}\n{self.log_tail()}")
        if line is None:
            self.proc.wait()
            code = self.proc.returncode
            self.proc = None
            pytest.fail(f"compile worker died (exit {code}) on {request}\n{self.log_tail()}")
        return json.loads(line)

    def close(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


@pytest.fixture(scope="module")
def worker():
    tmp = Path(tempfile.mkdtemp(prefix="fnf_triton_compile_"))
    w = _Worker(tmp)
    try:
        for arch in ARCHS:
            answer = w.ask(dict(what="probe", arch=arch))
            if not answer["ok"]:
                if _TOOLCHAIN.search(answer["error"]):
                    pytest.skip(f"CUDA toolchain unavailable for sm_{arch}: {answer['error'].splitlines()[0]}")
                pytest.fail(f"compiling a trivial kernel for sm_{arch} failed:\n{answer['traceback']}")
        yield w
    finally:
        w.close()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.parametrize("arch", [pytest.param(a, id=f"sm{a}") for a in ARCHS])
@pytest.mark.parametrize("case_id", [pytest.param(c["id"], id=c["id"]) for c in CASES])
def test_compiles_to_cubin(worker, case_id, arch, record_property):
    case = CASE_BY_ID[case_id]
    answer = worker.ask(dict(what="case", case=case_id, arch=arch))
    if not answer["ok"]:
        pytest.fail(f"{case['module']}.{case['kernel']} ({case_id}) failed to compile for sm_{arch}:\n"
                    f"{answer['traceback']}", pytrace=False)
    for key in ("shared", "regs", "spill_stores", "spill_loads", "num_warps", "num_stages", "seconds", "cubin_bytes"):
        record_property(key, answer.get(key))
    assert answer["cubin_bytes"] > 0, "empty cubin"
    # The launcher must still choose the constexprs this case is named after.
    got = {k: answer["constexprs"].get(k) for k in case["expect"]}
    assert got == case["expect"], f"launcher chose {got}, case expects {case['expect']}"
    shared, limit = answer["shared"], SMEM_LIMIT[arch]
    if case["kernel"] == "_fused_kernel" and case["config"] is not None:  # the pruned LoRA autotune set
        assert not answer.get("spill_stores"), (f"autotune config {case['config']} spills {answer['spill_stores']} "
                                                f"bytes on sm_{arch} ({answer['regs']} registers)")
        assert shared <= SMEM_LIMIT[80], f"autotune config {case['config']} needs {shared} bytes of shared memory"
    if case["config"] is None:
        assert shared <= limit, f"needs {shared} bytes of shared memory, sm_{arch} has at most {limit}"
    elif shared > limit:  # the autotuner drops this config (OutOfResources) on this GPU
        warnings.warn(f"{case_id} sm_{arch}: autotune config {case['config']} needs {shared} bytes of shared memory "
                      f"(limit {limit}); the autotuner will skip it there", stacklevel=1)
    if answer.get("spill_stores"):
        warnings.warn(f"{case_id} sm_{arch}: ptxas spills {answer['spill_stores']} bytes "
                      f"({answer['regs']} registers)", stacklevel=1)


def test_every_lora_autotune_config_is_compiled():
    """Each config of the LoRA autotune set has compile cases above (which fail on a register spill)."""
    from fnf_kernels.triton_kernels import lora_linear

    configs = lora_linear._fused_tuned.configs
    assert list(range(len(configs))) == list(LORA_CONFIGS_16 + LORA_CONFIGS_32)
    assert [configs[i] for i in LORA_CONFIGS_16] == lora_linear._CONFIGS_16
    assert [configs[i] for i in LORA_CONFIGS_32] == lora_linear._CONFIGS_32
    compiled = {c["config"] for c in CASES if c["kernel"] == "_fused_kernel"}
    assert compiled == set(LORA_CONFIGS_16 + LORA_CONFIGS_32)
    ieee_fused = {c["config"] for c in CASES if c["kernel"] == "_fused_kernel" and c["expect"].get("FUSE_DOWN")
                  and c["expect"].get("PRECISION") == "ieee"}
    assert ieee_fused == {configs.index(c) for c in lora_linear._CONFIGS_32_IEEE_FUSED_DOWN}


def test_lora_autotune_prune_picks_the_width_and_variant():
    import torch

    from fnf_kernels.triton_kernels import lora_linear as tk

    bf16, f32 = torch.empty(1, dtype=torch.bfloat16), torch.empty(1)
    prune = tk._prune
    assert prune(tk._FUSED_CONFIGS, {"a_ptr": bf16}, PRECISION="tf32", FUSE_DOWN=True) == tk._CONFIGS_16
    assert prune(tk._FUSED_CONFIGS, {"a_ptr": f32}, PRECISION="tf32", FUSE_DOWN=True) == tk._CONFIGS_32
    assert prune(tk._FUSED_CONFIGS, {"a_ptr": f32}, PRECISION="ieee", FUSE_DOWN=False) == tk._CONFIGS_32
    assert (prune(tk._FUSED_CONFIGS, {"a_ptr": f32}, PRECISION="ieee", FUSE_DOWN=True)
            == tk._CONFIGS_32_IEEE_FUSED_DOWN)


def test_lora_autotune_key_buckets_m():
    """The tuning key holds M's power-of-two bucket, not M: a new batch x tokens count reuses its bucket's choice."""
    from fnf_kernels.triton_kernels import lora_linear

    assert "M_BUCKET" in lora_linear._AUTOTUNE_KEY and "M" not in lora_linear._AUTOTUNE_KEY
    assert lora_linear._fused_tuned.keys == lora_linear._AUTOTUNE_KEY


def test_every_launched_kernel_has_cases(worker):
    """A kernel added to (or renamed in) one of the modules needs compile cases here."""
    answer = worker.ask(dict(what="inventory"))
    assert answer["ok"], answer.get("traceback")
    covered = {m: sorted({c["kernel"] for c in CASES if c["module"] == m}) for m in MODULES}
    assert answer["launched"] == covered
