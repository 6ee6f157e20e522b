"""`fnf estimate-memory`: predict a training step's peak GPU memory on any machine (no GPU, no weights)."""
from __future__ import annotations

import json
import os
import sys
import time

from tqdm.auto import tqdm

from .. import config
from ..inference import check_out_path
from ..memory.archs import ARCHS, KIND_TRACE_SECONDS, NATIVE, TRACE_SECONDS
from ..memory.cuda_rules import DEFAULT_GPU, GPUS
from ..memory.estimate import (MARGIN_BYTES, MARGIN_FRACTION, NOT_INCLUDED, estimate, ladder, ladder_plan,
                               model_spec, plan_bytes)
from .common import wrapped

EPILOG = """\
The estimate is of torch.cuda.max_memory_allocated over a run (weights, LoRA, AdamW state and the step's peak).
It traces the trainer's own optimizer step 2 (AdamW state live) under fake tensors, T = K + 2 sampling steps (the peak
does not depend on T), imitating CUDA's autocast fp32 ops, attention backend and foreach AdamW on the --gpu
(default h100). Precision 'auto' (the default) resolves as the trainer would on that GPU: bf16 on A100/H100/RTX
30xx/40xx, fp16 with the grad scaler on T4/V100. A reward or localizer whose files are not on this machine is
traced as a stand-in of its size, and the report says so.

examples:
  fnf estimate-memory --arch sd15
  fnf estimate-memory --config configs/sd15_artifacts.yaml --model /models/stable-diffusion-v1-5 --gpu 4090
  fnf estimate-memory --arch sdxl --reward-model clip-l14 --ladder --json sdxl.json
"""


DESCRIPTION = ("Predict the peak GPU memory of a training step (torch.cuda.max_memory_allocated) for a config and a "
               "model, on any machine: the trainer's own step is traced under fake tensors from the model's "
               "config.json files (--model) or a named architecture (--arch); no GPU and no weights are needed. "
               "Prints the estimate, what holds memory at the peak, and with --ladder the effect of each memory "
               "lever.")


def add_arguments(parser) -> None:
    parser.description = wrapped(DESCRIPTION)
    parser.epilog = EPILOG
    parser.add_argument("--config", metavar="X.yaml", help="training config (as for fnf train)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (repeatable), e.g. --set memory.mixed_precision=bf16")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", metavar="DIR", help="diffusers folder: only its config.json files are read")
    source.add_argument("--arch", metavar="NAME", help=f"a named architecture: {', '.join(sorted(ARCHS))}")
    parser.add_argument("--gpu", default=DEFAULT_GPU, choices=list(GPUS),
                        help=f"the GPU to imitate: its compute capability sets what 'auto' precision resolves to "
                             f"and the attention backend (default {DEFAULT_GPU})")
    parser.add_argument("--height", type=int, default=0, metavar="H", help="image height (default: config / native)")
    parser.add_argument("--width", type=int, default=0, metavar="W", help="image width (default: config / native)")
    parser.add_argument("--reward-model", default="", metavar="NAME",
                        help="replace the config's reward by a stand-in of realistic size: clip-l14 (a CLIP "
                             "ViT-L/14 vision tower + MLP head, in model.weight_dtype)")
    parser.add_argument("--ladder", action="store_true",
                        help="also estimate each memory lever added one at a time (naive -> ... -> fnf defaults "
                             "-> reward checkpointing -> fused LoRA / reference pool)")
    parser.add_argument("--json", metavar="FILE",
                        help="write the estimate(s) as JSON to FILE ('-': to stdout, the report then goes to stderr)")


def _gib(b: float) -> str:
    return f"{b / 2**30:.2f}"


def article(title: str) -> str:
    """'an H100', 'an RTX 4090', 'a T4'."""
    return "an" if title[:1] in "AEFHILMNORSX" else "a"


def precision_text(s: dict) -> str:
    """'weights bf16, autocast bf16 (auto on the H100)'."""
    autos = s.get("precision_auto") or []
    text = f"weights {s['weight_dtype']}, autocast {s['mixed_precision']}"
    if s["mixed_precision"] == "fp16" or (s["mixed_precision"] == "no" and s["weight_dtype"] == "fp16"):
        text += " + grad scaler"
    if autos:
        text += f" ({'auto' if len(autos) == 2 else autos[0] + ' auto'} on the {s.get('gpu_title', 'GPU')})"
    return text


def report(est, title: str = "") -> str:
    s = est.settings
    gpu = ""
    if "gpu_title" in s:
        sm = s["capability"].replace(".", "")
        gpu = f" on {article(s['gpu_title'])} {s['gpu_title']} (sm_{sm}, {s['gpu_memory_gb']} GB)"
    guidance = s.get("guidance", f"CFG {s['guidance_scale']}")
    lines = [f"fnf estimate-memory: {s['model']} ({s['kind']}) at {s['width']}x{s['height']}{gpu}, "
             f"{precision_text(s)}, LoRA rank {s['lora_rank']}, "
             f"{s.get('method') or 'K=%s' % s['truncation_k']}, {guidance}, "
             f"batch {s['batch_size']}, reward {s['reward']}, localizer {s['localizer']}"]
    if title:
        lines.append(f"  configuration: {title}")
    lines += [f"  stand-in: {note}" for note in s.get("stand_ins", [])]
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
    lines.append(f"traced: T = {s['sampling_steps_traced']} {s.get('sampler', 'DDIM steps')}, optimizer step 2 "
                 "(AdamW state live), "
                 f"{est.trace_seconds:.1f} s" + (f"; attention backends (calls): {backends}" if backends else ""))
    return "\n".join(lines)


def expected_seconds(cfg, args, spec) -> float:
    """A trace's time on the 2-core CPU box (fnf.memory.archs.TRACE_SECONDS) scaled by the image's pixels."""
    base = TRACE_SECONDS.get(args.arch, KIND_TRACE_SECONDS.get(spec["kind"], 180))
    native = NATIVE.get(args.arch, 512 if spec["kind"] == "sd" else 1024)
    h = args.height or cfg.sampling.height or native
    w = args.width or cfg.sampling.width or native
    return base * max(0.05, h * w / native ** 2)


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


class PhaseBar:
    """A progress bar over the expected seconds of a trace, moved on as each phase of the traced step begins."""

    def __init__(self, expected: float, name: str):
        self.expected = max(1, round(expected))
        self.bar = tqdm(total=self.expected, desc=f"tracing {name}", unit="s", file=sys.stderr, dynamic_ncols=True,
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining}{postfix}")
        self.began = time.time()

    def phase(self, name: str) -> None:
        self.bar.n = min(self.expected - 1, round(time.time() - self.began))
        self.bar.set_postfix_str(name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            self.bar.n = self.expected
            self.bar.set_postfix_str("done")
        self.bar.close()
        return False


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
    if args.json and args.json != "-" and os.path.isdir(args.json):
        raise IsADirectoryError(f"--json {args.json!r}: expected a file name, found a folder")
    if args.json and args.json != "-":
        check_out_path(os.path.dirname(os.path.abspath(args.json)), "--json")
    kw = dict(model_dir=args.model, arch=args.arch, height=args.height, width=args.width,
              reward_model=args.reward_model, gpu=args.gpu)
    text = sys.stderr if args.json == "-" else sys.stdout
    spec = model_spec(args.model or (None if args.arch else cfg.model.path), args.arch)
    name = args.arch or spec["kind"]
    expected = expected_seconds(cfg, args, spec)
    title = GPUS[args.gpu].title
    print(f"fnf estimate-memory: tracing one training step of {name} for {article(title)} {title} under fake tensors "
          f"(no GPU, no weights): about {_duration(expected)} on this CPU", file=sys.stderr)
    began = time.time()
    with PhaseBar(expected, name) as bar:
        est = estimate(cfg, on_phase=bar.phase, **kw)
    print(report(est), file=text)
    out = {"estimate": est.to_json()}
    if args.ladder:
        plan = ladder_plan(cfg, args.model, args.arch)
        each = time.time() - began
        print(f"\nmemory ladder: {len(plan)} rows, each a full trace like the one above ({each:.0f} s): about "
              f"{_duration(len(plan) * each)}", file=sys.stderr)
        with tqdm(total=len(plan), desc="ladder", unit="row", file=sys.stderr, dynamic_ncols=True) as rows_bar:
            def on_row(i, n, row):
                rows_bar.n = i
                rows_bar.set_postfix_str(row)
            rows = ladder(cfg, on_row=on_row, **kw)
            rows_bar.n = len(plan)
            rows_bar.refresh()
        print("\nmemory ladder (each row adds one lever to the row before):", file=text)
        print(ladder_table(rows), file=text)
        out["ladder"] = [{"configuration": name, **e.to_json()} for name, e in rows]
    if args.json == "-":
        json.dump(out, sys.stdout, indent=1)
        print()
    elif args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1)
    return 0
