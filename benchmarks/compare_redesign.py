"""Compare the current tree's behaviour with the pre-redesign records (benchmarks/results/redesign_baseline/).

Runs ``fnf demo --quick`` and ``fnf estimate-memory`` as the baseline was recorded (see its README), then compares:
every demo metric except wall/CPU seconds must be equal, and the estimates equal everywhere except the settings
text and the seconds the trace took. Prints each difference; exits 1 when there is one.

    python benchmarks/compare_redesign.py [--skip-demo] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
BASE = os.path.join(HERE, "results", "redesign_baseline")
ARCHS = ("sd15", "sdxl", "sd35-medium", "flux1-dev")
TIMING_WORDS = ("seconds", "elapsed", "wall", "cpu_s")
RENAMED = {"unet_checkpointing": "denoiser_checkpointing"}   # config keys the redesign renamed (issue 23, item 6)
# The baseline's defaults, explicit since issue 30 made precision and the localizer 'auto' (bf16 on the --gpu)
BASELINE_DEFAULTS = ("--set", "model.weight_dtype=fp32", "--set", "memory.mixed_precision=no",
                     "--set", "localize.spec=gradcam")
# Settings the estimate gained after the baseline (issues 30 and 25): not in it, so not compared
NEW_SETTINGS = ("gpu", "gpu_title", "capability", "gpu_memory_gb", "precision_auto", "stand_ins", "sampler",
                "guidance")


def leaves(x, path=""):
    """(path, value) for every leaf of nested dicts and lists."""
    if isinstance(x, dict):
        for k, v in x.items():
            yield from leaves(v, f"{path}/{k}")
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from leaves(v, f"{path}[{i}]")
    else:
        yield path, x


def differences(before: dict, after: dict, ignore=TIMING_WORDS) -> list[str]:
    """The leaves that differ (a NaN equals a NaN), skipping paths that name a timing."""
    def renamed(path):
        for old, new in RENAMED.items():
            path = path.replace(old, new)
        return path

    a = {renamed(k): v for k, v in leaves(before)}
    b = {renamed(k): v for k, v in leaves(after)}
    out = []
    for path in sorted(set(a) | set(b)):
        if any(word in path.lower() for word in ignore):
            continue
        x, y = a.get(path, "<missing>"), b.get(path, "<missing>")
        if x == "<missing>" and any(f"/settings/{k}" in path for k in NEW_SETTINGS):
            continue
        same = x == y or (isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y))
        if not same:
            out.append(f"{path}: before {x!r}, after {y!r}")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--skip-demo", action="store_true", help="compare only the estimates")
    p.add_argument("--out", default=os.path.join("runs", "compare_redesign"), help="where the new runs go")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    failed = False
    for arch in ARCHS:
        path = os.path.join(args.out, f"estimate_{arch}.json")
        subprocess.run([sys.executable, "-m", "fnf", "estimate-memory", "--arch", arch, "--reward-model", "clip-l14",
                        *BASELINE_DEFAULTS, "--json", path], check=True, stdout=subprocess.DEVNULL)
        with open(os.path.join(BASE, f"estimate_{arch}.json")) as f, open(path) as g:
            diff = differences(json.load(f), json.load(g))
        print(f"estimate-memory {arch}: {'identical' if not diff else f'{len(diff)} differences'}")
        for line in diff:
            print("  " + line)
        failed |= bool(diff)
    if not args.skip_demo:
        demo = os.path.join(args.out, "demo")
        subprocess.run([sys.executable, "-m", "fnf", "demo", "--quick", "--threads", "2", "--out", demo,
                        "--overwrite"], check=True, stdout=subprocess.DEVNULL)
        with open(os.path.join(BASE, "demo_quick_metrics.json")) as f, \
                open(os.path.join(demo, "metrics.json")) as g:
            diff = differences(json.load(f), json.load(g))
        print(f"demo --quick metrics: {'identical' if not diff else f'{len(diff)} differences'}")
        for line in diff:
            print("  " + line)
        failed |= bool(diff)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
