"""One real training step of a named architecture (random weights, real CPU tensors) counted by fnf.memory's
storage counter, next to the fake-tensor estimate of the same step (issue 12, deliverable 3).

    python benchmarks/estimate_vs_real_cpu.py --arch sd15 --forward-only   # time one UNet forward first
    python benchmarks/estimate_vs_real_cpu.py --arch sd15                  # fake estimate, then the real step

Both traces imitate CUDA (autocast fp32 ops, attention backend, foreach AdamW, 512-byte rounding), so the two
numbers differ only by what fake tensors get wrong. fp32 weights by default (bf16 on a CPU without AVX512-BF16
is emulated and far slower); the settings are RESULTS.md's ladder settings otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def settings(dtype: str) -> list[str]:
    mp = "no" if dtype == "fp32" else dtype
    return [f"model.weight_dtype={dtype}", f"memory.mixed_precision={mp}", "localize.spec=saliency",
            "lora.rank=64", "lora.alpha=64", "sampling.truncation_k=2", "sampling.guidance_scale=7.5",
            "train.prompts=[a photo of a person]"]


def time_forward(spec: dict, dtype: str, size: int) -> float:
    from fnf.memory.estimate import build_model

    model = build_model(spec, dtype)
    unet = model.denoiser
    latent = size // 8
    x = torch.randn(2, unet.config.in_channels, latent, latent, dtype=unet.dtype)
    ctx = torch.randn(2, 77, unet.config.cross_attention_dim, dtype=unet.dtype)
    began = time.time()
    with torch.no_grad():
        unet(x, torch.tensor([500, 500]), encoder_hidden_states=ctx)
    return time.time() - began


def main(argv=None) -> int:
    from fnf import config
    from fnf.memory.estimate import GIB, REWARD_STAND_INS, model_spec, run_trace, trace_config

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="sd15")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--forward-only", action="store_true", help="only time one no-grad UNet forward (batch 2)")
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    spec = model_spec(arch=args.arch)
    if args.forward_only:
        print(f"one UNet forward, batch 2, {args.size}², {args.dtype}: {time_forward(spec, args.dtype, args.size):.1f} s")
        return 0
    cfg = config.load(None, settings(args.dtype))
    cfg.reward.spec, cfg.reward.kwargs = REWARD_STAND_INS["clip-l14"], {"dtype": args.dtype}
    cfg = trace_config(cfg, args.size, args.size)
    out = {"arch": args.arch, "size": args.size, "dtype": args.dtype, "torch": torch.__version__}
    for name, fake in (("estimate (fake tensors)", True), ("real CPU tensors", False)):
        torch.manual_seed(0)
        est = run_trace(cfg, spec, fake=fake)
        out[name] = {"peak_gib": est.peak_bytes / GIB, "peak_bytes": est.peak_bytes, "peak_phase": est.peak_phase,
                     "held_at_peak_gib": {k: v / GIB for k, v in est.held_at_peak.items()},
                     "seconds": est.trace_seconds}
        print(f"{name}: {est.peak_bytes / GIB:.4f} GiB ({est.peak_bytes} B), peak in {est.peak_phase}, "
              f"{est.trace_seconds:.0f} s", flush=True)
    a, b = out["estimate (fake tensors)"]["peak_bytes"], out["real CPU tensors"]["peak_bytes"]
    out["relative_difference"] = (a - b) / b
    print(f"estimate - real: {a - b} B ({100 * (a - b) / b:+.3f}%)")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
