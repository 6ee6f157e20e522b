"""Triton backend of lora_linear: ops ``fnf_kernels::triton_lora_linear`` / ``triton_lora_linear_backward``.

y = x Wᵀ + b + s_m · (x Aᵀ) Bᵀ for x (M, K), W (N, K), A (R, K), B (N, R) (grouped: see fnf_kernels.lora),
s_m the per-row scale (peft's alpha/r times the per-sample scale of row m's sample).

Kernels (all accumulate in float32; every tile loop is masked, so no size has to be a multiple of 16):

* ``_down_kernel``   l[m, j] = s_m · Σ_k a[m, k] v[k, j]  — a skinny GEMM (M × R output), the "down" projection:
  forward  xs  = s · (x Aᵀ)            (M, R)   (saved for backward: dB needs it)
  backward gbs = s · (g B)  per group  (M, R)
* ``_fused_kernel``  out = a w (+ bias) + l u  — the main GEMM whose epilogue adds the low-rank update from the
  same fp32 accumulator, so the (M, N) output is written once:
  forward  y  = x Wᵀ + b + xs Bᵀ       (the tile loops only over the rank blocks of its output groups)
  backward dx = g W + gbs A
  With ``FUSE_DOWN`` (forward only) the kernel also computes xs itself inside its K loop (see below).
* ``_wgrad_kernel``  out = leftᵀ right, a reduction over the M rows split across programs (fp32 partials, summed
  by torch: deterministic, no atomics): dA = gbsᵀ x, dB = gᵀ xs (per group), dW = gᵀ x (if W requires grad).
  db = Σ_m g (torch, only when b requires grad).

Saved for backward: x (for dA, dW), W, A (for dx), B (for dx, dA) and xs (M × R, for dB) — each only when a
gradient that reads it is needed; never y or b. Nothing of size M × N is saved.

Cost model (e bytes per element, bf16 e = 2; numbers for the SD 64² self-attention projection M = 2·4096,
K = N = 320, r = 64; "(L2)" = a re-read of a tensor that was just streamed and still sits in the 50 MB L2):

Forward
  ======================  ======================================  ===========================  =========
  kernel                  FLOPs                                   HBM bytes                    example
  ======================  ======================================  ===========================  =========
  base linear alone       2MNK = 1.68 G                           e(MK + NK + MN) = 10.7 MB
  _down (xs)              2MKr = 0.34 G                           e(MK (L2) + rK + Mr)         +1.1 MB
  _fused (y)              2MNK + 2MNr = 1.68 + 0.34 G             e(MK + NK + MN + Mr + Nr)    11.8 MB
  fused total             +40 % FLOPs                             +21 % (+70 % if x misses L2)
  peft (5 torch ops)      same FLOPs                              + e(MK + 2Mr + 5MN) ≈ 49.5 MB  (4.6×)
  ======================  ======================================  ===========================  =========

x Aᵀ in the same kernel (``FUSE_DOWN``) or a small one before it: every (BM, BN) output tile needs the full
(BM, r) slice of x Aᵀ, so in-kernel it is recomputed by each of the ⌈N/BN⌉ column tiles: ⌈N/BN⌉ · 2MKr FLOPs
(3 × 0.34 G at N = 320, BN = 128: +60 % of the base FLOPs instead of +20 %) and a (BM × r) fp32 accumulator
plus an (r × BK) A tile per K step; it saves one launch and the x re-read (≤ 5.2 MB for every SD shape, L2
resident). The SD projections are memory bound (arithmetic intensity ≈ 160 FLOP/B against H100's ≈ 300), so the
recompute is largely hidden at small r and costs real time at large r. Default (``FORWARD_DOWN = "auto"``): in the
kernel when r_total ≤ ``FUSED_DOWN_MAX_RANK`` (64), else the separate kernel — both are built, tested, and
timed side by side in benchmarks/bench_lora.py (``--down``), which is where the threshold should be set from.

Backward (needs dx, dA, dB; W frozen)
  _down (gbs)    2MNr          e(MN + Nr + Mr)            g read #1
  _fused (dx)    2MNK + 2MKr   e(MN (L2) + NK + Mr + rK + MK)    g read #2, dx written once (no separate add)
  _wgrad (dA)    2MKr          e(Mr + MK)                 x read
  _wgrad (dB)    2MNr          e(MN + Mr)                 g read #3
  total ≈ e(3MN + 2MK + 4Mr) = 30 MB; peft's backward runs ≈ 9 kernels (mul by scaling, two thin GEMM pairs,
  the frozen base dx, the add of both dx) ≈ e(6MN + 4MK + 6Mr) ≈ 58 MB.
"""
from __future__ import annotations

import inspect
from typing import Optional

import torch
import triton
import triton.language as tl

from .. import _library
from ._common import check_grid, device_guard, interpreter

# Forward variant: "auto" (in-kernel x Aᵀ when the total rank <= FUSED_DOWN_MAX_RANK), "fused" or "separate".
FORWARD_DOWN = "auto"
FUSED_DOWN_MAX_RANK = 64
# Test hook: block sizes {"BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_R"} and {"split"} forced for every launch.
_OVERRIDE: dict = {}


# --------------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------------

@triton.jit
def _down_kernel(a_ptr, v_ptr, scale_ptr, out_ptr,
                 M, KG, RG, rows_per_sample, scale_value,
                 stride_am, stride_ak, stride_vk, stride_vj, stride_om, stride_oj,
                 HAS_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                 PRECISION: tl.constexpr):
    """out[m, g·RG + j] = s_m · Σ_{k < KG} a[m, g·KG + k] · v[g·KG + k, j] for rank block g (grid axis 1)."""
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    chunks = tl.cdiv(RG, BLOCK_R)
    grp = pid_r // chunks
    offs_j = (pid_r % chunks) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_j = offs_j < RG
    rows = offs_m.to(tl.int64)
    k_first = grp * KG
    a_ptrs = a_ptr + rows[:, None] * stride_am + (k_first + offs_k)[None, :] * stride_ak
    v_ptrs = v_ptr + (k_first + offs_k)[:, None] * stride_vk + offs_j[None, :] * stride_vj
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, KG, BLOCK_K):
        mask_k = (k0 + offs_k) < KG
        a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        v = tl.load(v_ptrs, mask=mask_k[:, None] & mask_j[None, :], other=0.0)
        acc = tl.dot(a, v, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        v_ptrs += BLOCK_K * stride_vk
    if HAS_SCALE:
        s = tl.load(scale_ptr + offs_m // rows_per_sample, mask=mask_m, other=0.0)
        acc = acc * (s * scale_value)[:, None]
    else:
        acc = acc * scale_value
    out_ptrs = out_ptr + rows[:, None] * stride_om + (grp * RG + offs_j)[None, :] * stride_oj
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_j[None, :])


@triton.jit
def _fused_kernel(a_ptr, w_ptr, bias_ptr, l_ptr, u_ptr, d_ptr, scale_ptr, out_ptr,
                  M, N, K, OG, RG, R, rows_per_sample, scale_value,
                  stride_am, stride_ak, stride_wk, stride_wn, stride_lm, stride_lr,
                  stride_ur, stride_un, stride_dk, stride_dr, stride_om, stride_on,
                  M_BUCKET,
                  HAS_BIAS: tl.constexpr, FUSE_DOWN: tl.constexpr, HAS_SCALE: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                  GROUP_M: tl.constexpr, PRECISION: tl.constexpr):
    """out[m, n] = Σ_k a[m, k] w[k, n] (+ bias[n]) + Σ_{r in group(n)} l[m, r] u[r - group(n)·RG, n].

    group(n) = n // OG; l is (M, R) with R = G·RG. With FUSE_DOWN, l = s_m · (a d) is computed here from
    d[k, r] (the K loop loads a (BLOCK_K, BLOCK_R) tile of it next to the w tile) and the column-0 programs
    store it to l_ptr for backward.
    """
    pid = tl.program_id(0)
    # Grouped launch order: GROUP_M row tiles share the same w column tiles while they sit in L2.
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    rows = offs_m.to(tl.int64)
    a_ptrs = a_ptr + rows[:, None] * stride_am + offs_k[None, :] * stride_ak
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if FUSE_DOWN:
        offs_d = tl.arange(0, BLOCK_R)
        mask_d = offs_d < R
        d_ptrs = d_ptr + offs_k[:, None] * stride_dk + offs_d[None, :] * stride_dr
        acc_l = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = (k0 + offs_k) < K
        a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
        if FUSE_DOWN:
            d = tl.load(d_ptrs, mask=mask_k[:, None] & mask_d[None, :], other=0.0)
            acc_l = tl.dot(a, d, acc_l, input_precision=PRECISION)
            d_ptrs += BLOCK_K * stride_dk
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk

    grp_n = offs_n // OG
    if FUSE_DOWN:
        if HAS_SCALE:
            s = tl.load(scale_ptr + offs_m // rows_per_sample, mask=mask_m, other=0.0)
            acc_l = acc_l * (s * scale_value)[:, None]
        else:
            acc_l = acc_l * scale_value
        l_tile = acc_l.to(l_ptr.dtype.element_ty)  # rounded like the separate kernel's stored xs
        if pid_n == 0:
            l_ptrs = l_ptr + rows[:, None] * stride_lm + offs_d[None, :] * stride_lr
            tl.store(l_ptrs, l_tile, mask=mask_m[:, None] & mask_d[None, :])
        r_local = offs_d[:, None] - grp_n[None, :] * RG
        mask_u = (r_local >= 0) & (r_local < RG) & mask_n[None, :]
        u = tl.load(u_ptr + r_local * stride_ur + offs_n[None, :] * stride_un, mask=mask_u, other=0.0)
        acc = tl.dot(l_tile, u, acc, input_precision=PRECISION)
    else:
        # Only the rank blocks of the groups this column tile touches (one, or two at a group boundary).
        last_n = min(pid_n * BLOCK_N + BLOCK_N, N) - 1
        r_begin = ((pid_n * BLOCK_N) // OG) * RG
        r_end = (last_n // OG + 1) * RG
        for r0 in range(r_begin, r_end, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            mask_r = offs_r < r_end
            l_tile = tl.load(l_ptr + rows[:, None] * stride_lm + offs_r[None, :] * stride_lr,
                             mask=mask_m[:, None] & mask_r[None, :], other=0.0)
            r_local = offs_r[:, None] - grp_n[None, :] * RG
            mask_u = (r_local >= 0) & (r_local < RG) & mask_r[:, None] & mask_n[None, :]
            u = tl.load(u_ptr + r_local * stride_ur + offs_n[None, :] * stride_un, mask=mask_u, other=0.0)
            acc = tl.dot(l_tile, u, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + rows[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _wgrad_kernel(left_ptr, right_ptr, out_ptr, M, PG, Q, QOFF, rows_per_split,
                  stride_lm, stride_lp, stride_rm, stride_rq, stride_os, stride_op, stride_oq,
                  BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, PRECISION: tl.constexpr):
    """out[s, g·PG + p, q] = Σ_{m in split s} left[m, g·PG + p] · right[m, g·QOFF + q] (fp32 partials)."""
    pid_p = tl.program_id(0)
    pid_q = tl.program_id(1)
    pid_s = tl.program_id(2)
    tiles = tl.cdiv(PG, BLOCK_P)
    grp = pid_p // tiles
    offs_pl = (pid_p % tiles) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_p = grp * PG + offs_pl
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    mask_p = offs_pl < PG
    mask_q = offs_q < Q
    m_begin = pid_s * rows_per_split
    m_end = min(M, m_begin + rows_per_split)
    offs_m = (m_begin + tl.arange(0, BLOCK_M)).to(tl.int64)
    l_ptrs = left_ptr + offs_m[:, None] * stride_lm + offs_p[None, :] * stride_lp
    r_ptrs = right_ptr + offs_m[:, None] * stride_rm + (grp * QOFF + offs_q)[None, :] * stride_rq
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    for m0 in range(m_begin, m_end, BLOCK_M):
        mask_m = (m0 + tl.arange(0, BLOCK_M)) < m_end
        lt = tl.load(l_ptrs, mask=mask_m[:, None] & mask_p[None, :], other=0.0)
        rt = tl.load(r_ptrs, mask=mask_m[:, None] & mask_q[None, :], other=0.0)
        acc = tl.dot(tl.trans(lt), rt, acc, input_precision=PRECISION)
        l_ptrs += BLOCK_M * stride_lm
        r_ptrs += BLOCK_M * stride_rm
    out_ptrs = out_ptr + pid_s * stride_os + offs_p[:, None] * stride_op + offs_q[None, :] * stride_oq
    tl.store(out_ptrs, acc, mask=mask_p[:, None] & mask_q[None, :])


def _config(block_m, block_n, block_k, warps, stages):
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": 8},
                         num_warps=warps, num_stages=stages)


# Autotune configs of _fused_kernel, per operand width: only configs whose ptxas compile for sm_80 and sm_90 spills
# no register in any variant (FUSE_DOWN on and off, forward and dx); tests/test_triton_compile.py compiles each one
# and fails on a spill.
_CONFIGS_16 = [  # float16 / bfloat16 operands
    _config(128, 128, 64, 8, 3),
    _config(128, 64, 64, 8, 4),
    _config(64, 128, 64, 8, 4),
    _config(64, 64, 64, 4, 4),
]
_CONFIGS_32 = [  # float32 operands (tf32 or ieee dots): smaller K steps, fewer stages
    _config(128, 64, 32, 8, 3),
    _config(64, 128, 32, 8, 3),
    _config(64, 64, 32, 8, 3),
]
# float32 with ieee dots (torch's default allow_tf32=False) and x Aᵀ in the kernel: the FMA path holds both
# accumulators in registers, and only the smallest tile stays unspilled.
_CONFIGS_32_IEEE_FUSED_DOWN = _CONFIGS_32[2:]
_FUSED_CONFIGS = _CONFIGS_16 + _CONFIGS_32


def _prune(configs, named_args, **kwargs):
    """The configs of the operands' width and variant (the key holds the dtypes: each width tunes separately)."""
    if named_args["a_ptr"].element_size() < 4:
        allowed = _CONFIGS_16
    elif kwargs.get("PRECISION") == "ieee" and kwargs.get("FUSE_DOWN"):
        allowed = _CONFIGS_32_IEEE_FUSED_DOWN
    else:
        allowed = _CONFIGS_32
    return [c for c in configs if any(c is k for k in allowed)]


# Tuning key: M bucketed to the next power of two (batch x tokens varies from call to call), the layer's N, K, rank
# and group width, the variant, plus the argument dtypes (added by Triton): a UNet's few projection shapes tune
# once per M bucket. The autotuner keeps each key's choice for the process; with ``cache_results`` (Triton >= 3.3)
# also on disk, keyed by the GPU target, so later runs skip the benchmark.
_AUTOTUNE_KEY = ["M_BUCKET", "N", "K", "R", "OG", "FUSE_DOWN", "BLOCK_R"]
_AUTOTUNE_OPTIONS = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}
_fused_tuned = triton.autotune(configs=_FUSED_CONFIGS, key=_AUTOTUNE_KEY,
                               prune_configs_by={"early_config_prune": _prune}, **_AUTOTUNE_OPTIONS)(_fused_kernel)


# --------------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------------

def _pow2(n: int, lo: int = 16, hi: int = 128) -> int:
    return max(lo, min(hi, triton.next_power_of_2(n)))


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"  # ignored for float16/bfloat16


def _down(a, v, v_strides, scale, scale_value, rows_per_sample, kg, rg, groups, out):
    """out (M, groups·rg) = s · per-group a[:, g·kg:(g+1)·kg] @ v-block; v[k, j] at v_strides = (s_k, s_j)."""
    m = a.shape[0]
    block_r = _OVERRIDE.get("BLOCK_R", _pow2(rg, hi=64))
    if interpreter():
        block_m, block_k, warps = _OVERRIDE.get("BLOCK_M", 16), _OVERRIDE.get("BLOCK_K", 16), 4
    else:
        block_m, block_k, warps = (64 if m <= 4096 else 128), 64, 4
    grid = (triton.cdiv(m, block_m), groups * triton.cdiv(rg, block_r))
    _down_kernel[check_grid(grid)](a, v, scale if scale is not None else out, out,
                       m, kg, rg, rows_per_sample, scale_value,
                       a.stride(0), a.stride(1), v_strides[0], v_strides[1], out.stride(0), out.stride(1),
                       HAS_SCALE=scale is not None, BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=block_k,
                       PRECISION=_precision(a.dtype), num_warps=warps)


def _fused(a, w_strides, w, bias, l, u, u_strides, out, og, rg, fuse_down=None, scale=None, scale_value=1.0,
           rows_per_sample=1):
    """out = a @ w (+ bias) + grouped l @ u; w[k, n] at w_strides, u[r, n] at u_strides (see _fused_kernel)."""
    m, k = a.shape
    n = out.shape[1]
    r = l.shape[1]
    if fuse_down is not None:
        d, d_strides = fuse_down
        block_r = triton.next_power_of_2(max(r, 16))
    else:
        d, d_strides = l, (0, 0)
        block_r = _OVERRIDE.get("BLOCK_R", _pow2(min(rg, r), hi=64))
    common = (a, w, bias if bias is not None else out, l, u, d, scale if scale is not None else out, out,
              m, n, k, og, rg, r, rows_per_sample, scale_value,
              a.stride(0), a.stride(1), w_strides[0], w_strides[1], l.stride(0), l.stride(1),
              u_strides[0], u_strides[1], d_strides[0], d_strides[1], out.stride(0), out.stride(1),
              triton.next_power_of_2(m))
    flags = dict(HAS_BIAS=bias is not None, FUSE_DOWN=fuse_down is not None, HAS_SCALE=scale is not None,
                 BLOCK_R=block_r, PRECISION=_precision(a.dtype))
    if interpreter() or _OVERRIDE.get("BLOCK_M"):
        bm, bn, bk = _OVERRIDE.get("BLOCK_M", 16), _OVERRIDE.get("BLOCK_N", 32), _OVERRIDE.get("BLOCK_K", 16)
        grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
        _fused_kernel[check_grid(grid)](*common, **flags, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                                        GROUP_M=_OVERRIDE.get("GROUP_M", 2), num_warps=4)
    else:
        def grid(meta):
            return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
        _fused_tuned[grid](*common, **flags)


def _wgrad(left, right, pg, q, qoff, groups, out_dtype):
    """(groups·pg, q) = per-group leftᵀ right (rows of group g use right's columns g·qoff + [0, q))."""
    m = left.shape[0]
    if interpreter():
        bp, bq, bm, warps = 16, 16, 16, 4
    else:
        bp, bq, bm, warps = _pow2(pg, hi=64), _pow2(q, hi=128), 64, 4
    tiles = groups * triton.cdiv(pg, bp) * triton.cdiv(q, bq)
    target = 4 if interpreter() else 2 * _sm_count(left.device)
    split = _OVERRIDE.get("split", max(1, min(triton.cdiv(target, tiles), triton.cdiv(m, 4 * bm))))
    rows_per_split = triton.cdiv(triton.cdiv(m, split), bm) * bm
    split = triton.cdiv(m, rows_per_split)
    part = torch.empty((split, groups * pg, q), device=left.device, dtype=torch.float32)
    grid = (groups * triton.cdiv(pg, bp), triton.cdiv(q, bq), split)
    _wgrad_kernel[check_grid(grid)](left, right, part, m, pg, q, qoff, rows_per_split,
                        left.stride(0), left.stride(1), right.stride(0), right.stride(1),
                        part.stride(0), part.stride(1), part.stride(2),
                        BLOCK_P=bp, BLOCK_Q=bq, BLOCK_M=bm, PRECISION=_precision(left.dtype), num_warps=warps)
    return (part[0] if split == 1 else part.sum(0)).to(out_dtype)


_SM_COUNT: dict = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 2
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def _use_fused_down(r_total: int) -> bool:
    mode = _OVERRIDE.get("down", FORWARD_DOWN)
    if mode == "fused":
        return r_total <= 128
    if mode == "separate":
        return False
    return r_total <= FUSED_DOWN_MAX_RANK


# --------------------------------------------------------------------------------------------------------
# Custom ops
# --------------------------------------------------------------------------------------------------------

@torch.library.custom_op("fnf_kernels::triton_lora_linear", mutates_args=())
def triton_lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_A: torch.Tensor,
                       lora_B: torch.Tensor, scale: Optional[torch.Tensor], scale_value: float, rows_per_sample: int,
                       groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    m, k = x.shape
    n, r = weight.shape[0], lora_A.shape[0]
    rg, og = r // groups, n // groups
    out = x.new_empty((m, n))
    xs = x.new_empty((m, r))
    with device_guard(x):
        if _use_fused_down(r):
            _fused(x, (weight.stride(1), weight.stride(0)), weight, bias, xs, lora_B,
                   (lora_B.stride(1), lora_B.stride(0)), out, og, rg,
                   fuse_down=(lora_A, (lora_A.stride(1), lora_A.stride(0))), scale=scale, scale_value=scale_value,
                   rows_per_sample=rows_per_sample)
        else:
            _down(x, lora_A, (lora_A.stride(1), lora_A.stride(0)), scale, scale_value, rows_per_sample, k, r, 1, xs)
            _fused(x, (weight.stride(1), weight.stride(0)), weight, bias, xs, lora_B,
                   (lora_B.stride(1), lora_B.stride(0)), out, og, rg)
    return out, xs


@torch.library.custom_op("fnf_kernels::triton_lora_linear_backward", mutates_args=())
def triton_lora_linear_backward(grad: torch.Tensor, x: Optional[torch.Tensor], weight: Optional[torch.Tensor],
                                lora_A: Optional[torch.Tensor], lora_B: Optional[torch.Tensor],
                                xs: Optional[torch.Tensor], scale: Optional[torch.Tensor], scale_value: float,
                                rows_per_sample: int, groups: int, need_x: bool, need_weight: bool, need_bias: bool,
                                need_A: bool, need_B: bool
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    m, n = grad.shape
    og = n // groups
    dx, dw, db, da, dbb = (grad.new_empty((0,)) for _ in range(5))  # distinct: outputs may not alias
    with device_guard(grad):
        if need_x or need_A:
            rg = lora_B.shape[1]
            r = rg * groups
            gbs = grad.new_empty((m, r))
            _down(grad, lora_B, (lora_B.stride(0), lora_B.stride(1)), scale, scale_value, rows_per_sample,
                  og, rg, groups, gbs)
            if need_x:
                k = weight.shape[1]
                dx = grad.new_empty((m, k))
                _fused(grad, (weight.stride(0), weight.stride(1)), weight, None, gbs, lora_A,
                       (lora_A.stride(0), lora_A.stride(1)), dx, k, r)
            if need_A:
                da = _wgrad(gbs, x, r, x.shape[1], 0, 1, grad.dtype)
        if need_B:
            rg = xs.shape[1] // groups
            dbb = _wgrad(grad, xs, og, rg, rg, groups, grad.dtype)
        if need_weight:
            dw = _wgrad(grad, x, n, x.shape[1], 0, 1, grad.dtype)
        if need_bias:
            db = grad.sum(0, dtype=torch.float32).to(grad.dtype)
    return dx, dw, db, da, dbb


_library.register_lora("fnf_kernels::triton_lora_linear", "fnf_kernels::triton_lora_linear_backward",
                       lambda *a: torch.ops.fnf_kernels.triton_lora_linear_backward(*a))
