"""What several commands share: the help texts, the options of train / localize / sample, flags to a config."""
from __future__ import annotations

import argparse
import os
import textwrap

from .. import config

DESCRIPTION = """\
Focus-N-Fix: fine-tune a local diffusers model folder (SD 1.x/2.x, SDXL, SD3/3.5, FLUX.1, FLUX.2, FLUX.2
[klein], Z-Image, Qwen-Image) with DRaFT-K + LoRA so that a reward improves inside problem regions while the
rest of the image stays as the pretrained model drew it:

    loss = -w * r(I, c) + beta * || (1 - M(I0)) * (I0 - I) ||_F

I0 is the pretrained sample, I the fine-tuned one (same prompt, same noise), M(I0) the problem mask.
beta = 0 is plain DRaFT. For rewards without a gradient (objective: grpo): group-relative policy
optimisation with the same term in the per-sample reward.

commands:
  train      train a LoRA (YAML config + --set overrides + flags); writes <out>/lora for pipe.load_lora_weights
  localize   write I0, heatmap, mask and overlay PNGs for prompts (check the localizer before training)
  sample     base and fine-tuned images side by side, same seeds
  eval       base vs LoRAs on prompts x seeds: reward with bootstrap intervals, win rate, change inside and
             outside the base image's mask; report.md, metrics.json, grids
  estimate-memory  predict a training step's peak GPU memory from the model folder's configs (no GPU, no weights)
  export-lora  a trained LoRA as one .safetensors file for diffusers, kohya-based tools or ComfyUI
  demo       DRaFT vs Focus-N-Fix (and Separate-and-Enhance) on the embedded toy model, with a held-out report

Errors in the input (config keys, specs, files, folders) print one line and exit with status 2; set
FNF_DEBUG=1 to see the traceback instead.
"""

SPEC_HELP = """\
specs:
  reward     a public model from local files: aesthetic, pickscore, clipscore, hpsv2, sd-safety (see README);
             a toy/statistic: brightness, darkness, redness, saturation, contrast, region, classifier;
             'package.module:callable' or 'path/to/file.py:callable'; the callable maps
             (images [B,3,H,W] in [0,1], prompts) -> [B]. Keyword arguments: --set reward.kwargs={...}
  localizer  gradcam[:layer]   Grad-CAM of the reward on a named layer (default: the reward's gradcam_layer,
                               a ViT block for the public models, else its last Conv2d)
             saliency          |d reward / d pixel|
             heatmap:SPEC      a heatmap model (torchscript:PATH, redness, box, module:callable, file.py:callable)
             boxes:PATH.onnx   an ONNX box detector; the chosen classes' boxes are the mask (onnxruntime)
             file:GLOB         mask images; the i-th sorted file pairs with the i-th prompt
             none              no mask: the whole image is held to I0

config keys (section.name), e.g. sampling.steps, sampling.truncation_k, sampling.guidance_scale,
lora.rank, lora.alpha, objective.beta, objective.squared, localize.threshold, localize.radius,
train.batch_size, train.grad_accum, train.checkpoint_every, memory.mixed_precision, memory.fused_lora;
see configs/*.yaml.
"""

TRAIN_DESCRIPTION = """\
Train a LoRA on a local diffusers model folder with DRaFT-K and the Focus-N-Fix penalty:

    loss = -w * r(I, c) + beta * || (1 - M(I0)) * (I0 - I) ||_F

I0 is the pretrained sample, I the fine-tuned one (same prompt, same noise), M(I0) the problem mask from the
localizer; beta = 0 is plain DRaFT. Settings come from --config, then --set, then the flags below. Writes
<out>/lora (for pipe.load_lora_weights), checkpoints, log.jsonl and sample grids into --out.
"""


def wrapped(text: str, width: int = 100) -> str:
    """A paragraph of help text wrapped for the terminal (the parsers keep line breaks as written)."""
    return textwrap.fill(" ".join(text.split()), width)


FLAGS = {  # flag -> config key (train, localize, sample)
    "model": "model.path", "reward": "reward.spec", "localizer": "localize.spec", "beta": "objective.beta",
    "steps": "train.steps", "lr": "train.lr", "seed": "train.seed", "out": "train.out", "resume": "train.resume",
    "fused_lora": "memory.fused_lora", "overwrite": "train.overwrite",
}


def add_common(p: argparse.ArgumentParser, *, training: bool, out_help: str = "", specs: bool = True) -> None:
    """The config options of train, localize and sample (``training``: also train's own; ``out_help``: what
    --out holds; ``specs``: --reward and --localizer, for commands that use them)."""
    p.add_argument("--config", metavar="X.yaml", help="YAML config (sections model, lora, sampling, reward, "
                                                      "localize, objective, train, memory)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set sampling.steps=20 (repeatable; values parsed as YAML)")
    p.add_argument("--model", metavar="DIR", help="local diffusers folder (model.path)")
    if specs:
        p.add_argument("--reward", metavar="SPEC", help="reward spec (reward.spec); see 'specs' below")
        p.add_argument("--localizer", metavar="SPEC", help="localizer spec (localize.spec); see 'specs' below")
    p.add_argument("--out", metavar="DIR",
                   help=out_help or "output folder of the run: checkpoints, log, LoRA, samples (train.out)")
    if training:
        p.add_argument("--seed", type=int, metavar="S", help="training seed: LoRA init, prompts and noise of every "
                                                             "step (train.seed)")
        p.add_argument("--beta", type=float, metavar="B", help="penalty weight beta; 0 = plain DRaFT (objective.beta)")
        p.add_argument("--steps", type=int, metavar="N", help="optimizer steps (train.steps)")
        p.add_argument("--lr", type=float, metavar="LR", help="AdamW learning rate (train.lr)")
        p.add_argument("--resume", nargs="?", const="latest", metavar="DIR",
                       help="resume from a checkpoint folder, or (the flag alone) the latest checkpoint of the run "
                            "in <out>; without --resume or --overwrite, an <out> holding an earlier run's "
                            "checkpoints, log, LoRA or samples is refused")
        p.add_argument("--overwrite", action="store_true", default=None,
                       help="start a new run in an <out> that holds an earlier run: its files (checkpoints, log, "
                            "LoRA, samples, config) are moved to <out>/previous-<UTC time>/, nothing is deleted "
                            "(train.overwrite)")
        p.add_argument("--fused-lora", nargs="?", const="on", choices=["auto", "on", "off"], metavar="MODE",
                       help="fused LoRA attention + I0 and I no-grad steps in one UNet batch: on (the flag alone), "
                            "auto (on with CUDA + triton) or off (memory.fused_lora; default off)")


PROMPTS_HELP = "the prompts themselves, e.g. --prompts \"a red car\" \"a cat\""
PROMPTS_FILE_HELP = "a text file of prompts, one per line"


def add_prompts(p: argparse.ArgumentParser, default: str) -> None:
    """--prompts (the prompts themselves) and --prompts-file (a file of them): the same two options in every
    command that samples."""
    group = p.add_mutually_exclusive_group()
    group.add_argument("--prompts", nargs="+", metavar="PROMPT", help=f"{PROMPTS_HELP} (default: {default})")
    group.add_argument("--prompts-file", metavar="FILE", help=f"{PROMPTS_FILE_HELP} (default: {default})")


def add_prompts_and_seeds(p: argparse.ArgumentParser, what: str) -> None:
    """localize's and sample's --prompts, --prompts-file, --seeds and --overwrite (``what``: the folder in
    <out> the command writes)."""
    add_prompts(p, "the config's train.prompts and train.prompts_file")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], metavar="S",
                   help="noise seeds, each image's x_T (default 0), e.g. --seeds 0 1 2")
    p.add_argument("--overwrite", action="store_true",
                   help=f"an <out>/{what}/ of an earlier run is moved to <out>/previous-<UTC time>/ (without it: "
                        "refused); nothing is deleted")


def read_prompts(args, cfg) -> list[str]:
    """The prompts of --prompts, --prompts-file, or else the config's (ValueError / FileNotFoundError, one line)."""
    if args.prompts:
        return list(args.prompts)
    if args.prompts_file:
        return read_prompts_file(args.prompts_file)
    return cfg.all_prompts()


def read_prompts_file(path: str, flag: str = "--prompts-file") -> list[str]:
    """The non-empty lines of ``path``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{flag} {path!r}: expected a file of prompts (one per line), which does not exist")
    with open(path, encoding="utf-8") as f:
        prompts = [line.strip() for line in f if line.strip()]
    if not prompts:
        raise ValueError(f"{flag} {path!r}: expected at least one non-empty line")
    return prompts


def config_from_flags(path, overrides, values: dict, check=None):
    """The config of ``path`` (YAML or None) with the --set ``overrides``, then each flag value that is not None
    (config key -> value); ``check(cfg)`` runs before validation."""
    cfg = config.load(path, overrides)
    for key, value in values.items():
        if value is not None:
            config._set(cfg, key, value)
    if check is not None:
        check(cfg)
    return config.validate(cfg)


def config_from_args(args):
    """The config of train / localize / sample: --config, --set, then the flags of :data:`FLAGS`."""
    return config_from_flags(args.config, args.overrides,
                             {key: getattr(args, flag, None) for flag, key in FLAGS.items()})
