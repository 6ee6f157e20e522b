"""memory.fused_lora's batching: the no-grad part of one training micro-batch, batched vs two passes.

    python benchmarks/bench_trainer_batching.py --preset tiny                  # CPU: a small UNet, float32
    python benchmarks/bench_trainer_batching.py --preset sd15 --dtype bfloat16  # GPU: SD-1.5 UNet, 512²

Per micro-batch the trainer denoises, without gradient, all T steps of I0 (the pretrained trajectory) and the
first T - K steps of the fine-tuned one (all T with DRaFT-LV); only that part is timed here (the K grad
steps, decodes and reward are the same on both paths). Rows:

* two passes, peft: today's path (memory.fused_lora=off): I0 with adapters disabled, then I's no-grad steps;
* two passes, patch_lora: the fused LoRA kernels without batching (I0 at LoRA scale 0, I at 1), to separate
  the kernel gain from the batching gain;
* one batch, patch_lora: memory.fused_lora=on (``fnf.sampling.denoise_batched``): T - K steps with the I0
  and I rows in one UNet call, then I0's last K steps alone.

The UNet is a diffusers UNet2DConditionModel with random weights and a peft LoRA (non-zero B) on
to_q/to_k/to_v/to_out.0, built from ``--preset`` (sd15: SD-1.5's architecture; tiny: the same layout scaled
down for CPU) with every size overridable; text embeddings are random. Like the trainer, half-precision
weights run under autocast with float32 LoRA parameters. Nothing is downloaded.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PRESETS = {
    # SD-1.5 (runwayml/stable-diffusion-v1-5 unet/config.json), 512² images -> 64² latents
    "sd15": dict(channels=[320, 640, 1280, 1280], layers_per_block=2, cross_attention_dim=768, heads=8,
                 resolution=512, text_len=77, rank=64),
    # the same four-level layout, small enough for 2 CPU cores (rank 8: about SD's rank-64 / 320 ratio)
    "tiny": dict(channels=[32, 64, 128, 128], layers_per_block=1, cross_attention_dim=64, heads=4,
                 resolution=128, text_len=77, rank=8),
}


def build_model(args, device, dtype):
    """A DiffusionModel (UNet + DDIM scheduler; no VAE / text encoder) with a LoRA and random weights."""
    import peft
    from diffusers import DDIMScheduler, UNet2DConditionModel

    from fnf.core import DiffusionModel
    from fnf.families import family_by_name

    torch.manual_seed(0)
    n = len(args.channels)
    unet = UNet2DConditionModel(
        sample_size=args.resolution // 8, in_channels=4, out_channels=4, layers_per_block=args.layers_per_block,
        block_out_channels=tuple(args.channels),
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        cross_attention_dim=args.cross_attention_dim, attention_head_dim=args.heads)
    unet.requires_grad_(False)
    unet.add_adapter(peft.LoraConfig(r=args.rank, lora_alpha=args.rank, lora_dropout=0.0,
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    unet.to(device).eval()
    if dtype != torch.float32:
        unet.to(dtype)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_" in name:
                p.data = p.data.float()  # the trainer keeps LoRA parameters in float32
                if "lora_B" in name:
                    p.normal_(0, 0.02)
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    return DiffusionModel(path="", family=family_by_name("sd"), denoiser=unet, vae=None, scheduler=sched)


def timed(paths, device, repeats: int) -> tuple[list[float], list[float]]:
    """Median wall-clock and process-CPU seconds of each (setup, fn) in ``paths``: one warm-up run each, then
    ``repeats`` rounds that run every path once in turn (drift on a shared machine hits all paths alike).

    On a CPU shared with other jobs the process CPU time (with --threads 1) is the steadier number."""
    def run(setup, fn):
        setup()
        if device.type == "cuda":
            torch.cuda.synchronize()
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - w0, time.process_time() - c0

    for setup, fn in paths:
        run(setup, fn)
    rounds = [[run(setup, fn) for setup, fn in paths] for _ in range(repeats)]
    wall = [statistics.median(r[i][0] for r in rounds) for i in range(len(paths))]
    cpu = [statistics.median(r[i][1] for r in rounds) for i in range(len(paths))]
    return wall, cpu


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="UNet size (default: sd15 on CUDA, tiny on CPU)")
    parser.add_argument("--channels", type=int, nargs="+", help="block_out_channels (overrides the preset)")
    parser.add_argument("--layers-per-block", type=int)
    parser.add_argument("--cross-attention-dim", type=int)
    parser.add_argument("--heads", type=int, help="attention heads (diffusers' attention_head_dim for SD-1.x)")
    parser.add_argument("--resolution", type=int, help="image side in pixels (latents are 1/8)")
    parser.add_argument("--text-len", type=int, help="prompt tokens")
    parser.add_argument("--rank", type=int, help="LoRA rank (sd15 preset: 64, as Focus-N-Fix; tiny: 8)")
    parser.add_argument("--batch", type=int, default=1, help="images per micro-batch (train.batch_size)")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps T")
    parser.add_argument("--k", type=int, default=2, help="DRaFT-K grad steps (not timed; they shorten the shared part)")
    parser.add_argument("--lv", type=int, default=0, help="DRaFT-LV copies (> 0: all T steps are shared)")
    parser.add_argument("--guidance", type=float, default=7.5, help="CFG scale (<= 1: no CFG)")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                        help="UNet weight dtype (default: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (each runs every path once)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    parser.add_argument("--json", default="", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    preset = PRESETS[args.preset or ("sd15" if device.type == "cuda" else "tiny")]
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))

    from fnf_kernels import lora_scale, patch_lora, unpatch_lora
    from fnf.core import PromptEmbeds
    from fnf.lora import adapters_disabled
    from fnf.sampling import denoise_batched, grad_start, run_steps, schedule, uses_cfg

    m = build_model(args, device, dtype)
    gen = torch.Generator().manual_seed(0)
    b = args.batch
    x_T = torch.randn(b, 4, args.resolution // 8, args.resolution // 8, generator=gen).to(device)
    cond = PromptEmbeds(torch.randn(b, args.text_len, args.cross_attention_dim, generator=gen).to(device))
    uncond = PromptEmbeds(torch.randn(b, args.text_len, args.cross_attention_dim, generator=gen).to(device))
    T, shared = args.steps, grad_start(args.steps, args.k, args.lv)
    plan = schedule(m, T, args.resolution, args.resolution, device)
    kw = dict(guidance_scale=args.guidance)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def ft_prefix():
        return run_steps(m, x_T, plan, cond, uncond, stop=shared, guidance_scale=args.guidance)

    @torch.no_grad()
    def two_passes_peft():
        with autocast:
            with adapters_disabled(m.denoiser):
                z_ref = run_steps(m, x_T, plan, cond, uncond, **kw)
            return z_ref, ft_prefix()

    @torch.no_grad()
    def two_passes_fused():
        with autocast:
            with lora_scale(m.denoiser, 0.0):
                z_ref = run_steps(m, x_T, plan, cond, uncond, **kw)
            return z_ref, ft_prefix()

    @torch.no_grad()
    def one_batch():
        with autocast:
            return denoise_batched(m, x_T, plan, cond, uncond, shared=shared, **kw)

    def peft():
        unpatch_lora(m.denoiser)

    def fused():
        patch_lora(m.denoiser)

    rows = [  # label, setup, fn, UNet calls, images per call
        ("two passes, peft (memory.fused_lora=off)", peft, two_passes_peft, f"{T} + {shared}", f"{b}"),
        ("two passes, patch_lora (fused kernels, no batching)", fused, two_passes_fused, f"{T} + {shared}", f"{b}"),
        ("one batch, patch_lora (memory.fused_lora=on)", fused, one_batch, f"{shared} batched + {T - shared}",
         f"{2 * b} (then {b})"),
    ]
    outputs = []
    for _, setup, fn, _, _ in rows:  # the paths agree (a broken path would not be worth timing)
        setup()
        outputs.append(fn())
    wall, cpu = timed([(setup, fn) for _, setup, fn, _, _ in rows], device, args.repeats)

    cfg = uses_cfg(uncond, args.guidance)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} thread(s)"
    print(f"\n### No-grad part of one micro-batch: I0 ({T} steps) + fine-tuned ({shared} of {T} steps)\n")
    print(f"{where}; torch {torch.__version__}; {str(dtype).replace('torch.', '')}; UNet channels {args.channels}, "
          f"{args.layers_per_block} layer(s)/block, {args.resolution}² ({args.resolution // 8}² latents); "
          f"LoRA rank {args.rank}; batch {b}; CFG {'on (x2 UNet rows)' if cfg else 'off'}; K={args.k}, "
          f"LV={args.lv}; median of {args.repeats}\n")
    print("| path | UNet calls | images per call | wall s | speedup (wall) | process CPU s | speedup (CPU) | "
          "max abs diff of (z_ref, x_ft) vs peft |")
    print("|---|---|---|---|---|---|---|---|")
    for i, (label, _, _, calls, per_call) in enumerate(rows):
        diff = max((a.float() - r.float()).abs().max().item() for a, r in zip(outputs[i], outputs[0]))
        print(f"| {label} | {calls} | {per_call} | {wall[i]:.3f} | {wall[0] / wall[i]:.2f}x | {cpu[i]:.3f} | "
              f"{cpu[0] / cpu[i]:.2f}x | {diff:.1e} |")
    if args.json:
        import json

        import provenance
        meta = {"benchmark": "bench_trainer_batching", "device": where, **provenance.stamp(argv),
                "dtype": str(dtype).replace("torch.", ""), "resolution": args.resolution, "rank": args.rank,
                "batch": b, "steps": T, "k": args.k, "lv": args.lv, "guidance": args.guidance,
                "channels": list(args.channels)}
        with open(args.json, "w") as f:
            json.dump([{**meta, "provider": label, "wall_s": wall[i], "cpu_s": cpu[i],
                        "speedup_wall": wall[0] / wall[i]} for i, (label, *_rest) in enumerate(rows)], f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
