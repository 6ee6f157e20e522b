"""Triton backend of the Separate-and-Enhance losses: ``fnf_kernels::triton_attention_maxima`` and its backward.

Maps are contiguous (B, heads, k, H, W); one program per (b, head) walks its k x H x W tile in chunks of
BLOCK pixels. Forward, per chunk: loads the k object maps once (the 3x3 Gaussian re-reads the 8 neighbours,
which are in L1), computes the Separate ratio prod/(sum + eps) and the k smoothed values, and keeps running
maxima with their first argmax. Writes 2 * (1 + k) numbers per (b, head). Backward: every map element is
written once (no atomics): the Separate term at the Separate argmax, plus, for object i, G's weight where the
pixel is one of the (reflected) 3x3 neighbours of object i's Enhance argmax.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import references as _ref
from ._common import accumulate_tl, check_grid, device_guard, interpreter


@triton.jit
def _reflect(i, n):
    i = tl.where(i < 0, -i, i)
    return tl.where(i >= n, 2 * n - 2 - i, i)


@triton.jit
def _tap(row, col, dy: tl.constexpr, dx: tl.constexpr, H, W, g_side, g_centre):
    """Tap (dy, dx) of the 3x3 Gaussian around (row, col): the reflected source pixel and its weight."""
    wy = g_centre if dy == 1 else g_side
    wx = g_centre if dx == 1 else g_side
    return _reflect(row + (dy - 1), H), _reflect(col + (dx - 1), W), wy * wx


@triton.jit
def _smoothed(base, row, col, H, W, ok, g_side, g_centre, ACC: tl.constexpr):
    acc = tl.zeros(row.shape, dtype=ACC)
    for dy in tl.static_range(3):
        for dx in tl.static_range(3):
            r, c, w = _tap(row, col, dy, dx, H, W, g_side, g_centre)
            acc += tl.load(base + r * W + c, mask=ok, other=0.0).to(ACC) * w
    return acc


@triton.jit
def _forward_kernel(maps_ptr, params_ptr, sep_ptr, sep_idx_ptr, en_ptr, en_idx_ptr, H, W,
                    K: tl.constexpr, KP: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    g_side = tl.load(params_ptr).to(ACC)  # float parameters in the accumulation dtype (a float argument
    g_centre = tl.load(params_ptr + 1).to(ACC)  # would be float32 even for float64 maps)
    eps = tl.load(params_ptr + 2).to(ACC)
    HW = H * W
    base = maps_ptr + pid * K * HW
    lane = tl.arange(0, BLOCK)
    objects = tl.arange(0, KP)
    neg_inf = float("-inf")
    best_sep = tl.full([1], neg_inf, dtype=ACC)
    best_sep_idx = tl.zeros([1], dtype=tl.int32)
    best_en = tl.full([KP], neg_inf, dtype=ACC)
    best_en_idx = tl.zeros([KP], dtype=tl.int32)
    for start in range(0, HW, BLOCK):
        offs = start + lane
        ok = offs < HW
        row = offs // W
        col = offs - row * W
        prod = tl.full([BLOCK], 1.0, dtype=ACC)
        total = tl.zeros([BLOCK], dtype=ACC)
        for i in tl.static_range(K):
            a = tl.load(base + i * HW + offs, mask=ok, other=0.0).to(ACC)
            prod = prod * a
            total = total + a
            s = tl.where(ok, _smoothed(base + i * HW, row, col, H, W, ok, g_side, g_centre, ACC), neg_inf)
            m = tl.max(s, axis=0)
            am = tl.argmax(s, axis=0, tie_break_left=True).to(tl.int32) + start
            better = (objects == i) & (m > best_en)  # strictly greater: earlier chunks win ties
            best_en = tl.where(better, m, best_en)
            best_en_idx = tl.where(better, am, best_en_idx)
        ratio = tl.where(ok, prod / (total + eps), neg_inf)
        m = tl.max(ratio, axis=0)
        am = tl.argmax(ratio, axis=0, tie_break_left=True).to(tl.int32) + start
        better = m > best_sep
        best_sep = tl.where(better, m, best_sep)
        best_sep_idx = tl.where(better, am, best_sep_idx)
    first = tl.arange(0, 1)
    tl.store(sep_ptr + pid + first, best_sep)
    tl.store(sep_idx_ptr + pid + first, best_sep_idx.to(tl.int64))
    keep = objects < K
    tl.store(en_ptr + pid * K + objects, best_en, mask=keep)
    tl.store(en_idx_ptr + pid * K + objects, best_en_idx.to(tl.int64), mask=keep)


@triton.jit
def _backward_kernel(maps_ptr, params_ptr, g_sep_ptr, sep_idx_ptr, g_en_ptr, en_idx_ptr, out_ptr, H, W,
                     K: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    g_side = tl.load(params_ptr).to(ACC)  # float parameters in the accumulation dtype (a float argument
    g_centre = tl.load(params_ptr + 1).to(ACC)  # would be float32 even for float64 maps)
    eps = tl.load(params_ptr + 2).to(ACC)
    HW = H * W
    base = maps_ptr + pid * K * HW
    out = out_ptr + pid * K * HW
    lane = tl.arange(0, BLOCK)
    g_sep = tl.load(g_sep_ptr + pid).to(ACC)
    p_sep = tl.load(sep_idx_ptr + pid).to(tl.int32)
    # Separate ratio at its argmax: r = P / (S + eps), dr/dA_i = prod_{j != i} A_j / (S + eps) - P / (S + eps)^2
    total = 0.0
    prod = 1.0
    for j in tl.static_range(K):
        a = tl.load(base + j * HW + p_sep).to(ACC)
        total += a
        prod *= a
    den = total + eps
    for start in range(0, HW, BLOCK):
        offs = start + lane
        ok = offs < HW
        row = offs // W
        col = offs - row * W
        for i in tl.static_range(K):
            others = 1.0
            for j in tl.static_range(K):
                if j != i:
                    others *= tl.load(base + j * HW + p_sep).to(ACC)
            d_sep = others / den - prod / (den * den)
            # unused outputs (zero grads) contribute exactly 0 even where the ratio's derivative is not finite
            sep_term = tl.where(g_sep != 0, g_sep * d_sep, 0.0)
            g = tl.where(offs == p_sep, sep_term, 0.0).to(ACC)
            g_en = tl.load(g_en_ptr + pid * K + i).to(ACC)
            p_en = tl.load(en_idx_ptr + pid * K + i).to(tl.int32)
            pr = p_en // W
            pc = p_en - pr * W
            for dy in tl.static_range(3):
                for dx in tl.static_range(3):
                    r, c, w = _tap(pr, pc, dy, dx, H, W, g_side, g_centre)
                    g += tl.where((row == r) & (col == c), g_en * w, 0.0)
            tl.store(out + i * HW + offs, g.to(out_ptr.dtype.element_ty), mask=ok)


# Test hook: {"block": int} forces the pixels per chunk (e.g. several chunks per (b, head)).
_OVERRIDE: dict = {}


def _block(hw: int) -> int:
    if _OVERRIDE:
        return _OVERRIDE["block"]
    if interpreter():
        return min(1024, triton.next_power_of_2(hw))
    return min(256, max(32, triton.next_power_of_2(hw)))


def _params(maps: torch.Tensor, eps: float) -> torch.Tensor:
    side, centre = _ref.gaussian_1d()
    return torch.tensor([side, centre, eps], dtype=_ref.accumulate_dtype(maps.dtype), device=maps.device)


@torch.library.custom_op("fnf_kernels::triton_attention_maxima", mutates_args=())
def triton_attention_maxima(maps: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                     torch.Tensor]:
    """Per (b, head): (max Separate ratio (B, heads), its pixel (int64), max of each smoothed object map
    (B, heads, k), their pixels (int64)); maps contiguous (B, heads, k, H, W), k >= 2, H, W >= 2."""
    maps = maps.contiguous()
    b, h, k, hh, ww = maps.shape
    acc = _ref.accumulate_dtype(maps.dtype)
    sep = torch.empty((b, h), dtype=acc, device=maps.device)
    sep_idx = torch.empty((b, h), dtype=torch.int64, device=maps.device)
    en = torch.empty((b, h, k), dtype=acc, device=maps.device)
    en_idx = torch.empty((b, h, k), dtype=torch.int64, device=maps.device)
    if b * h == 0:
        return sep, sep_idx, en, en_idx
    with device_guard(maps):
        _forward_kernel[check_grid((b * h,))](maps, _params(maps, eps), sep, sep_idx, en, en_idx, hh, ww, K=k,
                                  KP=triton.next_power_of_2(k), BLOCK=_block(hh * ww),
                                  ACC=accumulate_tl(maps.dtype))
    return sep, sep_idx, en, en_idx


@triton_attention_maxima.register_fake
def _(maps, eps):
    b, h, k = maps.shape[:3]
    acc = _ref.accumulate_dtype(maps.dtype)
    return (maps.new_empty((b, h), dtype=acc), maps.new_empty((b, h), dtype=torch.int64),
            maps.new_empty((b, h, k), dtype=acc), maps.new_empty((b, h, k), dtype=torch.int64))


@torch.library.custom_op("fnf_kernels::triton_attention_maxima_backward", mutates_args=())
def triton_attention_maxima_backward(maps: torch.Tensor, grad_sep: torch.Tensor, sep_idx: torch.Tensor,
                                     grad_en: torch.Tensor, en_idx: torch.Tensor, eps: float) -> torch.Tensor:
    """Gradient of the maxima with respect to maps (maps' shape and dtype)."""
    maps = maps.contiguous()
    b, h, k, hh, ww = maps.shape
    out = torch.empty_like(maps)
    if b * h == 0:
        return out
    acc = _ref.accumulate_dtype(maps.dtype)
    with device_guard(maps):
        _backward_kernel[check_grid((b * h,))](maps, _params(maps, eps), grad_sep.to(acc).contiguous(),
                                               sep_idx.contiguous(), grad_en.to(acc).contiguous(),
                                               en_idx.contiguous(), out, hh, ww,
                                               K=k, BLOCK=_block(hh * ww), ACC=accumulate_tl(maps.dtype))
    return out


@triton_attention_maxima_backward.register_fake
def _(maps, grad_sep, sep_idx, grad_en, en_idx, eps):
    return torch.empty_like(maps, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    maps, eps = inputs
    _, sep_idx, _, en_idx = output
    ctx.save_for_backward(maps, sep_idx, en_idx)
    ctx.eps = eps


def _backward(ctx, grad_sep, _g1, grad_en, _g2):
    maps, sep_idx, en_idx = ctx.saved_tensors
    if grad_sep is None:
        grad_sep = sep_idx.new_zeros(sep_idx.shape, dtype=_ref.accumulate_dtype(maps.dtype))
    if grad_en is None:
        grad_en = en_idx.new_zeros(en_idx.shape, dtype=_ref.accumulate_dtype(maps.dtype))
    grad = torch.ops.fnf_kernels.triton_attention_maxima_backward(maps, grad_sep, sep_idx, grad_en, en_idx,
                                                                   ctx.eps)
    return grad, None


torch.library.register_autograd("fnf_kernels::triton_attention_maxima", _backward, setup_context=_setup_context)


def attention_maxima(maps: torch.Tensor, eps: float):
    """Differentiable (sep_max, sep_idx, en_max, en_idx) through the Triton ops."""
    return torch.ops.fnf_kernels.triton_attention_maxima(maps, eps)

