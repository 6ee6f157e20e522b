"""The VAE decoder's training step with and without ``memory.fused_norm``, on fake and on real CPU tensors, counted
by fnf.memory's storage counter (issue 26, item 5: the estimate of the fused op equals reality).

    python benchmarks/fused_norm_vs_real_cpu.py --arch sd15 --size 512 --json out.json
    python benchmarks/fused_norm_vs_real_cpu.py --arch sdxl --size 1024 --dtype bf16 --fake-only

The step is the part of a Focus-N-Fix step the lever changes: decode a grad-carrying latent (random, as the last
denoiser step leaves it) through the architecture's VAE (random weights, frozen) with fnf's default decoder levers
(``memory.vae_checkpointing: resnet``, no tiles), a reward stand-in (the mean square of the float32 image) and its
backward to the latent. Both traces imitate CUDA as ``fnf estimate-memory`` does (cuda_rules: autocast fp32 ops,
512-byte rounding), so the fake and real numbers differ only by what fake tensors get wrong. fp32 by default (bf16
is emulated on this AVX2-only CPU and far slower); ``--dtype bf16`` is the trainer's GPU setting (bf16 VAE, bf16
autocast: CUDA runs group_norm in float32, where the unfused pairs hold three float32 tensors).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import re
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

GIB = 2 ** 30


def build_vae(arch: str, dtype: torch.dtype):
    from diffusers import AutoencoderKL

    from fnf.memory.archs import ARCHS

    cls, cfg = ARCHS[arch]["components"]["vae"]
    if cls != "AutoencoderKL":
        raise ValueError(f"--arch: {arch}'s VAE is {cls}; this script builds AutoencoderKL")
    return AutoencoderKL(**copy.deepcopy(cfg)).to(dtype).requires_grad_(False)


UNIT = re.compile(r"^(conv_in|conv_norm_out|conv_out|mid_block\.(resnets|attentions)\.\d+|"
                  r"up_blocks\.\d+\.(resnets|upsamplers)\.\d+)$")


def label_units(vae, counter) -> list:
    """Label allocations by the decoder unit (ResNet, upsampler, attention, tail) last entered, in the forward and
    in its checkpoint recomputation during backward: ``<phase>: <unit>``. Returns the hook handles."""
    def pre(_module, _args, name):
        counter.phase_name = f"{counter.phase_name.split(': ')[0]}: {name}"

    # every module inside a unit: a checkpoint's recomputation calls the unit's class forward, not its hooks
    return [sub.register_forward_pre_hook(lambda mod, args, name=name: pre(mod, args, name))
            for name, m in vae.decoder.named_modules() if UNIT.match(name) for sub in m.modules()]


def trace(arch: str, size: int, dtype: str, fused: str, fake: bool, by_unit: bool = False) -> dict:
    """Peak bytes of decode + reward + backward, by phase (weights registered first); ``by_unit``: the decode
    and backward phases split by decoder unit (label_units)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fnf.memory import cuda_rules
    from fnf.memory.counter import StorageCounter
    from fnf.memory.estimate import _fake_module_moves
    from fnf.train import vae_memory

    torch.manual_seed(0)
    half = dtype == "bf16"
    wdtype = torch.bfloat16 if half else torch.float32
    began = time.time()
    with contextlib.ExitStack() as stack:
        stack.enter_context(_fake_module_moves())
        stack.enter_context(FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext())
        vae = build_vae(arch, wdtype)
        lever = vae_memory.apply(vae, "resnet", 0, fused)
        counter = stack.enter_context(StorageCounter(scalar_answers=fake))
        stack.enter_context(cuda_rules.CudaRules())
        counter.register([*vae.parameters(), *vae.buffers()], "weights (frozen)")
        stack.enter_context(torch.autocast("cpu", dtype=torch.bfloat16, enabled=half))
        with counter.phase("latent"):
            z = torch.randn(1, vae.config.latent_channels, size // 8, size // 8, dtype=wdtype).requires_grad_(True)
        if by_unit:
            label_units(vae, counter)
        with counter.phase("VAE decode"):
            image = vae.decode(z / vae.config.scaling_factor, return_dict=False)[0]
        with counter.phase("reward"):
            loss = image.float().square().mean()
        with counter.phase("backward"):
            loss.backward()
        grad_sum = None if fake else float(z.grad.double().abs().sum())
        peak, phase, held = counter.peak, counter.peak_phase, dict(counter.peak_by_phase)
        del image, loss, z, vae
    return {"peak_bytes": peak, "peak_gib": peak / GIB, "peak_phase": phase,
            "held_at_peak_gib": {k: v / GIB for k, v in sorted(held.items(), key=lambda kv: -kv[1])},
            "seconds": round(time.time() - began, 1), "fused_norm": lever, "latent_grad_abs_sum": grad_sum}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="sd15")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--fake-only", action="store_true", help="only the fake-tensor traces (no compute)")
    p.add_argument("--by-unit", action="store_true", help="split the held bytes by decoder unit (ResNet, ...)")
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    out = {"arch": args.arch, "size": args.size, "dtype": args.dtype, "torch": torch.__version__,
           "command": "python benchmarks/fused_norm_vs_real_cpu.py " + " ".join(argv or sys.argv[1:]),
           "step": "VAE decode (memory.vae_checkpointing=resnet, no tiles) + mean-square reward + backward to the "
                   "latent; weights frozen, random", "runs": {}}
    for fused in ("off", "on"):
        for name, fake in (("estimate (fake tensors)", True), ("real CPU tensors", False)):
            if args.fake_only and not fake:
                continue
            r = trace(args.arch, args.size, args.dtype, fused, fake, args.by_unit)
            out["runs"][f"fused_norm={fused}, {name}"] = r
            print(f"fused_norm={fused:3s} {name:24s}: {r['peak_gib']:.4f} GiB ({r['peak_bytes']} B), peak in "
                  f"{r['peak_phase']}, {r['seconds']:.0f} s", flush=True)
        if not args.fake_only:
            a = out["runs"][f"fused_norm={fused}, estimate (fake tensors)"]["peak_bytes"]
            b = out["runs"][f"fused_norm={fused}, real CPU tensors"]["peak_bytes"]
            out[f"fused_norm={fused}: estimate - real (B)"] = a - b
            print(f"fused_norm={fused}: estimate - real = {a - b} B")
    kind = "real CPU tensors" if not args.fake_only else "estimate (fake tensors)"
    off, on = (out["runs"][f"fused_norm={f}, {kind}"]["peak_bytes"] for f in ("off", "on"))
    out["saved_gib"] = (off - on) / GIB
    print(f"fused_norm on saves {(off - on) / GIB:.3f} GiB of {off / GIB:.3f} ({kind})")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
