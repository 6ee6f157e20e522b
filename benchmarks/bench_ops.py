"""Benchmark table for the fnf_kernels ops: our backends vs eager torch, torch.compile and peers.

    python benchmarks/bench_ops.py                  # CPU and (when present) GPU, default sizes
    python benchmarks/bench_ops.py --device cuda --json benchmarks/results/ops.json

Prints one table per op and size: median time, speedup over the fastest eager baseline measured in the
same run and, on GPU, achieved GB/s (bytes that must move at least once / time) next to the measured
device copy bandwidth. Goals are ratios, checked here and reported, never asserted in tests.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys

import torch
import torch.nn.functional as F
from torch.utils import benchmark as tbench

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fnf_kernels  # noqa: E402
import provenance  # noqa: E402
from fnf_kernels import reference as ref  # noqa: E402
from fnf_kernels.backends import availability  # noqa: E402


def timeit(fn, min_run_time: float) -> float:
    """Median seconds per call (CUDA-synchronised), all threads."""
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    timer = tbench.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def copy_bandwidth(device: str) -> float:
    """Measured device copy bandwidth in GB/s (read + write of a 1 GiB float buffer)."""
    n = (1 << 30) // 4 if device == "cuda" else (1 << 27) // 4
    src = torch.empty(n, device=device)
    dst = torch.empty_like(src)
    t = timeit(lambda: dst.copy_(src), 0.5)
    return 2 * src.numel() * 4 / t / 1e9


# --- penalty -------------------------------------------------------------------------------------

def eager_sumsq(x, r, m):
    """Eager formulation 1: masked difference, squares, sum, sqrt."""
    d = (1 - m.clamp(0, 1)) * (r - x)
    return d.pow(2).flatten(1).sum(1).sqrt().mean()


def eager_norm(x, r, m):
    """Eager formulation 2: the reference (torch.linalg.vector_norm in float32)."""
    return ref.masked_frobenius_penalty(x, r, m)


def penalty_rows(device, dtype, shape, min_run_time, compile_baseline):
    b, c, h, w = shape
    x = torch.rand(shape, device=device, dtype=dtype, requires_grad=True)
    r = torch.rand(shape, device=device, dtype=dtype)
    m = (torch.rand(b, 1, h, w, device=device) > 0.3).to(dtype)
    providers = {"eager_sumsq": eager_sumsq, "eager_norm": eager_norm}
    if compile_baseline:
        providers["compile(eager_sumsq)"] = torch.compile(eager_sumsq)
    for name, (usable, _) in availability(device).items():
        if usable and name != "reference":
            providers[name] = lambda x, r, m, name=name: fnf_kernels.masked_frobenius_penalty(x, r, m, backend=name)
    elem = x.element_size()
    # Minimum traffic: forward reads image, reference and mask; backward reads them again and writes the grad.
    bytes_fwd = (2 * x.numel() + m.numel()) * elem
    bytes_fb = bytes_fwd + (3 * x.numel() + m.numel()) * elem
    rows = []
    for name, fn in providers.items():
        def fwd():
            with torch.no_grad():
                fn(x, r, m)

        def fwd_bwd():
            x.grad = None
            fn(x, r, m).backward()

        for mode, f, nbytes in (("fwd", fwd, bytes_fwd), ("fwd+bwd", fwd_bwd, bytes_fb)):
            t = timeit(f, min_run_time)
            rows.append(dict(op="masked_frobenius_penalty", shape=list(shape), dtype=str(dtype).split(".")[-1],
                             provider=name, mode=mode, ms=t * 1e3, gbps=nbytes / t / 1e9))
    return rows


# --- dilation ------------------------------------------------------------------------------------

def maxpool_route(hm, thr, radius):
    """Baseline: F.max_pool2d of the heatmap, then the comparison."""
    pooled = F.max_pool2d(hm.unsqueeze(1), 2 * radius + 1, stride=1, padding=radius)
    return (pooled.squeeze(1) > thr).float()


def kornia_bytes(shape, radius) -> int:
    """kornia.morphology.dilation unfolds every (2r+1)^2 window: memory grows with the kernel area."""
    b, h, w = shape
    return 2 * b * h * w * (2 * radius + 1) ** 2 * 4


def memory_budget(device) -> int:
    """Half the free memory of ``device``: the most a baseline may take before it is skipped."""
    if device == "cuda":
        return torch.cuda.mem_get_info()[0] // 2
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024 // 2
    except (OSError, KeyError, ValueError):
        return 4 << 30


def dilation_rows(device, shape, radii, min_run_time, with_kornia):
    hm = torch.rand(shape, device=device)
    providers = {"max_pool2d": lambda r: maxpool_route(hm, 0.99, r)}
    if with_kornia:
        try:
            import kornia

            def kornia_route(r):
                mask = (hm > 0.99).float().unsqueeze(1)
                kernel = torch.ones(2 * r + 1, 2 * r + 1, device=device)
                return kornia.morphology.dilation(mask, kernel, engine="convolution")

            providers["kornia"] = kornia_route
        except ImportError:
            pass
    for name, (usable, _) in availability(device).items():
        if usable and name != "reference":
            for shp in ("square", "disk"):
                providers[f"{name}[{shp}]"] = (
                    lambda r, name=name, shp=shp: fnf_kernels.threshold_dilate(hm, 0.99, r, shape=shp, backend=name))
    nbytes = hm.numel() * (hm.element_size() + 4)  # read the heatmap, write a float32 mask
    rows = []
    for radius in radii:
        for name, fn in providers.items():
            if name == "kornia" and kornia_bytes(shape, radius) > memory_budget(device):
                print(f"  (kornia at r={radius} skipped: its unfold needs ~{kornia_bytes(shape, radius) / 2**30:.0f} GiB)")
                continue
            t = timeit(lambda: fn(radius), min_run_time)
            rows.append(dict(op="threshold_dilate", shape=list(shape), dtype="float32", provider=name,
                             mode=f"r={radius}", ms=t * 1e3, gbps=nbytes / t / 1e9))
    return rows


# --- report --------------------------------------------------------------------------------------

def print_table(rows, device, copy_gbps):
    groups = {}
    for row in rows:
        groups.setdefault((row["op"], tuple(row["shape"]), row["dtype"], row["mode"]), []).append(row)
    for (op, shape, dtype, mode), items in groups.items():
        base_names = ("eager_sumsq", "eager_norm") if op == "masked_frobenius_penalty" else ("max_pool2d",)
        base = min(r["ms"] for r in items if r["provider"] in base_names)
        print(f"\n{op} {shape} {dtype} {mode} [{device}]")
        print(f"  {'provider':<22}{'ms':>10}{'vs eager':>10}" + (f"{'GB/s':>9}{'% copy':>8}" if device == "cuda" else ""))
        for r in sorted(items, key=lambda r: r["ms"]):
            line = f"  {r['provider']:<22}{r['ms']:>10.3f}{base / r['ms']:>9.2f}x"
            if device == "cuda":
                line += f"{r['gbps']:>9.0f}{100 * r['gbps'] / copy_gbps:>7.0f}%"
            print(line)


def goals(rows, device):
    """Ratios the issue sets as goals, computed from this run."""
    def ms(op, provider, mode, shape=None):
        hits = [r["ms"] for r in rows if r["op"] == op and r["provider"] == provider and r["mode"] == mode
                and (shape is None or tuple(r["shape"]) == shape)]
        return hits[0] if hits else None

    out = {}
    ours = "cpu" if device == "cpu" else "cuda"
    p = "masked_frobenius_penalty"
    eager = min(x for x in (ms(p, "eager_sumsq", "fwd+bwd"), ms(p, "eager_norm", "fwd+bwd")) if x)
    if ms(p, ours, "fwd+bwd"):
        out["penalty fwd+bwd speedup vs fastest eager"] = eager / ms(p, ours, "fwd+bwd")
        if ms(p, "compile(eager_sumsq)", "fwd+bwd"):
            out["penalty fwd+bwd speedup vs torch.compile"] = ms(p, "compile(eager_sumsq)", "fwd+bwd") / ms(p, ours, "fwd+bwd")
    d = "threshold_dilate"
    if ms(d, f"{ours}[square]", "r=15"):
        out["dilation r=15 speedup vs max_pool2d"] = ms(d, "max_pool2d", "r=15") / ms(d, f"{ours}[square]", "r=15")
    if ms(d, f"{ours}[square]", "r=63") and ms(d, f"{ours}[square]", "r=1"):
        out["dilation cost r=63 / r=1 (square)"] = ms(d, f"{ours}[square]", "r=63") / ms(d, f"{ours}[square]", "r=1")
        out["dilation cost r=63 / r=1 (disk)"] = ms(d, f"{ours}[disk]", "r=63") / ms(d, f"{ours}[disk]", "r=1")
    return out


def main(argv=None):
    sys.stdout.reconfigure(line_buffering=True)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    parser.add_argument("--min-run-time", type=float, default=0.5, help="seconds per measurement")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    parser.add_argument("--no-kornia", action="store_true", help="skip kornia.morphology.dilation")
    parser.add_argument("--json", help="also write the rows and goal ratios to this JSON file")
    args = parser.parse_args(argv)
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    devices = [d for d in devices if d == "cpu" or torch.cuda.is_available()]
    report = {**provenance.stamp(argv), "torch": torch.__version__, "host": platform.node(), "devices": {}}
    commit = report["commit"]
    for device in devices:
        name = torch.cuda.get_device_name() if device == "cuda" else f"{platform.processor() or 'cpu'} x{torch.get_num_threads()} threads"
        copy = copy_bandwidth(device)
        print(f"\n=== {device}: {name}; copy bandwidth {copy:.0f} GB/s; torch {torch.__version__}; commit {commit}")
        rows = []
        if device == "cpu":
            rows += penalty_rows(device, torch.float32, (8, 3, 512, 512), args.min_run_time, not args.no_compile)
            rows += dilation_rows(device, (8, 512, 512), (1, 15, 63), args.min_run_time, not args.no_kornia)
        else:
            for dtype in (torch.float32, torch.bfloat16):
                rows += penalty_rows(device, dtype, (16, 3, 1024, 1024), args.min_run_time, not args.no_compile)
            rows += penalty_rows(device, torch.float32, (8, 3, 512, 512), args.min_run_time, not args.no_compile)
            rows += dilation_rows(device, (8, 512, 512), (1, 15, 63), args.min_run_time, not args.no_kornia)
        print_table(rows, device, copy)
        ratios = goals(rows, device)
        print("\ngoal ratios:")
        for k, v in ratios.items():
            print(f"  {k}: {v:.2f}")
        report["devices"][device] = {"name": name, "copy_gbps": copy, "rows": rows, "goals": ratios}
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
