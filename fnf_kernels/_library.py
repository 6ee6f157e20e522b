"""Custom-op registration shared by the op modules and their backends: fake kernels and autograd.

A leaf of the import graph (imports only torch and :mod:`fnf_kernels.references`): ``penalty.py``,
``dilation.py`` and ``lora.py`` register the compiled and plain-torch ops through it, and
``triton_kernels/*.py`` register the Triton ops through it, so no Triton module imports an op module back.

Op contracts (the same for every backend of an op):

* penalty: ``norms(image, reference, mask, squared) -> (B,)`` in the accumulation dtype;
  ``backward(grad, image, reference, mask, norms, squared) -> grad_image``.
* threshold_dilate: ``(heatmap (B, H, W), threshold (B,), radius, disk, dtype) -> mask (B, H, W)``.
* lora_linear: forward ``(x (M, K), weight (N, K), bias (N,)?, lora_A (R, K), lora_B (N, R/G), scale (nB,)?
  float32, scale_value, rows_per_sample, groups) -> (out (M, N), xs (M, R))`` with xs = rowscale * (x Aᵀ),
  the only extra tensor backward needs (for dB); backward ``(grad (M, N), x?, weight?, lora_A?, lora_B?, xs?,
  scale?, scale_value, rows_per_sample, groups, need_x, need_weight, need_bias, need_A, need_B) ->
  (dx, dweight, dbias, dA, dB)``, a gradient that is not needed coming back as an empty (0,) tensor.
* group_norm_silu: forward ``(x (N, C, *), weight (C,)?, bias (C,)?, num_groups, eps, silu) -> (out, mean (N, G),
  rstd (N, G))`` with the statistics in the accumulate dtype; backward ``(grad, x, weight?, bias?, mean, rstd,
  num_groups, silu, need_x, need_weight, need_bias) -> (dx, dweight, dbias)``. Autograd saves only x, mean and
  rstd (and the parameters, alive anyway): the backward recomputes the normalisation and the SiLU.
* rms_norm_silu: forward ``(x, weight?, dim, eps, silu) -> (out, rstd)`` with rstd shaped as x without ``dim``;
  backward ``(grad, x, weight?, rstd, dim, silu, need_x, need_weight) -> (dx, dweight)``.
"""
from __future__ import annotations

from typing import Callable

import torch

from .references import accumulate_dtype


# ------------------------------------------------------------------------------------------------- penalty
def _fake_penalty_norms(image, reference, mask, squared):
    return image.new_empty((image.shape[0],), dtype=accumulate_dtype(image.dtype))


def _fake_penalty_backward(grad, image, reference, mask, norms, squared):
    return torch.empty_like(image)


def register_penalty(norms_qualname: str, backward_qualname: str, backward_op: Callable) -> None:
    """Register fake kernels and autograd for a (norms, backward) penalty op pair."""
    torch.library.register_fake(norms_qualname)(_fake_penalty_norms)
    torch.library.register_fake(backward_qualname)(_fake_penalty_backward)

    def setup_context(ctx, inputs, output):
        image, reference, mask, squared = inputs
        ctx.save_for_backward(image, reference, mask, output)
        ctx.squared = squared

    def backward(ctx, grad):
        image, reference, mask, norms = ctx.saved_tensors
        need_image, need_reference = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_image = backward_op(grad.contiguous(), image, reference, mask, norms, ctx.squared)
        grad_reference = grad_image.neg() if need_reference else None
        return (grad_image if need_image else None), grad_reference, None, None

    torch.library.register_autograd(norms_qualname, backward, setup_context=setup_context)


# ------------------------------------------------------------------------------------------------ dilation
def _fake_dilate(heatmap, threshold, radius, disk, dtype):
    return heatmap.new_empty(heatmap.shape, dtype=dtype)


def register_dilate(qualname: str) -> None:
    """Register the fake kernel of a threshold_dilate op (not differentiable: no autograd)."""
    torch.library.register_fake(qualname)(_fake_dilate)


# --------------------------------------------------------------------------------------------- lora_linear
def _fake_lora_forward(x, weight, bias, lora_A, lora_B, scale, scale_value, rows_per_sample, groups):
    return x.new_empty((x.shape[0], weight.shape[0])), x.new_empty((x.shape[0], lora_A.shape[0]))


def _fake_lora_backward(grad, x, weight, lora_A, lora_B, xs, scale, scale_value, rows_per_sample, groups,
                        need_x, need_weight, need_bias, need_A, need_B):
    m, n = grad.shape
    dx = grad.new_empty((m, weight.shape[1])) if need_x else grad.new_empty((0,))
    dw = grad.new_empty((n, x.shape[1])) if need_weight else grad.new_empty((0,))
    db = grad.new_empty((n,)) if need_bias else grad.new_empty((0,))
    da = grad.new_empty((lora_B.shape[1] * groups, x.shape[1])) if need_A else grad.new_empty((0,))
    dbb = grad.new_empty((n, xs.shape[1] // groups)) if need_B else grad.new_empty((0,))
    return dx, dw, db, da, dbb


def register_lora(forward_qualname: str, backward_qualname: str, backward_op: Callable) -> None:
    """Register fake kernels and autograd for a (forward, backward) lora_linear op pair."""
    torch.library.register_fake(forward_qualname)(_fake_lora_forward)
    torch.library.register_fake(backward_qualname)(_fake_lora_backward)

    def setup_context(ctx, inputs, output):
        x, weight, bias, lora_A, lora_B, scale, scale_value, rows_per_sample, groups = inputs
        _, xs = output
        ctx.mark_non_differentiable(xs)
        nx, nw, nb, na, nB = ctx.needs_input_grad[:5]
        # Save only what the needed gradients read: dx <- grad, W, A, B; dA <- grad, B, x; dB <- grad, xs;
        # dW <- grad, x. The output and bias are never saved.
        ctx.save_for_backward(x if (na or nw) else None, weight if nx else None, lora_A if nx else None,
                              lora_B if (nx or na) else None, xs if nB else None, scale)
        ctx.meta = (scale_value, rows_per_sample, groups)

    def backward(ctx, grad, _grad_xs):
        x, weight, lora_A, lora_B, xs, scale = ctx.saved_tensors
        scale_value, rows_per_sample, groups = ctx.meta
        need = tuple(bool(v) for v in ctx.needs_input_grad[:5])
        if not any(need):
            return (None,) * 9
        grads = backward_op(grad.contiguous(), x, weight, lora_A, lora_B, xs, scale, scale_value,
                            rows_per_sample, groups, *need)
        return tuple(g if n else None for g, n in zip(grads, need)) + (None,) * 4

    torch.library.register_autograd(forward_qualname, backward, setup_context=setup_context)


# ----------------------------------------------------------------------------------- group/rms norm + SiLU
def _fake_group_norm_silu(x, weight, bias, num_groups, eps, silu):
    stats = x.new_empty((x.shape[0], num_groups), dtype=accumulate_dtype(x.dtype))
    return torch.empty_like(x), stats, torch.empty_like(stats)


def _fake_group_norm_silu_backward(grad, x, weight, bias, mean, rstd, num_groups, silu, need_x, need_weight,
                                   need_bias):
    dx = torch.empty_like(x) if need_x else x.new_empty((0,))
    dw = torch.empty_like(weight) if need_weight else x.new_empty((0,))
    db = torch.empty_like(bias) if need_bias else x.new_empty((0,))
    return dx, dw, db


def register_group_norm_silu(forward_qualname: str, backward_qualname: str, backward_op: Callable) -> None:
    """Register fake kernels and autograd for a (forward, backward) group_norm_silu op pair."""
    torch.library.register_fake(forward_qualname)(_fake_group_norm_silu)
    torch.library.register_fake(backward_qualname)(_fake_group_norm_silu_backward)

    def setup_context(ctx, inputs, output):
        x, weight, bias, num_groups, eps, silu = inputs
        _, mean, rstd = output
        ctx.mark_non_differentiable(mean, rstd)
        ctx.save_for_backward(x, weight, bias, mean, rstd)  # never the output: the backward recomputes it
        ctx.meta = (num_groups, silu)

    def backward(ctx, grad, _grad_mean, _grad_rstd):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        need = tuple(bool(v) for v in ctx.needs_input_grad[:3])
        if not any(need):
            return (None,) * 6
        grads = backward_op(grad, x, weight, bias, mean, rstd, *ctx.meta, *need)
        return tuple(g if n else None for g, n in zip(grads, need)) + (None,) * 3

    torch.library.register_autograd(forward_qualname, backward, setup_context=setup_context)


def _fake_rms_norm_silu(x, weight, dim, eps, silu):
    shape = list(x.shape)
    del shape[dim]
    return torch.empty_like(x), x.new_empty(shape, dtype=accumulate_dtype(x.dtype))


def _fake_rms_norm_silu_backward(grad, x, weight, rstd, dim, silu, need_x, need_weight):
    dx = torch.empty_like(x) if need_x else x.new_empty((0,))
    dw = torch.empty_like(weight) if need_weight else x.new_empty((0,))
    return dx, dw


def register_rms_norm_silu(forward_qualname: str, backward_qualname: str, backward_op: Callable) -> None:
    """Register fake kernels and autograd for a (forward, backward) rms_norm_silu op pair."""
    torch.library.register_fake(forward_qualname)(_fake_rms_norm_silu)
    torch.library.register_fake(backward_qualname)(_fake_rms_norm_silu_backward)

    def setup_context(ctx, inputs, output):
        x, weight, dim, eps, silu = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(x, weight, output[1])
        ctx.meta = (dim, silu)

    def backward(ctx, grad, _grad_rstd):
        x, weight, rstd = ctx.saved_tensors
        need = tuple(bool(v) for v in ctx.needs_input_grad[:2])
        if not any(need):
            return (None,) * 5
        grads = backward_op(grad, x, weight, rstd, *ctx.meta, *need)
        return tuple(g if n else None for g, n in zip(grads, need)) + (None,) * 3

    torch.library.register_autograd(forward_qualname, backward, setup_context=setup_context)
