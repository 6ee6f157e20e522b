"""threshold_dilate: heatmap -> binary problem mask, thresholded then dilated, in one fused op.

Threshold and max filter commute, so every backend thresholds first and dilates the binary image with
a two-pass scan whose cost per pixel does not depend on the radius:

1. column pass: for every pixel, the vertical distance g to the nearest active pixel in its column
   (a running max of the last active row going down, a running min going up);
2. row pass: a column pixel x' with g <= r reaches the pixels x with |x - x'| <= s(x'), where
   s = r for the square and s = floor(sqrt(r^2 - g^2)) for the disk (exact Euclidean). A pixel is set
   when the running max of x' + s(x') from the left reaches it, or the running min of x' - s(x')
   from the right does.

NaN heatmap pixels are carried as a second level through the same scans (see reference.py).
"""
from __future__ import annotations

import torch

from . import _extension, _library, _validate, backends
from . import references as ref

if backends.triton_installed():  # the Triton op registers on import; triton reads TRITON_INTERPRET here
    from .triton_kernels import dilation as _triton
else:
    _triton = None

if _extension.load() is not None:
    _library.register_dilate("fnf_kernels::threshold_dilate")


def threshold_dilate(heatmap: torch.Tensor, threshold, radius: int, *, shape: str = "square",
                     dtype: torch.dtype = torch.float32, backend: str = "auto") -> torch.Tensor:
    """Binary mask of the pixels within ``radius`` of a pixel where heatmap > threshold.

    Args:
        heatmap: (B, H, W) or (B, 1, H, W) float tensor, any strides. Not differentiated.
        threshold: a float, or a (B,) tensor of per-image thresholds. Compared in float32
            (float64 for float64 heatmaps); strictly greater counts as active.
        radius: int >= 0; 0 is a plain threshold.
        shape: "square" (|dy|, |dx| <= r) or "disk" (dy^2 + dx^2 <= r^2).
        dtype: output dtype: a floating dtype (default float32), torch.bool or torch.uint8.
        backend: "auto", "cuda", "triton", "cpu" or "reference".

    Returns a contiguous tensor of heatmap's shape holding 0/1; pixels beyond the border never count.
    A window that holds a NaN heatmap pixel gives NaN (1 for bool/uint8 outputs). An empty heatmap (any
    zero-size dimension) gives an empty mask of its shape, on every backend.
    """
    in_shape = heatmap.shape if isinstance(heatmap, torch.Tensor) else None
    hm, thr, radius = _validate.dilate_args(heatmap, threshold, radius, shape, dtype, backend)
    # A radius beyond H + W covers the whole image either way; clamping keeps distances in 16 bits.
    radius = min(radius, hm.shape[1] + hm.shape[2])
    chosen = backends.select("threshold_dilate", backend, hm.device, hm.dtype, hm.shape[0])
    disk = shape == "disk"
    if chosen == "reference" or hm.numel() == 0:
        out = ref.threshold_dilate(hm, thr, radius, shape, dtype)
    elif chosen == "triton":
        out = _triton.threshold_dilate(hm, thr, radius, disk, dtype)
    else:
        out = torch.ops.fnf_kernels.threshold_dilate(hm, thr, radius, disk, dtype)
    return out.reshape(in_shape)
