"""`fnf eval`: the base model and each LoRA on the same prompts x seeds, with intervals.

Every prompt is sampled with noise seeds first_seed .. first_seed + N - 1; image (prompt p, seed s) starts from the
same x_T for the base model and for every LoRA. Per model: the reward's mean with a percentile bootstrap 95%
interval, its change against the base model and the paired win rate (1 better, 0.5 tie, 0 worse, per image);
each ``--metric`` the same way; the change against the base image inside and outside the base image's mask
(the localizer on the base image, thresholded and dilated as in training): MSE and PSNR, and LPIPS when the
``lpips`` package and its AlexNet weights are on this machine. Writes metrics.json and report.md first, then
image grids (base | each LoRA, the base mask outlined). Nothing is deleted: an --out holding an earlier
evaluation is refused unless --overwrite, which moves it to <out>/previous-<UTC time>/.

This module runs a checked :class:`Plan`; the command's options and checks are in fnf/commands/eval.py.
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

from . import metrics as M
from .images import grid, save_png
from .inference import check_lora_fits, load_for_inference, sample_seeded
from .inference import check_out as check_out_folder
from .localize import localizer_from_config
from .lora import adapters_disabled, load_lora
from .rewards import build_reward, prepare_reward
from .rewards import score as reward_values
from .train.run_dir import move_aside

OUTPUTS = ("metrics.json", "report.md", "grids")   # what an evaluation writes into --out
GRID_ROWS = 8                                       # images per grid file


@dataclass
class Plan:
    """Everything `fnf eval` will do, checked before any model loads (fnf.commands.eval.plan)."""
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
    """Refuse an --out that is a file or holds an earlier evaluation (unless ``overwrite``)."""
    check_out_folder(out, OUTPUTS, overwrite, "evaluation")


# ------------------------------------------------------------------------------------------ sampling
def sample_batch(model, cfg, prompts: list[str], seeds: list[int], h: int, w: int, device) -> torch.Tensor:
    """Images of ``prompts[i]`` from the noise of ``seeds[i]`` (the x_T `fnf sample` draws for that seed), float32.
    eta > 0 runs batches of one (the command's plan), so the DDIM noise of an image depends only on its seed."""
    return sample_seeded(model, cfg, prompts, seeds, h, w, device).float()


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


# ------------------------------------------------------------------------------------------ the run
SAME_IMAGES_ATOL = 1e-4   # adapters-off vs base: the same computation, float32 rounding of other GEMM orders


def evaluate(p: Plan) -> dict:
    """Run a checked :class:`Plan`; writes metrics.json, report.md and grids; returns metrics.json's content."""

    t0 = time.time()
    cfg = p.cfg
    model, device, h, w = load_for_inference(cfg)
    for folder in p.loras.values():   # before any sampling: a LoRA of another size or rank layout
        check_lora_fits(folder, model.family, cfg.model.path, model.denoiser)
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
