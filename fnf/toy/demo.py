"""`fnf demo`: DRaFT (beta = 0) vs Focus-N-Fix on the embedded toy model, then a held-out evaluation.

Three LoRA fine-tunings of fnf/assets/toy/sd with the same reward (fnf.toy.rewards:defect_reward), steps,
seeds and sampler, through fnf.train.train:
  draft        beta = 0 (the heatmap localizer still runs, so the logged change outside its mask compares)
  fnf_heatmap  beta > 0, mask from the defect heatmap model
  fnf_gradcam  beta > 0, mask from Grad-CAM of the defect classifier's logit
Then base and the three fine-tuned models sample the held-out prompts x evaluation seeds from the same noise.
Metrics per model: defect_score (mean p(defect)), defect_rate (p > 0.5), alignment (fraction of the prompt's
(shape, colour) pairs the attribute classifier finds), outside/inside_change_mse (mean squared pixel change
against the base image on the same noise, outside / inside the base image's defect mask from the heatmap model).
Then Separate-and-Enhance (fnf.toy.sepen_demo): attn2.to_k tuned with the sepen objective, base vs tuned
success on the held-out two-object prompts (the attribute classifier finds both shapes with their colours) and
the single-object prompts as the forgetting check, plus the two losses along the base model's trajectories split
by success (metrics.json key "sepen").
Writes metrics.json, settings.json and report.md first, then the pictures (grids/*.png, training.png: a
missing matplotlib or Pillow costs only the picture), and each run's folder under <out>/runs/. An <out> that holds
an earlier demo is refused unless ``overwrite`` (which moves it to <out>/previous-<time>/).
"""
from __future__ import annotations

import json
import os
import time

import torch

from . import ASSETS
from . import data as toydata

METHODS = ("draft", "fnf_heatmap", "fnf_gradcam")
LOCALIZERS = {"draft": "heatmap:fnf.toy.rewards:defect_heatmap",
              "fnf_heatmap": "heatmap:fnf.toy.rewards:defect_heatmap",
              "fnf_gradcam": "heatmap:fnf.toy.rewards:defect_gradcam"}
# Ours (the papers publish no values for a 64x64 toy): see report.md.
SETTINGS = {
    "default": {"train_steps": 40, "batch": 4, "eval_seeds": 4, "eval_pairs": None, "sepen_steps": 200},
    "quick": {"train_steps": 2, "batch": 2, "eval_seeds": 1, "eval_pairs": 4, "sepen_steps": 2},
}
# Ours: fnf's generic default. Measured on a 2400-step toy model (guidance 4, 40 steps, 136 held-out
# images): beta 1/5/50
# gave defect-score changes of -0.010 / -0.005 / -0.004 (DRaFT -0.053) at outside-mask MSE 0.00043 / 0.00020 /
# 0.00003 (DRaFT 0.00117); a squared penalty with beta 20 gave +0.002 / 0.00016. See fnf/toy/README.md.
BETA = 1.0
MASK_THRESHOLD = 0.5     # heatmap p > 0.5 (absolute) for the evaluation mask
MASK_RADIUS = 2
# What a demo writes into <out>; an <out> holding any of them is an earlier demo.
OUTPUTS = ("metrics.json", "settings.json", "report.md", "training.png", "grids", "runs")
# Largest |difference| allowed between images that must be the same computation (float32 rounding of a
# 10-step toy sampler is ~1e-6; 1e-4 leaves room for other CPUs' GEMM orderings).
SAME_IMAGES_ATOL = 1e-4


def prepare_out(out: str, overwrite: bool) -> None:
    """Refuse an <out> that holds an earlier demo (naming what is there) unless ``overwrite``; then move it aside."""
    from ..run_dir import move_aside

    found = [n for n in OUTPUTS if os.path.lexists(os.path.join(out, n))]
    if found and not overwrite:
        raise FileExistsError(f"{out} holds an earlier demo ({', '.join(found)}); pass --overwrite to move it to "
                              f"{out}/previous-<time>/, or choose another --out")
    if found:
        print(f"fnf demo: --overwrite: moved the earlier demo to {move_aside(out, OUTPUTS)}", flush=True)


def same_images(a: torch.Tensor, b: torch.Tensor, what: str, checks: dict) -> None:
    """Record (and warn about) a consistency check that should hold exactly up to float rounding."""
    diff = float((a - b).abs().max())
    checks[what] = {"max_abs_diff": diff, "ok": diff <= SAME_IMAGES_ATOL}
    if diff > SAME_IMAGES_ATOL:
        print(f"fnf demo: warning: {what}: images differ by {diff:.2e} (> {SAME_IMAGES_ATOL:g})", flush=True)


def base_config(model: str, out: str, method: str, steps: int, batch: int, seed: int, beta: float = BETA,
                squared: bool = False, grad_clip: float = 1.0):
    from ..config import from_dict

    return from_dict({
        "model": {"path": model},
        "lora": {"rank": 8, "alpha": 8},
        "sampling": {"steps": 10, "truncation_k": 2, "guidance_scale": 1.5},
        "reward": {"spec": "fnf.toy.rewards:defect_reward"},
        "localize": {"spec": LOCALIZERS[method], "threshold": 0.5, "radius": MASK_RADIUS},
        "objective": {"beta": 0.0 if method == "draft" else beta, "squared": squared},
        "memory": {"unet_checkpointing": False, "vae_checkpointing": False, "offload_text_encoder": False},
        "train": {"steps": steps, "batch_size": batch, "lr": 1e-3, "grad_clip": grad_clip, "seed": seed, "out": out,
                  "checkpoint_every": 0,
                  "sample_every": 0, "progress": False, "tensorboard": False, "device": "cpu",
                  "prompts": toydata.train_prompts()},
    })


def eval_masks(images: torch.Tensor) -> torch.Tensor:
    """Base-image defect masks (B, H, W) bool: heatmap p > threshold, dilated by MASK_RADIUS."""
    import torch.nn.functional as F

    from .rewards import defect_heatmap

    m = (defect_heatmap()(images) > MASK_THRESHOLD).float()[:, None]
    r = MASK_RADIUS
    return F.max_pool2d(m, 2 * r + 1, stride=1, padding=r)[:, 0] > 0.5 if r else m[:, 0] > 0.5


def metrics(images, base, masks, prompts) -> dict:
    from ..metrics import masked_mse
    from .evaluate_sd import measure

    m = measure(images, prompts)
    inside, outside = masked_mse(images, base, masks)        # fnf eval's metric; NaN where a region is empty
    outside = torch.nan_to_num(outside, nan=0.0)             # an all-mask image changes nothing outside
    has = masks.flatten(1).any(1)
    return {"defect_score": m["defect_score"], "defect_rate": m["defect_rate"], "alignment": m["alignment"],
            "alignment_exact": m["alignment_exact"], "outside_change_mse": float(outside.mean()),
            "inside_change_mse": float(inside[has].mean()) if has.any() else 0.0, "n_images": len(prompts),
            "n_images_with_mask": int(has.sum())}


def write_grid(path, base, masks, rows: dict, idx: list[int]) -> None:
    from ..images import save_png
    from ..localize import overlay

    cols = [overlay(base[idx], masks[idx][:, None].float(), color=(0.0, 1.0, 0.0), alpha=0.35)]
    cols += [rows[k][idx] for k in METHODS if k in rows]
    pad = lambda t: torch.nn.functional.pad(t, (1, 1, 1, 1), value=1.0)  # noqa: E731
    grid = torch.cat([torch.cat([pad(c[i]) for c in cols], dim=2) for i in range(len(idx))], dim=1)
    big = torch.nn.functional.interpolate(grid[None], scale_factor=3, mode="nearest")[0]
    save_png(big, path)


def picture(what: str, fn, *args) -> bool:
    """Draw one picture; a missing optional dependency costs only this picture, with a message."""
    try:
        fn(*args)
        return True
    except ImportError as e:
        print(f"fnf demo: {what} not drawn ({e.name or e} is not installed: pip install 'focus-n-fix[train]')",
              flush=True)
        return False


def plot(path, histories: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, hist in histories.items():
        steps = [r["step"] for r in hist]
        ax[0].plot(steps, [r.get("reward", float("nan")) for r in hist], label=name)
        ax[1].plot(steps, [r.get("change_outside", float("nan")) for r in hist], label=name)
    ax[0].set_title("reward log(1 - p_defect) (training batch)")
    ax[1].set_title("mean |I - I0| outside the training mask")
    for a in ax:
        a.set_xlabel("optimizer step")
        a.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report(path, res: dict, settings: dict, seconds: float) -> None:
    b = res["base"]
    lines = ["# fnf demo: DRaFT vs Focus-N-Fix on the embedded toy model", "",
             f"Held-out evaluation: {res['base']['n_images']} images (prompts x seeds never used in training), "
             f"{res['base']['n_images_with_mask']} with a base-image defect mask. "
             f"Wall time {seconds / 60:.1f} min.", "",
             "| model | defect score | Δ defect score | defect rate | alignment | Δ alignment "
             "| change outside mask (MSE) "
             "| change inside mask (MSE) |", "|---|---|---|---|---|---|---|---|"]
    for k in [k for k in ("base",) + METHODS if k in res]:
        r = res[k]
        lines.append(f"| {k} | {r['defect_score']:.3f} | {r['defect_score'] - b['defect_score']:+.3f} | "
                     f"{r['defect_rate']:.3f} | {r['alignment']:.3f} | {r['alignment'] - b['alignment']:+.3f} | "
                     f"{r['outside_change_mse']:.5f} | {r['inside_change_mse']:.5f} |")
    lines += ["", "Defect score: mean p(defect) of the shipped defect classifier (lower is better; the reward is "
              "log(1 - p)). Alignment: fraction of the prompt's (shape, colour) pairs found by the attribute "
              "classifier. Changes are against the base model's image from the same noise.", "",
              "Read with care: only the images whose base sample has a defect can gain reward, so the defect "
              "columns rest on the n images with a mask above (one image is 1/n of the defect rate); "
              "outside_change_mse averages over all images, clean ones included.", "",
              f"Settings: {json.dumps(settings)}", "", "![grid](grids/defects.png)", "",
              "![training](training.png)", ""]
    if "sepen" in res:
        lines += sepen_report(res["sepen"]) + [""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def sepen_report(r: dict) -> list[str]:
    g = r["loss_gap"]
    return [
        "", "## Separate-and-Enhance: two-object prompts", "",
        f"attn2.to_k tuned {r['steps']} steps (fnf train, objective sepen, the paper's loss weights; held-out "
        "prompts excluded from training). Success: the attribute classifier finds both shapes with their "
        "colours; single-object prompts are the forgetting check.", "",
        "| model | two-object success | single-object success | change on two-object images (MSE) "
        "| change on single-object images (MSE) |", "|---|---|---|---|---|",
        f"| base | {r['base']:.3f} | {r['single_base']:.3f} | 0 | 0 |",
        f"| sepen | {r['sepen']:.3f} ({r['gain']:+.3f}) | {r['single_sepen']:.3f} ({r['single_change']:+.3f}) | "
        f"{r['two_object_change_mse']:.5f} | {r['single_change_mse']:.5f} |", "",
        f"{r['n_two_object']} two-object images: {r['fixed']} fixed, {r['broken']} broken "
        f"(one image is {1 / max(1, r['n_two_object']):.3f} of the rate); {r['n_single_object']} single-object.",
        "", "Do the losses track failures on this model? Along the base model's own sampling trajectories "
        f"(mean over steps), Separate {g['separate_success']:.4f} on successes vs {g['separate_failure']:.4f} "
        f"on failures, Enhance {g['enhance_success']:.4f} vs {g['enhance_failure']:.4f} "
        f"({g['n_success']} / {g['n_failure']} images). Where these barely differ the losses carry little "
        "signal about what fails here, and lowering them cannot be expected to fix images; the toy UNet's "
        "cross-attention is nearly uniform over its 16 text tokens (head width 4).", "",
        "![sepen grid: base (top) over sepen (bottom); fixed first, then broken](grids/sepen.png)"]


def run_demo(out: str = "runs/demo", quick: bool = False, seed: int = 0, model: str = "",
             threads: int = 1, beta: float = BETA, methods=METHODS, squared: bool = False,
             grad_clip: float = 1.0, sepen: bool = True, overwrite: bool = False) -> dict:
    from ..models import adapters_disabled, load_model
    from ..train import train
    from .evaluate_sd import EVAL_SEED0, eval_prompts, sample

    t0 = time.time()
    model = model or os.path.join(ASSETS, "sd")
    prepare_out(out, overwrite)
    torch.set_num_threads(threads)
    st = dict(SETTINGS["quick" if quick else "default"])
    checks: dict = {}
    prompts = eval_prompts(st["eval_pairs"])
    if quick:
        prompts = prompts[:st["eval_pairs"]] + prompts[-2:]
    ps = [p for p in prompts for _ in range(st["eval_seeds"])]
    ss = [EVAL_SEED0 + 1000 * seed + k for _ in prompts for k in range(st["eval_seeds"])]
    cfgs = {k: base_config(model, os.path.join(out, "runs", k), k, st["train_steps"], st["batch"], 0, beta, squared,
                           grad_clip) for k in methods}
    first = cfgs[methods[0]]
    s = first.sampling
    kw = dict(steps=s.steps, guidance=s.guidance_scale)
    base_model = load_model(model)
    base = sample(base_model, ps, ss, **kw)
    masks = eval_masks(base)
    if sepen:
        from .sepen_demo import loss_gap, trajectory_losses

        two = [i for i, p in enumerate(ps) if " and " in p]
        traj = trajectory_losses(base_model, [ps[i] for i in two], [ss[i] for i in two], **kw)
        same_images(traj["images"], base[two], "attention capture leaves the base images unchanged", checks)
        gap = loss_gap(traj, [ps[i] for i in two])
    del base_model
    res = {"base": metrics(base, base, masks, ps)}
    images, histories = {}, {}
    for k in methods:
        r = train(cfgs[k])
        histories[k] = r.history
        with torch.no_grad():
            images[k] = sample(r.model, ps, ss, **kw)
            with adapters_disabled(r.model.unet):          # the same model with the LoRA off is the base
                check = sample(r.model, ps[:2], ss[:2], **kw)
        same_images(check, base[:2], f"{k}: adapters-off model reproduces the base images", checks)
        res[k] = metrics(images[k], base, masks, ps)
        print(f"fnf demo: {k}: {json.dumps(res[k])}", flush=True)
    if sepen:
        from .sepen_demo import evaluate, sepen_config
        from .sepen_demo import write_grid as sepen_grid

        cfg = sepen_config(model, os.path.join(out, "runs", "sepen"), steps=st["sepen_steps"],
                           batch=st["batch"])
        r = train(cfg)
        with torch.no_grad():
            tuned = sample(r.model, ps, ss, **kw)
        res["sepen"] = {**evaluate(base, tuned, ps), "loss_gap": gap, "steps": st["sepen_steps"],
                        "lr": cfg.train.lr, "batch": cfg.train.batch_size,
                        "final_separate": r.history[-1]["separate"], "final_enhance": r.history[-1]["enhance"],
                        "first_separate": r.history[0]["separate"], "first_enhance": r.history[0]["enhance"]}
        print(f"fnf demo: sepen: {json.dumps(res['sepen'])}", flush=True)
    settings = {**st, "beta": beta, "squared_penalty": squared, "eval_seed": seed, "eval_prompts": len(prompts),
                "model": model,
                "sampling_steps": s.steps, "truncation_k": s.truncation_k, "guidance": s.guidance_scale,
                "lora_rank": first.lora.rank, "lr": first.train.lr,
                "grad_clip": first.train.grad_clip, "checks": checks}
    # Results first: a failure while drawing must not cost the numbers.
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump({k: res[k] for k in ("base",) + tuple(methods) + (("sepen",) if sepen else ())}, f, indent=1)
    with open(os.path.join(out, "settings.json"), "w") as f:
        json.dump(settings, f, indent=1)
    report(os.path.join(out, "report.md"), res, settings, time.time() - t0)
    os.makedirs(os.path.join(out, "grids"), exist_ok=True)
    has = masks.flatten(1).any(1).nonzero()[:, 0].tolist()
    rest = [i for i in range(len(ps)) if i not in has]
    picture("grids/defects.png", write_grid, os.path.join(out, "grids", "defects.png"), base, masks, images,
            has[:8] or rest[:4])
    picture("grids/clean.png", write_grid, os.path.join(out, "grids", "clean.png"), base, masks, images,
            rest[:8] or has[:4])
    if sepen:
        picture("grids/sepen.png", sepen_grid, os.path.join(out, "grids", "sepen.png"), base, tuned, ps)
    picture("training.png", plot, os.path.join(out, "training.png"), histories)
    return res
