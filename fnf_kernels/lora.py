"""lora_linear: y = x Wᵀ + b + s · (x Aᵀ) Bᵀ as one op, with a per-sample LoRA scale s.

Backends (``backend=``):

* ``"triton"``: the fused Triton kernels of :mod:`fnf_kernels.triton_kernels.lora_linear`
  (op ``fnf_kernels::triton_lora_linear``); CUDA tensors, or CPU tensors under TRITON_INTERPRET=1.
* ``"cpu"``: plain torch (op ``fnf_kernels::lora_linear_torch``: addmm/matmul calls with the same hand-written
  backward and the same saved tensors as the Triton op). CPU tensors only.
* ``"reference"``: :func:`lora_linear_reference`, differentiated by ordinary autograd (the spec).
* ``"auto"`` (default): "triton" on CUDA tensors when triton is installed and the dtype is not float64,
  otherwise the plain-torch op (which then also runs on CUDA tensors).

Both custom ops share the fake kernels and the autograd registration below, so they work under
torch.compile. Internally x is flattened to (M, in) rows; row m belongs to sample m // (M / B).

Grouped LoRA (``groups=G``, used to fuse q, k, v into one GEMM): the output features split into G equal
blocks and lora_A's rows into G equal rank blocks; output block g uses only rank block g, i.e. B is
block-diagonal and is passed as its G diagonal blocks stacked along the output dimension:
``lora_A = cat([A_q, A_k, A_v])`` (G·r, in) and ``lora_B = cat([B_q, B_k, B_v])`` (out, r).
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch

from . import _library, _validate, backends
from .references import lora_linear_reference

if backends.triton_installed():  # the Triton ops register on import; triton reads TRITON_INTERPRET here
    from .triton_kernels import lora_linear as _triton
else:
    _triton = None

LORA_BACKENDS = ("triton", "cpu", "reference")
# The fake kernels, autograd and op signatures shared by both custom ops: fnf_kernels._library (register_lora).


# --------------------------------------------------------------------------------------------------------
# Plain-torch op (CPU path; also the CUDA fallback without triton)
# --------------------------------------------------------------------------------------------------------

def _row_scale(scale, scale_value, rows_per_sample, m, dtype, device):
    """The (M, 1) per-row scale, or a float when it is the same for every row."""
    if scale is None:
        return scale_value
    rs = scale.to(dtype).repeat_interleave(rows_per_sample) * scale_value
    return rs.reshape(m, 1)


def _grouped_up(left, right, groups):
    """out[:, block g] = left[:, rank block g] @ right[block g]ᵀ for left (M, G·r), right (G·o, r)."""
    m = left.shape[0]
    if groups == 1:
        return left @ right.t()
    r, o = left.shape[1] // groups, right.shape[0] // groups
    out = torch.bmm(left.reshape(m, groups, r).transpose(0, 1), right.reshape(groups, o, r).transpose(1, 2))
    return out.transpose(0, 1).reshape(m, groups * o)


@torch.library.custom_op("fnf_kernels::lora_linear_torch", mutates_args=())
def lora_linear_torch(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_A: torch.Tensor,
                      lora_B: torch.Tensor, scale: Optional[torch.Tensor], scale_value: float, rows_per_sample: int,
                      groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    rs = _row_scale(scale, scale_value, rows_per_sample, x.shape[0], x.dtype, x.device)
    xs = (x @ lora_A.t()) * rs
    out = x @ weight.t() if bias is None else torch.addmm(bias, x, weight.t())
    out += _grouped_up(xs, lora_B, groups)
    return out, xs


@torch.library.custom_op("fnf_kernels::lora_linear_torch_backward", mutates_args=())
def lora_linear_torch_backward(grad: torch.Tensor, x: Optional[torch.Tensor], weight: Optional[torch.Tensor],
                               lora_A: Optional[torch.Tensor], lora_B: Optional[torch.Tensor],
                               xs: Optional[torch.Tensor], scale: Optional[torch.Tensor], scale_value: float,
                               rows_per_sample: int, groups: int, need_x: bool, need_weight: bool, need_bias: bool,
                               need_A: bool, need_B: bool
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    m, n = grad.shape
    dx, dw, db, da, dbb = (grad.new_empty((0,)) for _ in range(5))  # distinct: outputs may not alias
    if need_x or need_A:
        rs = _row_scale(scale, scale_value, rows_per_sample, m, grad.dtype, grad.device)
        r = lora_B.shape[1]
        if groups == 1:
            gbs = grad @ lora_B
        else:
            o = n // groups
            gbs = torch.bmm(grad.reshape(m, groups, o).transpose(0, 1), lora_B.reshape(groups, o, r))
            gbs = gbs.transpose(0, 1).reshape(m, groups * r)
        gbs = gbs * rs  # (M, R): rowscale * (grad B) per group
        if need_x:
            dx = torch.addmm(grad @ weight, gbs, lora_A)
        if need_A:
            da = gbs.t() @ x
    if need_weight:
        dw = grad.t() @ x
    if need_bias:
        db = grad.sum(0)
    if need_B:
        if groups == 1:
            dbb = grad.t() @ xs
        else:
            o, r = n // groups, xs.shape[1] // groups
            dbb = torch.bmm(grad.reshape(m, groups, o).permute(1, 2, 0), xs.reshape(m, groups, r).transpose(0, 1))
            dbb = dbb.reshape(n, r)
    return dx, dw, db, da, dbb


_library.register_lora("fnf_kernels::lora_linear_torch", "fnf_kernels::lora_linear_torch_backward",
                       lambda *a: torch.ops.fnf_kernels.lora_linear_torch_backward(*a))


# --------------------------------------------------------------------------------------------------------
# Validation, dispatch, public op
# --------------------------------------------------------------------------------------------------------

def _shape(t) -> tuple:
    return tuple(t.shape)


def _lora_args(x, weight, bias, lora_A, lora_B, scale, groups, backend):
    """Validate lora_linear arguments; return (x2d, scale tensor or None, scale_value, rows_per_sample)."""
    x = _validate.tensor("x", x)
    weight = _validate.tensor("weight", weight)
    lora_A = _validate.tensor("lora_A", lora_A)
    lora_B = _validate.tensor("lora_B", lora_B)
    _validate.choice("backend", backend, _validate.BACKEND_NAMES)
    if isinstance(groups, bool) or not isinstance(groups, numbers.Integral) or groups < 1:
        raise ValueError(f"groups must be an int >= 1, got {groups!r}")
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dimension (..., in_features), got a 0-d tensor")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {_shape(weight)}")
    out_f, in_f = weight.shape
    if x.shape[-1] != in_f:
        raise ValueError(f"x's last dimension must be weight's in_features {in_f}, got x of shape {_shape(x)}")
    if lora_A.dim() != 2 or lora_A.shape[1] != in_f:
        raise ValueError(f"lora_A must be 2-D (rank, in_features) = (r, {in_f}), got shape {_shape(lora_A)}")
    rank = lora_A.shape[0]
    if rank % groups:
        raise ValueError(f"lora_A's rank {rank} must be divisible by groups={groups}")
    if out_f % groups:
        raise ValueError(f"weight's out_features {out_f} must be divisible by groups={groups}")
    if lora_B.dim() != 2 or tuple(lora_B.shape) != (out_f, rank // groups):
        raise ValueError(f"lora_B must be 2-D (out_features, rank / groups) = {(out_f, rank // groups)}, "
                         f"got shape {_shape(lora_B)}")
    for name, t in (("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)):
        if t.dtype != x.dtype:
            raise TypeError(f"{name} must have x's dtype {x.dtype}, got {t.dtype}")
        _validate.same_device(name, t, "x", x)
    if bias is not None:
        bias = _validate.tensor("bias", bias)
        if bias.dim() != 1 or bias.shape[0] != out_f:
            raise ValueError(f"bias must be None or 1-D (out_features,) = ({out_f},), got shape {_shape(bias)}")
        if bias.dtype != x.dtype:
            raise TypeError(f"bias must have x's dtype {x.dtype}, got {bias.dtype}")
        _validate.same_device("bias", bias, "x", x)
    x2 = x.reshape(math.prod(x.shape[:-1]), in_f)
    m = x2.shape[0]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    if isinstance(scale, torch.Tensor):
        if scale.dtype not in _validate.FLOAT_DTYPES:
            raise TypeError(f"scale must be a float or a floating (B,) tensor, got dtype {scale.dtype}")
        _validate.same_device("scale", scale, "x", x)
        if scale.dim() == 0:
            scale_t, rows = scale.reshape(1), m
        elif scale.dim() == 1 and x.dim() >= 2 and scale.shape[0] == x.shape[0]:
            scale_t, rows = scale, (m // x.shape[0] if x.shape[0] else 1)
        else:
            lead = x.shape[0] if x.dim() >= 2 else None
            raise ValueError(f"scale must be a float, a 0-d tensor or a (B,) tensor with B = x.shape[0]"
                             f"{' = ' + str(lead) if lead is not None else ' (x must then be at least 2-D)'}; "
                             f"got shape {_shape(scale)} for x of shape {_shape(x)}")
        return x2, scale_t.detach().to(acc).contiguous(), 1.0, rows
    if isinstance(scale, numbers.Real) and not isinstance(scale, bool):
        return x2, None, float(scale), m
    raise TypeError(f"scale must be a float or a (B,) tensor, got {type(scale).__name__}")


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """x's dtype, or the autocast dtype when torch.autocast is on for x's device (F.linear's rule)."""
    dev = x.device.type
    if x.dtype != torch.float64 and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def autocast_inputs(x, *others):
    """Under torch.autocast cast x and the floating tensors in ``others`` to the autocast dtype, as F.linear does."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        return (x, *others)
    dev = x.device.type
    if x.dtype == torch.float64 or not torch.is_autocast_enabled(dev):
        return (x, *others)
    dtype = torch.get_autocast_dtype(dev)
    cast = [t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in others]
    return (x.to(dtype), *cast)


def _lora_linear(x, weight, bias, lora_A, lora_B, scale_t, scale_value, rows_per_sample, groups, chosen):
    """Run a validated lora_linear on 2-D x; returns (M, out)."""
    if chosen == "triton":
        out, _ = torch.ops.fnf_kernels.triton_lora_linear(x, weight, bias, lora_A, lora_B, scale_t, scale_value,
                                                          rows_per_sample, groups)
    else:
        out, _ = torch.ops.fnf_kernels.lora_linear_torch(x, weight, bias, lora_A, lora_B, scale_t, scale_value,
                                                         rows_per_sample, groups)
    return out


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_A: torch.Tensor,
                lora_B: torch.Tensor, scale=1.0, *, groups: int = 1, backend: str = "auto") -> torch.Tensor:
    """LoRA linear layer y = x Wᵀ + b + s · (x Aᵀ) Bᵀ in one fused op.

    Args:
        x: (..., in) float16/bfloat16/float32 (float64 on the plain-torch path), any strides.
        weight: (out, in) base weight, usually frozen; its gradient is computed only when it requires grad.
        bias: None or (out,); its gradient only when it requires grad.
        lora_A: (r, in); lora_B: (out, r) (with ``groups=G``: lora_A (G·r_g, in), lora_B (out, r_g), see the
            module docstring). weight, bias, lora_A and lora_B must have x's dtype and device.
        scale: a float (e.g. peft's ``lora_alpha / r``), a 0-d tensor, or a (B,) tensor applied per sample along
            x's first dimension (B = x.shape[0]); 0 gives the base layer exactly. No gradient flows to it.
        groups: block-diagonal LoRA for fused projections (q, k, v in one GEMM); 1 for an ordinary LoRA.
        backend: "auto", "triton", "cpu" or "reference" ("cuda" has no kernel for this op and raises).

    Under torch.autocast (CUDA or CPU) every floating input is first cast to the autocast dtype, like F.linear.

    Returns y of shape (..., out) in x's dtype. Gradients flow to x, weight, bias, lora_A and lora_B
    (each only when it requires grad). Empty inputs (no rows, in, out or rank of size 0) give the
    correctly-shaped result (rank 0: the base layer) and gradients on every backend.
    """
    x, weight, bias, lora_A, lora_B = autocast_inputs(x, weight, bias, lora_A, lora_B)
    x2, scale_t, scale_value, rows = _lora_args(x, weight, bias, lora_A, lora_B, scale, groups, backend)
    chosen = backends.select("lora_linear", backend, x.device, x.dtype)
    if chosen == "reference" or min(x2.shape[0], x2.shape[1], weight.shape[0], lora_A.shape[0]) == 0:
        return lora_linear_reference(x, weight, bias, lora_A, lora_B, scale, groups=groups)
    out = _lora_linear(x2, weight, bias, lora_A, lora_B, scale_t, scale_value, rows, groups, chosen)
    return out.reshape(*x.shape[:-1], weight.shape[0])
