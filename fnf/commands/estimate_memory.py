"""`fnf estimate-memory`: predict a training step's peak GPU memory on any machine (no GPU, no weights)."""
from __future__ import annotations

import json
import os

from .. import config
from ..memory.archs import ARCHS
from ..memory.estimate import MARGIN_BYTES, MARGIN_FRACTION, NOT_INCLUDED, estimate, ladder, plan_bytes

EPILOG = """\
The estimate is of torch.cuda.max_memory_allocated over a run (weights, LoRA, AdamW state and the step's peak).
It traces the trainer's own optimizer step 2 (AdamW state live) under fake tensors, T = K + 2 sampling steps (the peak
does not depend on T), imitating CUDA's autocast fp32 ops, attention backend and foreach AdamW.

examples:
  fnf estimate-memory --config configs/sd15_artifacts.yaml --model /models/stable-diffusion-v1-5
  fnf estimate-memory --arch sdxl --set memory.mixed_precision=bf16 --set model.weight_dtype=bf16 \\
      --reward-model clip-l14 --ladder --json sdxl.json
"""


def add_arguments(parser) -> None:
    parser.epilog = EPILOG
    parser.add_argument("--config", metavar="X.yaml", help="training config (as for fnf train)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (repeatable), e.g. --set memory.mixed_precision=bf16")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", metavar="DIR", help="diffusers folder: only its config.json files are read")
    source.add_argument("--arch", metavar="NAME", help=f"a named architecture: {', '.join(sorted(ARCHS))}")
    parser.add_argument("--height", type=int, default=0, metavar="H", help="image height (default: config / native)")
    parser.add_argument("--width", type=int, default=0, metavar="W", help="image width (default: config / native)")
    parser.add_argument("--reward-model", default="", metavar="NAME",
                        help="replace the config's reward by a stand-in of realistic size: clip-l14 (a CLIP "
                             "ViT-L/14 vision tower + MLP head, in model.weight_dtype)")
    parser.add_argument("--ladder", action="store_true",
                        help="also estimate each memory lever added one at a time (naive -> ... -> fnf defaults "
                             "-> reward checkpointing -> fused LoRA / reference pool)")
    parser.add_argument("--json", metavar="FILE", help="write the estimate(s) as JSON here")


def _gib(b: float) -> str:
    return f"{b / 2**30:.2f}"


def report(est, title: str = "") -> str:
    s = est.settings
    lines = [f"fnf estimate-memory: {s['model']} ({s['kind']}) at {s['width']}x{s['height']}, weights "
             f"{s['weight_dtype']}, autocast {s['mixed_precision']}, LoRA rank {s['lora_rank']}, "
             f"K={s['truncation_k']}, CFG {s['guidance_scale']}, batch {s['batch_size']}, reward {s['reward']}, "
             f"localizer {s['localizer']}"]
    if title:
        lines.append(f"  configuration: {title}")
    plan = plan_bytes(est.peak_bytes)
    lines += [f"estimated torch.cuda.max_memory_allocated: {_gib(est.peak_bytes)} GiB "
              f"(peak in phase '{est.peak_phase}', {est.peak_step})",
              f"  with the margin (+{MARGIN_FRACTION:.0%} + {_gib(MARGIN_BYTES)} GiB for cuDNN/cuBLAS workspaces and "
              f"kernel scratch, which the trace cannot see): plan for {_gib(plan)} GiB",
              "  not included: " + "; ".join(NOT_INCLUDED)]
    q = est.quantized
    if q:
        lines += [f"with model.quantize={q['method']}: {_gib(q['peak_bytes'])} GiB, plan for "
                  f"{_gib(plan_bytes(q['peak_bytes']))} GiB",
                  f"  arithmetic on the trace below (fnf/memory/quantized.py), not a trace of the quantized kernels: "
                  f"its {q['linear_layers']} Linear weights ({_gib(q['linear_weight_bytes'])} GiB in "
                  f"{s['weight_dtype']}) stored in {_gib(q['stored_bytes'])} GiB saves {_gib(q['saved_bytes'])} GiB; "
                  f"+ {_gib(q['transient_bytes'])} GiB for the largest layer dequantized; the rest is traced in "
                  f"{s['weight_dtype']}"]
    lines.append("held at the peak, by the phase that allocated it (GiB; as traced):")
    lines += [f"  {name:<34}{_gib(b):>8}" for name, b in est.held_at_peak.items() if b >= 2**20]
    lines.append("persistent (GiB): " + ", ".join(f"{k} {_gib(v)}" for k, v in est.persistent.items()))
    lines.append(f"phases (GiB; session build, then the last optimizer step): {'at entry':>9}{'peak':>8}{'added':>8}")
    for name, p in est.phases.items():
        mark = "  <- peak" if name == est.peak_phase else ""
        lines.append(f"  {name:<56}{_gib(p['at_entry']):>9}{_gib(p['peak']):>8}{_gib(p['added']):>8}{mark}")
    backends = ", ".join(f"{k} {v}" for k, v in sorted(est.attention_backends.items()))
    lines.append(f"traced: T = {s['sampling_steps_traced']} DDIM steps, optimizer step 2 (AdamW state live), "
                 f"{est.trace_seconds:.1f} s" + (f"; attention backends (calls): {backends}" if backends else ""))
    return "\n".join(lines)


def ladder_table(rows) -> str:
    width = max([len("configuration"), *(len(name) for name, _ in rows)]) + 1
    quant = bool(rows) and rows[0][1].quantized is not None
    lines = [f"{'configuration':<{width}}{'peak GiB':>9}{'plan GiB':>9}  peak phase"
             + (f"  (peaks with model.quantize={rows[0][1].quantized['method']}, fnf/memory/quantized.py)"
                if quant else "")]
    for name, est in rows:
        peak = est.quantized["peak_bytes"] if est.quantized else est.peak_bytes
        lines.append(f"{name:<{width}}{_gib(peak):>9}{_gib(plan_bytes(peak)):>9}  {est.peak_phase}")
    return "\n".join(lines)


def run(args) -> int:
    cfg = config.load(args.config, args.overrides)
    if not (args.model or args.arch or cfg.model.path):
        raise ValueError("no model: give --model DIR (a diffusers folder; only its config.json files are read), "
                         f"--arch NAME ({', '.join(sorted(ARCHS))}) or model.path in the config")
    for name in ("height", "width"):
        value = getattr(args, name)
        if value < 0 or value % 8:
            raise ValueError(f"--{name} must be a positive multiple of 8, got {value}")
    kw = dict(model_dir=args.model, arch=args.arch, height=args.height, width=args.width,
              reward_model=args.reward_model)
    est = estimate(cfg, **kw)
    print(report(est))
    out = {"estimate": est.to_json()}
    if args.ladder:
        rows = ladder(cfg, **kw)
        print("\nmemory ladder (each row adds one lever to the row before):")
        print(ladder_table(rows))
        out["ladder"] = [{"configuration": name, **e.to_json()} for name, e in rows]
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1)
    return 0
