"""`fnf sample`: the base model and the model with a LoRA from the same noise, side by side."""
from __future__ import annotations

import os

from .. import preflight
from ..core import ADAPTER
from ..images import labelled_row, save_png
from ..inference import (MANIFEST, check_lora_arg, check_lora_fits, check_lora_for_folder, check_out, claim_out,
                         file_stem, load_for_inference, lora_name, sample_seeded, sampling_settings, write_manifest)
from ..lora import adapters_disabled, load_lora
from .common import add_common, add_prompts_and_seeds, config_from_args, read_prompts, wrapped

FOLDER = "samples_compare"
EPILOG = f"""\
Writes <out>/{FOLDER}/: {MANIFEST} first (the model, LoRA, settings, and which prompt and seed made
each file), then per prompt index P and seed S: pPPP_sS_base.png, pPPP_sS_<lora>.png (the images as sampled)
and pPPP_sS_base-vs-<lora>.png (the two side by side, labelled). <lora> is the LoRA's name: runs/fix/lora ->
fix. An <out>/{FOLDER}/ of an earlier run is refused unless --overwrite (it moves to <out>/previous-<UTC time>/).

examples:
  fnf sample --config configs/sd15_artifacts.yaml --lora runs/fix/lora --out runs/compare
  fnf sample --model /models/sd-v1-5 --lora runs/fix/lora --prompts "a person waving" --seeds 0 1 2
"""


def add_arguments(parser) -> None:
    parser.description = wrapped("Sample the base model and the model with a LoRA from the same prompts and noise, "
                                 "and write both images and a labelled side-by-side picture.")
    parser.epilog = EPILOG
    add_common(parser, training=False, specs=False,
               out_help=f"writes into <out>/{FOLDER}/ (default: the config's train.out, where `fnf train` put the "
                        "LoRA)")
    parser.add_argument("--lora", required=True, metavar="DIR",
                        help="LoRA folder written by `fnf train` (<out>/lora) for this model")
    add_prompts_and_seeds(parser, FOLDER)


def plan(args):
    """(cfg, prompts, out folder): every input checked, before any model loads."""
    cfg = config_from_args(args)
    check_lora_arg(args.lora)
    check_out(cfg.train.out, (FOLDER,), args.overwrite, "fnf sample")
    preflight.check(cfg, prompts=not (args.prompts or args.prompts_file), specs=False)  # no reward or localizer
    prompts = read_prompts(args, cfg)
    check_lora_for_folder(args.lora, cfg.model.path, cfg.model.kind)
    return cfg, prompts, os.path.join(cfg.train.out, FOLDER)


def run(args) -> int:
    cfg, prompts, out = plan(args)
    name = lora_name(args.lora)
    name = "lora-base" if name == "base" else name
    jobs = [(pi, prompt, seed) for pi, prompt in enumerate(prompts) for seed in args.seeds]
    print(f"fnf sample: {len(jobs)} image pair{'s' * (len(jobs) != 1)} (base, {name}) -> {out}", flush=True)
    model, device, h, w = load_for_inference(cfg)
    check_lora_fits(args.lora, model.family, cfg.model.path, model.denoiser)
    load_lora(model, args.lora, adapter_name=ADAPTER)
    files = []
    for pi, prompt, seed in jobs:
        stem = file_stem(pi, seed)
        for image, what in (("base", "base model"), (name, f"LoRA {name}"), (f"base-vs-{name}", "labelled pair")):
            files.append({"file": f"{stem}_{image}.png", "prompt_index": pi, "prompt": prompt, "seed": seed,
                          "image": what})
    claim_out(cfg.train.out, (FOLDER,), "sample")
    write_manifest(out, {"command": "fnf sample", "lora": {"name": name, "folder": os.path.abspath(args.lora)},
                         "settings": sampling_settings(cfg, model, device, h, w), "prompts": prompts,
                         "seeds": list(args.seeds), "files": files})
    for k, (pi, prompt, seed) in enumerate(jobs):
        with adapters_disabled(model.denoiser):
            base = sample_seeded(model, cfg, [prompt], [seed], h, w, device)
        tuned = sample_seeded(model, cfg, [prompt], [seed], h, w, device)
        stem = os.path.join(out, file_stem(pi, seed))
        save_png(base[0], f"{stem}_base.png")
        save_png(tuned[0], f"{stem}_{name}.png")
        save_png(labelled_row([base[0], tuned[0]], ["base", name]), f"{stem}_base-vs-{name}.png")
        print(f"fnf sample: [{k + 1}/{len(jobs)}] prompt {pi} seed {seed}", flush=True)
    print(f"fnf sample: wrote {len(jobs)} base | {name} pair{'s' * (len(jobs) != 1)} and {MANIFEST} to {out}")
    return 0
