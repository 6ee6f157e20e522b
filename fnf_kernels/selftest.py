"""``python -m fnf_kernels selftest``: every available backend of every op against its float64 reference.

Each check draws small inputs with odd sizes (seeded; the seed is printed), runs the op through one backend
in one dtype, runs the float64 reference (:mod:`fnf_kernels.references`) on the same values cast to float64,
and compares the outputs and the gradients. The error is max |out - ref| / max |ref| over every compared
tensor; it must stay within the dtype's tolerance (masks must match exactly). One table, one row per
(op, backend, dtype); the exit status is 1 when a row fails.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from . import backends, lora, references
from .attention_losses import separate_enhance_losses
from .dilation import threshold_dilate
from .norm_silu import group_norm_silu, rms_norm_silu
from .penalty import masked_frobenius_penalty

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Relative tolerance (of the largest reference value) per input dtype: fp32 accumulations with outputs and
# gradients rounded to the input dtype.
TOLERANCE = {torch.float64: 1e-9, torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 4e-2}


@dataclass
class Row:
    op: str
    backend: str
    dtype: str
    error: float
    tolerance: float
    ok: bool
    note: str = ""


def _error(outs, refs) -> float:
    """max |out - ref| / max |ref| over paired tensors (NaN where the reference is NaN must be NaN too)."""
    worst = 0.0
    for out, ref in zip(outs, refs):
        out, ref = out.detach().to(torch.float64).cpu(), ref.detach().to(torch.float64).cpu()
        if out.shape != ref.shape:
            return math.inf
        nan = torch.isnan(ref)
        if not torch.equal(torch.isnan(out), nan):
            return math.inf
        out, ref = out[~nan], ref[~nan]
        if ref.numel() == 0:
            continue
        scale = max(float(ref.abs().max()), 1e-30)
        worst = max(worst, float((out - ref).abs().max()) / scale)
    return worst


def _leaf(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.detach().to(dtype).requires_grad_()


# ------------------------------------------------------------------------------------------------- checks
# Each check: (device, backend, dtype, generator) -> (outputs and gradients of the backend, same of the
# float64 reference); inputs are drawn in float64, rounded to dtype, and the reference sees the rounded values.

def _check_penalty(device, backend, dtype, gen):
    image = torch.rand(3, 3, 17, 23, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    ref_img = torch.rand(3, 3, 17, 23, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    mask = torch.rand(3, 1, 17, 23, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    weight = torch.rand(3, generator=gen, dtype=torch.float64).to(device) + 0.5
    results = []
    for run_dtype, run in ((dtype, lambda x, r: masked_frobenius_penalty(x, r, mask, reduction="none",
                                                                         backend=backend)),
                           (torch.float64, lambda x, r: references.penalty_norms(x, r, mask.double()))):
        x, r = _leaf(image, run_dtype), _leaf(ref_img, run_dtype)
        norms = run(x, r)
        (norms.double() * weight).sum().backward()
        results.append([norms, x.grad, r.grad])
    return results


def _check_dilate(device, backend, dtype, gen):
    heatmap = torch.rand(3, 19, 29, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    heatmap[1, 7, 11] = float("nan")
    thr = torch.tensor([0.96875, 0.9375, 0.984375], dtype=torch.float64, device=device)  # exact in fp16
    outs, refs = [], []
    for shape, radius in (("square", 2), ("disk", 3), ("disk", 0)):
        outs.append(threshold_dilate(heatmap, thr, radius, shape=shape, backend=backend))
        refs.append(references.threshold_dilate(heatmap.double(), thr, radius, shape, torch.float32))
    return outs, refs


def _check_lora(device, backend, dtype, gen):
    def draw(*shape, s=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * s).to(device=device, dtype=dtype)

    x, w, b = draw(2, 7, 37), draw(46, 37, s=0.2), draw(46)
    a, bb = draw(10, 37, s=0.2), draw(46, 5, s=0.2)  # groups=2: two rank-5 blocks, two 23-feature outputs
    scale = torch.tensor([0.5, 1.25], dtype=torch.float64, device=device)
    grad = torch.randn(2, 7, 46, generator=gen, dtype=torch.float64).to(device)
    results = []
    for run_dtype, is_ref in ((dtype, False), (torch.float64, True)):
        leaves = [_leaf(t, run_dtype) for t in (x, w, b, a, bb)]
        if is_ref:
            out = references.lora_linear_reference(*leaves, scale, groups=2)
        else:
            out = _lora_backend(backend, leaves, scale, groups=2)
        (out.double() * grad).sum().backward()
        results.append([out] + [t.grad for t in leaves])
    return results


def _lora_backend(backend, leaves, scale, groups):
    """lora_linear through one implementation: "triton", "torch" (the plain-torch op, any device) or "cpu"."""
    x = leaves[0]
    if backend == "torch":  # reachable through "auto" only on CUDA tensors (float64, or without triton)
        x2, scale_t, scale_value, rows = lora._lora_args(*leaves, scale, groups, "auto")
        out = lora._lora_linear(x2, *leaves[1:], scale_t, scale_value, rows, groups, "torch")
        return out.reshape(*x.shape[:-1], -1)
    return lora.lora_linear(*leaves, scale, groups=groups, backend=backend)


def _attention_maps(device, dtype, gen):
    """Attention-like maps whose maxima are unique by a wide margin, so a gradient (which goes to the argmax)
    cannot move to another pixel or object through rounding in low precision."""
    logits = torch.randn(2, 3, 9 * 11, 5, generator=gen, dtype=torch.float64) * 2
    probs = logits.softmax(-1)[..., 1:3] * 0.5
    maps = probs.permute(0, 1, 3, 2).reshape(2, 3, 2, 9, 11).contiguous()
    for b in range(2):
        y, x = int(torch.randint(1, 8, (1,), generator=gen)), int(torch.randint(1, 10, (1,), generator=gen))
        maps[b, b, 0, y, x], maps[b, b, 1, y, x] = 0.75, 0.6
    return maps.to(device=device, dtype=dtype)


def _check_attention(device, backend, dtype, gen):
    maps = _attention_maps(device, dtype, gen)
    weights = torch.rand(2, 2, generator=gen, dtype=torch.float64).to(device) + 0.5
    results = []
    for run_dtype, is_ref in ((dtype, False), (torch.float64, True)):
        m = _leaf(maps, run_dtype)
        if is_ref:
            sep, en = references.separate_reference(m), references.enhance_reference(m)
        else:
            sep, en = separate_enhance_losses(m, backend=backend)
        (sep.double() * weights[0] + en.double() * weights[1]).sum().backward()
        results.append([sep, en, m.grad])
    return results


def _check_norm(op, device, backend, dtype, gen):
    """group_norm_silu (channels_last, C = 6 in 3 groups, H*W = 35) or rms_norm_silu (dim 1)."""
    x = torch.randn(2, 6, 5, 7, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    w = (torch.randn(6, generator=gen, dtype=torch.float64) + 1).to(device=device, dtype=dtype)
    b = torch.randn(6, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    grad = torch.randn(2, 6, 5, 7, generator=gen, dtype=torch.float64).to(device)
    results = []
    for run_dtype, is_ref in ((dtype, False), (torch.float64, True)):
        xl, wl, bl = (_leaf(t, run_dtype) for t in (x, w, b))
        if op == "group_norm_silu":
            if is_ref:
                out = references.group_norm_silu_reference(xl, 3, wl, bl, 1e-5)
            elif backend == "torch":  # the plain-torch op, reachable through "auto" (and "cpu" on CPU tensors)
                out = torch.ops.fnf_kernels.group_norm_silu_torch(xl, wl, bl, 3, 1e-5, True)[0]
            else:
                out = group_norm_silu(xl, 3, wl, bl, 1e-5, backend=backend)
            leaves = [xl, wl, bl]
        else:
            if is_ref:
                out = references.rms_norm_silu_reference(xl, wl, 1e-6, dim=1)
            elif backend == "torch":
                out = torch.ops.fnf_kernels.rms_norm_silu_torch(xl, wl, 1, 1e-6, True)[0]
            else:
                out = rms_norm_silu(xl, wl, 1e-6, dim=1, backend=backend)
            leaves = [xl, wl]
        (out.double() * grad).sum().backward()
        results.append([out] + [t.grad for t in leaves])
    return results


# Backends an op does not have at all (not reported as "not run").
_ABSENT = {("lora_linear", "cuda"), ("separate_enhance_losses", "cuda"), ("separate_enhance_losses", "cpu")}

CHECKS: dict[str, Callable] = {
    "masked_frobenius_penalty": _check_penalty,
    "threshold_dilate": _check_dilate,
    "lora_linear": _check_lora,
    "separate_enhance_losses": _check_attention,
    "group_norm_silu": lambda *a: _check_norm("group_norm_silu", *a),
    "rms_norm_silu": lambda *a: _check_norm("rms_norm_silu", *a),
}


# ------------------------------------------------------------------------------------------------ planning
def plan(device: str, dtypes: list[torch.dtype]) -> tuple[list[tuple[str, str, torch.dtype]], list[str]]:
    """(the (op, backend, dtype) checks to run on ``device``, lines saying which backends are not run and why)."""
    device_type = "cuda" if torch.device(device).type == "cuda" else "cpu"
    interpreter = device_type == "cpu" and backends.triton_interpreter()
    runs, skipped = [], []
    for op in backends.OPS:
        if op not in CHECKS:
            skipped.append(f"{op}: no selftest check yet")
            continue
        table = backends.op_availability(op, device_type)
        for name, (usable, reason) in table.items():
            if name == "cpu" and device_type == "cpu" and backends.cpu_is_torch(op):
                continue  # the same plain-torch op as "torch" (checked once, as "torch")
            if (op, name) in _ABSENT:
                continue
            if not usable:
                skipped.append(f"{op} {name}: {reason}")
                continue
            for dtype in dtypes:
                if name == "triton" and interpreter and dtype not in (torch.float32, torch.float64):
                    continue  # the interpreter has no bf16 arithmetic; fp16 is slow there
                if op == "lora_linear" and name == "triton" and dtype == torch.float64:
                    continue  # float64 never takes Triton (auto runs the plain-torch op)
                runs.append((op, name, dtype))
    return runs, skipped


def run(device: str = "cpu", dtypes: Optional[list[torch.dtype]] = None, seed: int = 0, out=None) -> list[Row]:
    """Run every planned check on ``device``; print the table to ``out`` and return its rows."""
    out = out or sys.stdout
    dtypes = dtypes or list(DTYPES.values())
    runs, skipped = plan(device, dtypes)
    start = time.perf_counter()
    rows = []
    for i, (op, backend, dtype) in enumerate(runs):
        gen = torch.Generator().manual_seed(seed * 1000 + i)
        dname = str(dtype).replace("torch.", "")
        tol = 0.0 if op == "threshold_dilate" else TOLERANCE[dtype]
        try:
            got, want = CHECKS[op](device, backend, dtype, gen)
            err = _error(got, want)
            rows.append(Row(op, backend, dname, err, tol, err <= tol))
        except Exception as exc:  # noqa: BLE001 - a backend that raises is a failed row
            rows.append(Row(op, backend, dname, math.inf, tol, False, f"{type(exc).__name__}: {exc}"[:200]))
    elapsed = time.perf_counter() - start
    name = torch.cuda.get_device_name(torch.device(device)) if torch.device(device).type == "cuda" else "cpu"
    print(f"fnf_kernels selftest on {device} ({name}), torch {torch.__version__}, seed {seed}, "
          f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', 'unset')}", file=out)
    header = f"{'op':<26} {'backend':<10} {'dtype':<9} {'max error':>10} {'tolerance':>10}  ok"
    print(header, file=out)
    print("-" * len(header), file=out)
    for r in rows:
        print(f"{r.op:<26} {r.backend:<10} {r.dtype:<9} {r.error:>10.2e} {r.tolerance:>10.1e}  "
              f"{'ok' if r.ok else 'FAIL'}{'  ' + r.note if r.note else ''}", file=out)
    failed = sum(not r.ok for r in rows)
    print(f"{len(rows)} checks, {failed} failed, {elapsed:.1f} s", file=out)
    for line in skipped:
        print(f"not run: {line}", file=out)
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="device to test on: cuda (default when visible), cuda:N or cpu")
    parser.add_argument("--dtype", action="append", choices=sorted(DTYPES),
                        help="dtype to test (repeatable; default: all four)")
    parser.add_argument("--seed", type=int, default=0, help="input seed (default 0)")


def main(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("selftest: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 2
    dtypes = [DTYPES[d] for d in args.dtype] if args.dtype else None
    rows = run(str(device), dtypes, args.seed)
    return 0 if rows and all(r.ok for r in rows) else 1
