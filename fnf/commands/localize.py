"""`fnf localize`: sample I0 with the pretrained model and write its heatmap, mask and overlay PNGs."""
from __future__ import annotations

import os

from .. import preflight
from ..images import labelled_row, save_png
from ..inference import (MANIFEST, check_out, claim_out, file_stem, load_for_inference, sample_seeded,
                         sampling_settings, write_manifest)
from ..localize import heatmap_rgb, localizer_from_config, overlay
from ..rewards import build_reward, prepare_reward
from .common import SPEC_HELP, add_common, add_prompts_and_seeds, config_from_args, read_prompts, wrapped

FOLDER = "localize"
PARTS = (("i0", "base (I0)"), ("heatmap", "heatmap"), ("mask", "mask"), ("overlay", "mask on base"))
EPILOG = f"""\
Writes <out>/{FOLDER}/: {MANIFEST} first (model, reward, localizer, settings, and which prompt and seed made each
file), then per prompt index P and seed S: pPPP_sS_i0.png (the base image), _heatmap.png, _mask.png,
_overlay.png, and pPPP_sS_panel.png (the four side by side, labelled). An <out>/{FOLDER}/ of an earlier run is
refused unless --overwrite (it moves to <out>/previous-<UTC time>/).

examples:
  fnf localize --config configs/sd15_artifacts.yaml --prompts "a person waving" --out runs/masks
  fnf localize --model /models/sd-v1-5 --reward aesthetic --localizer gradcam --prompts-file prompts.txt --seeds 0 1

{SPEC_HELP}"""


def add_arguments(parser) -> None:
    parser.description = wrapped("Sample I0 with the pretrained model and write the localizer's heatmap and mask "
                                 "for it: check the localizer before training.")
    parser.epilog = EPILOG
    add_common(parser, training=False, out_help=f"writes into <out>/{FOLDER}/ (default: the config's train.out)")
    add_prompts_and_seeds(parser, FOLDER)


def plan(args):
    """(cfg, prompts, out folder): every input checked, before any model loads."""
    cfg = config_from_args(args)
    check_out(cfg.train.out, (FOLDER,), args.overwrite, "fnf localize")
    preflight.check(cfg, prompts=not (args.prompts or args.prompts_file))
    return cfg, read_prompts(args, cfg), os.path.join(cfg.train.out, FOLDER)


def run(args) -> int:
    cfg, prompts, out = plan(args)
    jobs = [(pi, prompt, seed) for pi, prompt in enumerate(prompts) for seed in args.seeds]
    print(f"fnf localize: {len(jobs)} images, localizer {cfg.localize.spec!r} -> {out}", flush=True)
    model, device, h, w = load_for_inference(cfg)
    reward = prepare_reward(build_reward(cfg.reward.spec, **cfg.reward.kwargs), device)
    loc = localizer_from_config(cfg, reward)
    files = [{"file": f"{file_stem(pi, seed)}_{part}.png", "prompt_index": pi, "prompt": prompt, "seed": seed,
              "image": what} for pi, prompt, seed in jobs for part, what in PARTS + (("panel", "labelled panel"),)]
    claim_out(cfg.train.out, (FOLDER,), "localize")
    write_manifest(out, {"command": "fnf localize", "reward": {"spec": cfg.reward.spec, "kwargs": cfg.reward.kwargs},
                         "localize": dict(vars(cfg.localize)),
                         "settings": sampling_settings(cfg, model, device, h, w), "prompts": prompts,
                         "seeds": list(args.seeds), "files": files})
    for k, (pi, prompt, seed) in enumerate(jobs):
        img = sample_seeded(model, cfg, [prompt], [seed], h, w, device)
        heat, mask = loc(img, [prompt], [pi])
        pictures = [img[0], heatmap_rgb(heat)[0], mask[0, 0], overlay(img, mask)[0]]
        stem = os.path.join(out, file_stem(pi, seed))
        for (part, _), picture in zip(PARTS, pictures):
            save_png(picture, f"{stem}_{part}.png")
        save_png(labelled_row(pictures, [what for _, what in PARTS]), f"{stem}_panel.png")
        print(f"fnf localize: [{k + 1}/{len(jobs)}] prompt {pi} seed {seed}: mask covers "
              f"{float(mask.float().mean()):.0%}", flush=True)
    print(f"fnf localize: wrote {len(jobs)} sets of I0 / heatmap / mask / overlay PNGs and {MANIFEST} to {out}")
    return 0
