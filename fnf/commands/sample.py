"""`fnf sample`: the base model and the model with a LoRA from the same noise, side by side."""
from __future__ import annotations

import os

from .. import preflight
from ..core import ADAPTER
from ..images import grid, save_png
from ..inference import check_lora_arg, load_for_inference, sample_seeded
from ..lora import adapters_disabled, load_lora
from .common import add_common, add_prompts_and_seeds, config_from_args


def add_arguments(parser) -> None:
    parser.description = "Sample the base model and the model with a LoRA from the same noise."
    add_common(parser, training=False)
    parser.add_argument("--lora", required=True, metavar="DIR",
                        help="LoRA folder written by `fnf train` (<out>/lora)")
    add_prompts_and_seeds(parser)


def run(args) -> int:
    cfg = config_from_args(args)
    check_lora_arg(args.lora)
    preflight.check(cfg, prompts=not args.prompts, specs=False)  # no reward or localizer is used here
    model, device, h, w = load_for_inference(cfg)
    load_lora(model, args.lora, adapter_name=ADAPTER)
    prompts = args.prompts or cfg.all_prompts()
    out = os.path.join(cfg.train.out, "samples_compare")
    for pi, prompt in enumerate(prompts):
        for seed in args.seeds:
            with adapters_disabled(model.denoiser):
                base = sample_seeded(model, cfg, [prompt], [seed], h, w, device)
            tuned = sample_seeded(model, cfg, [prompt], [seed], h, w, device)
            save_png(grid([[base[0], tuned[0]]]), os.path.join(out, f"p{pi:03d}_s{seed}.png"))
    print(f"fnf: wrote base | fine-tuned pairs to {out}")
    return 0
