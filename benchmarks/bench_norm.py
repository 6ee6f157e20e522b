"""group_norm_silu forward + backward against eager GroupNorm + SiLU (torch.compile and each of our backends on GPU).

    python benchmarks/bench_norm.py                      # CPU (and GPU when present), default sizes
    python benchmarks/bench_norm.py --device cuda --json benchmarks/results/norm.json

``--resnet-memory`` instead counts, with fnf.memory.counter.StorageCounter, what one SD-style decoder ResNet block holds
for backward, eager (autocast-style float32 group norm) vs fused, on real and fake tensors.

Per size and dtype: median time of one forward + backward (x, weight and bias require grad), the ratio eager / ours,
the bytes autograd saves between forward and backward (what the fused op exists for), and on GPU the achieved
GB/s of the bytes that must move at least once (forward reads x and writes out, backward reads x and the gradient
and writes dx: 5 x bytes) as a % of the measured copy bandwidth. Nothing here is asserted.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys

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


def bench_size(device, dtype, size, min_run_time, compiled, bw):
    n, c, h, wd, groups = size
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, h, wd, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    w = torch.randn(c, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    b = torch.randn(c, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    grad = torch.randn(x.shape, generator=gen).to(device=device, dtype=dtype)
    row = dict(device=device, dtype=str(dtype).removeprefix("torch."), shape=[n, c, h, wd], groups=groups,
               tensor_mb=round(x.numel() * x.element_size() / 2**20, 1))
    candidates = {"eager": eager}
    if compiled:
        candidates["compile"] = torch.compile(eager)
    table = backends.op_availability("group_norm_silu", "cuda" if device == "cuda" else "cpu")
    for name in ("cuda", "triton", "cpu"):
        if table[name][0]:
            candidates[f"ours[{name}]"] = (lambda be: lambda x, g, w, b: fnf_kernels.group_norm_silu(
                x, g, w, b, backend=be))(name)
    for name, fn in candidates.items():
        try:
            row[f"{name}_ms"] = timeit(step(fn, x, groups, w, b, grad), min_run_time) * 1e3
        except Exception as exc:  # a backend that cannot run here: say why in the table
            row[f"{name}_ms"] = None
            row[f"{name}_error"] = f"{type(exc).__name__}: {str(exc)[:120]}"
    row["saved_mb_eager"] = round(saved_bytes(eager, x, groups, w, b) / 2**20, 1)
    row["saved_mb_ours"] = round(saved_bytes(fnf_kernels.group_norm_silu, x, groups, w, b) / 2**20, 3)
    ours = [k for k in candidates if k.startswith("ours") and row.get(f"{k}_ms")]
    if ours:
        best = min(ours, key=lambda k: row[f"{k}_ms"])
        row["best"] = best
        row["speedup_vs_eager"] = row["eager_ms"] / row[f"{best}_ms"]
        if "compile_ms" in row and row["compile_ms"]:
            row["speedup_vs_compile"] = row["compile_ms"] / row[f"{best}_ms"]
        if bw:
            moved = 5 * x.numel() * x.element_size()
            row["pct_of_bytes_limit"] = 100 * moved / (row[f"{best}_ms"] / 1e3) / 1e9 / bw
    return row


def show(rows, bw):
    print(f"\n{'device':6} {'dtype':8} {'shape':22} {'G':>3} {'MiB':>6} " + " ".join(
        f"{k:>13}" for k in ("eager ms", "compile ms", "ours ms", "best", "x eager", "x compile", "% bytes lim"))
        + f" {'saved MiB eager/ours':>22}")
    for r in rows:
        best = r.get("best")
        cells = [r.get("eager_ms"), r.get("compile_ms"), r.get(f"{best}_ms") if best else None]
        fmt = [f"{v:13.2f}" if isinstance(v, float) else f"{'-':>13}" for v in cells]
        fmt.append(f"{(best or '-'):>13}")
        for k in ("speedup_vs_eager", "speedup_vs_compile", "pct_of_bytes_limit"):
            v = r.get(k)
            fmt.append(f"{v:13.2f}" if isinstance(v, float) else f"{'-':>13}")
        print(f"{r['device']:6} {r['dtype']:8} {str(tuple(r['shape'])):22} {r['groups']:>3} {r['tensor_mb']:>6} "
              + " ".join(fmt) + f" {r['saved_mb_eager']:>10} / {r['saved_mb_ours']:<9}")
        for k, v in r.items():
            if k.endswith("_error"):
                print(f"    {k[:-6]}: {v}")
    if bw:
        print(f"copy bandwidth: {bw:.0f} GB/s")


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
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--resnet-memory", action="store_true", help="only the saved-bytes count of one SD-style "
                        "decoder ResNet block (256 ch at 1024^2 on fake tensors; 64 ch at 64^2 fake and real)")
    args = parser.parse_args(argv)
    if args.resnet_memory:
        rows = [(s, fake, resnet_memory(s, fake)) for s, fake in (((1, 64, 64, 64), False), ((1, 64, 64, 64), True),
                                                                   ((1, 256, 1024, 1024), True))]
        show_resnet(rows)
        return
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    devices = [d for d in devices if d == "cpu" or torch.cuda.is_available()]
    print(f"torch {torch.__version__}, python {platform.python_version()}, threads {torch.get_num_threads()}"
          + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))
    rows = []
    for device in devices:
        dtypes = args.dtype or (["float32"] if device == "cpu" else ["bfloat16", "float32"])
        bw = copy_bandwidth(device) if device == "cuda" else None
        sizes = GPU_SIZES if device == "cuda" else CPU_SIZES
        compiled = not args.no_compile and device == "cuda"
        for dt in dtypes:
            for size in sizes:
                rows.append(bench_size(device, DTYPES[dt], size, args.min_run_time, compiled, bw))
        show([r for r in rows if r["device"] == device], bw)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
