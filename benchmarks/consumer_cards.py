"""Which configuration of each family fits an 8, 12, 16, 24 and 32 GB card: ``fnf estimate-memory`` traces, not
measurements.

For every named architecture (``--arch``) at its native size, three settings are traced (fake tensors, no GPU, no
weights; the CLIP ViT-L/14 stand-in reward, fnf's default localizer):

* ``defaults``: fnf's defaults (bf16 on an H100-class GPU, K = 2, LoRA rank 64, denoiser and per-ResNet VAE
  checkpointing, text encoders offloaded after encoding);
* ``lean``: K = 1, rank 16, reward checkpointing on;
* ``lean+tiled``: lean with the VAE decoded in tiles of half the image side (a different image: see
  docs/memory_levers.md).

Each trace also gives the quantized rows by arithmetic (fnf/memory/quantized.py: ``bnb-8bit``, ``torchao-int8``,
``bnb-4bit``). A card fits a configuration when its plan figure (estimate + 10% + 0.25 GiB) is at most the card's
size in GiB. For each card the first configuration that fits, in the order of :data:`PREFERENCE` (least change to
the model and the image first), is the table's entry.

    python benchmarks/consumer_cards.py --arch sd15 sdxl ...   # traces cached in benchmarks/results/consumer_cards/
    python benchmarks/consumer_cards.py --table                 # the markdown table from the cached traces
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

OUT = os.path.join(ROOT, "benchmarks", "results", "consumer_cards")
CARDS = (8, 12, 16, 24, 32)
QUANT = ("none", "torchao-int8", "bnb-8bit", "bnb-4bit")
SETTINGS = {
    "defaults": {},
    "lean": {"sampling": {"truncation_k": 1}, "lora": {"rank": 16, "alpha": 16.0},
             "memory": {"reward_checkpointing": True}},
    "lean+tiled": {"sampling": {"truncation_k": 1}, "lora": {"rank": 16, "alpha": 16.0},
                   "memory": {"reward_checkpointing": True, "vae_tile": "half"}},
}
# Per-architecture settings on top of every row: how the released model is run (the family's shipped config).
ARCH_SETTINGS = {
    "z-image": {"sampling": {"guidance_scale": 0.0}},   # Z-Image-Turbo is guidance-distilled: no CFG batch
}
# (setting, quantization): least change first. 8-bit before the lean settings (it keeps K and rank), 4-bit after
# them (NF4 changes the frozen model more than K = 1 changes the objective); tiling last (it changes the image).
PREFERENCE = [("defaults", "none"), ("defaults", "8bit"), ("lean", "none"), ("lean", "8bit"),
              ("defaults", "bnb-4bit"), ("lean", "bnb-4bit"), ("lean+tiled", "none"), ("lean+tiled", "8bit"),
              ("lean+tiled", "bnb-4bit")]
TITLES = {"sd15": "SD 1.5", "sd21": "SD 2.1", "sdxl": "SDXL", "sd35-medium": "SD3.5 Medium",
          "sd35-large": "SD3.5 Large", "flux1-dev": "FLUX.1-dev", "flux2-dev": "FLUX.2-dev",
          "flux2-klein-4b": "FLUX.2 [klein] 4B", "flux2-klein-9b": "FLUX.2 [klein] 9B", "z-image": "Z-Image",
          "qwen-image": "Qwen-Image"}


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _path(arch: str, setting: str) -> str:
    return os.path.join(OUT, f"{arch}__{setting}.json")


def trace(arch: str, setting: str) -> dict:
    """One trace of ``arch`` with ``setting``, plus every quantization's arithmetic on it."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fnf import config
    from fnf.memory import estimate as est
    from fnf.memory.quantized import adjustment

    cfg = config.load(None, [])
    for overrides in (ARCH_SETTINGS.get(arch, {}), SETTINGS[setting]):
        for section, values in overrides.items():
            for key, value in values.items():
                setattr(getattr(cfg, section), key, value)
    if cfg.memory.vae_tile == "half":
        cfg.memory.vae_tile = est.HALF_SIDE
    began = time.time()
    e = est.estimate(cfg, arch=arch, reward_model="clip-l14")
    record = {"arch": arch, "setting": setting, "overrides": SETTINGS[setting],
              "arch_overrides": ARCH_SETTINGS.get(arch, {}), "estimate": e.to_json(),
              "commit": _commit(), "date": time.strftime("%Y-%m-%d"), "torch": __import__("torch").__version__,
              "command": f"python benchmarks/consumer_cards.py --arch {arch} --setting {setting}",
              "seconds": round(time.time() - began, 1)}
    traced_cfg = est.trace_config(cfg)
    spec = est.model_spec(None, arch)
    dtype = e.settings["weight_dtype"]
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = est.build_model(spec, dtype)
    phases = {k: {"peak": v["peak"]} for k, v in e.phases.items()}
    record["quantized"] = {}
    for method in QUANT[1:]:
        q = copy.deepcopy(traced_cfg)
        q.model.quantize = method
        q.model.weight_dtype = dtype
        adj = adjustment(model.denoiser, method, est.DTYPES[dtype])
        out = est._quantized(q, adj, phases)
        record["quantized"][method] = {"peak_gib": round(out["peak_bytes"] / est.GIB, 4),
                                       "plan_for_gib": round(est.plan_bytes(out["peak_bytes"]) / est.GIB, 4),
                                       "step_peak_gib": round(out["step_peak_bytes"] / est.GIB, 4),
                                       "build_peak_gib": round(out["build_peak_bytes"] / est.GIB, 4),
                                       "stored_gib": round(adj["stored_bytes"] / est.GIB, 4)}
    return record


def _plan(record: dict, quant: str) -> tuple[float, str]:
    """(plan GiB, the method's name) of one row; ``8bit``: the smaller of the two 8-bit methods."""
    if quant == "none":
        return record["estimate"]["plan_for_gib"], "bf16"
    if quant == "8bit":
        q = record["quantized"]
        best = min(("torchao-int8", "bnb-8bit"), key=lambda m: q[m]["plan_for_gib"])
        return q[best]["plan_for_gib"], best
    return record["quantized"][quant]["plan_for_gib"], quant


def describe(setting: str, method: str) -> str:
    if (setting, method) == ("defaults", "bf16"):
        return "fnf defaults"
    parts = {"defaults": "K 2, rank 64", "lean": "K 1, rank 16", "lean+tiled": "K 1, rank 16, tiled VAE"}[setting]
    return f"{parts}, {method}"


def table(archs: list[str]) -> str:
    """The markdown table: one row per architecture, one column per card."""
    head = "| model (native size) | " + " | ".join(f"{c} GB" for c in CARDS) + " | defaults: estimate / plan GiB |"
    lines = [head, "|---|" + "---|" * len(CARDS) + "---:|"]
    for arch in archs:
        records = {s: json.load(open(_path(arch, s))) for s in SETTINGS if os.path.exists(_path(arch, s))}
        if "defaults" not in records:
            continue
        size = records["defaults"]["estimate"]["settings"]["height"]
        cells, last = [], None
        for card in CARDS:
            cell = "does not fit"
            for setting, quant in PREFERENCE:
                if setting not in records:
                    continue
                plan, method = _plan(records[setting], quant)
                if plan <= card:
                    cell = f"{describe(setting, method)} ({plan:.1f})"
                    if cell == last:
                        cell = "same"
                    else:
                        last = cell
                    break
            if cell == "does not fit" and records:
                best = min(_plan(r, q)[0] for r in records.values() for q in ("none", "8bit", "bnb-4bit"))
                cell = f"does not fit (least: {best:.1f})"
            cells.append(cell)
        d = records["defaults"]["estimate"]
        lines.append(f"| {TITLES.get(arch, arch)} ({size}²) | " + " | ".join(cells)
                     + f" | {d['peak_gib']:.2f} / {d['plan_for_gib']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", nargs="*", default=[], help="architectures to trace (fnf estimate-memory --arch names)")
    p.add_argument("--setting", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--force", action="store_true", help="trace again even where a cached record exists")
    p.add_argument("--table", action="store_true", help="print the table of every cached architecture")
    args = p.parse_args(argv)
    os.makedirs(OUT, exist_ok=True)
    for arch in args.arch:
        for setting in args.setting:
            path = _path(arch, setting)
            if os.path.exists(path) and not args.force:
                continue
            print(f"tracing {arch} {setting} ...", file=sys.stderr, flush=True)
            try:
                record = trace(arch, setting)
            except ValueError as e:   # a lever this model refuses (Qwen-Image's VAE has no 2D tiled decode)
                print(f"  {arch} {setting}: not available: {e}", file=sys.stderr)
                continue
            tmp = path + ".tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(record, f, indent=1)
            os.replace(tmp, path)
            print(f"  {arch} {setting}: {record['estimate']['peak_gib']:.2f} GiB "
                  f"(plan {record['estimate']['plan_for_gib']:.2f}) in {record['seconds']:.0f} s", file=sys.stderr)
    if args.table or not args.arch:
        done = sorted({f.split("__")[0] for f in os.listdir(OUT) if f.endswith(".json")},
                      key=lambda a: list(TITLES).index(a) if a in TITLES else 99)
        print(table(done))
    return 0


if __name__ == "__main__":
    sys.exit(main())
