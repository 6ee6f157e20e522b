"""`fnf localize`: sample I0 with the pretrained model and write its heatmap, mask and overlay PNGs."""
from __future__ import annotations

import os

from .. import preflight
from ..images import save_png
from ..inference import load_for_inference, sample_seeded
from ..localize import heatmap_rgb, localizer_from_config, overlay
from ..rewards import build_reward, prepare_reward
from .common import SPEC_HELP, add_common, add_prompts_and_seeds, config_from_args


def add_arguments(parser) -> None:
    parser.description = "Sample I0 with the pretrained model and write its heatmap and mask."
    parser.epilog = SPEC_HELP
    add_common(parser, training=False)
    add_prompts_and_seeds(parser)


def run(args) -> int:
    cfg = config_from_args(args)
    preflight.check(cfg, prompts=not args.prompts)
    model, device, h, w = load_for_inference(cfg)
    reward = prepare_reward(build_reward(cfg.reward.spec, **cfg.reward.kwargs), device)
    loc = localizer_from_config(cfg, reward)
    prompts = args.prompts or cfg.all_prompts()
    out = os.path.join(cfg.train.out, "localize")
    for pi, prompt in enumerate(prompts):
        for seed in args.seeds:
            img = sample_seeded(model, cfg, [prompt], [seed], h, w, device)
            heat, mask = loc(img, [prompt], [pi])
            stem = os.path.join(out, f"p{pi:03d}_s{seed}")
            save_png(img[0], stem + "_i0.png")
            save_png(heatmap_rgb(heat)[0], stem + "_heatmap.png")
            save_png(mask[0, 0], stem + "_mask.png")
            save_png(overlay(img, mask)[0], stem + "_overlay.png")
    print(f"fnf: wrote {len(prompts) * len(args.seeds)} sets of I0/heatmap/mask/overlay PNGs to {out}")
    return 0
