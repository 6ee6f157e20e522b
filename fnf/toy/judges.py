"""Defect judges that the training reward never sees: was the scratch really removed, or only the classifier fooled?

The training reward is the defect classifier (fnf.toy.rewards). These judges are independent of it:

* :func:`pixel_judge`: the toy world draws nothing dark except the scratch (fnf.toy.data: every object colour
  and background has a channel above 0.55; the scratch is ~0.06), so "at least ``DARK_MIN_PIXELS`` pixels whose
  brightest channel is below data.DARK" is a rule with no trained weights at all.
* :func:`heatmap_judge`: the defect heatmap model (a second network, trained on masks, not on the classifier's
  labels), at least ``HEAT_MIN_PIXELS`` pixels with p > 0.5. Focus-N-Fix's heatmap localizer reads the same model,
  so this one is independent of the reward, not of that localizer; the pixel rule is independent of both.

The thresholds are calibrated on VAE reconstructions of rendered images with their ground-truth defect labels
(data seed ``CALIBRATION_SEED``, which neither the toy SD, the small models nor any evaluation uses):

    HF_HUB_OFFLINE=1 python -m fnf.toy.judges --model fnf/assets/toy/sd     # prints the calibration as JSON
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch

from . import ASSETS
from . import data as toydata
from .rewards import defect_heatmap

CALIBRATION_SEED = 4242          # data seed of the calibration images (unused elsewhere)
CALIBRATION_IMAGES = 600
# Calibrated with `python -m fnf.toy.judges` (see calibrate) on the toy v2 VAE (600 images, seed 4242, defect rate
# 0.28): clean reconstructions have at most 2 dark pixels, defective ones at least 26, so every threshold in 3..26
# is perfect there (balanced accuracy 1.0); we take 6, twice the smallest, as a margin for generated images (a
# faint or partly drawn scratch still counts). The heatmap model marks up to 43 pixels on clean reconstructions
# (threshold 4 would give 7% false positives); 44 is its smallest perfect threshold. Written down here, so that
# the demo never chooses a threshold on its evaluation images.
DARK_MIN_PIXELS = 6
HEAT_MIN_PIXELS = 44


def dark_counts(images: torch.Tensor) -> torch.Tensor:
    """(B,) number of scratch-dark pixels (fnf.toy.data.dark_pixels) of images (B, 3, H, W) in [0, 1]."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images: expected (B, 3, H, W), got {tuple(images.shape)}")
    arr = images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    return torch.from_numpy(np.asarray(toydata.dark_pixels(arr), dtype=np.int64))


def pixel_judge(images: torch.Tensor, min_pixels: int = DARK_MIN_PIXELS) -> torch.Tensor:
    """(B,) bool: the image shows a scratch by the pixel rule."""
    return dark_counts(images) >= min_pixels


def heat_counts(images: torch.Tensor, root: str = "") -> torch.Tensor:
    """(B,) number of pixels the defect heatmap model marks (p > 0.5)."""

    return (defect_heatmap(root=root)(images) > 0.5).flatten(1).sum(1)


def heatmap_judge(images: torch.Tensor, min_pixels: int = HEAT_MIN_PIXELS, root: str = "") -> torch.Tensor:
    """(B,) bool: the heatmap model marks at least ``min_pixels`` pixels."""
    return heat_counts(images, root) >= min_pixels


def best_threshold(counts: np.ndarray, labels: np.ndarray) -> dict:
    """The smallest count threshold t (predict defect when count >= t) that maximises balanced accuracy."""
    counts, labels = np.asarray(counts), np.asarray(labels, bool)
    if counts.shape != labels.shape or labels.all() or not labels.any():
        raise ValueError("best_threshold: expected counts and labels of the same shape, with both classes present")
    best = None
    for t in range(1, int(counts.max()) + 2):
        pred = counts >= t
        recall, fpr = pred[labels].mean(), pred[~labels].mean()
        bal = 0.5 * (recall + 1 - fpr)
        if best is None or bal > best["balanced_accuracy"] + 1e-12:
            best = {"threshold": t, "balanced_accuracy": float(bal), "recall": float(recall),
                    "false_positive_rate": float(fpr), "accuracy": float((pred == labels).mean())}
    return best


@torch.no_grad()
def vae_reconstruct(model_path: str, images: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """Images (B, 3, H, W) in [0, 1] through the pipeline's VAE (encode mode, decode)."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(os.path.join(model_path, "vae")).eval()
    out = []
    for i in range(0, len(images), batch):
        x = images[i:i + batch] * 2 - 1
        out.append(((vae.decode(vae.encode(x).latent_dist.mode()).sample + 1) / 2).clamp(0, 1))
    return torch.cat(out)


def calibrate(model_path: str, n: int = CALIBRATION_IMAGES, seed: int = CALIBRATION_SEED, root: str = "") -> dict:
    """Both judges' best thresholds on VAE reconstructions of ``n`` rendered images (ground-truth labels), and how
    the written-down thresholds do there."""
    ds = toydata.make_dataset(n, seed, prompts=toydata.heldout_prompts() + toydata.train_prompts())
    recon = vae_reconstruct(model_path, toydata.to_tensor(ds["images"]))
    labels = ds["defect"]
    dark, heat = dark_counts(recon).numpy(), heat_counts(recon, root).numpy()
    at = lambda pred: {"recall": float(pred[labels].mean()), "false_positive_rate": float(pred[~labels].mean())}  # noqa: E731
    return {"model": model_path, "images": n, "data_seed": seed, "defect_rate": float(labels.mean()),
            "pixel": {**best_threshold(dark, labels), "at_written": {"threshold": DARK_MIN_PIXELS,
                                                                      **at(dark >= DARK_MIN_PIXELS)}},
            "heatmap": {**best_threshold(heat, labels), "at_written": {"threshold": HEAT_MIN_PIXELS,
                                                                        **at(heat >= HEAT_MIN_PIXELS)}},
            "dark_pixels_clean_max": int(dark[~labels].max()), "dark_pixels_defect_min": int(dark[labels].min())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=os.path.join(ASSETS, "sd"), help="pipeline folder whose VAE reconstructs")
    p.add_argument("--small", default="", help="folder of the small models (default the shipped ones)")
    p.add_argument("--images", type=int, default=CALIBRATION_IMAGES)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(json.dumps(calibrate(args.model, args.images, root=args.small), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
