"""Estimate (fnf estimate-memory's trace) of a memory lever the trainer does not have yet: per-ResNet activation
checkpointing of the VAE decoder, instead of diffusers' ``enable_gradient_checkpointing`` (which recomputes whole
up-blocks in backward, at full resolution for the last one).

    python benchmarks/estimate_vae_resnet_ckpt.py --arch sdxl            # fnf defaults, bf16, CLIP-L/14 reward

Prints the estimate with the trainer's VAE checkpointing and with the prototype (a prototype only: the trainer
would need a memory.vae_checkpointing mode for it).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from torch.utils.checkpoint import checkpoint

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Checkpointed(torch.nn.Module):
    """Runs ``module`` under non-reentrant activation checkpointing whenever grad is enabled."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        if torch.is_grad_enabled():
            return checkpoint(self.module, *args, use_reentrant=False, **kwargs)
        return self.module(*args, **kwargs)


def checkpoint_decoder_resnets(model) -> None:
    """Each ResNet (and upsampler) of the VAE decoder's mid and up blocks checkpointed on its own."""
    decoder = model.vae.decoder
    for block in [decoder.mid_block, *decoder.up_blocks]:
        block.resnets = torch.nn.ModuleList([Checkpointed(r) for r in block.resnets])
        if getattr(block, "upsamplers", None):
            block.upsamplers = torch.nn.ModuleList([Checkpointed(u) for u in block.upsamplers])


def main(argv=None) -> int:
    from fnf import config
    from fnf.memory.estimate import REWARD_STAND_INS, model_spec, run_trace, trace_config

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="sdxl")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    base = ["model.weight_dtype=bf16", "memory.mixed_precision=bf16", "localize.spec=saliency", "lora.rank=64",
            "lora.alpha=64", "sampling.truncation_k=2", "sampling.guidance_scale=7.5"]
    spec = model_spec(arch=args.arch)
    native = int(spec["unet"]["sample_size"]) * 2 ** (len(spec["vae"]["block_out_channels"]) - 1)
    out = {}
    variants = [("trainer VAE checkpointing (per up-block)", True, None),
                ("prototype: per-ResNet VAE decoder checkpointing", False, checkpoint_decoder_resnets)]
    for name, vae_ckpt, hook in variants:
        cfg = config.load(None, base + [f"memory.vae_checkpointing={str(vae_ckpt).lower()}"] + args.overrides)
        cfg.reward.spec, cfg.reward.kwargs = REWARD_STAND_INS["clip-l14"], {"dtype": "bf16"}
        cfg = trace_config(cfg, native, native)
        est = run_trace(cfg, spec, model_hook=hook)
        out[name] = {k: v for k, v in est.to_json().items()
                     if k in ("peak_gib", "peak_phase", "held_at_peak_gib", "trace_seconds")}
        print(f"{name}: {out[name]['peak_gib']:.2f} GiB (peak in {est.peak_phase})", flush=True)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
