"""Benchmark table for lora_linear and the fused LoRA attention (GPU only; bf16 by default).

    python benchmarks/bench_lora.py                     # all sections
    python benchmarks/bench_lora.py --sections linear --ranks 4 16 64
    python benchmarks/bench_lora.py --sections unet --unet-batch 2 --resolution 512

Sections:

* ``linear``: forward+backward (x, A, B need grad; W frozen) of the SD attention projections — base linear alone,
  peft's LoRA Linear, and lora_linear (Triton) with x Aᵀ computed in a kernel before the main GEMM ("sep") and
  inside it ("in-kernel"), plus the forward alone. Overheads are over the base linear measured in the same run;
  goals: fused overhead <= 15 %, >= 1.3x faster than peft.
* ``unet``: one training step (forward + backward, LoRA rank 64 on to_q/k/v/out.0) of an SD-1.5-size UNet with
  random weights: peft + SDPA vs patch_lora (+ xformers when installed); goal >= 1.15x.
* ``batch``: a no-grad UNet step on one batch of 2b rows (scale 0 | 1, lora_scale) vs two passes of b rows (the
  trainer's I0 + fine-tuned denoising steps, issue item 3).

Prints markdown tables (paste into benchmarks/RESULTS.md). Exits 0 with a message when CUDA is missing.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

RECORDS: list[dict] = []   # every measurement, for --json


def record(section: str, op: str, shape: str, dtype, provider: str, ms: float, **extra) -> None:
    RECORDS.append({"benchmark": "bench_lora", "section": section, "op": op, "shape": shape,
                    "dtype": str(dtype).replace("torch.", ""), "provider": provider, "ms": round(ms, 5), **extra})

SHAPES = [  # (label, rows M, in K, out N)
    ("64² self-attn (2·4096, 320)→320", 2 * 4096, 320, 320),
    ("32² self-attn (2·1024, 640)→640", 2 * 1024, 640, 640),
    ("16² self-attn (2·256, 1280)→1280", 2 * 256, 1280, 1280),
    ("cross-attn k/v (2·77, 768)→320", 2 * 77, 768, 320),
    ("cross-attn k/v (2·77, 768)→1280", 2 * 77, 768, 1280),
]


def bench(fn, rep_ms: int = 200) -> float:
    """Median milliseconds per call (triton.testing.do_bench: CUDA events, L2 flushed between calls)."""
    import triton.testing
    return triton.testing.do_bench(fn, warmup=50, rep=rep_ms, return_mode="median")


def _peft_layer(k, n, r, dtype):
    import peft
    model = torch.nn.Sequential()
    model.add_module("proj", torch.nn.Linear(k, n, bias=False))
    model = peft.inject_adapter_in_model(peft.LoraConfig(r=r, lora_alpha=r, target_modules=["proj"]), model)
    layer = model.proj.to(device="cuda", dtype=dtype)
    layer.base_layer.requires_grad_(False)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.02)
    return layer


def section_linear(ranks, dtype) -> None:
    from fnf_kernels import lora_linear
    from fnf_kernels.triton_kernels import lora_linear as tk

    print(f"\n### lora_linear forward+backward, {str(dtype).replace('torch.', '')}, "
          f"{torch.cuda.get_device_name()}\n")
    print("| shape | r | base ms | peft ms | fused ms (sep) | fused ms (in-kernel) | peft overhead | "
          "fused overhead | speedup vs peft | fwd: base / peft / fused ms | max err vs peft |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for label, m, k, n in SHAPES:
        for r in ranks:
            torch.manual_seed(0)
            layer = _peft_layer(k, n, r, dtype)
            w = layer.base_layer.weight
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            s = layer.scaling["default"]
            x = torch.randn(m, k, device="cuda", dtype=dtype, requires_grad=True)
            g = torch.randn(m, n, device="cuda", dtype=dtype)

            def base_step():
                F.linear(x, w).backward(g)

            def peft_step():
                layer(x).backward(g)

            def fused_step():
                lora_linear(x, w, None, a, b, s).backward(g)

            t_base, t_peft = bench(base_step), bench(peft_step)
            times = {}
            for mode in ("separate", "fused"):
                tk._OVERRIDE["down"] = mode
                times[mode] = bench(fused_step)
            tk._OVERRIDE.clear()
            with torch.no_grad():
                f_base = bench(lambda: F.linear(x, w))
                f_peft = bench(lambda: layer(x))
                f_fused = bench(lambda: lora_linear(x, w, None, a, b, s))
                err = (lora_linear(x, w, None, a, b, s).float() - layer(x).float()).abs().max().item()
            best = min(times.values())
            for prov, ms in (("base linear", t_base), ("peft", t_peft), ("fused sep", times["separate"]),
                             ("fused in-kernel", times["fused"])):
                record("linear", "fwd+bwd", f"{m}x{k}->{n}", dtype, prov, ms, rank=r)
            for prov, ms in (("base linear", f_base), ("peft", f_peft), ("fused", f_fused)):
                record("linear", "fwd", f"{m}x{k}->{n}", dtype, prov, ms, rank=r)
            print(f"| {label} | {r} | {t_base:.3f} | {t_peft:.3f} | {times['separate']:.3f} | {times['fused']:.3f} | "
                  f"{100 * (t_peft / t_base - 1):+.0f} % | {100 * (best / t_base - 1):+.0f} % | "
                  f"{t_peft / best:.2f}x | {f_base:.3f} / {f_peft:.3f} / {f_fused:.3f} | {err:.2e} |")


def sd15_unet(dtype, rank):
    from diffusers import UNet2DConditionModel
    import peft
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768, attention_head_dim=8)
    unet.requires_grad_(False)
    unet.add_adapter(peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                     init_lora_weights="gaussian"))
    return unet.to(device="cuda", dtype=dtype)


def section_unet(rank, batch, resolution, dtype) -> None:
    from diffusers.models.attention_processor import AttnProcessor2_0, XFormersAttnProcessor
    from fnf_kernels import patch_lora, unpatch_lora

    unet = sd15_unet(dtype, rank)
    h = resolution // 8
    x = torch.randn(batch, 4, h, h, device="cuda", dtype=dtype)
    t = torch.full((batch,), 500, device="cuda")
    ehs = torch.randn(batch, 77, 768, device="cuda", dtype=dtype)

    def step():
        unet(x, t, ehs).sample.float().pow(2).mean().backward()

    rows = []
    unet.set_attn_processor(AttnProcessor2_0())
    rows.append(("peft + SDPA", bench(step, 1000)))
    try:
        import xformers  # noqa: F401
        unet.set_attn_processor(XFormersAttnProcessor())
        rows.append(("peft + xformers", bench(step, 1000)))
        unet.set_attn_processor(AttnProcessor2_0())
    except ImportError:
        pass
    patch_lora(unet)
    rows.append(("patch_lora (fused LoRA, SDPA)", bench(step, 1000)))
    unpatch_lora(unet)
    try:
        import xformers  # noqa: F401
        patch_lora(unet, attention="xformers")
        rows.append(("patch_lora (fused LoRA, xformers)", bench(step, 1000)))
        unpatch_lora(unet)
    except ImportError:
        pass
    print(f"\n### SD-1.5-size UNet training step (fwd+bwd), rank {rank}, batch {batch}, {resolution}², "
          f"{str(dtype).replace('torch.', '')}\n")
    print("| path | ms / step | speedup vs peft + SDPA |")
    print("|---|---|---|")
    for name, ms in rows:
        print(f"| {name} | {ms:.1f} | {rows[0][1] / ms:.2f}x |")
        record("unet", "train step", f"sd15 b{batch} {resolution}", dtype, name, ms, rank=rank)


def section_batch(rank, batch, resolution, dtype) -> None:
    from fnf_kernels import lora_scale, patch_lora, trajectory_scale

    unet = sd15_unet(dtype, rank)
    h = resolution // 8
    x = torch.randn(batch, 4, h, h, device="cuda", dtype=dtype)
    t = torch.full((batch,), 500, device="cuda")
    ehs = torch.randn(batch, 77, 768, device="cuda", dtype=dtype)
    x2, t2, ehs2 = torch.cat([x, x]), torch.cat([t, t]), torch.cat([ehs, ehs])

    @torch.no_grad()
    def two_passes_peft():
        unet.disable_adapters()
        unet(x, t, ehs)
        unet.enable_adapters()
        unet(x, t, ehs)

    t_peft = bench(two_passes_peft, 1000)
    patch_lora(unet)
    scale = trajectory_scale(batch, batch, device="cuda")

    @torch.no_grad()
    def two_passes_fused():
        with lora_scale(unet, 0.0):
            unet(x, t, ehs)
        unet(x, t, ehs)

    @torch.no_grad()
    def one_batch():
        with lora_scale(unet, scale):
            unet(x2, t2, ehs2)

    t_two, t_one = bench(two_passes_fused, 1000), bench(one_batch, 1000)
    print(f"\n### no-grad denoising step, I0 + fine-tuned trajectories of {batch} rows each, rank {rank}, "
          f"{resolution}²\n")
    print("| path | ms | speedup vs two peft passes |")
    print("|---|---|---|")
    for name, ms in (("two passes, peft (disable_adapters / enable)", t_peft),
                     ("two passes, patch_lora (scale 0 / 1)", t_two),
                     ("one batch of 2b rows, patch_lora + lora_scale([0]*b + [1]*b)", t_one)):
        print(f"| {name} | {ms:.1f} | {t_peft / ms:.2f}x |")
        record("batch", "no-grad step", f"sd15 b{batch} {resolution}", dtype, name, ms, rank=rank)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", nargs="+", default=["linear", "unet", "batch"],
                        choices=["linear", "unet", "batch"])
    parser.add_argument("--ranks", nargs="+", type=int, default=[4, 16, 64])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--unet-rank", type=int, default=64)
    parser.add_argument("--unet-batch", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--json", default="", help="also write every measurement to this JSON file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_lora: no CUDA device; these benchmarks are GPU-only (skipped).")
        return 0
    dtype = getattr(torch, args.dtype)
    if "linear" in args.sections:
        section_linear(args.ranks, dtype)
    if "unet" in args.sections:
        section_unet(args.unet_rank, args.unet_batch, args.resolution, dtype)
    if "batch" in args.sections:
        section_batch(args.unet_rank, args.unet_batch, args.resolution, dtype)
    if args.json:
        import json

        import provenance
        meta = {"device": torch.cuda.get_device_name(), **provenance.stamp(argv)}
        with open(args.json, "w") as f:
            json.dump([{**meta, **r} for r in RECORDS], f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
