"""`fnf eval`: the base model and each LoRA on the same prompts x seeds, with intervals.

Every prompt is sampled with noise seeds first_seed .. first_seed + N - 1; image (prompt p, seed s) starts from the
same x_T for the base model and for every LoRA. Per model: the reward's mean with a percentile bootstrap 95%
interval, its change against the base model and the paired win rate (1 better, 0.5 tie, 0 worse, per image);
each ``--metric`` the same way; the change against the base image inside and outside the base image's mask
(the localizer on the base image, thresholded and dilated as in training): MSE and PSNR, and LPIPS when the
``lpips`` package and its AlexNet weights are on this machine. Writes metrics.json and report.md first, then
image grids (base | each LoRA, the base mask outlined). Nothing is deleted: an --out holding an earlier
evaluation is refused unless --overwrite, which moves it to <out>/previous-<UTC time>/.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from . import config as C
from . import metrics as M
from . import preflight
from .cli import _prepare
from .core import LORA_WEIGHTS
from .encoding import encode_negative, encode_prompts
from .images import grid, save_png
from .localize import check_localizer_spec, localizer_from_config
from .lora import adapters_disabled, load_lora
from .rewards import build_reward, check_reward_spec, prepare_reward
from .rewards import evaluate as reward_values
from .run_dir import move_aside
from .sampling import initial_latents, sample_images

OUTPUTS = ("metrics.json", "report.md", "grids")   # what an evaluation writes into --out
CLIP_METRIC = "clipscore"
GRID_ROWS = 8                                       # images per grid file
EPILOG = """\
examples:
  fnf eval --model /models/sd-v1-5 --lora runs/fix/lora runs/draft/lora --prompts prompts.txt --seeds 4 \\
           --reward sd-safety --reward-kwargs '{"model": "/models/sd-v1-5/safety_checker"}' \\
           --set reward.weight=-1 --localizer gradcam --clip /models/clip-vit-large-patch14 --out runs/eval
  fnf eval --config configs/sd15_artifacts.yaml --lora runs/fix/lora --prompts heldout.txt --seeds 2

A --metric is any reward spec, optionally with kwargs as JSON after '=':
  --metric 'pickscore={"model": "/models/PickScore_v1", "processor": "/models/CLIP-ViT-H-14"}'
With --set reward.weight < 0 a lower reward is better (win rate and Grad-CAM's 'problem' follow the sign).
"""


# ------------------------------------------------------------------------------------------ arguments
def add_arguments(parser) -> None:
    parser.description = __doc__.split("\n\n")[0].strip() + " " + " ".join(__doc__.split("\n\n")[1].split())
    parser.epilog = EPILOG
    p = parser
    p.add_argument("--model", metavar="DIR", help="local diffusers folder (model.path)")
    p.add_argument("--lora", nargs="+", default=[], metavar="DIR",
                   help="LoRA folders written by `fnf train` (<out>/lora), each compared with the base model")
    p.add_argument("--prompts", metavar="FILE", help="prompts, one per line (default: the config's train prompts)")
    p.add_argument("--seeds", type=int, default=1, metavar="N", help="noise seeds per prompt (default 1)")
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
    p.add_argument("--config", metavar="X.yaml", help="YAML config (sections model, sampling, reward, localize)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set localize.threshold=0.3 (repeatable)")


@dataclass
class Plan:
    """Everything `fnf eval` will do, checked before any model loads."""
    cfg: object
    loras: dict                       # name -> LoRA folder
    prompts: list
    seeds: list
    metric_specs: list                # [(name, spec, kwargs)]
    out: str
    overwrite: bool
    batch_size: int
    resamples: int
    bootstrap_seed: int
    grid_images: int
    progress: bool
    lpips_note: str = ""


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
        parts = os.path.normpath(os.path.abspath(folder)).split(os.sep)
        name = parts[-2] if parts[-1] == "lora" and len(parts) > 1 else parts[-1]
        unique, k = name, 2
        while unique in names or unique == "base":
            unique, k = f"{name}-{k}", k + 1
        names[unique] = folder
    return names


def _config(args):
    cfg = C.load(args.config, args.overrides)
    set_keys = {o.split("=", 1)[0].strip() for o in args.overrides}
    flags = {"model.path": args.model, "reward.spec": args.reward, "sampling.guidance_scale": args.guidance,
             "sampling.height": args.height, "sampling.width": args.width}
    if args.reward_kwargs is not None:
        flags["reward.kwargs"] = _json_object(args.reward_kwargs, "--reward-kwargs")
    if args.steps is not None:
        flags["sampling.steps"] = args.steps
        if args.steps >= 1:  # eval takes no gradient steps: keep truncation_k valid for any --steps
            cfg.sampling.truncation_k = min(cfg.sampling.truncation_k, args.steps)
    if args.localizer is not None:
        flags["localize.spec"] = args.localizer
    elif not args.config and "localize.spec" not in set_keys:
        flags["localize.spec"] = "none"
    for key, value in flags.items():
        if value is not None:
            C._set(cfg, key, value)
    if not cfg.model.path:
        raise ValueError("--model: expected a local diffusers model folder (or model.path in --config)")
    if not (args.reward or args.config or "reward.spec" in set_keys):
        raise ValueError("--reward: expected a reward spec (a registered name, module:callable or file.py:callable)")
    return C.validate(cfg)


def _read_prompts(path: str) -> list[str]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--prompts {path!r}: expected a file of prompts (one per line), which does not exist")
    with open(path, encoding="utf-8") as f:
        prompts = [line.strip() for line in f if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts {path!r}: expected at least one non-empty line")
    return prompts


def lpips_status() -> str:
    """'' when LPIPS can run here (the lpips package and its AlexNet backbone weights are local), else why not."""
    try:
        import lpips  # noqa: F401
    except ImportError:
        return "the lpips package is not installed"
    weights = os.path.join(torch.hub.get_dir(), "checkpoints", "alexnet-owt-7be5be79.pth")
    if not os.path.isfile(weights):
        return f"the AlexNet weights LPIPS needs are not at {weights}"
    return ""


def check_out(out: str, overwrite: bool) -> None:
    if os.path.exists(out) and not os.path.isdir(out):
        raise FileExistsError(f"--out {out!r}: expected a folder, found a file")
    found = [n for n in OUTPUTS if os.path.lexists(os.path.join(out, n))]
    if found and not overwrite:
        raise FileExistsError(f"--out {out} holds an earlier evaluation ({', '.join(found)}); pass --overwrite to "
                              f"move it to {out}/previous-<time>/, or choose another --out")


def plan(args) -> Plan:
    """Check every input without loading a model (raises ValueError/OSError naming the argument)."""

    for name, value, low in (("--seeds", args.seeds, 1), ("--batch-size", args.batch_size, 1),
                             ("--bootstrap", args.bootstrap, 1), ("--grid-images", args.grid_images, 0),
                             ("--first-seed", args.first_seed, 0)):
        if value < low:
            raise ValueError(f"{name}: expected an integer >= {low}, got {value}")
    cfg = _config(args)
    prompts = _read_prompts(args.prompts) if args.prompts else preflight.check_prompts(cfg)
    for folder in args.lora:
        if not os.path.isfile(os.path.join(folder, LORA_WEIGHTS)):
            raise FileNotFoundError(f"--lora {folder!r}: expected a LoRA folder written by `fnf train` "
                                    f"(<out>/lora with {LORA_WEIGHTS})")
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
    check_out(args.out, args.overwrite)
    preflight.check_device(cfg)
    preflight.check_model_folder(cfg.model.path, cfg.model.kind)
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    return Plan(cfg, lora_names(args.lora), prompts, seeds, metric_specs, args.out, args.overwrite,
                args.batch_size if cfg.sampling.eta == 0 else 1, args.bootstrap, args.bootstrap_seed,
                args.grid_images, not args.no_progress, lpips_status())


# ------------------------------------------------------------------------------------------ sampling
def sample_batch(model, cfg, prompts: list[str], seeds: list[int], h: int, w: int, device) -> torch.Tensor:
    """Images of ``prompts[i]`` from the noise of ``seeds[i]`` (the x_T `fnf sample` draws for that seed)."""

    cond = encode_prompts(model, prompts, height=h, width=w)
    uncond = encode_negative(model, cfg.sampling.negative_prompt, len(prompts), height=h, width=w)
    x_T = torch.cat([initial_latents(model, 1, h, w, torch.Generator().manual_seed(s), device) for s in seeds])
    # eta > 0 runs batches of one (plan), so the DDIM noise of an image depends only on its seed.
    return sample_images(model, x_T, cond, uncond, steps=cfg.sampling.steps,
                         guidance_scale=cfg.sampling.guidance_scale, eta=cfg.sampling.eta, seed=seeds[0],
                         height=h, width=w).float()


def _lpips_model(device):
    import lpips

    return lpips.LPIPS(net="alex", spatial=True, verbose=False).to(device).eval()


def _lpips_maps(net, images, base) -> torch.Tensor:
    with torch.no_grad():
        d = net(images * 2 - 1, base * 2 - 1)
    if d.shape[-2:] != images.shape[-2:]:
        d = torch.nn.functional.interpolate(d, size=images.shape[-2:], mode="bilinear", align_corners=False)
    return d[:, 0].float()


def _masked_mean(maps: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    inside_m = mask[:, 0] > 0.5
    n_in, n_out = inside_m.float().sum((1, 2)), (~inside_m).float().sum((1, 2))
    inside = (maps * inside_m).sum((1, 2)) / n_in.clamp_min(1)
    outside = (maps * ~inside_m).sum((1, 2)) / n_out.clamp_min(1)
    nan = torch.full_like(inside, float("nan"))
    return torch.where(n_in > 0, inside, nan), torch.where(n_out > 0, outside, nan)


class Recorder:
    """Per-image values of every model, appended batch by batch."""

    def __init__(self):
        self.values: dict = {}

    def add(self, model: str, key: str, values) -> None:
        arr = values.detach().cpu().double().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
        self.values.setdefault(model, {}).setdefault(key, []).extend(arr.reshape(-1).tolist())

    def get(self, model: str, key: str) -> np.ndarray:
        return np.asarray(self.values[model][key], dtype=np.float64)


def score_batch(rec: Recorder, name: str, images, base, mask, prompts, reward, metric_fns, lpips_net) -> None:
    with torch.no_grad():
        rec.add(name, "reward", reward_values(reward, images, prompts))
        for metric, fn in metric_fns.items():
            rec.add(name, "metric:" + metric, reward_values(fn, images, prompts))
    inside, outside = M.masked_mse(images, base, mask)
    rec.add(name, "inside_mse", inside)
    rec.add(name, "outside_mse", outside)
    rec.add(name, "inside_psnr", M.psnr_from_mse(inside))
    rec.add(name, "outside_psnr", M.psnr_from_mse(outside))
    if lpips_net is not None:
        li, lo = _masked_mean(_lpips_maps(lpips_net, images, base), mask)
        rec.add(name, "inside_lpips", li)
        rec.add(name, "outside_lpips", lo)


# ------------------------------------------------------------------------------------------ summaries
def summarize(rec: Recorder, models: list[str], metric_names: list[str], higher_is_better: bool, *, resamples: int,
              seed: int) -> dict:
    """Per model: reward, its change against base and the paired win rate, metrics (and their change), change
    inside / outside the base mask; each {"mean", "ci_low", "ci_high", "n"}."""
    kw = dict(resamples=resamples, seed=seed)
    base_r = rec.get("base", "reward")
    out = {}
    for name in models:
        r = rec.get(name, "reward")
        row = {"reward": M.summary(r, **kw), "reward_delta": M.summary(r - base_r, **kw),
               "win_rate": M.summary(M.paired_wins(r, base_r, higher_is_better), **kw), "metrics": {}}
        for metric in metric_names:
            v, b = rec.get(name, "metric:" + metric), rec.get("base", "metric:" + metric)
            row["metrics"][metric] = {**M.summary(v, **kw), "delta": M.summary(v - b, **kw)}
        row["change"] = {key: M.summary(rec.get(name, key), **kw) for key in rec.values[name]
                         if key.startswith(("inside_", "outside_"))}
        out[name] = row
    return out


def _fmt(s: dict, digits: int = 4, signed: bool = False) -> str:
    if s["mean"] is None or s["n"] == 0 or s["mean"] != s["mean"]:
        return "n/a"
    f = f"{{:{'+' if signed else ''}.{digits}g}}"
    return f"{f.format(s['mean'])} [{f.format(s['ci_low'])}, {f.format(s['ci_high'])}]"


def report_lines(result: dict) -> list[str]:
    st, models = result["settings"], result["models"]
    b = st["bootstrap"]
    lines = ["# fnf eval", "",
             f"Model {st['model']}; {st['n_images']} images ({st['n_prompts']} prompts x {len(st['seeds'])} seeds "
             f"{st['seeds'][0]}..{st['seeds'][-1]}), {st['steps']} DDIM steps, guidance {st['guidance']}, "
             f"{st['height']}x{st['width']}. Reward {st['reward']['spec']!r} "
             f"({'higher' if st['reward']['higher_is_better'] else 'lower'} is better); localizer "
             f"{st['localizer']!r}: {st['n_images_with_mask']} base images have a non-empty mask.", "",
             f"Each cell: mean [{int(b['level'] * 100)}% percentile bootstrap interval, B = {b['resamples']} "
             f"resamples, seed {b['seed']}]. Changes are against the base image from the same prompt and noise, "
             "inside and outside the base image's mask; win rate: per image 1 better than base, 0.5 tie, 0 worse.",
             "", "| model | reward | Δ reward | win rate vs base | change outside mask (MSE) "
             "| change inside mask (MSE) |", "|---|---|---|---|---|---|"]
    for name, r in models.items():
        c = r["change"]
        lines.append(f"| {name} | {_fmt(r['reward'])} | {_fmt(r['reward_delta'], signed=True)} | "
                     f"{_fmt(r['win_rate'], 3)} | {_fmt(c['outside_mse'], 3)} | {_fmt(c['inside_mse'], 3)} |")
    for name, r in models.items():
        src = st["loras"].get(name)
        lines += ["", f"## {name}" + (f" ({src})" if src else " (no LoRA)"), "",
                  "| quantity | mean [95% interval] | n |", "|---|---|---|",
                  f"| reward | {_fmt(r['reward'])} | {r['reward']['n']} |",
                  f"| Δ reward vs base | {_fmt(r['reward_delta'], signed=True)} | {r['reward_delta']['n']} |",
                  f"| win rate vs base | {_fmt(r['win_rate'], 3)} | {r['win_rate']['n']} |"]
        for metric, s in r["metrics"].items():
            lines.append(f"| {metric} | {_fmt(s)} | {s['n']} |")
            lines.append(f"| Δ {metric} vs base | {_fmt(s['delta'], signed=True)} | {s['delta']['n']} |")
        for key, s in r["change"].items():
            where, what = key.split("_")
            unit = " (dB, capped at %g)" % M.PSNR_MAX_DB if what == "psnr" else ""
            lines.append(f"| change {where} mask, {what.upper()}{unit} | {_fmt(s)} | {s['n']} |")
    if st["lpips"]:
        lines += ["", f"LPIPS not computed: {st['lpips']}."]
    if result["checks"]:
        lines += ["", "Checks: " + "; ".join(f"{k}: max |diff| {v['max_abs_diff']:.2e} "
                                             f"({'ok' if v['ok'] else 'FAILED'})" for k, v in result["checks"].items())]
    if result["grids"]:
        names = " | ".join(["base"] + list(models)[1:])
        lines += ["", f"Grids: {names}, the base image's mask outlined in green.", ""]
        lines += [f"![grid]({g})" for g in result["grids"]]
    return lines + [""]


# ------------------------------------------------------------------------------------------ pictures
def outline(mask: torch.Tensor, width: int = 1) -> torch.Tensor:
    """(B, 1, H, W) 0/1 -> the mask's inner border of ``width`` pixels (B, 1, H, W) bool."""
    inside = mask > 0.5
    k = 2 * width + 1
    near_outside = torch.nn.functional.max_pool2d((~inside).float(), k, stride=1, padding=width) > 0.5
    return inside & near_outside


def draw_outline(images: torch.Tensor, mask: torch.Tensor, color=(0.0, 1.0, 0.0)) -> torch.Tensor:
    edge = outline(mask.to(images.device), max(1, images.shape[-1] // 128)).to(images.dtype)
    tint = torch.tensor(color, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return images * (1 - edge) + tint * edge


def write_grids(out: str, columns: list[torch.Tensor], mask: torch.Tensor) -> list[str]:
    """Grid PNGs of GRID_ROWS images each: columns base | LoRAs, outlines of ``mask``; returns relative paths."""

    cols = [draw_outline(c, mask) for c in columns]
    scale = max(1, 128 // cols[0].shape[-1])
    paths = []
    for k, start in enumerate(range(0, cols[0].shape[0], GRID_ROWS)):
        rows = [[c[i] for c in cols] for i in range(start, min(start + GRID_ROWS, cols[0].shape[0]))]
        img = grid(rows)
        if scale > 1:
            img = torch.nn.functional.interpolate(img[None], scale_factor=scale, mode="nearest")[0]
        rel = os.path.join("grids", f"grid_{k:03d}.png")
        save_png(img, os.path.join(out, rel))
        paths.append(rel)
    return paths


# ------------------------------------------------------------------------------------------ the command
SAME_IMAGES_ATOL = 1e-4   # adapters-off vs base: the same computation, float32 rounding of other GEMM orders


def run(args) -> int:
    p = plan(args)
    result = evaluate(p)
    print(f"fnf eval: {result['settings']['n_images']} images x {len(result['models'])} models; report in "
          f"{os.path.join(p.out, 'report.md')}")
    return 0


def evaluate(p: Plan) -> dict:
    """Run a checked :class:`Plan`; writes metrics.json, report.md and grids; returns metrics.json's content."""

    t0 = time.time()
    cfg = p.cfg
    model, device, h, w = _prepare(cfg)
    reward = prepare_reward(build_reward(cfg.reward.spec, **cfg.reward.kwargs), device)
    metric_fns = {name: prepare_reward(build_reward(spec, **kw), device) for name, spec, kw in p.metric_specs}
    localizer = localizer_from_config(cfg, reward)
    lpips_net = None if p.lpips_note else _lpips_model(device)
    items = [(pi, prompt, seed) for pi, prompt in enumerate(p.prompts) for seed in p.seeds]
    models = ["base"] + list(p.loras)
    rec, checks = Recorder(), {}
    grid_cols = {m: [] for m in models}
    grid_masks, mask_fraction = [], []
    bar = None
    if p.progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(items) * len(models), desc="fnf eval", unit="image", dynamic_ncols=True)
    loaded, adapters = False, {}
    for start in range(0, len(items), p.batch_size):
        batch = items[start:start + p.batch_size]
        idx, prompts, seeds = [b[0] for b in batch], [b[1] for b in batch], [b[2] for b in batch]
        with adapters_disabled(model.denoiser) if loaded else contextlib.nullcontext():
            base = sample_batch(model, cfg, prompts, seeds, h, w, device)
        _, mask = localizer(base, prompts, idx)
        mask = mask.float()
        mask_fraction += mask.flatten(1).mean(1).tolist()
        if bar is not None:
            bar.update(len(batch))
        if not loaded and p.loras:  # first batch: the true base model; then every LoRA joins as its own adapter
            adapters = load_loras(model, p.loras)
            loaded = True
            with adapters_disabled(model.denoiser):
                again = sample_batch(model, cfg, prompts, seeds, h, w, device)
            diff = float((again - base).abs().max())
            checks["adapters-off model reproduces the base images"] = {"max_abs_diff": diff,
                                                                       "ok": diff <= SAME_IMAGES_ATOL}
        score_batch(rec, "base", base, base, mask, prompts, reward, metric_fns, lpips_net)
        keep = max(0, min(len(batch), p.grid_images - start))
        grid_cols["base"].append(base[:keep].cpu())
        grid_masks.append(mask[:keep].cpu())
        for name in p.loras:
            model.denoiser.set_adapter(adapters[name])
            images = sample_batch(model, cfg, prompts, seeds, h, w, device)
            score_batch(rec, name, images, base, mask, prompts, reward, metric_fns, lpips_net)
            grid_cols[name].append(images[:keep].cpu())
            if bar is not None:
                bar.update(len(batch))
    if bar is not None:
        bar.close()
    higher = cfg.reward.weight >= 0
    summary = summarize(rec, models, [n for n, _, _ in p.metric_specs], higher, resamples=p.resamples,
                        seed=p.bootstrap_seed)
    for name in models:
        summary[name]["lora"] = p.loras.get(name)
    n_masked = int(sum(f > 0 for f in mask_fraction))
    result = {
        "settings": {"model": cfg.model.path, "loras": dict(p.loras), "n_prompts": len(p.prompts),
                     "seeds": p.seeds, "n_images": len(items), "n_images_with_mask": n_masked,
                     "steps": cfg.sampling.steps, "guidance": cfg.sampling.guidance_scale, "eta": cfg.sampling.eta,
                     "height": h, "width": w, "negative_prompt": cfg.sampling.negative_prompt,
                     "reward": {"spec": cfg.reward.spec, "kwargs": cfg.reward.kwargs, "weight": cfg.reward.weight,
                                "higher_is_better": higher},
                     "metrics": {n: {"spec": s, "kwargs": k} for n, s, k in p.metric_specs},
                     "localizer": cfg.localize.spec, "localize": dict(vars(cfg.localize)),
                     "bootstrap": {"resamples": p.resamples, "seed": p.bootstrap_seed, "level": M.LEVEL,
                                   "method": "percentile bootstrap of the mean over images"},
                     "psnr_max_db": M.PSNR_MAX_DB, "lpips": p.lpips_note, "seconds": round(time.time() - t0, 1)},
        "checks": checks,
        "models": summary,
        "images": [{"prompt_index": pi, "prompt": pr, "seed": s, "mask_fraction": f}
                   for (pi, pr, s), f in zip(items, mask_fraction)],
        "per_image": rec.values,
        "grids": [],
    }
    cols = [torch.cat(grid_cols[m]) for m in models]
    gmask = torch.cat(grid_masks)
    if cols[0].shape[0]:
        result["grids"] = [os.path.join("grids", f"grid_{k:03d}.png")
                           for k in range((cols[0].shape[0] + GRID_ROWS - 1) // GRID_ROWS)]
    write_results(p, result)
    if result["grids"]:
        try:   # results first: a failure while drawing must not cost the numbers
            write_grids(p.out, cols, gmask)
        except ImportError as e:
            print(f"fnf eval: grids not drawn ({e.name or e} is not installed)")
    return result


def load_loras(model, loras: dict) -> dict:
    """Every LoRA folder into the UNet as its own adapter; returns report name -> adapter name (pick one with
    set_adapter). Adapter names are ``fnf_eval_<i>``, never the report name: peft makes each adapter name an
    attribute of every LoRA layer, so a folder called e.g. ``train`` or ``forward`` would clash with nn.Module."""

    adapters = {name: f"fnf_eval_{i}" for i, name in enumerate(loras)}
    with warnings.catch_warnings():   # peft warns when a second adapter joins: here that is the plan
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        for name, folder in loras.items():
            load_lora(model, folder, adapter_name=adapters[name])
    return adapters


def write_results(p: Plan, result: dict) -> None:
    os.makedirs(p.out, exist_ok=True)
    # With --overwrite: the earlier evaluation. Without: plan() refused one, so what is there now appeared while
    # this one ran; it is moved aside too rather than losing either.
    moved = move_aside(p.out, OUTPUTS)
    if moved:
        print(f"fnf eval: moved the earlier evaluation in {p.out} to {moved}")
    with open(os.path.join(p.out, "metrics.json"), "w", encoding="utf-8") as f:
        json.dump(M.finite_or_none(result), f, indent=1)
    with open(os.path.join(p.out, "report.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(report_lines(result)))
