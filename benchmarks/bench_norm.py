"""group_norm_silu / rms_norm_silu forward + backward against eager GroupNorm + SiLU / RMSNorm + SiLU (and
torch.compile of the eager pair on GPU), every backend of ours.

    python benchmarks/bench_norm.py                      # CPU (and GPU when present), default sizes
    python benchmarks/bench_norm.py --device cpu --json benchmarks/results/norm_cpu.json
    python benchmarks/bench_norm.py --device cuda --json benchmarks/results/norm_cuda.json

``--resnet-memory`` instead counts, with fnf.memory.counter.StorageCounter, what one SD-style decoder ResNet block holds
for backward, eager (autocast-style float32 group norm) vs fused, on real and fake tensors.

Per op, size and dtype: median time of one forward + backward (x, weight and bias require grad) of eager, of
torch.compile (GPU, or --compile) and of each of our backends (ours[cuda|triton|cpu|torch]), the ratio eager / our
best, the bytes autograd saves between forward and backward (what the fused op exists for), and the bytes-moved
limit: the bytes that must move at least once (forward reads x and writes out, backward reads x and the gradient
and writes dx: 5 x bytes; the parameters and statistics are < 0.1 %) at the measured copy bandwidth of the device
(``limit ms``), and our best time as a % of it. Arithmetic per element (fp32, counted from the C++ CPU kernel; a
sigmoid = ~20 flops: rational tanh, 13 mul/add + 1 div): forward ~30 (statistics 4, affine 2, SiLU ~24), backward
~40 when dy is kept between its two passes (groups up to 32K elements) else ~65 (dy and its sigmoid recomputed;
the GPU kernels always recompute, with a hardware exp). At 5 x 4 bytes per element that is 3.5-5 flops per byte:
a GPU (~60 flops per byte of bandwidth) is bound by memory; one CPU core with 4-wide SSE (~24 GFLOP/s at 16
GB/s copy, 1.5 flops per byte) is bound by the arithmetic. ``--cpu-time`` times CPU seconds instead of wall
clock (on a shared machine the work per step, not the waits). Nothing here is asserted.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fnf_kernels  # noqa: E402
from bench_ops import copy_bandwidth, timeit  # noqa: E402
from diffusers.models.resnet import ResnetBlock2D  # noqa: E402
from fnf.memory.counter import StorageCounter  # noqa: E402
from fnf_kernels import backends  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# (N, C, H, W, groups): SD-style VAE decoder activations (512 ch at 1/8, 256 ch at full resolution) scaled to size.
CPU_SIZES = [(1, 128, 128, 128, 32), (1, 512, 64, 64, 32), (2, 64, 96, 96, 32)]
GPU_SIZES = [(1, 512, 128, 128, 32), (1, 256, 512, 512, 32), (1, 128, 1024, 1024, 32), (4, 512, 64, 64, 32)]


def eager(x, groups, w, b):
    return F.silu(F.group_norm(x, groups, w, b, 1e-5))


def eager_rms(x, groups, w, b):
    """RMSNorm over the channels (dim 1, Qwen-Image's VAE) then SiLU, in plain torch (groups and b unused)."""
    return F.silu(x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + 1e-6) * w.view(1, -1, *([1] * (x.dim() - 2))))


# Our plain-torch ops (the CPU path before the C++ kernels; what "auto" falls back to), called directly.
TORCH_OPS = {
    "group_norm_silu": lambda x, g, w, b: torch.ops.fnf_kernels.group_norm_silu_torch(x, w, b, g, 1e-5, True)[0],
    "rms_norm_silu": lambda x, g, w, b: torch.ops.fnf_kernels.rms_norm_silu_torch(x, w, 1, 1e-6, True)[0]}
OPS = {"group_norm_silu": (eager, lambda be: lambda x, g, w, b: fnf_kernels.group_norm_silu(x, g, w, b, backend=be)),
       "rms_norm_silu": (eager_rms, lambda be: lambda x, g, w, b: fnf_kernels.rms_norm_silu(x, w, 1e-6, dim=1,
                                                                                               backend=be))}


def saved_bytes(fn, *args) -> int:
    """Bytes of the distinct storages autograd saves during fn(*args) (parameters excluded)."""
    seen: dict = {}
    params = {a.untyped_storage().data_ptr() for a in args[2:] if isinstance(a, torch.Tensor)}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return sum(seen.values())


def step(fn, x, groups, w, b, grad):
    def run():
        for t in (x, w, b):
            t.grad = None
        fn(x, groups, w, b).backward(grad)
    return run


def cpu_seconds(fn, min_run_time: float) -> float:
    """Median process CPU seconds (all threads) per call: on a shared machine the work done, not the waits."""
    fn()
    times, spent = [], 0.0
    while spent < min_run_time or len(times) < 5:
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
        spent += times[-1]
    return sorted(times)[len(times) // 2]


def bench_size(device, dtype, size, min_run_time, compiled, bw, op="group_norm_silu", timer=None):
    n, c, h, wd, groups = size
    base, ours_of = OPS[op]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, h, wd, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    w = torch.randn(c, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    b = torch.randn(c, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    grad = torch.randn(x.shape, generator=gen).to(device=device, dtype=dtype)
    row = dict(op=op, device=device, dtype=str(dtype).removeprefix("torch."), shape=[n, c, h, wd],
               groups=groups if op == "group_norm_silu" else None,
               tensor_mb=round(x.numel() * x.element_size() / 2**20, 1))
    candidates = {"eager": base}
    if compiled:
        candidates["compile"] = torch.compile(base)
    device_type = "cuda" if device == "cuda" else "cpu"
    table = backends.op_availability(op, device_type)
    for name in ("cuda", "triton", "cpu"):
        if table[name][0] and not (name == "cpu" and backends.cpu_is_torch(op)):
            candidates[f"ours[{name}]"] = ours_of(name)
    candidates["ours[torch]"] = TORCH_OPS[op]
    for name, fn in candidates.items():
        try:
            row[f"{name}_ms"] = (timer or timeit)(step(fn, x, groups, w, b, grad), min_run_time) * 1e3
        except Exception as exc:  # a backend that cannot run here: say why in the table
            row[f"{name}_ms"] = None
            row[f"{name}_error"] = f"{type(exc).__name__}: {str(exc)[:120]}"
    row["saved_mb_eager"] = round(saved_bytes(base, x, groups, w, b) / 2**20, 1)
    row["saved_mb_ours"] = round(saved_bytes(ours_of("auto"), x, groups, w, b) / 2**20, 3)
    ours = [k for k in candidates if k.startswith("ours") and row.get(f"{k}_ms")]
    if ours:
        best = min(ours, key=lambda k: row[f"{k}_ms"])
        row["best"] = best
        row["speedup_vs_eager"] = row["eager_ms"] / row[f"{best}_ms"]
        if "compile_ms" in row and row["compile_ms"]:
            row["speedup_vs_compile"] = row["compile_ms"] / row[f"{best}_ms"]
        if bw:
            moved = 5 * x.numel() * x.element_size()
            row["bytes_moved_mb"] = round(moved / 2**20, 1)
            row["limit_ms"] = moved / (bw * 1e9) * 1e3
            row["pct_of_bytes_limit"] = 100 * row["limit_ms"] / row[f"{best}_ms"]
    return row



def show(rows, bw):
    names = sorted({k[:-3] for r in rows for k in r if k.startswith("ours[") and k.endswith("_ms")})
    cols = ["eager ms", "compile ms"] + [f"{n} ms" for n in names] + ["best", "x eager", "x compile", "limit ms",
                                                                       "% limit"]
    print(f"\n{'op':15} {'device':6} {'dtype':8} {'shape':20} {'G':>3} {'MiB':>6} " + " ".join(f"{k:>16}" for k in cols)
          + f" {'saved MiB eager/ours':>22}")
    for r in rows:
        best = r.get("best")
        cells = [r.get("eager_ms"), r.get("compile_ms")] + [r.get(f"{n}_ms") for n in names]
        fmt = [f"{v:16.2f}" if isinstance(v, float) else f"{'-':>16}" for v in cells]
        fmt.append(f"{(best or '-'):>16}")
        for k in ("speedup_vs_eager", "speedup_vs_compile", "limit_ms", "pct_of_bytes_limit"):
            v = r.get(k)
            fmt.append(f"{v:16.2f}" if isinstance(v, float) else f"{'-':>16}")
        print(f"{r['op']:15} {r['device']:6} {r['dtype']:8} {str(tuple(r['shape'])):20} {r['groups'] or '-':>3} "
              f"{r['tensor_mb']:>6} " + " ".join(fmt) + f" {r['saved_mb_eager']:>10} / {r['saved_mb_ours']:<9}")
        for k, v in r.items():
            if k.endswith("_error"):
                print(f"    {k[:-6]}: {v}")
    if bw:
        print(f"copy bandwidth: {bw:.1f} GB/s (limit ms = 5 x tensor bytes at this rate)")


# ------------------------------------------------------------------ one decoder ResNet block under the storage counter
def _resnet_block(block, x, fused: bool):
    """diffusers' ResnetBlock2D (no temb, no shortcut) in bf16 as CUDA autocast runs it: group_norm in float32 (its
    input cast up), SiLU on that, conv in bf16 (its input cast down); ``fused`` replaces each GroupNorm -> SiLU."""
    h = x
    for norm, conv in ((block.norm1, block.conv1), (block.norm2, block.conv2)):
        if fused:
            h = fnf_kernels.group_norm_silu(h, norm.num_groups, norm.weight, norm.bias, norm.eps)
        else:
            h = F.silu(F.group_norm(h.float(), norm.num_groups, norm.weight.float(), norm.bias.float(), norm.eps))
        h = conv(h.to(x.dtype))
    return x + h


def resnet_memory(shape, fake: bool) -> dict:
    """Bytes the block holds for backward (live after forward, less what was live before) and the backward's peak
    above that baseline, eager vs fused, counted by fnf.memory.counter.StorageCounter (fake or real tensors)."""
    out = {}
    # The (small) parameters are real tensors built outside the counter: the same baseline for both paths.
    block = ResnetBlock2D(in_channels=shape[1], out_channels=shape[1], temb_channels=None, groups=32,
                          eps=1e-6).to(torch.bfloat16).requires_grad_(False)
    for fused in (False, True):
        fake_mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else torch.device("cpu")
        with fake_mode:
            counter = StorageCounter(scalar_answers=fake, round_to=1)
            with counter:
                x = torch.randn(shape, dtype=torch.bfloat16).requires_grad_()
                grad = torch.randn(shape, dtype=torch.bfloat16)
                base = counter.live
                y = _resnet_block(block, x, fused)
                held = counter.live - base - y.untyped_storage().nbytes()
                counter.peak = counter.live
                y.backward(grad)
                out["fused" if fused else "eager"] = dict(held=held, backward_peak=counter.peak - base)
                del y
    return out


def show_resnet(rows):
    print(f"\n{'ResNet block (bf16, autocast-style)':40} {'counted on':10} {'held eager':>12} {'held fused':>12} "
          f"{'bwd peak eager':>15} {'bwd peak fused':>15}  (MiB)")
    for shape, fake, r in rows:
        e, f = r["eager"], r["fused"]
        print(f"{str(tuple(shape)):40} {'fake' if fake else 'real':10} {e['held'] / 2**20:12.2f} "
              f"{f['held'] / 2**20:12.2f} {e['backward_peak'] / 2**20:15.2f} {f['backward_peak'] / 2**20:15.2f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    parser.add_argument("--dtype", action="append", choices=sorted(DTYPES), help="default: float32 on CPU, "
                        "bfloat16 and float32 on GPU")
    parser.add_argument("--min-run-time", type=float, default=1.0)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile column (GPU)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile on CPU (needs a C++ compiler)")
    parser.add_argument("--op", action="append", choices=sorted(OPS), help="default: both")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--cpu-time", action="store_true", help="CPU: time in process CPU seconds (all threads), "
                        "not wall clock: the work per step on a machine shared with other jobs")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--resnet-memory", action="store_true", help="only the saved-bytes count of one SD-style "
                        "decoder ResNet block (256 ch at 1024^2 on fake tensors; 64 ch at 64^2 fake and real)")
    args = parser.parse_args(argv)
    if args.resnet_memory:
        rows = [(s, fake, resnet_memory(s, fake)) for s, fake in (((1, 64, 64, 64), False), ((1, 64, 64, 64), True),
                                                                   ((1, 256, 1024, 1024), True))]
        show_resnet(rows)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    devices = [d for d in devices if d == "cpu" or torch.cuda.is_available()]
    header = (f"torch {torch.__version__}, python {platform.python_version()}, threads {torch.get_num_threads()}, "
              f"cpu {platform.processor() or platform.machine()}"
              + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))
    print(header)
    rows = []
    for device in devices:
        dtypes = args.dtype or (["float32"] if device == "cpu" else ["bfloat16", "float32"])
        if args.cpu_time and device == "cpu":  # the same clock for the limit: bytes per CPU second of a copy
            src = torch.empty((1 << 27) // 4)
            dst = torch.empty_like(src)
            bw = 2 * src.numel() * 4 / cpu_seconds(lambda: dst.copy_(src), 0.5) / 1e9
        else:
            bw = copy_bandwidth(device)
        sizes = GPU_SIZES if device == "cuda" else CPU_SIZES
        compiled = (not args.no_compile and device == "cuda") or (args.compile and device == "cpu")
        for op in args.op or list(OPS):
            for dt in dtypes:
                for size in sizes:
                    timer = cpu_seconds if (args.cpu_time and device == "cpu") else None
                    rows.append(bench_size(device, DTYPES[dt], size, args.min_run_time, compiled, bw, op, timer))
                    rows[-1].update(copy_bandwidth_gbs=round(bw, 2), clock="process CPU time" if timer else "wall")
                    if args.json:  # after every row: a run stopped by a time budget keeps what it measured
                        with open(args.json, "w") as f:
                            json.dump(dict(environment=header, command="python " + " ".join(sys.argv),
                                           commit=os.environ.get("FNF_COMMIT") or _commit(), rows=rows), f, indent=1)
        show([r for r in rows if r["device"] == device], bw)


def _commit() -> str:
    try:
        import subprocess
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


if __name__ == "__main__":
    main()
