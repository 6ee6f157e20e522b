"""`fnf eval`: its options, their checks (every input before any model loads) and the run (fnf/evaluate.py)."""
from __future__ import annotations

import contextlib
import json
import os
import sys

from .. import config
from .. import evaluate as E
from .. import metrics as M
from .. import preflight
from ..inference import check_lora_arg, check_lora_for_folder, lora_name
from ..localize import check_localizer_spec
from ..rewards import check_reward_spec
from .common import add_prompts, config_from_flags, read_prompts_file, wrapped

CLIP_METRIC = "clipscore"
EPILOG = """\
examples:
  fnf eval --model /models/sd-v1-5 --lora runs/fix/lora runs/draft/lora --prompts-file prompts.txt \\
           --seeds 4 \\
           --reward sd-safety --reward-kwargs '{"model": "/models/sd-v1-5/safety_checker"}' \\
           --set reward.weight=-1 --localizer gradcam --clip /models/clip-vit-large-patch14 --out runs/eval
  fnf eval --config configs/sd15_artifacts.yaml --lora runs/fix/lora --prompts-file heldout.txt --seeds 2

A --metric is any reward spec, optionally with kwargs as JSON after '=':
  --metric 'pickscore={"model": "/models/PickScore_v1", "processor": "/models/CLIP-ViT-H-14"}'
With --set reward.weight < 0 a lower reward is better (win rate and Grad-CAM's 'problem' follow the sign).
"""


def add_arguments(parser) -> None:
    doc = E.__doc__.split("\n\n")
    parser.description = wrapped((doc[0].strip() + " " + doc[1]).replace("``", "'"))
    parser.epilog = EPILOG
    p = parser
    p.add_argument("--model", metavar="DIR", help="local diffusers folder (model.path)")
    p.add_argument("--lora", nargs="+", default=[], metavar="DIR",
                   help="LoRA folders written by `fnf train` (<out>/lora), each compared with the base model")
    add_prompts(p, "the config's train.prompts and train.prompts_file")
    p.add_argument("--seeds", type=int, default=1, metavar="N",
                   help="how many noise seeds per prompt (default 1): seeds --first-seed .. --first-seed + N - 1")
    p.add_argument("--first-seed", type=int, default=0, metavar="S", help="seeds are S .. S+N-1 (default 0)")
    p.add_argument("--reward", metavar="SPEC", help="reward spec (reward.spec): the main score")
    p.add_argument("--reward-kwargs", metavar="JSON", help="reward keyword arguments as a JSON object (reward.kwargs)")
    p.add_argument("--localizer", metavar="SPEC",
                   help="localizer of the base image's mask (localize.spec; default: the config's, or none)")
    p.add_argument("--metric", action="append", default=[], metavar="SPEC[=JSON]",
                   help="another score, any reward spec (repeatable)")
    p.add_argument("--clip", metavar="DIR", help=f"a local CLIP folder: adds the '{CLIP_METRIC}' metric (100 cos)")
    p.add_argument("--out", default="runs/eval", metavar="DIR", help="output folder (default runs/eval)")
    p.add_argument("--overwrite", action="store_true",
                   help="an --out holding an earlier evaluation is moved to <out>/previous-<time>/ (else refused)")
    p.add_argument("--steps", type=int, metavar="T", help="DDIM steps (sampling.steps)")
    p.add_argument("--guidance", type=float, metavar="G", help="classifier-free guidance (sampling.guidance_scale)")
    p.add_argument("--height", type=int, metavar="H", help="image height (sampling.height; default the model's)")
    p.add_argument("--width", type=int, metavar="W", help="image width (sampling.width)")
    p.add_argument("--batch-size", type=int, default=4, metavar="B", help="images per sampling batch (default 4)")
    p.add_argument("--bootstrap", type=int, default=M.BOOTSTRAP_RESAMPLES, metavar="B",
                   help=f"bootstrap resamples (default {M.BOOTSTRAP_RESAMPLES})")
    p.add_argument("--bootstrap-seed", type=int, default=M.BOOTSTRAP_SEED, metavar="S",
                   help=f"seed of the bootstrap draws (default {M.BOOTSTRAP_SEED})")
    p.add_argument("--grid-images", type=int, default=16, metavar="N",
                   help="how many prompt/seed images the grids show (default 16; 0: no grids)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true",
                   help="print metrics.json to stdout at the end (the summary then goes to stderr)")
    p.add_argument("--config", metavar="X.yaml", help="YAML config (sections model, sampling, reward, localize)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set localize.threshold=0.3 (repeatable)")


def _json_object(text: str, what: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError as e:
        raise ValueError(f"{what}: expected a JSON object, got {text!r} ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{what}: expected a JSON object, got {text!r}")
    return value


def parse_metric(text: str) -> tuple[str, dict]:
    """'SPEC' or 'SPEC={json kwargs}' -> (spec, kwargs)."""
    spec, sep, rest = text.partition("={")
    kwargs = _json_object("{" + rest, f"--metric {text!r}: the kwargs after '='") if sep else {}
    if not spec:
        raise ValueError(f"--metric {text!r}: expected a reward spec, optionally followed by ={{json kwargs}}")
    return spec, kwargs


def lora_names(folders: list[str]) -> dict:
    """Short unique names: runs/fix/lora -> 'fix', runs/x/my_lora -> 'my_lora'."""
    names = {}
    for folder in folders:
        name = lora_name(folder)
        unique, k = name, 2
        while unique in names or unique == "base":
            unique, k = f"{name}-{k}", k + 1
        names[unique] = folder
    return names


def config_from_eval_args(args):
    """eval's config: --config and --set, then its flags; without --localizer, --config or a localize.spec
    override the localizer is none."""
    set_keys = {o.split("=", 1)[0].strip() for o in args.overrides}
    flags = {"model.path": args.model, "reward.spec": args.reward, "sampling.guidance_scale": args.guidance,
             "sampling.height": args.height, "sampling.width": args.width, "sampling.steps": args.steps}
    if args.localizer is not None:
        flags["localize.spec"] = args.localizer
    elif not args.config and "localize.spec" not in set_keys:
        flags["localize.spec"] = "none"

    def check(cfg):
        if args.reward_kwargs is not None:   # parsed after the config loaded: a bad --config is reported first
            config._set(cfg, "reward.kwargs", _json_object(args.reward_kwargs, "--reward-kwargs"))
        if args.steps is not None and args.steps >= 1:  # no gradient steps: keep truncation_k valid for any --steps
            cfg.sampling.truncation_k = min(cfg.sampling.truncation_k, args.steps)
        if not cfg.model.path:
            raise ValueError("--model: expected a local diffusers model folder (or model.path in --config)")
        if not (args.reward or args.config or "reward.spec" in set_keys):
            raise ValueError("--reward: expected a reward spec (a registered name, module:callable or "
                             "file.py:callable)")

    return config_from_flags(args.config, args.overrides, flags, check)


def _prompts(args, cfg) -> list[str]:
    if args.prompts:
        if len(args.prompts) == 1 and os.path.isfile(args.prompts[0]):
            raise ValueError(f"--prompts {args.prompts[0]!r}: --prompts takes the prompts themselves; for a file "
                             f"of prompts use --prompts-file {args.prompts[0]}")
        return list(args.prompts)
    if args.prompts_file:
        return read_prompts_file(args.prompts_file)
    return preflight.check_prompts(cfg)


def plan(args) -> E.Plan:
    """Check every input without loading a model (raises ValueError/OSError naming the argument)."""
    for name, value, low in (("--seeds", args.seeds, 1), ("--batch-size", args.batch_size, 1),
                             ("--bootstrap", args.bootstrap, 1), ("--grid-images", args.grid_images, 0),
                             ("--first-seed", args.first_seed, 0)):
        if value < low:
            raise ValueError(f"{name}: expected an integer >= {low}, got {value}")
    cfg = config_from_eval_args(args)
    prompts = _prompts(args, cfg)
    for folder in args.lora:
        check_lora_arg(folder)
    metric_specs = []
    for text in args.metric:
        spec, kwargs = parse_metric(text)
        metric_specs.append((text.partition("={")[0], spec, kwargs))
    if args.clip:
        if not os.path.isdir(args.clip):
            raise FileNotFoundError(f"--clip {args.clip!r}: expected a local CLIP model folder, which does not exist")
        metric_specs.append((CLIP_METRIC, CLIP_METRIC, {"model": args.clip}))  # fnf.reward_models.clip
    names = [n for n, _, _ in metric_specs]
    if len(set(names)) != len(names):
        raise ValueError(f"--metric: each metric once, got {names}")
    check_reward_spec(cfg.reward.spec, cfg.reward.kwargs)
    for name, spec, kwargs in metric_specs:
        check_reward_spec(spec, kwargs)
    check_localizer_spec(cfg.localize.spec, cfg.localize.kwargs)
    E.check_out(args.out, args.overwrite)
    preflight.check_device(cfg)
    preflight.check_model_folder(cfg.model.path, cfg.model.kind)
    for folder in args.lora:   # a LoRA of another family: before the model loads
        check_lora_for_folder(folder, cfg.model.path, cfg.model.kind)
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    return E.Plan(cfg, lora_names(args.lora), prompts, seeds, metric_specs, args.out, args.overwrite,
                  args.batch_size if cfg.sampling.eta == 0 else 1, args.bootstrap, args.bootstrap_seed,
                  args.grid_images, not args.no_progress, E.lpips_status())


def summary_lines(result: dict) -> list[str]:
    """The console's short summary: per model its reward, change vs base, win rate and change outside the mask."""
    def num(s, fmt=".4g"):
        return "n/a" if s.get("mean") is None else format(s["mean"], fmt)

    lines = []
    for name, r in result["models"].items():
        line = f"  {name}: reward {num(r['reward'])}"
        if name != "base":
            line += (f", {num(r['reward_delta'], '+.4g')} vs base, win rate {num(r['win_rate'], '.2f')}, change "
                     f"outside / inside the mask (MSE) {num(r['change']['outside_mse'], '.2g')} / "
                     f"{num(r['change']['inside_mse'], '.2g')}")
        lines.append(line)
    return lines


def run(args) -> int:
    p = plan(args)
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        result = E.evaluate(p)
        print(f"fnf eval: {result['settings']['n_images']} images x {len(result['models'])} models; report in "
              f"{os.path.join(p.out, 'report.md')}")
        print("\n".join(summary_lines(result)))
    if args.json:
        with open(os.path.join(p.out, "metrics.json"), encoding="utf-8") as f:
            json.dump(json.load(f), sys.stdout, indent=1)
        print()
    return 0
