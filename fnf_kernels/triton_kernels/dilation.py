"""Triton backend of threshold_dilate: op ``fnf_kernels::triton_threshold_dilate``.

Two passes whose cost per pixel does not depend on the radius (the algorithm of the C++ backends):

* ``_column_kernel`` (grid (B, column blocks); each program holds a tile of BLOCK_H rows x BLOCK_W adjacent
  columns and walks down, then up, its columns tile by tile, with carried values between tiles):
  state = 2 (NaN) / 1 (> threshold) / 0, and per pixel d1 = vertical distance to the nearest pixel of its
  column with state >= 1, d2 = to the nearest with state == 2, both capped at r + 1, stored packed as
  d1 | d2 << 16 in an int32 scratch. Down sweep: reads the heatmap (e bytes per pixel), writes 4 bytes;
  up sweep: reads 4 and writes 4 bytes (state >= 1 iff the down-sweep d1 == 0, == 2 iff d2 == 0).
* ``_row_kernel`` (one program per ROWS rows): column x' with dL(x') <= r reaches s(x') = r (square) or
  floor(sqrt(r^2 - dL^2)) (disk) pixels to each side; x is covered at level L iff the prefix max of
  x' + s(x') reaches x or the suffix min of x' - s(x') does (associative scans along the row). Reads
  4 bytes and writes the output (o bytes: 1 for bool/uint8, 2/4/8 for floats) per pixel. Rows longer than
  one block are processed in tiles with carried values; then the suffix pass first writes its coverage
  flags into free bits of the scratch (4 more bytes read + 4 written per pixel).

Total: e + 16 + o bytes per pixel (e + 24 + o for very long rows); no atomics.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _library
from ._common import accumulate_tl, check_grid, device_guard, interpreter
from .index_width import dilation_wide

# Test hooks: {"col": (BLOCK_H, BLOCK_W), "row": (ROWS, BLOCK)} forces the tile shapes; {"wide": True} forces
# 64-bit heatmap offsets in the column pass (to check that path on a small tensor).
_OVERRIDE: dict = {}
# Longest row handled as a single block by the row pass; longer rows use the tiled path.
MAX_ROW_BLOCK = 4096
# Distances stay below 2**15 (H + W < 32767): bits 15 and 31 of the packed scratch are free.
_FAR = tl.constexpr(0x7FFF7FFF)


@triton.jit
def _max_fn(a, b):
    return tl.maximum(a, b)


@triton.jit
def _min_fn(a, b):
    return tl.minimum(a, b)


@triton.jit
def _column_kernel(hm_ptr, thr_ptr, sc_ptr, H, W, shb, shy, shx, cap,
                   ACC: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, WIDE: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    col_ok = cols < W
    lane = tl.arange(0, BLOCK_H)
    thr = tl.load(thr_ptr + b)
    hm_ptr += b * shb
    sc_ptr += b * H * W
    none = tl.zeros([BLOCK_W], dtype=tl.int32) - cap  # "no such row above": y - none >= cap
    last1 = none
    last2 = none
    for y0 in range(0, H, BLOCK_H):
        y = y0 + lane
        ok = (y < H)[:, None] & col_ok[None, :]
        if WIDE:
            row_off = y.to(tl.int64) * shy
            col_off = cols.to(tl.int64) * shx
        else:
            row_off = y * shy
            col_off = cols * shx
        v = tl.load(hm_ptr + row_off[:, None] + col_off[None, :], mask=ok, other=0.0).to(ACC)
        nan = v != v
        act = ok & ((v > thr) | nan)
        nan = ok & nan
        yy = y[:, None] + tl.zeros([BLOCK_H, BLOCK_W], dtype=tl.int32)
        l1 = tl.maximum(tl.associative_scan(tl.where(act, yy, -cap), 0, _max_fn), last1[None, :])
        l2 = tl.maximum(tl.associative_scan(tl.where(nan, yy, -cap), 0, _max_fn), last2[None, :])
        d1 = tl.minimum(yy - l1, cap)
        d2 = tl.minimum(yy - l2, cap)
        tl.store(sc_ptr + y[:, None] * W + cols[None, :], d1 | (d2 << 16), mask=ok)
        last1 = tl.max(l1, axis=0)
        last2 = tl.max(l2, axis=0)
    far = tl.zeros([BLOCK_W], dtype=tl.int32) + (H - 1 + cap)  # "no such row below": far - y >= cap
    next1 = far
    next2 = far
    n_tiles = tl.cdiv(H, BLOCK_H)
    for t in range(n_tiles):
        y = (n_tiles - 1 - t) * BLOCK_H + lane
        ok = (y < H)[:, None] & col_ok[None, :]
        ptrs = sc_ptr + y[:, None] * W + cols[None, :]
        p = tl.load(ptrs, mask=ok, other=_FAR)
        d1 = p & 0xFFFF
        d2 = p >> 16
        yy = y[:, None] + tl.zeros([BLOCK_H, BLOCK_W], dtype=tl.int32)
        n1 = tl.minimum(tl.associative_scan(tl.where(ok & (d1 == 0), yy, H - 1 + cap), 0, _min_fn, reverse=True),
                        next1[None, :])
        n2 = tl.minimum(tl.associative_scan(tl.where(ok & (d2 == 0), yy, H - 1 + cap), 0, _min_fn, reverse=True),
                        next2[None, :])
        d1 = tl.minimum(d1, n1 - yy)
        d2 = tl.minimum(d2, n2 - yy)
        tl.store(ptrs, d1 | (d2 << 16), mask=ok)
        next1 = tl.min(n1, axis=0)
        next2 = tl.min(n2, axis=0)


@triton.jit
def _reach(d, r, DISK: tl.constexpr):
    """Horizontal reach s of a column pixel at vertical distance d <= r (garbage where d > r)."""
    if DISK:
        v = tl.maximum(r * r - d * d, 0)
        s = tl.sqrt(v.to(tl.float32)).to(tl.int32)
        # The float sqrt may be off by one around perfect squares: correct it exactly.
        s = tl.where(s * s > v, s - 1, s)
        s = tl.where((s + 1) * (s + 1) <= v, s + 1, s)
    else:
        s = tl.zeros(d.shape, dtype=tl.int32) + r
    return s


@triton.jit
def _right_end(d, x, r, DISK: tl.constexpr):
    """x' + s(x') where column x' reaches (else -1, below every x)."""
    return tl.where(d <= r, x + _reach(d, r, DISK), -1)


@triton.jit
def _left_end(d, x, r, W, DISK: tl.constexpr):
    """x' - s(x') where column x' reaches (else W, beyond every x)."""
    return tl.where(d <= r, x - _reach(d, r, DISK), W)


@triton.jit
def _store_mask(out_ptrs, cov1, cov2, ok, FLOAT_OUT: tl.constexpr):
    if FLOAT_OUT:
        val = tl.where(cov2, float("nan"), tl.where(cov1, 1.0, 0.0))
        tl.store(out_ptrs, val.to(out_ptrs.dtype.element_ty), mask=ok)
    else:  # bool (viewed as uint8) or uint8: level 2 implies level 1
        tl.store(out_ptrs, cov1.to(tl.uint8), mask=ok)


@triton.jit
def _row_kernel(sc_ptr, out_ptr, n_rows, W, r,
                DISK: tl.constexpr, FLOAT_OUT: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
                TILED: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    base = rows.to(tl.int64) * W
    lane = tl.arange(0, BLOCK)
    if not TILED:
        x = lane[None, :] + tl.zeros([ROWS, BLOCK], dtype=tl.int32)
        ok = row_ok[:, None] & (x < W)
        p = tl.load(sc_ptr + base[:, None] + x, mask=ok, other=_FAR)
        d1 = p & 0x7FFF
        d2 = (p >> 16) & 0x7FFF
        cov1 = ((tl.associative_scan(_right_end(d1, x, r, DISK), 1, _max_fn) >= x)
                | (tl.associative_scan(_left_end(d1, x, r, W, DISK), 1, _min_fn, reverse=True) <= x))
        cov2 = ((tl.associative_scan(_right_end(d2, x, r, DISK), 1, _max_fn) >= x)
                | (tl.associative_scan(_left_end(d2, x, r, W, DISK), 1, _min_fn, reverse=True) <= x))
        _store_mask(out_ptr + base[:, None] + x, cov1, cov2, ok, FLOAT_OUT)
    else:
        n_tiles = tl.cdiv(W, BLOCK)
        # Right to left: suffix min of x' - s(x'); coverage flags go to bits 15 / 31 of the scratch.
        carry1 = tl.zeros([ROWS], dtype=tl.int32) + W
        carry2 = tl.zeros([ROWS], dtype=tl.int32) + W
        for t in range(n_tiles):
            x = (n_tiles - 1 - t) * BLOCK + lane[None, :] + tl.zeros([ROWS, BLOCK], dtype=tl.int32)
            ok = row_ok[:, None] & (x < W)
            ptrs = sc_ptr + base[:, None] + x
            p = tl.load(ptrs, mask=ok, other=_FAR)
            m1 = tl.minimum(tl.associative_scan(_left_end(p & 0x7FFF, x, r, W, DISK), 1, _min_fn, reverse=True),
                            carry1[:, None])
            m2 = tl.minimum(tl.associative_scan(_left_end((p >> 16) & 0x7FFF, x, r, W, DISK), 1, _min_fn,
                                                reverse=True), carry2[:, None])
            flags = ((m1 <= x).to(tl.int32) << 15) | ((m2 <= x).to(tl.int32) << 31)
            tl.store(ptrs, p | flags, mask=ok)
            carry1 = tl.min(m1, axis=1)
            carry2 = tl.min(m2, axis=1)
        # Left to right: prefix max of x' + s(x'), combined with the flags.
        carry1 = tl.zeros([ROWS], dtype=tl.int32) - 1
        carry2 = tl.zeros([ROWS], dtype=tl.int32) - 1
        for t in range(n_tiles):
            x = t * BLOCK + lane[None, :] + tl.zeros([ROWS, BLOCK], dtype=tl.int32)
            ok = row_ok[:, None] & (x < W)
            p = tl.load(sc_ptr + base[:, None] + x, mask=ok, other=_FAR)
            m1 = tl.maximum(tl.associative_scan(_right_end(p & 0x7FFF, x, r, DISK), 1, _max_fn), carry1[:, None])
            m2 = tl.maximum(tl.associative_scan(_right_end((p >> 16) & 0x7FFF, x, r, DISK), 1, _max_fn),
                            carry2[:, None])
            cov1 = (m1 >= x) | (((p >> 15) & 1) != 0)
            cov2 = (m2 >= x) | (p < 0)
            _store_mask(out_ptr + base[:, None] + x, cov1, cov2, ok, FLOAT_OUT)
            carry1 = tl.max(m1, axis=1)
            carry2 = tl.max(m2, axis=1)


def _column_config(batch: int, height: int, width: int) -> tuple[int, int, int]:
    """(BLOCK_H, BLOCK_W, num_warps) of the column pass."""
    if "col" in _OVERRIDE:
        block_h, block_w = _OVERRIDE["col"]
        return block_h, block_w, 1
    if interpreter():
        return min(64, triton.next_power_of_2(height)), min(128, triton.next_power_of_2(width)), 1
    # 32-64 adjacent columns keep each row segment one or two 128-byte lines; narrow blocks when the batch
    # is small so more programs run in parallel. The sweeps are latency-bound (one dependent step per row
    # tile), so each step loads a tall 2048-pixel tile to keep enough bytes in flight per program.
    block_w = 64 if batch * triton.cdiv(width, 64) >= 264 else 32
    block_w = min(block_w, max(16, triton.next_power_of_2(width)))
    return min(64, 2048 // block_w), block_w, 4


def _row_config(n_rows: int, width: int) -> tuple[int, int, bool, int]:
    """(ROWS, BLOCK, TILED, num_warps) of the row pass."""
    if "row" in _OVERRIDE:
        rows, block = _OVERRIDE["row"]
        return rows, block, block < width, 4
    block = min(triton.next_power_of_2(width), MAX_ROW_BLOCK)
    rows = max(1, min(4096 // block, triton.next_power_of_2(n_rows)))
    warps = 8 if rows * block >= 4096 else 4
    return rows, block, block < width, warps


@torch.library.custom_op("fnf_kernels::triton_threshold_dilate", mutates_args=())
def triton_threshold_dilate(heatmap: torch.Tensor, threshold: torch.Tensor, radius: int, disk: bool,
                            dtype: torch.dtype) -> torch.Tensor:
    """Threshold (B, H, W) ``heatmap`` at the per-sample ``threshold`` and dilate by ``radius``."""
    batch, height, width = heatmap.shape
    if height + width >= 32767:
        raise ValueError(f"heatmap is too large: H + W = {height + width}, expected below 32767")
    # Beyond H + W the element covers the whole image either way; keeps cap = r + 1 in 15 bits.
    radius = max(0, min(int(radius), height + width))
    acc = torch.float64 if heatmap.dtype == torch.float64 else torch.float32
    threshold = threshold.to(acc).contiguous()
    out = torch.empty((batch, height, width), dtype=dtype, device=heatmap.device)
    scratch = torch.empty((batch, height, width), dtype=torch.int32, device=heatmap.device)
    if out.numel() == 0:
        return out
    out_view = out.view(torch.uint8) if dtype == torch.bool else out
    shb, shy, shx = heatmap.stride()
    block_h, block_w, warps = _column_config(batch, height, width)
    # Heatmap offsets (rows and columns, whole tiles) in 64 bits when int32 could overflow.
    wide = _OVERRIDE.get("wide", False) or dilation_wide(height, width, shy, shx, block_h, block_w)
    rows, block, tiled, row_warps = _row_config(batch * height, width)
    with device_guard(heatmap):
        _column_kernel[check_grid((batch, triton.cdiv(width, block_w)))](
            heatmap, threshold, scratch, height, width, shb, shy, shx, radius + 1,
            ACC=accumulate_tl(heatmap.dtype), BLOCK_H=block_h, BLOCK_W=block_w, WIDE=wide, num_warps=warps)
        _row_kernel[check_grid((triton.cdiv(batch * height, rows),))](
            scratch, out_view, batch * height, width, radius,
            DISK=disk, FLOAT_OUT=dtype.is_floating_point, ROWS=rows, BLOCK=block, TILED=tiled,
            num_warps=row_warps)
    return out


_library.register_dilate("fnf_kernels::triton_threshold_dilate")


def threshold_dilate(heatmap: torch.Tensor, threshold: torch.Tensor, radius: int, disk: bool,
                     dtype: torch.dtype) -> torch.Tensor:
    """Entry point of fnf_kernels.dilation for backend="triton" (validated arguments)."""
    return torch.ops.fnf_kernels.triton_threshold_dilate(heatmap, threshold, radius, disk, dtype)
