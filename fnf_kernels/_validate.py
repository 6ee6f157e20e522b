"""Argument checks shared by the public ops: clear TypeError/ValueError messages naming the argument."""
from __future__ import annotations

import numbers

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MASK_OUTPUT_DTYPES = FLOAT_DTYPES + (torch.bool, torch.uint8)
BACKEND_NAMES = ("auto", "cuda", "triton", "cpu", "reference")
REDUCTIONS = ("none", "mean", "sum")
SHAPES = ("square", "disk")
# Dilation keeps per-pixel distances in 16 bits: H + W must stay below this.
MAX_DILATE_EXTENT = 32767


def tensor(name: str, value, *, floating: bool = True, allow_bool: bool = False) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if floating and value.dtype not in FLOAT_DTYPES and not (allow_bool and value.dtype == torch.bool):
        allowed = ", ".join(str(d).replace("torch.", "") for d in FLOAT_DTYPES)
        extra = " or bool" if allow_bool else ""
        raise TypeError(f"{name} must have a floating dtype ({allowed}){extra}, got {value.dtype}")
    return value


def choice(name: str, value, options) -> str:
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{name} must be one of {', '.join(repr(o) for o in options)}; got {value!r}")
    return value


def flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def nonzero_dim(name: str, t: torch.Tensor, dim: int, what: str) -> None:
    """Reject a zero-size dimension that leaves each sample's result undefined (e.g. a max over nothing)."""
    if t.shape[dim] == 0:
        raise ValueError(f"{name} has no {what} (dim {dim} of shape {tuple(t.shape)}); expected at least one")


def same_device(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; expected the same device")


def penalty_args(image, reference, mask, squared, reduction, backend):
    """Validate masked_frobenius_penalty arguments; return mask as (B, 1|C, H, W) in image's dtype."""
    image = tensor("image", image)
    reference = tensor("reference", reference)
    mask = tensor("mask", mask, allow_bool=True)
    flag("squared", squared)
    choice("reduction", reduction, REDUCTIONS)
    choice("backend", backend, BACKEND_NAMES)
    if image.dim() != 4:
        raise ValueError(f"image must be 4-D (B, C, H, W), got shape {tuple(image.shape)}")
    if reference.shape != image.shape:
        raise ValueError(f"reference must have image's shape {tuple(image.shape)}, got {tuple(reference.shape)}")
    if reference.dtype != image.dtype:
        raise TypeError(f"reference must have image's dtype {image.dtype}, got {reference.dtype}")
    same_device("reference", reference, "image", image)
    same_device("mask", mask, "image", image)
    b, c, h, w = image.shape
    if mask.dim() == 3:
        if tuple(mask.shape) != (b, h, w):
            raise ValueError(f"mask of shape {tuple(mask.shape)} does not fit image {tuple(image.shape)}; "
                             f"expected (B, H, W) = {(b, h, w)}, (B, 1, H, W) or (B, C, H, W)")
        mask = mask.unsqueeze(1)
    elif mask.dim() == 4:
        if tuple(mask.shape) not in ((b, 1, h, w), (b, c, h, w)):
            raise ValueError(f"mask of shape {tuple(mask.shape)} does not fit image {tuple(image.shape)}; "
                             f"expected (B, H, W), (B, 1, H, W) = {(b, 1, h, w)} or (B, C, H, W)")
    else:
        raise ValueError(f"mask must be 3-D (B, H, W) or 4-D (B, 1|C, H, W), got shape {tuple(mask.shape)}")
    if mask.dtype != image.dtype:
        mask = mask.to(image.dtype)
    return image, reference, mask


def dilate_args(heatmap, threshold, radius, shape, dtype, backend):
    """Validate threshold_dilate arguments; return (heatmap as (B, H, W), threshold as (B,) tensor)."""
    heatmap = tensor("heatmap", heatmap)
    choice("shape", shape, SHAPES)
    choice("backend", backend, BACKEND_NAMES)
    if not isinstance(dtype, torch.dtype) or dtype not in MASK_OUTPUT_DTYPES:
        allowed = ", ".join(str(d) for d in MASK_OUTPUT_DTYPES)
        raise TypeError(f"dtype must be one of {allowed}; got {dtype!r}")
    if isinstance(radius, bool) or not isinstance(radius, numbers.Integral):
        raise TypeError(f"radius must be an int >= 0, got {type(radius).__name__}")
    if radius < 0:
        raise ValueError(f"radius must be >= 0, got {radius}")
    if heatmap.dim() == 4:
        if heatmap.shape[1] != 1:
            raise ValueError(f"heatmap must be (B, H, W) or (B, 1, H, W), got shape {tuple(heatmap.shape)}")
        heatmap = heatmap[:, 0]
    elif heatmap.dim() != 3:
        raise ValueError(f"heatmap must be (B, H, W) or (B, 1, H, W), got shape {tuple(heatmap.shape)}")
    b, h, w = heatmap.shape
    if h + w >= MAX_DILATE_EXTENT:
        raise ValueError(f"heatmap is too large: H + W = {h + w}, expected below {MAX_DILATE_EXTENT}")
    acc = torch.float64 if heatmap.dtype == torch.float64 else torch.float32
    if isinstance(threshold, torch.Tensor):
        if threshold.dtype not in FLOAT_DTYPES:
            raise TypeError(f"threshold must be a float or a floating (B,) tensor, got dtype {threshold.dtype}")
        same_device("threshold", threshold, "heatmap", heatmap)
        if threshold.dim() == 0:
            threshold = threshold.reshape(1).expand(b)
        if tuple(threshold.shape) != (b,):
            raise ValueError(f"threshold must be a float or a tensor of shape (B,) = ({b},), "
                             f"got shape {tuple(threshold.shape)}")
        threshold = threshold.detach().to(acc).contiguous()
    elif isinstance(threshold, numbers.Real) and not isinstance(threshold, bool):
        threshold = torch.full((b,), float(threshold), dtype=acc, device=heatmap.device)
    else:
        raise TypeError(f"threshold must be a float or a (B,) tensor, got {type(threshold).__name__}")
    return heatmap.detach(), threshold, int(radius)
