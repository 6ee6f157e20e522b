"""Triton backend of masked_frobenius_penalty: ops ``fnf_kernels::triton_penalty_norms`` / ``triton_penalty_backward``.

Performance model (per element of the (B, C, H, W) image; e = bytes per element of its dtype, k = 1 for a
(B, C, H, W) mask and 1/C for a (B, 1, H, W) mask read through stride 0, which stays in L1/L2):

* ``_norms_kernel``: reads image, reference and mask once (2e + k*e bytes), computes (w * (r - x))^2
  in float32 (float64 for float64) and writes one partial sum per program into a (B, n_chunks) buffer
  (negligible). torch sums the partials (deterministic, no atomics) and takes the sqrt.
* ``_backward_kernel``: reads image, reference, mask (2e + k*e) and writes grad_image (e) once:
  3e + k*e bytes. grad_reference = -grad_image is left to autograd (one more e-read, e-write pass, only
  when reference requires grad).

Grid: one axis of batch x chunks programs (program p is chunk p % n_chunks of sample p // n_chunks), so any
batch size launches (the y and z grid axes stop at 65535).

Both walk the (C, H, W) elements of a sample in the order of the image's strides (contiguous and
channels_last read memory in order), with dims merged where every tensor is contiguous across them,
so the common layouts need one or no integer division per element.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _library
from .. import references as _ref
from ._common import accumulate_tl, check_grid, device_guard, interpreter, plan_dims
from .index_width import penalty_wide

# Test hooks: {"block": int, "iters": int} forces the launch shape (e.g. several chunks per sample);
# {"wide": True} forces 64-bit offsets (to check that path on a small tensor).
_OVERRIDE: dict = {}


@triton.jit
def _split(f, D1, D2, NDIM: tl.constexpr):
    """Flat index -> (i0, i1, i2) for f = (i0 * D1 + i1) * D2 + i2 (unused indices are left as f)."""
    if NDIM == 1:
        i0 = f
        i1 = f
        i2 = f
    elif NDIM == 2:
        i1 = f // D2
        i2 = f - i1 * D2
        i0 = f
    else:
        t = f // D2
        i2 = f - t * D2
        i0 = t // D1
        i1 = t - i0 * D1
    return i0, i1, i2


@triton.jit
def _offset(i0, i1, i2, s0, s1, s2, NDIM: tl.constexpr):
    if NDIM == 1:
        off = i2 * s2
    elif NDIM == 2:
        off = i1 * s1 + i2 * s2
    else:
        off = i0 * s0 + i1 * s1 + i2 * s2
    return off


@triton.jit
def _weighted_diff(x, r, m):
    """w * (r - x) with w = 1 - clamp(m, 0, 1); the clamp is written with comparisons so NaN propagates."""
    c = tl.where(m < 0, 0.0, tl.where(m > 1, 1.0, m))
    return (r - x) * (1.0 - c)


@triton.jit
def _norms_kernel(x_ptr, r_ptr, m_ptr, part_ptr, N, n_chunks, D1, D2,
                  sxb, sx0, sx1, sx2, srb, sr0, sr1, sr2, smb, sm0, sm1, sm2,
                  NDIM: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr,
                  WIDE: tl.constexpr):
    pid = tl.program_id(0)
    b32 = pid // n_chunks
    chunk = pid - b32 * n_chunks
    b = b32.to(tl.int64)
    x_ptr += b * sxb
    r_ptr += b * srb
    m_ptr += b * smb
    lane = tl.arange(0, BLOCK)
    if WIDE:
        start = chunk.to(tl.int64) * (BLOCK * ITERS)
    else:
        start = chunk * (BLOCK * ITERS)
    acc = tl.zeros([BLOCK], dtype=ACC)
    for it in range(ITERS):
        f = start + it * BLOCK + lane
        ok = f < N
        i0, i1, i2 = _split(f, D1, D2, NDIM)
        x = tl.load(x_ptr + _offset(i0, i1, i2, sx0, sx1, sx2, NDIM), mask=ok, other=0.0).to(ACC)
        r = tl.load(r_ptr + _offset(i0, i1, i2, sr0, sr1, sr2, NDIM), mask=ok, other=0.0).to(ACC)
        m = tl.load(m_ptr + _offset(i0, i1, i2, sm0, sm1, sm2, NDIM), mask=ok, other=0.0).to(ACC)
        d = _weighted_diff(x, r, m)
        acc += d * d
    tl.store(part_ptr + b * n_chunks + chunk, tl.sum(acc, axis=0))


@triton.jit
def _backward_kernel(coef_ptr, x_ptr, r_ptr, m_ptr, o_ptr, N, n_chunks, D1, D2,
                     sxb, sx0, sx1, sx2, srb, sr0, sr1, sr2, smb, sm0, sm1, sm2, sob, so0, so1, so2,
                     NDIM: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr,
                     WIDE: tl.constexpr):
    pid = tl.program_id(0)
    b32 = pid // n_chunks
    chunk = pid - b32 * n_chunks
    b = b32.to(tl.int64)
    coef = tl.load(coef_ptr + b)
    x_ptr += b * sxb
    r_ptr += b * srb
    m_ptr += b * smb
    o_ptr += b * sob
    lane = tl.arange(0, BLOCK)
    if WIDE:
        start = chunk.to(tl.int64) * (BLOCK * ITERS)
    else:
        start = chunk * (BLOCK * ITERS)
    for it in range(ITERS):
        f = start + it * BLOCK + lane
        ok = f < N
        i0, i1, i2 = _split(f, D1, D2, NDIM)
        x = tl.load(x_ptr + _offset(i0, i1, i2, sx0, sx1, sx2, NDIM), mask=ok, other=0.0).to(ACC)
        r = tl.load(r_ptr + _offset(i0, i1, i2, sr0, sr1, sr2, NDIM), mask=ok, other=0.0).to(ACC)
        m = tl.load(m_ptr + _offset(i0, i1, i2, sm0, sm1, sm2, NDIM), mask=ok, other=0.0).to(ACC)
        c = tl.where(m < 0, 0.0, tl.where(m > 1, 1.0, m))
        w = 1.0 - c
        # Same operation order as autograd through the reference: -((w * (r - x)) * coef) * w.
        g = -(((r - x) * w) * coef) * w
        tl.store(o_ptr + _offset(i0, i1, i2, so0, so1, so2, NDIM), g.to(o_ptr.dtype.element_ty), mask=ok)


def _launch_shape(numel: int, batch: int) -> tuple[int, int, int]:
    """(BLOCK, ITERS, num_warps): elements per program = BLOCK * ITERS."""
    if "block" in _OVERRIDE:
        return _OVERRIDE["block"], _OVERRIDE.get("iters", 1), 4
    if interpreter():
        # The interpreter pays per program, not per element: few large programs.
        return min(4096, triton.next_power_of_2(numel)), 1, 4
    block = 1024 if numel >= 1024 else max(128, triton.next_power_of_2(numel))
    iters = 1
    # Grow the work per program (fewer partials) while keeping >= ~1024 programs to fill an H100.
    while iters < 8 and batch * triton.cdiv(numel, block * iters * 2) >= 1024:
        iters *= 2
    return block, iters, 4


def _walk(image: torch.Tensor, tensors: list[torch.Tensor], elements_per_program: int):
    """Plan the element walk shared by ``tensors`` (all image-shaped); return (ndim, dims, strides, wide)."""
    ndim, dims, strides = plan_dims(tuple(image.shape[1:]), [tuple(t.stride()[1:]) for t in tensors])
    wide = _OVERRIDE.get("wide", False) or penalty_wide(ndim, dims, strides, elements_per_program)
    return ndim, dims, strides, wide


def _prepare(image, reference, mask):
    if mask.dim() == 3:
        mask = mask.unsqueeze(1)
    if mask.dtype != image.dtype:
        mask = mask.to(image.dtype)
    return mask.expand(image.shape)


@torch.library.custom_op("fnf_kernels::triton_penalty_norms", mutates_args=())
def triton_penalty_norms(image: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor,
                         squared: bool) -> torch.Tensor:
    """Per-sample ||(1 - clamp(mask, 0, 1)) * (reference - image)||_F (squared if asked), shape (B,)."""
    mask = _prepare(image, reference, mask)
    batch = image.shape[0]
    numel = image[0].numel()
    acc_dtype = _ref.accumulate_dtype(image.dtype)
    if image.numel() == 0:
        return torch.zeros((batch,), dtype=acc_dtype, device=image.device)
    block, iters, warps = _launch_shape(numel, batch)
    ndim, (_, d1, d2), (sx, sr, sm), wide = _walk(image, [image, reference, mask], block * iters)
    n_chunks = triton.cdiv(numel, block * iters)
    partials = torch.empty((batch, n_chunks), dtype=acc_dtype, device=image.device)
    with device_guard(image):
        _norms_kernel[check_grid((batch * n_chunks,))](
            image, reference, mask, partials, numel, n_chunks, d1, d2,
            image.stride(0), *sx, reference.stride(0), *sr, mask.stride(0), *sm,
            NDIM=ndim, ACC=accumulate_tl(image.dtype), BLOCK=block, ITERS=iters, WIDE=wide, num_warps=warps)
    sums = partials.sum(dim=1)
    return sums if squared else sums.sqrt()


@torch.library.custom_op("fnf_kernels::triton_penalty_backward", mutates_args=())
def triton_penalty_backward(grad: torch.Tensor, image: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor,
                            norms: torch.Tensor, squared: bool) -> torch.Tensor:
    """grad_image = -coef_b * w^2 * (reference - image), coef_b = 2 g_b (squared) or g_b / n_b (0 where n_b == 0)."""
    mask = _prepare(image, reference, mask)
    batch = image.shape[0]
    numel = image[0].numel()
    acc_dtype = _ref.accumulate_dtype(image.dtype)
    grad = grad.to(acc_dtype)
    norms = norms.to(acc_dtype)
    if squared:
        coef = 2.0 * grad
    else:
        # torch's norm backward: zero where the norm is 0 (never NaN there); NaN norms still propagate.
        coef = torch.where(norms == 0, torch.zeros_like(grad), grad / norms)
    coef = coef.contiguous()
    out = torch.empty_like(image)
    if image.numel() == 0:
        return out
    block, iters, warps = _launch_shape(numel, batch)
    ndim, (_, d1, d2), (sx, sr, sm, so), wide = _walk(image, [image, reference, mask, out], block * iters)
    n_chunks = triton.cdiv(numel, block * iters)
    with device_guard(image):
        _backward_kernel[check_grid((batch * n_chunks,))](
            coef, image, reference, mask, out, numel, n_chunks, d1, d2,
            image.stride(0), *sx, reference.stride(0), *sr, mask.stride(0), *sm, out.stride(0), *so,
            NDIM=ndim, ACC=accumulate_tl(image.dtype), BLOCK=block, ITERS=iters, WIDE=wide, num_warps=warps)
    return out


_library.register_penalty("fnf_kernels::triton_penalty_norms", "fnf_kernels::triton_penalty_backward",
                          lambda *args: torch.ops.fnf_kernels.triton_penalty_backward(*args))


def penalty_norms(image: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor, squared: bool) -> torch.Tensor:
    """Differentiable per-sample norms (B,) through the Triton ops (validated arguments)."""
    return torch.ops.fnf_kernels.triton_penalty_norms(image, reference, mask, squared)
