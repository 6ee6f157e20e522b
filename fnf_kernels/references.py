"""Pure-torch references of every op: the specification each backend is tested against.

One section per op: masked_frobenius_penalty, threshold_dilate, the Separate-and-Enhance attention losses and
lora_linear. The functions take already-validated arguments (see ``fnf_kernels._validate``), are written for
clarity, not speed, and are differentiable through ordinary autograd. This module imports nothing from
fnf_kernels (a leaf of the package's import graph).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = [
    "accumulate_dtype", "reduce",
    "penalty_norms", "masked_frobenius_penalty",
    "disk_offsets", "states_to_mask", "threshold_dilate",
    "SIGMA", "gaussian_1d", "gaussian_kernel", "separate_per_head_reference", "smooth_reference",
    "separate_reference", "enhance_reference",
    "lora_linear_reference",
    "group_norm_silu_reference", "rms_norm_silu_reference",
]


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums are accumulated (and results returned) in: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def reduce(values: torch.Tensor, reduction: str) -> torch.Tensor:
    """Apply reduction "none" | "mean" | "sum" over the batch dimension (torch's rules: the mean of an
    empty batch is NaN, its sum 0)."""
    if reduction == "none":
        return values
    if reduction == "sum":
        return values.sum()
    return values.mean()


# ----------------------------------------------------------------------------------- masked_frobenius_penalty
def penalty_norms(image: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor,
                  squared: bool = False) -> torch.Tensor:
    """Per-sample n_b = ||(1 - clamp(M_b, 0, 1)) * (reference_b - image_b)||_F (or n_b**2), shape (B,).

    ``mask`` broadcasts against the (B, C, H, W) images: (B, 1, H, W) or (B, C, H, W).
    Accumulated and returned in float32 (float64 for float64 inputs). Mask values are clamped to
    [0, 1]; NaN propagates. The gradient where n_b == 0 is exactly zero (torch's norm backward).
    A sample with no elements has n_b = 0.
    """
    acc = accumulate_dtype(image.dtype)
    weight = 1.0 - mask.to(acc).clamp(0.0, 1.0)
    diff = (reference.to(acc) - image.to(acc)) * weight
    flat = diff.flatten(1)
    if squared:
        return (flat * flat).sum(dim=1)
    return torch.linalg.vector_norm(flat, ord=2, dim=1)


def masked_frobenius_penalty(image, reference, mask, squared=False, reduction="mean"):
    """Reference of :func:`fnf_kernels.masked_frobenius_penalty` (validated 4-D inputs)."""
    return reduce(penalty_norms(image, reference, mask, squared), reduction)


# ----------------------------------------------------------------------------------------- threshold_dilate
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


def states_to_mask(state: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Map states 0/1/2 to 0/1/NaN in a floating dtype, or 0/1/1 in bool or uint8."""
    if dtype.is_floating_point:
        out = state.clamp(max=1).to(dtype)
        return out.masked_fill(state == 2, float("nan"))
    return (state > 0).to(dtype)


def threshold_dilate(heatmap: torch.Tensor, threshold: torch.Tensor, radius: int,
                     shape: str = "square", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Reference of :func:`fnf_kernels.threshold_dilate` on a (B, H, W) heatmap.

    A pixel is active when heatmap > threshold (compared in float32, float64 for float64 input).
    out[p] = 1 when an active pixel lies in the structuring element centred on p; pixels beyond the
    border never count. NaN pixels dominate: a window holding a NaN gives NaN for floating ``dtype``
    and 1 for bool/uint8. Written as the max filter of the per-pixel states (0, 1, 2 = NaN).
    An empty heatmap gives an empty mask.
    """
    if heatmap.numel() == 0:
        return torch.zeros(heatmap.shape, dtype=dtype, device=heatmap.device)
    state = _states(heatmap, threshold)
    if radius > 0:
        if shape == "square":
            # max_pool2d pads with -inf, so pixels beyond the border never activate anything.
            pooled = F.max_pool2d(state.unsqueeze(1).float(), 2 * radius + 1, stride=1, padding=radius)
            state = pooled.squeeze(1).to(torch.uint8)
        else:
            state = _max_filter_disk(state, radius)
    return states_to_mask(state, dtype)


# ------------------------------------------------------------------------ Separate-and-Enhance attention losses
SIGMA = 0.5


def gaussian_1d(sigma: float = SIGMA) -> tuple[float, float]:
    """(side, centre) weights of the normalised 3-tap Gaussian; the 3x3 kernel is their outer product."""
    side = math.exp(-1.0 / (2.0 * sigma * sigma))
    total = 1.0 + 2.0 * side
    return side / total, 1.0 / total


def gaussian_kernel(dtype=torch.float32, device="cpu") -> torch.Tensor:
    """The normalised 3x3 Gaussian (sigma 0.5) as a (3, 3) tensor."""
    side, centre = gaussian_1d()
    g = torch.tensor([side, centre, side], dtype=torch.float64)
    return torch.outer(g, g).to(dtype=dtype, device=device)


def separate_per_head_reference(maps: torch.Tensor, eps: float) -> torch.Tensor:
    """prod_i A_i / (sum_i A_i + eps), shape (B, heads, H, W), in the accumulation dtype."""
    a = maps.to(accumulate_dtype(maps.dtype))
    return a.prod(dim=2) / (a.sum(dim=2) + eps)


def smooth_reference(maps: torch.Tensor) -> torch.Tensor:
    """G * A_i per (head, object), reflect padding; shape (B, heads, k, H, W) in the accumulation dtype.

    Computed in float64 as an explicit sum of the 9 taps (no convolution: cuDNN may run a float32 conv2d in
    TF32 on CUDA), then rounded once to the accumulation dtype, so it is exact to fp32 rounding on every device.
    """
    a = maps.to(torch.float64)
    b, h, k, hh, ww = a.shape
    x = F.pad(a.reshape(b * h * k, 1, hh, ww), (1, 1, 1, 1), mode="reflect")[:, 0]
    side, centre = gaussian_1d()
    taps = (side, centre, side)
    out = None
    for dy in range(3):
        for dx in range(3):
            term = x[:, dy:dy + hh, dx:dx + ww] * (taps[dy] * taps[dx])
            out = term if out is None else out + term
    return out.reshape(b, h, k, hh, ww).to(accumulate_dtype(maps.dtype))


def _first_max(x: torch.Tensor) -> torch.Tensor:
    """max over dim 1 of (N, M) whose gradient goes to the first maximal index only (torch.max(dim))."""
    return x.max(dim=1).values


def separate_reference(maps: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Separate loss (B,): max over heads and pixels of prod_i A_i / (sum_i A_i + eps)."""
    ratio = separate_per_head_reference(maps, eps)
    return _first_max(ratio.flatten(1))


def enhance_reference(maps: torch.Tensor) -> torch.Tensor:
    """Enhance loss (B,): 1 - min_i max over heads and pixels of G * A_i."""
    s = smooth_reference(maps)
    b, h, k = s.shape[:3]
    per_object = s.transpose(1, 2).reshape(b * k, h * s.shape[3] * s.shape[4]).max(dim=1).values.reshape(b, k)
    return 1.0 - per_object.min(dim=1).values


# ----------------------------------------------------------------------------------------------- lora_linear
def lora_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                          lora_A: torch.Tensor, lora_B: torch.Tensor, scale=1.0, *, groups: int = 1) -> torch.Tensor:
    """y = x Wᵀ + b + s · (x Aᵀ) Bᵀ with ordinary autograd (validated arguments).

    ``scale``: a float, or a (B,) tensor applied per sample along x's first dimension (no gradient flows
    to it). With ``groups=G`` output block g uses rank block g only (see :mod:`fnf_kernels.lora`).
    """
    base = F.linear(x, weight, bias)
    if groups == 1 or lora_A.shape[0] == 0:
        low = F.linear(F.linear(x, lora_A), lora_B)
    else:
        parts = [F.linear(F.linear(x, a), b) for a, b in zip(lora_A.chunk(groups, 0), lora_B.chunk(groups, 0))]
        low = torch.cat(parts, dim=-1)
    if isinstance(scale, torch.Tensor):
        s = scale.detach().to(low.dtype)
        if s.dim() == 1 and x.dim() >= 2:
            s = s.reshape((-1,) + (1,) * (x.dim() - 1))
        return base + s * low
    return base + float(scale) * low


# ------------------------------------------------------------------------------------ group/rms norm + SiLU
def group_norm_silu_reference(x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor] = None,
                              bias: Optional[torch.Tensor] = None, eps: float = 1e-5,
                              silu: bool = True) -> torch.Tensor:
    """silu(GroupNorm(x)) of (N, C, *) x: per (sample, group) mean and biased variance over the group's C/G
    channels and every spatial position, y = (x - mean) / sqrt(var + eps) * weight_c + bias_c.

    Computed in the accumulate dtype (float32 for half inputs, as CUDA autocast runs group_norm; float64 for
    float64), returned in x's dtype.
    """
    acc = accumulate_dtype(x.dtype)
    n, c = x.shape[:2]
    xa = x.to(acc)
    grouped = xa.reshape(n, num_groups, (c // num_groups) * math.prod(x.shape[2:]))
    mean = grouped.mean(dim=2, keepdim=True)
    var = ((grouped - mean) ** 2).mean(dim=2, keepdim=True)
    y = ((grouped - mean) / torch.sqrt(var + eps)).reshape(x.shape)
    shape = (1, c) + (1,) * (x.dim() - 2)
    if weight is not None:
        y = y * weight.to(acc).reshape(shape)
    if bias is not None:
        y = y + bias.to(acc).reshape(shape)
    if silu:
        y = y * torch.sigmoid(y)
    return y.to(x.dtype)


def rms_norm_silu_reference(x: torch.Tensor, weight: Optional[torch.Tensor] = None, eps: float = 1e-6, *,
                            dim: int = 1, silu: bool = True) -> torch.Tensor:
    """silu(x / sqrt(mean(x**2 over dim) + eps) * weight) with weight (x.shape[dim],) along ``dim``.

    Computed in the accumulate dtype, returned in x's dtype.
    """
    acc = accumulate_dtype(x.dtype)
    xa = x.to(acc)
    y = xa * torch.rsqrt((xa * xa).mean(dim=dim, keepdim=True) + eps)
    if weight is not None:
        shape = [1] * x.dim()
        shape[dim] = x.shape[dim]
        y = y * weight.to(acc).reshape(shape)
    if silu:
        y = y * torch.sigmoid(y)
    return y.to(x.dtype)
