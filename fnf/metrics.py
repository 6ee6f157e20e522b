"""Pure evaluation metrics (no models): bootstrap intervals, paired win rates, change inside / outside a mask.

Used by ``fnf eval`` (fnf/evaluate.py) and the toy demo (fnf/toy/demo.py). Per-image values are torch tensors
or numpy arrays; summaries are plain floats. Images are (B, 3, H, W) in [0, 1]; masks (B, H, W) or (B, 1, H, W),
1 (or True) = inside the problem region.
"""
from __future__ import annotations

import math

import numpy as np
import torch

BOOTSTRAP_RESAMPLES = 1000   # B, the number of bootstrap resamples (ours; stated in every report)
BOOTSTRAP_SEED = 0
LEVEL = 0.95
PSNR_MAX_DB = 100.0          # PSNR of identical images (MSE 0) is capped here so that means stay finite


def _as_2d_mask(mask: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    m = mask
    if m.dim() == 4:
        if m.shape[1] != 1:
            raise ValueError(f"mask: expected (B, H, W) or (B, 1, H, W), got {tuple(mask.shape)}")
        m = m[:, 0]
    if m.dim() != 3 or m.shape[0] != images.shape[0] or m.shape[-2:] != images.shape[-2:]:
        raise ValueError(f"mask: expected (B, H, W) = ({images.shape[0]}, {images.shape[-2]}, {images.shape[-1]}) "
                         f"matching the images, got {tuple(mask.shape)}")
    return m.bool() if m.dtype == torch.bool else m > 0.5


def masked_mse(images: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image mean squared change against ``reference``, averaged over channels, then over the pixels
    inside the mask and over the pixels outside it: returns (inside (B,), outside (B,)) in float32.
    An image whose region is empty gets NaN there (nothing to measure)."""
    if images.shape != reference.shape or images.dim() != 4:
        raise ValueError(f"images and reference: expected the same (B, C, H, W) shape, got {tuple(images.shape)} "
                         f"and {tuple(reference.shape)}")
    inside_mask = _as_2d_mask(mask, images).to(images.device)
    sq = ((images.float() - reference.float()) ** 2).mean(dim=1)   # (B, H, W)
    out_w, in_w = (~inside_mask).float(), inside_mask.float()
    n_out, n_in = out_w.sum((1, 2)), in_w.sum((1, 2))
    outside = (sq * out_w).sum((1, 2)) / n_out.clamp_min(1)
    inside = (sq * in_w).sum((1, 2)) / n_in.clamp_min(1)
    nan = torch.full_like(outside, float("nan"))
    return torch.where(n_in > 0, inside, nan), torch.where(n_out > 0, outside, nan)


def psnr_from_mse(mse, max_db: float = PSNR_MAX_DB):
    """PSNR in dB of images in [0, 1]: 10·log10(1 / MSE), capped at ``max_db`` (MSE 0 gives ``max_db``); NaN
    stays NaN. Works on tensors and arrays."""
    arr = np.asarray(mse.detach().cpu() if isinstance(mse, torch.Tensor) else mse, dtype=np.float64)
    with np.errstate(divide="ignore"):
        db = 10.0 * np.log10(1.0 / np.maximum(arr, 0.0))
    return np.where(np.isnan(arr), np.nan, np.minimum(db, max_db))


def paired_wins(candidate, base, higher_is_better: bool = True) -> np.ndarray:
    """Per-image win of ``candidate`` over ``base`` on the same prompt and noise: 1 better, 0.5 tie, 0 worse."""
    c, b = _values(candidate), _values(base)
    if c.shape != b.shape:
        raise ValueError(f"candidate and base: expected the same number of images, got {c.shape} and {b.shape}")
    diff = c - b if higher_is_better else b - c
    return np.where(diff > 0, 1.0, np.where(diff < 0, 0.0, 0.5))


def _values(values) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().double().numpy()
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    return arr


def bootstrap_indices(n: int, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """(resamples, n) indices drawn with replacement from numpy's PCG64 seeded with ``seed``. Every statistic of
    the same n images uses the same draws, so intervals of paired quantities resample the same images."""
    if n < 1 or resamples < 1:
        raise ValueError(f"bootstrap: expected n >= 1 values and resamples >= 1, got n={n}, resamples={resamples}")
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def bootstrap_ci(values, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                 level: float = LEVEL) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (NaNs dropped first): the (1-level)/2 and
    (1+level)/2 quantiles (numpy's linear interpolation) of the means of ``resamples`` resamples. (nan, nan)
    when no value is left."""
    if not 0 < level < 1:
        raise ValueError(f"level: expected a fraction in (0, 1), got {level!r}")
    arr = _values(values)
    arr = arr[~np.isnan(arr)]
    if arr.size == 0:
        return float("nan"), float("nan")
    means = arr[bootstrap_indices(arr.size, resamples, seed)].mean(axis=1)
    lo, hi = np.percentile(means, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def summary(values, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED, level: float = LEVEL) -> dict:
    """{"mean", "ci_low", "ci_high", "n"} of the non-NaN ``values`` (mean NaN and n 0 when there are none)."""
    arr = _values(values)
    arr = arr[~np.isnan(arr)]
    lo, hi = bootstrap_ci(arr, resamples, seed, level)
    return {"mean": float(arr.mean()) if arr.size else float("nan"), "ci_low": lo, "ci_high": hi, "n": int(arr.size)}


def finite_or_none(x):
    """A float for JSON: NaN and ±inf become None (json.dump would write non-standard NaN/Infinity)."""
    if isinstance(x, dict):
        return {k: finite_or_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite_or_none(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    return x
