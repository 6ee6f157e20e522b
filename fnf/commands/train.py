"""`fnf train`: train a LoRA from a YAML config, --set overrides and flags."""
from __future__ import annotations

import os

from ..inference import check_out_path
from ..train import train
from .common import SPEC_HELP, TRAIN_DESCRIPTION, add_common, config_from_args

EXAMPLES = """
examples:
  fnf train --config configs/sd15_artifacts.yaml --model /models/sd-v1-5 --out runs/fix
  fnf train --config configs/sd15_artifacts.yaml --beta 0 --out runs/draft_baseline
  accelerate launch --num_processes 2 -m fnf train --config configs/sd15_artifacts.yaml
  fnf train --config configs/sd15_artifacts.yaml --resume          # continue from the latest checkpoint
"""


def add_arguments(parser) -> None:
    parser.description = TRAIN_DESCRIPTION
    parser.epilog = SPEC_HELP + EXAMPLES
    add_common(parser, training=True)


def run(args) -> int:
    cfg = config_from_args(args)
    check_out_path(cfg.train.out)   # before anything loads
    result = train(cfg)
    log = os.path.join(result.out, "log.jsonl")
    print(f"fnf: done: {result.steps_done} steps; LoRA in {result.lora_dir}; log in {log}")
    return 0
