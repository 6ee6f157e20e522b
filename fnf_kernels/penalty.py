"""masked_frobenius_penalty: the Focus-N-Fix region constraint ||(1 - M) * (I0 - I)||_F as a fused op.

One fused pass computes the per-sample norms, one fused pass computes the gradient. The compiled ops
``fnf_kernels::penalty_norms`` / ``penalty_backward`` (C++ CPU and CUDA) and the Triton ops
``fnf_kernels::triton_penalty_norms`` / ``triton_penalty_backward`` share the fake and autograd
registrations of :mod:`fnf_kernels._library`, so all of them work under torch.compile.
"""
from __future__ import annotations

import math

import torch

from . import _extension, _library, _validate, backends
from . import references as ref

if backends.triton_installed():  # the Triton ops register on import; triton reads TRITON_INTERPRET here
    from .triton_kernels import penalty as _triton
else:
    _triton = None

if _extension.load() is not None:
    _library.register_penalty("fnf_kernels::penalty_norms", "fnf_kernels::penalty_backward",
                              lambda *a: torch.ops.fnf_kernels.penalty_backward(*a))


def _norms(backend: str, image, reference, mask, squared):
    if backend == "reference":
        return ref.penalty_norms(image, reference, mask, squared)
    if backend == "triton":
        return _triton.penalty_norms(image, reference, mask, squared)
    return torch.ops.fnf_kernels.penalty_norms(image, reference, mask, squared)


def masked_frobenius_penalty(image: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor, *,
                             squared: bool = False, reduction: str = "mean",
                             backend: str = "auto") -> torch.Tensor:
    """Masked Frobenius penalty n_b = ||(1 - M_b) * (reference_b - image_b)||_F per sample.

    Args:
        image: (B, C, H, W) float16/bfloat16/float32/float64, any strides (channels_last included).
        reference: same shape, dtype and device as ``image`` (the pretrained image I0).
        mask: (B, 1, H, W), (B, H, W) or (B, C, H, W), float or bool; 1 = problem region, free to change.
            Values are clamped to [0, 1]; a soft mask weights by (1 - M). No gradient flows to it.
        squared: return n_b**2 instead of n_b.
        reduction: "mean" (default), "sum" or "none" (shape (B,)).
        backend: "auto", "cuda", "triton", "cpu" or "reference".

    Returns float32 (float64 for float64 inputs). Gradients flow to ``image`` and to ``reference`` when it
    requires grad; where n_b == 0 they are exactly 0. NaN in any input propagates to the result.
    Empty inputs, on every backend: a zero-size C, H or W gives n_b = 0 (zero gradients); an empty batch gives
    shape (0,) for "none", 0 for "sum" and NaN for "mean" (torch's rules).
    """
    image, reference, mask = _validate.penalty_args(image, reference, mask, squared, reduction, backend)
    chosen = backends.select("masked_frobenius_penalty", backend, image.device, image.dtype, image.shape[0])
    if image.numel() == 0:
        chosen = "reference"
    return ref.reduce(_norms(chosen, image, reference, mask.detach(), squared), reduction)


class MaskedFrobeniusPenalty(torch.nn.Module):
    """Drop-in loss: ``beta * masked_frobenius_penalty(image, reference, mask)``.

    >>> loss_fn = MaskedFrobeniusPenalty(beta=0.5)
    >>> loss = reward_loss + loss_fn(image, reference_image, problem_mask)
    """

    def __init__(self, beta: float = 1.0, *, squared: bool = False, reduction: str = "mean",
                 backend: str = "auto") -> None:
        super().__init__()
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta < 0:
            raise ValueError(f"beta must be a finite number >= 0, got {beta!r}")
        _validate.flag("squared", squared)
        _validate.choice("reduction", reduction, _validate.REDUCTIONS)
        _validate.choice("backend", backend, _validate.BACKEND_NAMES)
        self.beta, self.squared, self.reduction, self.backend = float(beta), squared, reduction, backend

    def forward(self, image: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        value = masked_frobenius_penalty(image, reference, mask, squared=self.squared,
                                         reduction=self.reduction, backend=self.backend)
        return self.beta * value

    def extra_repr(self) -> str:
        return f"beta={self.beta}, squared={self.squared}, reduction={self.reduction!r}, backend={self.backend!r}"
