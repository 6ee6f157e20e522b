"""Index width of the Triton kernels: whether offsets need 64-bit arithmetic, from shapes and strides only.

Pure Python (no triton import, no tensor), so the int32 boundary is unit-tested without allocating.
Offsets are bounded over whole tiles: lanes past the edge are masked but their offsets are still computed.
"""
from __future__ import annotations

# Offsets above this need 64-bit index arithmetic.
INT32_LIMIT = 2**31 - 1


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def max_offset(dims, strides) -> int:
    """Largest element offset a walk over ``dims`` (sizes) with ``strides`` reaches."""
    return sum((n - 1) * abs(s) for n, s in zip(dims, strides))


def dilation_wide(height: int, width: int, row_stride: int, col_stride: int, block_h: int, block_w: int) -> bool:
    """Whether the column pass's heatmap offsets y * row_stride + x * col_stride (within one image, whole
    BLOCK_H x BLOCK_W tiles) can exceed int32."""
    last_y = _round_up(height, block_h) - 1  # last row / column a tile lane reaches
    last_x = _round_up(width, block_w) - 1
    return last_y * abs(row_stride) + last_x * abs(col_stride) > INT32_LIMIT


def penalty_wide(ndim: int, dims, strides_per_tensor, elements_per_program: int) -> bool:
    """Whether the penalty kernels' flat index or any tensor's in-sample offset can exceed int32.

    ``ndim``, ``dims`` and the strides are plan_dims' walk of one sample; the flat index runs over whole
    programs (numel rounded up to a multiple of elements_per_program), so the outermost walked dim is
    extended to match.
    """
    inner = 1
    for n in dims[4 - ndim:]:
        inner *= n
    padded = _round_up(inner * dims[3 - ndim], elements_per_program)  # flat indices 0 .. padded - 1
    if padded - 1 > INT32_LIMIT:
        return True
    walk = list(dims)
    walk[3 - ndim] = -(-padded // inner)
    return any(max_offset(walk, s) > INT32_LIMIT for s in strides_per_tensor)
