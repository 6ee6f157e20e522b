"""Pure-torch references: the specification every backend is tested against.

These functions take already-validated arguments (see ``fnf_kernels._validate``) and are written
for clarity, not speed. They are differentiable through ordinary autograd.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums are accumulated (and results returned) in: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def penalty_norms(image: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor,
                  squared: bool = False) -> torch.Tensor:
    """Per-sample n_b = ||(1 - clamp(M_b, 0, 1)) * (reference_b - image_b)||_F (or n_b**2), shape (B,).

    ``mask`` broadcasts against the (B, C, H, W) images: (B, 1, H, W) or (B, C, H, W).
    Accumulated and returned in float32 (float64 for float64 inputs). Mask values are clamped to
    [0, 1]; NaN propagates. The gradient where n_b == 0 is exactly zero (torch's norm backward).
    """
    acc = accumulate_dtype(image.dtype)
    weight = 1.0 - mask.to(acc).clamp(0.0, 1.0)
    diff = (reference.to(acc) - image.to(acc)) * weight
    flat = diff.reshape(diff.shape[0], -1)
    if squared:
        return (flat * flat).sum(dim=1)
    return torch.linalg.vector_norm(flat, ord=2, dim=1)


def reduce(values: torch.Tensor, reduction: str) -> torch.Tensor:
    """Apply reduction "none" | "mean" | "sum" over the batch dimension."""
    if reduction == "none":
        return values
    if reduction == "sum":
        return values.sum()
    return values.mean()


def masked_frobenius_penalty(image, reference, mask, squared=False, reduction="mean"):
    """Reference of :func:`fnf_kernels.masked_frobenius_penalty` (validated 4-D inputs)."""
    return reduce(penalty_norms(image, reference, mask, squared), reduction)


def _states(heatmap: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Per-pixel state of a (B, H, W) heatmap: 0 = at or below threshold, 1 = above, 2 = NaN."""
    acc = accumulate_dtype(heatmap.dtype)
    h = heatmap.to(acc)
    thr = threshold.to(acc).reshape(-1, 1, 1)
    state = (h > thr).to(torch.uint8)
    return torch.where(torch.isnan(h), torch.full_like(state, 2), state)


def disk_offsets(radius: int) -> list[tuple[int, int]]:
    """Offsets (dy, dx) of the disk structuring element dy**2 + dx**2 <= radius**2."""
    r = radius
    return [(dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1) if dy * dy + dx * dx <= r * r]


def _max_filter_disk(state: torch.Tensor, radius: int) -> torch.Tensor:
    b, h, w = state.shape
    padded = F.pad(state, (radius, radius, radius, radius))  # zeros: beyond the border is inactive
    out = torch.zeros_like(state)
    for dy, dx in disk_offsets(radius):
        window = padded[:, radius + dy: radius + dy + h, radius + dx: radius + dx + w]
        out = torch.maximum(out, window)
    return out


def threshold_dilate(heatmap: torch.Tensor, threshold: torch.Tensor, radius: int,
                     shape: str = "square", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Reference of :func:`fnf_kernels.threshold_dilate` on a (B, H, W) heatmap.

    A pixel is active when heatmap > threshold (compared in float32, float64 for float64 input).
    out[p] = 1 when an active pixel lies in the structuring element centred on p; pixels beyond the
    border never count. NaN pixels dominate: a window holding a NaN gives NaN for floating ``dtype``
    and 1 for bool/uint8. Written as the max filter of the per-pixel states (0, 1, 2 = NaN).
    """
    state = _states(heatmap, threshold)
    if radius > 0:
        if shape == "square":
            # max_pool2d pads with -inf, so pixels beyond the border never activate anything.
            pooled = F.max_pool2d(state.unsqueeze(1).float(), 2 * radius + 1, stride=1, padding=radius)
            state = pooled.squeeze(1).to(torch.uint8)
        else:
            state = _max_filter_disk(state, radius)
    return states_to_mask(state, dtype)


def states_to_mask(state: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Map states 0/1/2 to 0/1/NaN in a floating dtype, or 0/1/1 in bool or uint8."""
    if dtype.is_floating_point:
        out = state.clamp(max=1).to(dtype)
        return out.masked_fill(state == 2, float("nan"))
    return (state > 0).to(dtype)
