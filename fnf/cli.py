"""The ``fnf`` command: ``fnf train``, ``fnf localize``, ``fnf sample``, ``fnf demo``.

Run ``fnf <command> --help`` for each command's options.
"""
from __future__ import annotations

import argparse
import os
import sys

DESCRIPTION = """\
Focus-N-Fix: fine-tune a local diffusers model folder (SD 1.x/2.x, SDXL, SD3/3.5, FLUX.1) with
DRaFT-K + LoRA so that a reward improves inside problem regions while the rest of the image stays as the
pretrained model drew it:

    loss = -w * r(I, c) + beta * || (1 - M(I0)) * (I0 - I) ||_F

I0 is the pretrained sample, I the fine-tuned one (same prompt, same noise), M(I0) the problem mask.
beta = 0 is plain DRaFT.

commands:
  train      train a LoRA (YAML config + --set overrides + flags); writes <out>/lora for pipe.load_lora_weights
  localize   write I0, heatmap, mask and overlay PNGs for prompts (check the localizer before training)
  sample     base and fine-tuned images side by side, same seeds
  eval       base vs LoRAs on prompts x seeds: reward with bootstrap intervals, win rate, change inside and
             outside the base image's mask; report.md, metrics.json, grids
  estimate-memory  predict a training step's peak GPU memory from the model folder's configs (no GPU, no weights)
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

FLAGS = {  # flag -> config key
    "model": "model.path", "reward": "reward.spec", "localizer": "localize.spec", "beta": "objective.beta",
    "steps": "train.steps", "lr": "train.lr", "seed": "train.seed", "out": "train.out", "resume": "train.resume",
    "fused_lora": "memory.fused_lora", "overwrite": "train.overwrite",
}


def _add_common(p: argparse.ArgumentParser, *, training: bool) -> None:
    p.add_argument("--config", metavar="X.yaml", help="YAML config (sections model, lora, sampling, reward, "
                                                      "localize, objective, train, memory)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set sampling.steps=20 (repeatable; values parsed as YAML)")
    p.add_argument("--model", metavar="DIR", help="local diffusers folder (model.path)")
    p.add_argument("--reward", metavar="SPEC", help="reward spec (reward.spec)")
    p.add_argument("--localizer", metavar="SPEC", help="localizer spec (localize.spec)")
    p.add_argument("--out", metavar="DIR", help="output folder (train.out)")
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


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="fnf", description=DESCRIPTION, epilog=SPEC_HELP, formatter_class=fmt)
    sub = parser.add_subparsers(dest="command", metavar="{train,localize,sample,eval,estimate-memory,demo}")
    p = sub.add_parser("train", help="train a LoRA", description=DESCRIPTION, epilog=SPEC_HELP + """
examples:
  fnf train --config configs/sd15_artifacts.yaml --model /models/sd-v1-5 --out runs/fix
  fnf train --config configs/sd15_artifacts.yaml --beta 0 --out runs/draft_baseline
  accelerate launch --num_processes 2 -m fnf train --config configs/sd15_artifacts.yaml
  fnf train --config configs/sd15_artifacts.yaml --resume          # continue from the latest checkpoint
""", formatter_class=fmt)
    _add_common(p, training=True)
    p = sub.add_parser("localize", help="write I0 / heatmap / mask / overlay PNGs for prompts",
                       description="Sample I0 with the pretrained model and write its heatmap and mask.",
                       epilog=SPEC_HELP, formatter_class=fmt)
    _add_common(p, training=False)
    p.add_argument("--prompts", nargs="+", metavar="PROMPT", help="prompts (default: the config's train.prompts)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], metavar="S", help="noise seeds (default 0)")
    p = sub.add_parser("sample", help="base and fine-tuned images side by side",
                       description="Sample the base model and the model with a LoRA from the same noise.",
                       formatter_class=fmt)
    _add_common(p, training=False)
    p.add_argument("--lora", required=True, metavar="DIR", help="LoRA folder written by `fnf train` (<out>/lora)")
    p.add_argument("--prompts", nargs="+", metavar="PROMPT", help="prompts (default: the config's train.prompts)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], metavar="S", help="noise seeds (default 0)")
    from . import evaluate
    from .memory import cli as memory_cli

    p = sub.add_parser("eval", help="base vs LoRAs on prompts x seeds: reward with intervals, change inside/outside "
                                    "the base mask, grids", formatter_class=fmt)
    evaluate.add_arguments(p)
    p = sub.add_parser("estimate-memory", help="predict a training step's peak GPU memory (no GPU, no weights)",
                       formatter_class=fmt)
    memory_cli.add_arguments(p)
    p = sub.add_parser("demo", help="DRaFT vs Focus-N-Fix on the embedded toy model, with a held-out report",
                       description="Fine-tune the embedded toy model (fnf/assets/toy/sd) with DRaFT (beta=0) and "
                                   "Focus-N-Fix (heatmap and Grad-CAM localization), then evaluate on held-out "
                                   "prompts x seeds; then Separate-and-Enhance (attn2.to_k) on held-out two-object "
                                   "prompts, base vs tuned success and the single-object forgetting check; writes "
                                   "report.md, metrics.json, grids and a plot.",
                       formatter_class=fmt)
    p.add_argument("--out", default="runs/demo", metavar="DIR", help="output folder (default runs/demo)")
    p.add_argument("--quick", action="store_true", help="a CI-sized run (a few steps, a few images)")
    p.add_argument("--eval-seed", "--seed", type=int, default=0, metavar="N", dest="eval_seed",
                   help="which set of held-out evaluation noise seeds to use (default 0); training seeds are fixed")
    p.add_argument("--sweep", action="store_true",
                   help="also train Focus-N-Fix at every beta of the sweep (0.3, 1, 3, 10) for the Pareto plot "
                        "(several times the default run time)")
    p.add_argument("--small", default="", metavar="DIR",
                   help="folder of the toy's small models (defect classifier, heatmap, attribute classifier; "
                        "default the shipped ones)")
    p.add_argument("--model", default="", metavar="DIR", help="toy pipeline folder (default the shipped one)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch CPU threads (default 2, or 1 on a one-core machine)")
    p.add_argument("--no-sepen", action="store_true", help="skip the Separate-and-Enhance part (saves ~1.5 min)")
    p.add_argument("--overwrite", action="store_true",
                   help="an --out holding an earlier demo is moved to <out>/previous-<time>/ (without it: refused)")
    return parser


def config_from_args(args):
    from . import config as config_mod

    cfg = config_mod.load(args.config, args.overrides)
    for flag, key in FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            config_mod._set(cfg, key, value)
    return config_mod.validate(cfg)


def _prepare(cfg):
    """Model, prompts embeddings helper and size for the no-grad commands."""
    import torch

    from .families.registry import load_model, model_options

    device = "cuda" if cfg.train.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu"
    model = load_model(cfg.model.path, kind=cfg.model.kind, weight_dtype=cfg.model.weight_dtype, device=device,
                       **model_options(cfg))
    h = cfg.sampling.height or model.native_size
    w = cfg.sampling.width or model.native_size
    return model, device, h, w


def _sample(model, cfg, prompt: str, seed: int, h: int, w: int, device):
    import torch

    from .encoding import encode_negative, encode_prompts
    from .sampling import initial_latents, sample_images

    cond = encode_prompts(model, [prompt], height=h, width=w)
    uncond = encode_negative(model, cfg.sampling.negative_prompt, 1, height=h, width=w)
    x_T = initial_latents(model, 1, h, w, torch.Generator().manual_seed(seed), device)
    return sample_images(model, x_T, cond, uncond, steps=cfg.sampling.steps,
                         guidance_scale=cfg.sampling.guidance_scale, eta=cfg.sampling.eta, seed=seed,
                         height=h, width=w)


def cmd_train(args) -> int:
    from .train import train

    cfg = config_from_args(args)
    result = train(cfg)
    print(f"fnf: done: {result.steps_done} steps; LoRA in {result.lora_dir}; log in {os.path.join(result.out, 'log.jsonl')}")
    return 0


def cmd_localize(args) -> int:
    from . import preflight
    from .images import save_png
    from .localize import heatmap_rgb, localizer_from_config, overlay
    from .rewards import build_reward, prepare_reward

    cfg = config_from_args(args)
    preflight.check(cfg, prompts=not args.prompts)
    model, device, h, w = _prepare(cfg)
    reward = prepare_reward(build_reward(cfg.reward.spec, **cfg.reward.kwargs), device)
    loc = localizer_from_config(cfg, reward)
    prompts = args.prompts or cfg.all_prompts()
    out = os.path.join(cfg.train.out, "localize")
    for pi, prompt in enumerate(prompts):
        for seed in args.seeds:
            img = _sample(model, cfg, prompt, seed, h, w, device)
            heat, mask = loc(img, [prompt], [pi])
            stem = os.path.join(out, f"p{pi:03d}_s{seed}")
            save_png(img[0], stem + "_i0.png")
            save_png(heatmap_rgb(heat)[0], stem + "_heatmap.png")
            save_png(mask[0, 0], stem + "_mask.png")
            save_png(overlay(img, mask)[0], stem + "_overlay.png")
    print(f"fnf: wrote {len(prompts) * len(args.seeds)} sets of I0/heatmap/mask/overlay PNGs to {out}")
    return 0


def cmd_sample(args) -> int:
    from . import preflight
    from .core import ADAPTER
    from .images import grid, save_png
    from .lora import adapters_disabled, load_lora

    cfg = config_from_args(args)
    from .core import LORA_WEIGHTS

    if not os.path.isfile(os.path.join(args.lora, LORA_WEIGHTS)):
        raise FileNotFoundError(f"--lora {args.lora!r}: expected a LoRA folder written by `fnf train` "
                                "(<out>/lora with pytorch_lora_weights.safetensors)")
    preflight.check(cfg, prompts=not args.prompts, specs=False)  # no reward or localizer is used here
    model, device, h, w = _prepare(cfg)
    load_lora(model, args.lora, adapter_name=ADAPTER)
    prompts = args.prompts or cfg.all_prompts()
    out = os.path.join(cfg.train.out, "samples_compare")
    for pi, prompt in enumerate(prompts):
        for seed in args.seeds:
            with adapters_disabled(model.denoiser):
                base = _sample(model, cfg, prompt, seed, h, w, device)
            tuned = _sample(model, cfg, prompt, seed, h, w, device)
            save_png(grid([[base[0], tuned[0]]]), os.path.join(out, f"p{pi:03d}_s{seed}.png"))
    print(f"fnf: wrote base | fine-tuned pairs to {out}")
    return 0


def cmd_demo(args) -> int:
    from .toy.demo import run_demo

    run_demo(args.out, quick=args.quick, seed=args.eval_seed, model=args.model, threads=args.threads,
             sepen=not args.no_sepen, overwrite=args.overwrite, sweep=args.sweep, small=args.small)
    print(f"fnf: demo report in {os.path.join(args.out, 'report.md')}")
    return 0


def cmd_eval(args) -> int:
    from . import evaluate

    return evaluate.run(args)


def cmd_estimate_memory(args) -> int:
    from .memory import cli as memory_cli

    return memory_cli.run(args)


# What user input can raise (config keys, specs, files, folders, model loading): one line, exit 2.
USER_ERRORS = (ValueError, TypeError, RuntimeError, OSError, ImportError)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    try:
        return {"train": cmd_train, "localize": cmd_localize, "sample": cmd_sample,
                "demo": cmd_demo, "eval": cmd_eval, "estimate-memory": cmd_estimate_memory}[args.command](args)
    except USER_ERRORS as e:
        if os.environ.get("FNF_DEBUG") == "1":
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"fnf {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fnf {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
