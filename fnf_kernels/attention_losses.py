"""Separate-and-Enhance losses on cross-attention maps (Bao et al. 2024), as one fused op.

For maps A of shape (B, heads, k, H, W) (k >= 2 objects, one map per object token or word), per sample b:

* ``separate_loss`` = max over heads and pixels of prod_i A_i / (sum_i A_i + eps)
* ``enhance_loss``  = 1 - min_i ( max over heads and pixels of (G * A_i) ), G the normalised 3x3 Gaussian
  with sigma 0.5, applied to every (head, object) map with reflect padding (H, W >= 2).

Both are maxima, so the fused forward (Triton: ``fnf_kernels::triton_attention_maxima``) reads the maps
once and writes, per (b, head), the maximum of the Separate ratio and the maximum of every smoothed object
map, with the pixel each was found at. The (tiny) reductions over heads and objects then run in torch. The
backward (``fnf_kernels::triton_attention_maxima_backward``) writes every element of the map gradient once:
the gradient of a maximum goes to its argmax pixel only (for Enhance: to the 3x3 reflected neighbourhood of
the argmax pixel, weighted by G; neighbours that reflect onto the same pixel add up).

Ties: the maximum over (head, pixel) goes to the FIRST maximal element in (head, row, column) order, and the
minimum over objects to the first minimal object -- what torch.max / torch.min with ``dim`` return on CPU.
The torch reference (in fnf_kernels.references) is written so its autograd routes gradients the same way, so
reference and kernel agree on ties too (when the float values tie exactly; the smoothed maps may round
differently in the last bit between the two). NaN in the maps gives an unspecified result (attention
probabilities are finite).
"""
from __future__ import annotations

import math

import torch

from . import _validate, backends
from .references import (SIGMA, accumulate_dtype, enhance_reference, gaussian_1d, gaussian_kernel,  # noqa: F401
                         separate_per_head_reference, separate_reference, smooth_reference)

if backends.triton_installed():  # the Triton ops register on import; triton reads TRITON_INTERPRET here
    from .triton_kernels import attention_losses as _triton
else:
    _triton = None

BACKENDS = ("auto", "triton", "reference")


# ----------------------------------------------------------------------------------------- validation
def _check(maps, eps=1e-8, backend="auto") -> torch.Tensor:
    maps = _validate.tensor("maps", maps)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    _validate.choice("backend", backend, BACKENDS)
    if maps.dim() != 5:
        raise ValueError(f"maps must be 5-D (B, heads, k, H, W), got shape {tuple(maps.shape)}")
    if maps.shape[2] < 2:
        raise ValueError(f"maps must hold k >= 2 object maps (dim 2), got k = {maps.shape[2]} "
                         f"(shape {tuple(maps.shape)})")
    if maps.shape[3] < 2 or maps.shape[4] < 2:
        raise ValueError(f"maps must have H, W >= 2 (the 3x3 Gaussian uses reflect padding), got "
                         f"H = {maps.shape[3]}, W = {maps.shape[4]}")
    if maps.shape[0] > 0:
        _validate.nonzero_dim("maps", maps, 1, "heads (a maximum over no heads is undefined)")
    return maps


def _backend(maps: torch.Tensor, backend: str) -> str:
    """The backend that runs: an empty batch always takes the reference (empty results, every backend)."""
    chosen = backends.select("separate_enhance_losses", backend, maps.device, maps.dtype, maps.shape[0])
    return "reference" if maps.shape[0] == 0 else chosen


# ----------------------------------------------------------------------------------------- fused path
def _from_maxima(sep_max: torch.Tensor, en_max: torch.Tensor):
    """(separate, enhance) (B,) from the per-(b, head) maxima, first index on ties."""
    separate = sep_max.max(dim=1).values
    enhance = 1.0 - en_max.max(dim=1).values.min(dim=1).values
    return separate, enhance


def _fused(maps: torch.Tensor, eps: float):
    sep_max, _, en_max, _ = _triton.attention_maxima(maps.contiguous(), float(eps))
    return _from_maxima(sep_max, en_max)


# ----------------------------------------------------------------------------------------- public API
def separate_enhance_losses(maps: torch.Tensor, eps: float = 1e-8, *, backend: str = "auto"):
    """Both losses from one fused pass: returns (separate (B,), enhance (B,)); see the module docstring.

    maps: (B, heads, k, H, W) float16/bfloat16/float32/float64, k >= 2, H, W >= 2. Results are float32
    (float64 for float64 maps); gradients flow back to ``maps`` in its dtype.
    backend: "auto" (Triton on CUDA when installed, else the torch reference), "triton" or "reference".
    An empty batch (B = 0) gives two (0,) results on every backend; heads = 0 with B > 0 raises ValueError.
    """
    maps = _check(maps, eps, backend)
    if _backend(maps, backend) == "triton":
        return _fused(maps, eps)
    return separate_reference(maps, eps), enhance_reference(maps)


def separate_loss(maps: torch.Tensor, eps: float = 1e-8, *, backend: str = "auto") -> torch.Tensor:
    """Separate loss (B,): max over heads and pixels of prod_i A_i / (sum_i A_i + eps).

    ``eps`` (default 1e-8) keeps the ratio finite where every map is 0 (the official code has none)."""
    maps = _check(maps, eps, backend)
    if _backend(maps, backend) == "triton":
        return _fused(maps, eps)[0]
    return separate_reference(maps, eps)


def enhance_loss(maps: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Enhance loss (B,): 1 - min_i max over heads and pixels of G * A_i (3x3 Gaussian, sigma 0.5, reflect)."""
    maps = _check(maps, 0.0, backend)
    if _backend(maps, backend) == "triton":
        return _fused(maps, 1e-8)[1]  # eps only touches the unused Separate part
    return enhance_reference(maps)
