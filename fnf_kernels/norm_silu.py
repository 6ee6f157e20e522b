"""group_norm_silu and rms_norm_silu: a normalisation and its SiLU as one op that keeps only its input.

Autograd saves x (in its own dtype) and the float32 statistics (float64 for float64 inputs) — never the
normalised tensor, the affine output or the SiLU output — and the backward recomputes them. Backends
(``backend=``):

* ``"cuda"``: CUDA C++ kernels of the extension (ops ``fnf_kernels::group_norm_silu`` / ``rms_norm_silu`` and
  their ``_backward``).
* ``"triton"``: :mod:`fnf_kernels.triton_kernels.norm_silu`; CUDA tensors, or CPU under TRITON_INTERPRET=1.
* ``"cpu"``: the C++ CPU kernels of the extension (the same op names; csrc/cpu/norm_silu_cpu.cpp), or, with an
  extension that predates them, the plain-torch op.
* the ``"torch"`` op: plain torch over chunks of whole groups (rows for rms_norm_silu), any device (ATen's own
  kernels per chunk); what "auto" falls back to.
* ``"reference"``: :mod:`fnf_kernels.references`, differentiated by ordinary autograd (saves everything).
* ``"auto"``: cuda > triton > torch on CUDA tensors; on CPU tensors the plain-torch op for group_norm_silu and the
  C++ kernel for rms_norm_silu (the faster of the two, measured: benchmarks/RESULTS.md, issue 26).

Every custom op shares the fake kernels and autograd of :mod:`fnf_kernels._library`, so they work under
torch.compile and fake-tensor tracing (the memory estimator sees what is saved).
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
import torch.nn.functional as F

from . import _extension, _library, _validate, backends
from . import references as ref

if backends.triton_installed():  # the Triton ops register on import; triton reads TRITON_INTERPRET here
    from .triton_kernels import norm_silu as _triton
else:
    _triton = None

# Elements per chunk of the plain-torch op (whole groups / rows; a group larger than this is one chunk).
CHUNK_ELEMENTS = 1 << 22


def _compiled(name: str) -> bool:
    """Whether the loaded extension registers op ``fnf_kernels::name`` for CPU or CUDA (an older build may not)."""
    for key in ("CPU", "CUDA"):
        try:
            if torch._C._dispatch_has_kernel_for_dispatch_key(f"fnf_kernels::{name}", key):
                return True
        except RuntimeError:
            return False
    return False


if _extension.load() is not None and _compiled("group_norm_silu"):
    _library.register_group_norm_silu("fnf_kernels::group_norm_silu", "fnf_kernels::group_norm_silu_backward",
                                      lambda *a: torch.ops.fnf_kernels.group_norm_silu_backward(*a))
if _extension.load() is not None and _compiled("rms_norm_silu"):
    _library.register_rms_norm_silu("fnf_kernels::rms_norm_silu", "fnf_kernels::rms_norm_silu_backward",
                                    lambda *a: torch.ops.fnf_kernels.rms_norm_silu_backward(*a))


# --------------------------------------------------------------------------------------------------------
# Plain-torch ops (the CPU path; any device)
# --------------------------------------------------------------------------------------------------------
def _silu_grad(grad: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """d silu(y) / dy * grad = grad * s * (1 + y * (1 - s)), s = sigmoid(y)."""
    s = torch.sigmoid(y)
    return grad * (s * (1 + y * (1 - s)))


def _group_blocks(x: torch.Tensor, num_groups: int):
    """Yield (n0, n1, g0, g1): blocks of whole groups of at most CHUNK_ELEMENTS elements (at least one group)."""
    n, c = x.shape[:2]
    group = (c // num_groups) * (x[0, 0].numel() if n and c else 0)
    per_sample = group * num_groups
    if 0 < per_sample <= CHUNK_ELEMENTS:
        step = max(1, CHUNK_ELEMENTS // per_sample)
        for n0 in range(0, n, step):
            yield n0, min(n, n0 + step), 0, num_groups
        return
    step = max(1, CHUNK_ELEMENTS // max(group, 1))
    for n0 in range(n):
        for g0 in range(0, num_groups, step):
            yield n0, n0 + 1, g0, min(num_groups, g0 + step)


def _unit_batch_stride(x: torch.Tensor) -> torch.Tensor:
    """A one-sample x with the canonical batch stride (a view). A size-1 dim's stride is arbitrary (a tiled VAE
    decode's convolutions return channels_last (1, C, H, W) tensors with batch stride C rather than C·H·W); ATen's
    group norm and the kernels' layout checks read it, so it is made the one its layout implies."""
    if x.dim() >= 3 and x.shape[0] == 1 and x.stride(0) != x[0].numel():
        return x.as_strided(x.shape, (x[0].numel(), *x.stride()[1:]))
    return x


def _layout(x: torch.Tensor):
    """The memory format a chunk of x is computed in: channels_last stays so (no transposing copy)."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def _chunk(t: torch.Tensor, n0, n1, c0, c1, acc, fmt) -> torch.Tensor:
    """t[n0:n1, c0:c1] in the accumulate dtype and ``fmt`` (a view when it already is)."""
    return _unit_batch_stride(t[n0:n1, c0:c1].to(acc).contiguous(memory_format=fmt))


def _params(weight, bias, c0, c1, acc):
    return (None if weight is None else weight[c0:c1].to(acc).contiguous(),
            None if bias is None else bias[c0:c1].to(acc).contiguous())


def _norm(xs, w, b, groups, eps):
    """ATen's fused group norm of one chunk: (y, mean (n, g), rstd (n, g))."""
    n, c = xs.shape[:2]
    return torch.native_group_norm(xs, w, b, n, c, xs[0, 0].numel(), groups, eps)


def _affine_of(xs, mean, rstd, w, b):
    """The affine output y = x * scale + shift of a chunk (the form ATen's CPU group norm computes it in), from the
    saved statistics: one pass over the chunk."""
    n, c = xs.shape[:2]
    cpg = c // mean.shape[1]
    scale = rstd.repeat_interleave(cpg, dim=1)
    if w is not None:
        scale = scale * w
    shift = -mean.repeat_interleave(cpg, dim=1) * scale
    if b is not None:
        shift = shift + b
    shape = (n, c) + (1,) * (xs.dim() - 2)
    return torch.addcmul(shift.reshape(shape), xs, scale.reshape(shape))


@torch.library.custom_op("fnf_kernels::group_norm_silu_torch", mutates_args=())
def group_norm_silu_torch(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                          num_groups: int, eps: float, silu: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    acc, fmt = ref.accumulate_dtype(x.dtype), _layout(x)
    n, c = x.shape[:2]
    cpg = c // num_groups
    blocks = list(_group_blocks(x, num_groups))
    out = None if len(blocks) == 1 and x.dtype == acc else torch.empty_like(x)
    mean = x.new_empty((n, num_groups), dtype=acc)
    rstd = torch.empty_like(mean)
    for n0, n1, g0, g1 in blocks:
        c0, c1 = g0 * cpg, g1 * cpg
        y, m, r = _norm(_chunk(x, n0, n1, c0, c1, acc, fmt), *_params(weight, bias, c0, c1, acc), g1 - g0, eps)
        if silu:
            y = F.silu(y, inplace=True)
        if out is None and y.stride() == x.stride():
            out = y  # one chunk already in x's dtype and layout: no copy
        elif out is None:
            out = torch.empty_like(x).copy_(y)
        else:
            out[n0:n1, c0:c1].copy_(y)
        mean[n0:n1, g0:g1] = m
        rstd[n0:n1, g0:g1] = r
    return out, mean, rstd


@torch.library.custom_op("fnf_kernels::group_norm_silu_torch_backward", mutates_args=())
def group_norm_silu_torch_backward(grad: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor],
                                   bias: Optional[torch.Tensor], mean: torch.Tensor, rstd: torch.Tensor,
                                   num_groups: int, silu: bool, need_x: bool, need_weight: bool, need_bias: bool
                                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    acc, fmt = ref.accumulate_dtype(x.dtype), _layout(x)
    n, c = x.shape[:2]
    cpg = c // num_groups
    blocks = list(_group_blocks(x, num_groups))
    single = len(blocks) == 1 and x.dtype == acc
    dx = (None if single else torch.empty_like(x)) if need_x else x.new_empty((0,))
    sum_dw = x.new_zeros((c,), dtype=acc)
    sum_db = x.new_zeros((c,), dtype=acc)
    for n0, n1, g0, g1 in blocks:
        c0, c1 = g0 * cpg, g1 * cpg
        xs = _chunk(x, n0, n1, c0, c1, acc, fmt)
        dy = _chunk(grad, n0, n1, c0, c1, acc, fmt)
        w, b = _params(weight, bias, c0, c1, acc)
        m, r = mean[n0:n1, g0:g1].contiguous(), rstd[n0:n1, g0:g1].contiguous()
        if silu:
            dy = torch.ops.aten.silu_backward(dy, _affine_of(xs, m, r, w, b))
        ones = w if w is not None else xs.new_ones((c1 - c0,))  # ATen wants a weight for dbias
        d, dw, db = torch.ops.aten.native_group_norm_backward(
            dy, xs, m, r, ones, n1 - n0, c1 - c0, xs[0, 0].numel(), g1 - g0, [need_x, need_weight, need_bias])
        if need_x:
            if dx is None:
                dx = d if d.stride() == x.stride() else torch.empty_like(x).copy_(d)
            else:
                dx[n0:n1, c0:c1].copy_(d)
        if need_weight:
            sum_dw[c0:c1] += dw
        if need_bias:
            sum_db[c0:c1] += db
    out_dw = sum_dw.to(weight.dtype) if need_weight else x.new_empty((0,))
    out_db = sum_db.to(bias.dtype) if need_bias else x.new_empty((0,))
    return dx, out_dw, out_db


_library.register_group_norm_silu("fnf_kernels::group_norm_silu_torch", "fnf_kernels::group_norm_silu_torch_backward",
                                  lambda *a: torch.ops.fnf_kernels.group_norm_silu_torch_backward(*a))


def _row_blocks(x: torch.Tensor, dim: int):
    """Yield (axis, i0, i1): slices along the first dim other than ``dim`` of at most ~CHUNK_ELEMENTS."""
    axis = 1 if dim == 0 else 0
    size = x.shape[axis]
    per = x.numel() // max(size, 1)
    step = max(1, CHUNK_ELEMENTS // max(per, 1))
    for i0 in range(0, size, step):
        yield axis, i0, min(size, i0 + step)


def _weight_view(weight, x, dim, acc):
    if weight is None:
        return None
    shape = [1] * x.dim()
    shape[dim] = -1
    return weight.to(acc).reshape(shape)


@torch.library.custom_op("fnf_kernels::rms_norm_silu_torch", mutates_args=())
def rms_norm_silu_torch(x: torch.Tensor, weight: Optional[torch.Tensor], dim: int, eps: float,
                        silu: bool) -> tuple[torch.Tensor, torch.Tensor]:
    acc = ref.accumulate_dtype(x.dtype)
    out = torch.empty_like(x)
    shape = list(x.shape)
    del shape[dim]
    rstd = x.new_empty(shape, dtype=acc)
    w = _weight_view(weight, x, dim, acc)
    for axis, i0, i1 in _row_blocks(x, dim):
        xs = x.narrow(axis, i0, i1 - i0).to(acc)
        r = torch.rsqrt((xs * xs).mean(dim=dim, keepdim=True) + eps)
        y = xs * r
        if w is not None:
            y = y * w
        if silu:
            y = F.silu(y, inplace=True)
        out.narrow(axis, i0, i1 - i0).copy_(y)
        rstd.narrow(axis if axis < dim else axis - 1, i0, i1 - i0).copy_(r.squeeze(dim))
    return out, rstd


@torch.library.custom_op("fnf_kernels::rms_norm_silu_torch_backward", mutates_args=())
def rms_norm_silu_torch_backward(grad: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor],
                                 rstd: torch.Tensor, dim: int, silu: bool, need_x: bool,
                                 need_weight: bool) -> tuple[torch.Tensor, torch.Tensor]:
    acc = ref.accumulate_dtype(x.dtype)
    dx = torch.empty_like(x) if need_x else x.new_empty((0,))
    sum_dyx = x.new_zeros((x.shape[dim],), dtype=acc)
    w = _weight_view(weight, x, dim, acc)
    others = [d for d in range(x.dim()) if d != dim]
    for axis, i0, i1 in _row_blocks(x, dim):
        xs = x.narrow(axis, i0, i1 - i0).to(acc)
        gs = grad.narrow(axis, i0, i1 - i0).to(acc)
        r = rstd.narrow(axis if axis < dim else axis - 1, i0, i1 - i0).unsqueeze(dim)
        xhat = xs * r
        dy = _silu_grad(gs, xhat if w is None else xhat * w) if silu else gs
        if need_weight:
            sum_dyx += (dy * xhat).sum(dim=others)
        if need_x:
            if w is not None:
                dy = dy * w
            d = (dy - xhat * (dy * xhat).mean(dim=dim, keepdim=True)) * r
            dx.narrow(axis, i0, i1 - i0).copy_(d)
    dw = sum_dyx.to(weight.dtype) if need_weight else x.new_empty((0,))
    return dx, dw


_library.register_rms_norm_silu("fnf_kernels::rms_norm_silu_torch", "fnf_kernels::rms_norm_silu_torch_backward",
                                lambda *a: torch.ops.fnf_kernels.rms_norm_silu_torch_backward(*a))


# --------------------------------------------------------------------------------------------------------
# Validation, dispatch, public ops
# --------------------------------------------------------------------------------------------------------
def _eps(eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    return float(eps)


def _param(name: str, value, x: torch.Tensor, size: int, what: str) -> Optional[torch.Tensor]:
    if value is None:
        return None
    value = _validate.tensor(name, value)
    _validate.same_device(name, value, "x", x)
    if tuple(value.shape) != (size,):
        raise ValueError(f"{name} must have shape ({size},) (the {what} of x), got {tuple(value.shape)}")
    return value


def _x(x) -> torch.Tensor:
    x = _validate.tensor("x", x)
    if x.dim() < 2:
        raise ValueError(f"x must have at least 2 dims (N, C, ...), got shape {tuple(x.shape)}")
    return x


def _mergeable(x: torch.Tensor) -> bool:
    """Whether the spatial dims of x merge into one stride (contiguous, channels_last and their 3-D kin do)."""
    stride = 1 if x.dim() == 2 else x.stride(-1)
    for d in range(x.dim() - 1, 1, -1):
        if x.shape[d] != 1 and x.stride(d) != stride:
            return False
        stride *= x.shape[d]
    return True


def _merges(shape, strides) -> bool:
    """Whether dims of these sizes and strides merge into one stride (size-1 dims are free)."""
    expect = None
    for size, st in reversed(list(zip(shape, strides))):
        if size == 1:
            continue
        if expect is not None and st != expect:
            return False
        expect = st * size
    return True


def _rms_merges(x: torch.Tensor, dim: int) -> bool:
    """Whether x's dims before ``dim`` and after it each merge (x is then an (O, D, I) view for the kernels)."""
    return _merges(x.shape[:dim], x.stride()[:dim]) and _merges(x.shape[dim + 1:], x.stride()[dim + 1:])


def group_norm_silu(x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor] = None,
                    bias: Optional[torch.Tensor] = None, eps: float = 1e-5, *, silu: bool = True,
                    backend: str = "auto") -> torch.Tensor:
    """silu(group_norm(x, num_groups, weight, bias, eps)) keeping only x and the (N, G) statistics for backward.

    Args:
        x: (N, C, *) float16/bfloat16/float32/float64; contiguous or channels_last (other layouts are copied).
        num_groups: an int >= 1 that divides C.
        weight, bias: None or (C,) floating tensors on x's device (any float dtype; gradients in their dtype).
        eps: added to the variance. silu: False gives the plain group norm.
        backend: "auto", "cuda", "triton", "cpu" (the C++ CPU kernel) or "reference".

    Statistics and arithmetic in float32 (float64 for float64 x); the output has x's dtype and layout.
    """
    x = _unit_batch_stride(_x(x))
    c = x.shape[1]
    if isinstance(num_groups, bool) or not isinstance(num_groups, numbers.Integral) or num_groups < 1:
        raise TypeError(f"num_groups must be an int >= 1, got {num_groups!r}")
    num_groups = int(num_groups)
    if c % num_groups:
        raise ValueError(f"num_groups must divide the channels of x (C = {c}), got {num_groups}")
    weight = _param("weight", weight, x, c, "channels")
    bias = _param("bias", bias, x, c, "channels")
    eps = _eps(eps)
    _validate.flag("silu", silu)
    _validate.choice("backend", backend, _validate.BACKEND_NAMES)
    chosen = backends.select("group_norm_silu", backend, x.device, x.dtype)
    if chosen == "reference" or x.numel() == 0:
        return ref.group_norm_silu_reference(x, num_groups, weight, bias, eps, silu)
    if not _mergeable(x):
        x = x.contiguous()
    if chosen == "triton":
        op = torch.ops.fnf_kernels.triton_group_norm_silu
    elif chosen in ("cuda", "cpu"):
        op = torch.ops.fnf_kernels.group_norm_silu
    else:
        op = torch.ops.fnf_kernels.group_norm_silu_torch
    return op(x, weight, bias, num_groups, eps, silu)[0]


def rms_norm_silu(x: torch.Tensor, weight: Optional[torch.Tensor] = None, eps: float = 1e-6, *, dim: int,
                  silu: bool = True, backend: str = "auto") -> torch.Tensor:
    """silu(x / sqrt(mean(x**2 over dim) + eps) * weight) keeping only x and the float32 rstd for backward.

    Args:
        x: a float16/bfloat16/float32/float64 tensor of at least 1 dim. dim: the normalised dim (1 for the
            channel-first VAE of Qwen-Image, -1 for channels-last activations).
        weight: None or a (x.shape[dim],) floating tensor. eps: added to the mean square.
        backend: "auto", "cuda", "triton", "cpu" (the C++ CPU kernel) or "reference".
    """
    x = _validate.tensor("x", x)
    if x.dim() == 1 and isinstance(dim, int) and dim in (0, -1):
        return rms_norm_silu(x[None], weight, eps, dim=1, silu=silu, backend=backend)[0]
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral):
        raise TypeError(f"dim must be an int, got {type(dim).__name__}")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim must be in [{-x.dim()}, {x.dim() - 1}] for x of shape {tuple(x.shape)}, got {dim}")
    dim = int(dim) % x.dim()
    weight = _param("weight", weight, x, x.shape[dim], f"size of dim {dim}")
    eps = _eps(eps)
    _validate.flag("silu", silu)
    _validate.choice("backend", backend, _validate.BACKEND_NAMES)
    chosen = backends.select("rms_norm_silu", backend, x.device, x.dtype)
    if chosen == "reference" or x.numel() == 0:
        return ref.rms_norm_silu_reference(x, weight, eps, dim=dim, silu=silu)
    if chosen in ("triton", "cuda", "cpu") and not _rms_merges(x, dim):
        x = x.contiguous()
    if chosen == "triton":
        return torch.ops.fnf_kernels.triton_rms_norm_silu(x, weight, dim, eps, silu)[0]
    if chosen in ("cuda", "cpu"):
        return torch.ops.fnf_kernels.rms_norm_silu(x, weight, dim, eps, silu)[0]
    return torch.ops.fnf_kernels.rms_norm_silu_torch(x, weight, dim, eps, silu)[0]
