"""Triton backend of group_norm_silu: ops ``fnf_kernels::triton_group_norm_silu`` / ``triton_group_norm_silu_backward``.

x is walked as (N, C, S) with strides (sn, sc, ss) (the spatial dims merged: contiguous and channels_last both
merge). Each program takes a [BLOCK_C, BLOCK_S] tile of one sample; the tile's long side follows the layout's
contiguous dim (S for contiguous, C for channels_last), so loads are coalesced in both. One axis of
N x channel blocks x spatial chunks programs (no 65535 limit).

Forward: ``_stats_kernel`` writes per (n, c, chunk) the chunk's mean and sum of squared deviations (read x:
e bytes per element); torch merges them per group (Chan's formula) into mean and rstd; ``_apply_kernel`` reads
x and writes silu(affine(xhat)) (2e). Backward: ``_bwd_sums_kernel`` reads x and grad (2e) and writes per
(n, c, chunk) sums of dy * xhat and dy; torch reduces them to dweight, dbias and the per-group coefficients;
``_bwd_dx_kernel`` reads x and grad and writes dx (3e). Nothing of x's size is stored besides out and dx.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .. import _library
from .. import references as _ref
from ._common import accumulate_tl, check_grid, device_guard, interpreter

# Test hook: {"block_c": int, "block_s": int} forces the tile.
_OVERRIDE: dict = {}


@triton.jit
def _tile(pid, C, S, n_cb, n_sc, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    sc = pid % n_sc
    t = pid // n_sc
    cb = t % n_cb
    n = (t // n_cb).to(tl.int64)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    s = sc.to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
    ok = (c < C)[:, None] & (s < S)[None, :]
    return n, sc, c, s, ok


@triton.jit
def _xhat(x_ptr, mean_ptr, rstd_ptr, n, c, s, ok, sxn, sxc, sxs, G, CPG, ACC: tl.constexpr):
    x = tl.load(x_ptr + n * sxn + c.to(tl.int64)[:, None] * sxc + s[None, :] * sxs, mask=ok, other=0.0).to(ACC)
    g = n * G + c // CPG
    cm = c < (G * CPG)
    mean = tl.load(mean_ptr + g, mask=cm, other=0.0)
    rstd = tl.load(rstd_ptr + g, mask=cm, other=0.0)
    return (x - mean[:, None]) * rstd[:, None]


@triton.jit
def _affine(xhat, w_ptr, b_ptr, c, C, HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACC: tl.constexpr):
    y = xhat
    if HAS_W:
        w = tl.load(w_ptr + c, mask=c < C, other=0.0).to(ACC)
        y = y * w[:, None]
    if HAS_B:
        b = tl.load(b_ptr + c, mask=c < C, other=0.0).to(ACC)
        y = y + b[:, None]
    return y


@triton.jit
def _stats_kernel(x_ptr, mean_ptr, m2_ptr, C, S, n_cb, n_sc, sxn, sxc, sxs,
                  ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    n, sc, c, s, ok = _tile(tl.program_id(0), C, S, n_cb, n_sc, BLOCK_C, BLOCK_S)
    x = tl.load(x_ptr + n * sxn + c.to(tl.int64)[:, None] * sxc + s[None, :] * sxs, mask=ok, other=0.0).to(ACC)
    count = tl.minimum(S - sc.to(tl.int64) * BLOCK_S, BLOCK_S).to(ACC)
    mean = tl.sum(x, axis=1) / count
    d = tl.where(ok, x - mean[:, None], 0.0)
    m2 = tl.sum(d * d, axis=1)
    out = (n * C + c) * n_sc + sc
    tl.store(mean_ptr + out, mean, mask=c < C)
    tl.store(m2_ptr + out, m2, mask=c < C)


@triton.jit
def _apply_kernel(x_ptr, o_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, C, S, G, CPG, n_cb, n_sc,
                  sxn, sxc, sxs, son, soc, sos, HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr,
                  ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    n, sc, c, s, ok = _tile(tl.program_id(0), C, S, n_cb, n_sc, BLOCK_C, BLOCK_S)
    xhat = _xhat(x_ptr, mean_ptr, rstd_ptr, n, c, s, ok, sxn, sxc, sxs, G, CPG, ACC)
    y = _affine(xhat, w_ptr, b_ptr, c, C, HAS_W, HAS_B, ACC)
    if SILU:
        y = y / (1.0 + tl.exp(-y))
    tl.store(o_ptr + n * son + c.to(tl.int64)[:, None] * soc + s[None, :] * sos, y.to(o_ptr.dtype.element_ty),
             mask=ok)


@triton.jit
def _dy(g_ptr, xhat, w_ptr, b_ptr, n, c, s, ok, C, sgn, sgc, sgs, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
        SILU: tl.constexpr, ACC: tl.constexpr):
    dy = tl.load(g_ptr + n * sgn + c.to(tl.int64)[:, None] * sgc + s[None, :] * sgs, mask=ok, other=0.0).to(ACC)
    if SILU:
        y = _affine(xhat, w_ptr, b_ptr, c, C, HAS_W, HAS_B, ACC)
        sg = 1.0 / (1.0 + tl.exp(-y))
        dy = dy * (sg * (1.0 + y * (1.0 - sg)))
    return dy


@triton.jit
def _bwd_sums_kernel(x_ptr, g_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, sdx_ptr, sd_ptr, C, S, G, CPG, n_cb, n_sc,
                     sxn, sxc, sxs, sgn, sgc, sgs, HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr,
                     ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    n, sc, c, s, ok = _tile(tl.program_id(0), C, S, n_cb, n_sc, BLOCK_C, BLOCK_S)
    xhat = _xhat(x_ptr, mean_ptr, rstd_ptr, n, c, s, ok, sxn, sxc, sxs, G, CPG, ACC)
    dy = _dy(g_ptr, xhat, w_ptr, b_ptr, n, c, s, ok, C, sgn, sgc, sgs, HAS_W, HAS_B, SILU, ACC)
    dy = tl.where(ok, dy, 0.0)
    out = (n * C + c) * n_sc + sc
    tl.store(sdx_ptr + out, tl.sum(dy * xhat, axis=1), mask=c < C)
    tl.store(sd_ptr + out, tl.sum(dy, axis=1), mask=c < C)


@triton.jit
def _bwd_dx_kernel(x_ptr, g_ptr, dx_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, ca_ptr, cb_ptr, C, S, G, CPG, n_cb, n_sc,
                   sxn, sxc, sxs, sgn, sgc, sgs, son, soc, sos, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                   SILU: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    n, sc, c, s, ok = _tile(tl.program_id(0), C, S, n_cb, n_sc, BLOCK_C, BLOCK_S)
    xhat = _xhat(x_ptr, mean_ptr, rstd_ptr, n, c, s, ok, sxn, sxc, sxs, G, CPG, ACC)
    dy = _dy(g_ptr, xhat, w_ptr, b_ptr, n, c, s, ok, C, sgn, sgc, sgs, HAS_W, HAS_B, SILU, ACC)
    if HAS_W:
        w = tl.load(w_ptr + c, mask=c < C, other=0.0).to(ACC)
        dy = dy * w[:, None]
    g = n * G + c // CPG
    cm = c < C
    rstd = tl.load(rstd_ptr + g, mask=cm, other=0.0)
    ca = tl.load(ca_ptr + g, mask=cm, other=0.0)
    cb = tl.load(cb_ptr + g, mask=cm, other=0.0)
    dx = (dy - ca[:, None] - xhat * cb[:, None]) * rstd[:, None]
    tl.store(dx_ptr + n * son + c.to(tl.int64)[:, None] * soc + s[None, :] * sos, dx.to(dx_ptr.dtype.element_ty),
             mask=ok)


def _ncs_strides(t: torch.Tensor) -> tuple[int, int, int]:
    """(sn, sc, ss) of t viewed as (N, C, S) (the caller made its spatial dims mergeable)."""
    ss = 1
    for d in range(t.dim() - 1, 1, -1):
        if t.shape[d] != 1:
            ss = t.stride(d)
            break
    return t.stride(0), t.stride(1), ss


def _like_x(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """t with x's strides (a copy only when they differ)."""
    if t.stride() == x.stride():
        return t
    return torch.empty_like(x).copy_(t)


def _tile_shape(c: int, s: int, channels_inner: bool) -> tuple[int, int, int]:
    """(BLOCK_C, BLOCK_S, num_warps) for C channels and S spatial positions."""
    if "block_c" in _OVERRIDE:
        return _OVERRIDE["block_c"], _OVERRIDE["block_s"], 4
    total = 8192 if interpreter() else 2048
    if channels_inner:
        bc = min(triton.next_power_of_2(c), 64)
        bs = min(triton.next_power_of_2(s), max(1, total // bc))
    else:
        bs = min(triton.next_power_of_2(s), 1024)
        bc = min(triton.next_power_of_2(c), max(1, total // bs))
    return bc, bs, 4 if bc * bs <= 1024 else 8


def _geometry(x: torch.Tensor):
    n, c = x.shape[:2]
    s = x[0, 0].numel()
    sx = _ncs_strides(x)
    bc, bs, warps = _tile_shape(c, s, sx[1] == 1 and c > 1)
    n_cb, n_sc = triton.cdiv(c, bc), triton.cdiv(s, bs)
    return n, c, s, sx, bc, bs, warps, n_cb, n_sc


def merge_stats(mean_p: torch.Tensor, m2_p: torch.Tensor, s: int, block_s: int, num_groups: int, eps: float):
    """Per-group (mean, rstd) (N, G) from per (n, c, chunk) chunk means and squared-deviation sums (Chan)."""
    n, c, k = mean_p.shape
    counts = torch.full((k,), float(block_s), dtype=mean_p.dtype, device=mean_p.device)
    counts[-1] = s - (k - 1) * block_s
    total = (c // num_groups) * s
    mp = mean_p.reshape(n, num_groups, -1)
    cnt = counts.repeat(c // num_groups)
    mean = (mp * cnt).sum(dim=2) / total
    m2 = m2_p.reshape(n, num_groups, -1).sum(dim=2) + ((mp - mean[:, :, None]) ** 2 * cnt).sum(dim=2)
    return mean, torch.rsqrt(m2 / total + eps)


@torch.library.custom_op("fnf_kernels::triton_group_norm_silu", mutates_args=())
def triton_group_norm_silu(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                           num_groups: int, eps: float, silu: bool
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(silu(group_norm(x)), mean (N, G), rstd (N, G)); x of (N, C, *) with mergeable spatial dims."""
    acc = _ref.accumulate_dtype(x.dtype)
    n, c, s, sx, bc, bs, warps, n_cb, n_sc = _geometry(x)
    out = torch.empty_like(x)
    mean_p = torch.empty((n, c, n_sc), dtype=acc, device=x.device)
    m2_p = torch.empty_like(mean_p)
    grid = check_grid((n * n_cb * n_sc,))
    meta = dict(ACC=accumulate_tl(x.dtype), BLOCK_C=bc, BLOCK_S=bs, num_warps=warps)
    with device_guard(x):
        _stats_kernel[grid](x, mean_p, m2_p, c, s, n_cb, n_sc, *sx, **meta)
        mean, rstd = merge_stats(mean_p, m2_p, s, bs, num_groups, eps)
        _apply_kernel[grid](x, out, mean, rstd, weight, bias, c, s, num_groups, c // num_groups, n_cb, n_sc,
                            *sx, *_ncs_strides(out), HAS_W=weight is not None, HAS_B=bias is not None, SILU=silu,
                            **meta)
    return out, mean, rstd


@torch.library.custom_op("fnf_kernels::triton_group_norm_silu_backward", mutates_args=())
def triton_group_norm_silu_backward(grad: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor],
                                    bias: Optional[torch.Tensor], mean: torch.Tensor, rstd: torch.Tensor,
                                    num_groups: int, silu: bool, need_x: bool, need_weight: bool, need_bias: bool
                                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dbias), each an empty (0,) tensor when not needed."""
    acc = _ref.accumulate_dtype(x.dtype)
    n, c, s, sx, bc, bs, warps, n_cb, n_sc = _geometry(x)
    grad = _like_x(grad, x)
    sg = _ncs_strides(grad)
    sdx_p = torch.empty((n, c, n_sc), dtype=acc, device=x.device)
    sd_p = torch.empty_like(sdx_p)
    grid = check_grid((n * n_cb * n_sc,))
    cpg = c // num_groups
    flags = dict(HAS_W=weight is not None, HAS_B=bias is not None, SILU=silu, ACC=accumulate_tl(x.dtype),
                 BLOCK_C=bc, BLOCK_S=bs, num_warps=warps)
    dx = torch.empty_like(x) if need_x else x.new_empty((0,))
    with device_guard(x):
        _bwd_sums_kernel[grid](x, grad, mean, rstd, weight, bias, sdx_p, sd_p, c, s, num_groups, cpg, n_cb, n_sc,
                               *sx, *sg, **flags)
        sdx, sd = sdx_p.sum(dim=2), sd_p.sum(dim=2)  # (N, C)
        if need_x:
            w = weight.to(acc) if weight is not None else torch.ones(c, dtype=acc, device=x.device)
            ca = (sd * w).reshape(n, num_groups, cpg).sum(dim=2) / (cpg * s)
            cb = (sdx * w).reshape(n, num_groups, cpg).sum(dim=2) / (cpg * s)
            _bwd_dx_kernel[grid](x, grad, dx, mean, rstd, weight, bias, ca.contiguous(), cb.contiguous(), c, s,
                                 num_groups, cpg, n_cb, n_sc, *sx, *sg, *_ncs_strides(dx), **flags)
    dw = sdx.sum(dim=0).to(weight.dtype) if need_weight else x.new_empty((0,))
    db = sd.sum(dim=0).to(bias.dtype) if need_bias else x.new_empty((0,))
    return dx, dw, db


_library.register_group_norm_silu("fnf_kernels::triton_group_norm_silu",
                                  "fnf_kernels::triton_group_norm_silu_backward",
                                  lambda *a: torch.ops.fnf_kernels.triton_group_norm_silu_backward(*a))


# ------------------------------------------------------------------------------------------------- rms_norm_silu
# x viewed as (O, D, I): O = the dims before ``dim`` merged, D = x.shape[dim], I = the dims after it merged. One
# program per (o, block of BLOCK_I columns) walks D in BLOCK_D chunks twice (sum of squares, then the output /
# the gradient), so any D fits; rstd (O, I) is the op's only statistic. dweight: per-program partials (P, D).
@triton.jit
def _rms_cols(pid, I, n_ib, BLOCK_I: tl.constexpr):
    o = (pid // n_ib).to(tl.int64)
    i = (pid % n_ib).to(tl.int64) * BLOCK_I + tl.arange(0, BLOCK_I)
    return o, i, i < I


@triton.jit
def _rms_fwd_kernel(x_ptr, o_ptr, r_ptr, w_ptr, D, I, n_ib, eps, sxo, sxd, sxi, soo, sod, soi,
                    HAS_W: tl.constexpr, SILU: tl.constexpr, ACC: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_I: tl.constexpr):
    o, i, iok = _rms_cols(tl.program_id(0), I, n_ib, BLOCK_I)
    acc = tl.zeros([BLOCK_I], dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        ok = (d < D)[:, None] & iok[None, :]
        x = tl.load(x_ptr + o * sxo + d.to(tl.int64)[:, None] * sxd + i[None, :] * sxi, mask=ok, other=0.0).to(ACC)
        acc += tl.sum(x * x, axis=0)
    rstd = 1.0 / tl.sqrt(acc / D + eps)
    tl.store(r_ptr + o * I + i, rstd, mask=iok)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        ok = (d < D)[:, None] & iok[None, :]
        x = tl.load(x_ptr + o * sxo + d.to(tl.int64)[:, None] * sxd + i[None, :] * sxi, mask=ok, other=0.0).to(ACC)
        y = x * rstd[None, :]
        if HAS_W:
            y = y * tl.load(w_ptr + d, mask=d < D, other=0.0).to(ACC)[:, None]
        if SILU:
            y = y / (1.0 + tl.exp(-y))
        tl.store(o_ptr + o * soo + d.to(tl.int64)[:, None] * sod + i[None, :] * soi, y.to(o_ptr.dtype.element_ty),
                 mask=ok)


@triton.jit
def _rms_dy(x_ptr, g_ptr, w_ptr, rstd, o, d, i, ok, D, sxo, sxd, sxi, sgo, sgd, sgi, HAS_W: tl.constexpr,
            SILU: tl.constexpr, ACC: tl.constexpr):
    """(xhat, dy * w, dy) of a [BLOCK_D, BLOCK_I] tile."""
    x = tl.load(x_ptr + o * sxo + d.to(tl.int64)[:, None] * sxd + i[None, :] * sxi, mask=ok, other=0.0).to(ACC)
    g = tl.load(g_ptr + o * sgo + d.to(tl.int64)[:, None] * sgd + i[None, :] * sgi, mask=ok, other=0.0).to(ACC)
    xhat = x * rstd[None, :]
    if HAS_W:
        w = tl.load(w_ptr + d, mask=d < D, other=0.0).to(ACC)[:, None]
    else:
        w = tl.full([1, 1], 1.0, ACC)
    if SILU:
        y = xhat * w
        s = 1.0 / (1.0 + tl.exp(-y))
        g = g * (s * (1.0 + y * (1.0 - s)))
    g = tl.where(ok, g, 0.0)
    return xhat, g * w, g


@triton.jit
def _rms_bwd_kernel(x_ptr, g_ptr, r_ptr, w_ptr, dx_ptr, dw_ptr, D, I, n_ib, sxo, sxd, sxi, sgo, sgd, sgi,
                    sdo, sdd, sdi, HAS_W: tl.constexpr, SILU: tl.constexpr, NEED_X: tl.constexpr,
                    NEED_W: tl.constexpr, ACC: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_I: tl.constexpr):
    pid = tl.program_id(0)
    o, i, iok = _rms_cols(pid, I, n_ib, BLOCK_I)
    rstd = tl.load(r_ptr + o * I + i, mask=iok, other=0.0)
    dot = tl.zeros([BLOCK_I], dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        ok = (d < D)[:, None] & iok[None, :]
        xhat, gw, g = _rms_dy(x_ptr, g_ptr, w_ptr, rstd, o, d, i, ok, D, sxo, sxd, sxi, sgo, sgd, sgi, HAS_W, SILU,
                              ACC)
        dot += tl.sum(gw * xhat, axis=0)
        if NEED_W:
            tl.store(dw_ptr + pid.to(tl.int64) * D + d, tl.sum(g * xhat, axis=1), mask=d < D)
    if NEED_X:
        c = dot / D
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            ok = (d < D)[:, None] & iok[None, :]
            xhat, gw, g = _rms_dy(x_ptr, g_ptr, w_ptr, rstd, o, d, i, ok, D, sxo, sxd, sxi, sgo, sgd, sgi, HAS_W,
                                  SILU, ACC)
            dx = (gw - xhat * c[None, :]) * rstd[None, :]
            tl.store(dx_ptr + o * sdo + d.to(tl.int64)[:, None] * sdd + i[None, :] * sdi,
                     dx.to(dx_ptr.dtype.element_ty), mask=ok)


def _merged_stride(shape, strides):
    """The stride of dims that merge into one (their flat index times it), 1 for no dims, None when they do not."""
    stride, expect = 1, None
    for size, st in reversed(list(zip(shape, strides))):
        if size == 1:
            continue
        if expect is None:
            stride = st
        elif st != expect:
            return None
        expect = st * size
    return stride


def rms_view(t: torch.Tensor, dim: int):
    """(O, D, I, (so, sd, si)) of t viewed around ``dim``, or None when the dims before / after it do not merge."""
    so = _merged_stride(t.shape[:dim], t.stride()[:dim])
    si = _merged_stride(t.shape[dim + 1:], t.stride()[dim + 1:])
    if so is None or si is None:
        return None
    o = 1
    for s in t.shape[:dim]:
        o *= s
    i = 1
    for s in t.shape[dim + 1:]:
        i *= s
    return o, t.shape[dim], i, (so, t.stride(dim), si)


def _rms_tile(d: int, i: int, d_inner: bool) -> tuple[int, int, int]:
    total = 8192 if interpreter() else 2048
    if d_inner:
        bd = min(triton.next_power_of_2(d), 128)
        bi = min(triton.next_power_of_2(i), max(1, total // bd))
    else:
        bi = min(triton.next_power_of_2(i), 256)
        bd = min(triton.next_power_of_2(d), max(1, total // bi))
    return bd, bi, 4 if bd * bi <= 1024 else 8


@torch.library.custom_op("fnf_kernels::triton_rms_norm_silu", mutates_args=())
def triton_rms_norm_silu(x: torch.Tensor, weight: Optional[torch.Tensor], dim: int, eps: float,
                         silu: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(silu(x * rstd * weight), rstd shaped as x without ``dim``); x's dims around ``dim`` must merge."""
    o, d, i, sx = rms_view(x, dim)
    out = torch.empty_like(x)
    shape = list(x.shape)
    del shape[dim]
    rstd = torch.empty(shape, dtype=_ref.accumulate_dtype(x.dtype), device=x.device)
    bd, bi, warps = _rms_tile(d, i, sx[1] == 1 and d > 1)
    n_ib = triton.cdiv(i, bi)
    w = weight.contiguous() if weight is not None else None
    with device_guard(x):
        _rms_fwd_kernel[check_grid((o * n_ib,))](x, out, rstd, w, d, i, n_ib, eps, *sx, *rms_view(out, dim)[3],
                                                 HAS_W=w is not None, SILU=silu, ACC=accumulate_tl(x.dtype),
                                                 BLOCK_D=bd, BLOCK_I=bi, num_warps=warps)
    return out, rstd


@torch.library.custom_op("fnf_kernels::triton_rms_norm_silu_backward", mutates_args=())
def triton_rms_norm_silu_backward(grad: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor],
                                  rstd: torch.Tensor, dim: int, silu: bool, need_x: bool,
                                  need_weight: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dweight), each an empty (0,) tensor when not needed."""
    o, d, i, sx = rms_view(x, dim)
    grad = _like_x(grad, x)
    bd, bi, warps = _rms_tile(d, i, sx[1] == 1 and d > 1)
    n_ib = triton.cdiv(i, bi)
    programs = o * n_ib
    acc = _ref.accumulate_dtype(x.dtype)
    dx = torch.empty_like(x) if need_x else x.new_empty((0,))
    part = torch.empty((programs, d), dtype=acc, device=x.device) if need_weight else x.new_empty((0,), dtype=acc)
    w = weight.contiguous() if weight is not None else None
    with device_guard(x):
        _rms_bwd_kernel[check_grid((programs,))](
            x, grad, rstd.contiguous(), w, dx, part, d, i, n_ib, *sx, *rms_view(grad, dim)[3],
            *(rms_view(dx, dim)[3] if need_x else (0, 0, 0)), HAS_W=w is not None, SILU=silu, NEED_X=need_x,
            NEED_W=need_weight, ACC=accumulate_tl(x.dtype), BLOCK_D=bd, BLOCK_I=bi, num_warps=warps)
    dw = part.sum(dim=0).to(weight.dtype) if need_weight else x.new_empty((0,))
    return dx, dw


_library.register_rms_norm_silu("fnf_kernels::triton_rms_norm_silu", "fnf_kernels::triton_rms_norm_silu_backward",
                                lambda *a: torch.ops.fnf_kernels.triton_rms_norm_silu_backward(*a))
