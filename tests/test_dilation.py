"""threshold_dilate: the reference against a direct definition, every backend against the reference."""
import pytest
import torch

import fnf_kernels
from fnf_kernels import reference as ref
from tests.backends import ids, runnable

PAIRS = runnable()
SIZES = [(1, 1, 1), (2, 37, 53), (3, 8, 1), (1, 1, 29)]


def _slow_on_interpreter(pair, big=True):
    """Triton on CPU tensors runs under the interpreter: ~10 s per call at (2, 37, 53) on 2 cores."""
    return (pytest.mark.slow,) if pair == ("cpu", "triton") and big else ()


PAIR_SIZES = [pytest.param(p, s, marks=_slow_on_interpreter(p, s[1] * s[2] > 100),
                           id=f"{p[0]}-{p[1]}-{'x'.join(map(str, s))}") for p in PAIRS for s in SIZES]
PAIRS_SLOW_ON_INTERPRETER = [pytest.param(p, marks=_slow_on_interpreter(p), id=f"{p[0]}-{p[1]}") for p in PAIRS]
OUT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.bool, torch.uint8]


def definition(heatmap, threshold, radius, shape):
    """out[p] = 1 iff some q with heatmap[q] > threshold lies in the element centred on p (pixel loops)."""
    b, h, w = heatmap.shape
    out = torch.zeros(b, h, w)
    for n in range(b):
        active = [(y, x) for y in range(h) for x in range(w) if heatmap[n, y, x] > threshold[n]]
        for y in range(h):
            for x in range(w):
                for qy, qx in active:
                    dy, dx = qy - y, qx - x
                    inside = max(abs(dy), abs(dx)) <= radius if shape == "square" else dy * dy + dx * dx <= radius ** 2
                    if inside:
                        out[n, y, x] = 1
                        break
    return out


def same(a, b):
    """Equal as 0/1/NaN masks (bool and uint8 compared as numbers)."""
    return torch.equal(a.float().nan_to_num(7.0), b.float().nan_to_num(7.0))


@pytest.mark.parametrize("shape", ["square", "disk"])
@pytest.mark.parametrize("radius", [0, 1, 2, 3, 6])
def test_reference_matches_definition(shape, radius):
    heatmap = torch.rand(2, 9, 11)
    threshold = torch.tensor([0.9, 0.8])
    out = fnf_kernels.threshold_dilate(heatmap, threshold, radius, shape=shape, backend="reference")
    assert same(out, definition(heatmap, threshold, radius, shape))


def test_known_disk_and_square():
    heatmap = torch.zeros(1, 7, 7)
    heatmap[0, 3, 3] = 1.0
    square = fnf_kernels.threshold_dilate(heatmap, 0.5, 2, shape="square")
    disk = fnf_kernels.threshold_dilate(heatmap, 0.5, 2, shape="disk")
    assert square.sum() == 25 and disk.sum() == 13  # 5x5 square; disk of radius 2 has 13 pixels
    assert disk[0, 1, 3] == 1 and disk[0, 1, 2] == 0 and square[0, 1, 1] == 1


@pytest.mark.parametrize("pair, size", PAIR_SIZES)
@pytest.mark.parametrize("shape", ["square", "disk"])
@pytest.mark.parametrize("radius", [0, 1, 2, 5, 15, 200])
def test_backends_match_reference(pair, shape, radius, size):
    device, backend = pair
    heatmap = torch.rand(size, device=device)
    threshold = torch.rand(size[0], device=device) * 0.2 + 0.8
    out = fnf_kernels.threshold_dilate(heatmap, threshold, radius, shape=shape, backend=backend)
    exp = fnf_kernels.threshold_dilate(heatmap, threshold, radius, shape=shape, backend="reference")
    assert out.shape == heatmap.shape and out.dtype == torch.float32 and out.is_contiguous()
    assert same(out, exp)


@pytest.mark.parametrize("pair", PAIRS, ids=ids(PAIRS))
@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
def test_output_dtypes_and_nan(pair, out_dtype):
    device, backend = pair
    heatmap = torch.rand(2, 13, 17, device=device)
    heatmap[0, 5, 6] = float("nan")
    for shape in ("square", "disk"):
        out = fnf_kernels.threshold_dilate(heatmap, 0.9, 2, shape=shape, dtype=out_dtype, backend=backend)
        exp = fnf_kernels.threshold_dilate(heatmap, 0.9, 2, shape=shape, dtype=out_dtype, backend="reference")
        assert out.dtype == out_dtype and same(out, exp)
    if out_dtype.is_floating_point:
        assert torch.isnan(out[0, 5, 6]) and not torch.isnan(out[1]).any()


@pytest.mark.parametrize("pair", PAIRS, ids=ids(PAIRS))
@pytest.mark.parametrize("in_dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_input_dtypes(pair, in_dtype):
    device, backend = pair
    if backend == "triton" and device == "cpu" and in_dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter has no bf16 arithmetic")
    heatmap = torch.rand(2, 15, 12, device=device).to(in_dtype)
    threshold = torch.tensor([0.7, 0.9], device=device, dtype=in_dtype)
    out = fnf_kernels.threshold_dilate(heatmap, threshold, 3, shape="disk", backend=backend)
    exp = fnf_kernels.threshold_dilate(heatmap, threshold, 3, shape="disk", backend="reference")
    assert same(out, exp)


@pytest.mark.parametrize("pair", PAIRS_SLOW_ON_INTERPRETER)
def test_layouts(pair):
    device, backend = pair
    base = torch.rand(2, 1, 20, 31, device=device)
    for heatmap in (base, base.transpose(2, 3), base[:, :, ::2, 1::3], base[:, 0].transpose(1, 2).contiguous()):
        for shape in ("square", "disk"):
            out = fnf_kernels.threshold_dilate(heatmap, 0.85, 2, shape=shape, backend=backend)
            exp = fnf_kernels.threshold_dilate(heatmap.contiguous(), 0.85, 2, shape=shape, backend="reference")
            assert out.shape == heatmap.shape and same(out, exp)


@pytest.mark.parametrize("pair", PAIRS + [("cpu", "reference")], ids=ids(PAIRS + [("cpu", "reference")]))
def test_border_never_activates(pair):
    device, backend = pair
    heatmap = torch.full((1, 6, 6), -5.0, device=device)
    out = fnf_kernels.threshold_dilate(heatmap, -1.0, 3, backend=backend)
    assert out.sum() == 0  # nothing above -1, and beyond the border nothing counts either


def test_radius_beyond_image_covers_everything():
    heatmap = torch.zeros(1, 10, 12)
    heatmap[0, 0, 0] = 1
    for shape in ("square", "disk"):
        assert fnf_kernels.threshold_dilate(heatmap, 0.5, 10_000, shape=shape).sum() == 120


def test_grad_input_is_accepted_and_output_is_constant():
    heatmap = torch.rand(1, 5, 5, requires_grad=True)
    out = fnf_kernels.threshold_dilate(heatmap, 0.5, 1)
    assert not out.requires_grad


try:
    from hypothesis import given, strategies as st

    @given(b=st.integers(1, 3), h=st.integers(1, 30), w=st.integers(1, 30), radius=st.integers(0, 12),
           shape=st.sampled_from(["square", "disk"]), frac=st.floats(0.0, 1.0))
    def test_fuzz(b, h, w, radius, shape, frac):
        heatmap = torch.rand(b, h, w)
        heatmap[torch.rand(b, h, w) < 0.02] = float("nan")
        threshold = torch.full((b,), 1.0 - 0.2 * frac)
        exp = fnf_kernels.threshold_dilate(heatmap, threshold, radius, shape=shape, backend="reference")
        for device, backend in PAIRS:
            if backend == "triton" and device == "cpu":
                continue  # covered by the parametrized tests; the interpreter is slow
            out = fnf_kernels.threshold_dilate(heatmap.to(device), threshold.to(device), radius, shape=shape,
                                               backend=backend)
            assert same(out.cpu(), exp)
except ImportError:  # pragma: no cover
    pass


# ----------------------------------------------------------------------------- Triton index width
from fnf_kernels.triton_kernels.index_width import INT32_LIMIT, dilation_wide  # noqa: E402


def _brute_max_offset(height, width, row_stride, col_stride, block_h, block_w):
    """Largest y * row_stride + x * col_stride over every lane of every column-pass tile."""
    tiles_y, tiles_x = -(-height // block_h), -(-width // block_w)
    return (tiles_y * block_h - 1) * row_stride + (tiles_x * block_w - 1) * col_stride


@pytest.mark.parametrize("block_h, block_w", [(1, 1), (64, 32), (32, 64)])
def test_dilation_index_width_at_int32_boundary(block_h, block_w):
    """64-bit offsets exactly when some tile lane's offset passes 2**31 - 1 (row and column strides)."""
    for height, width in ((3, 5), (100, 70), (20000, 12000)):
        tiles = (-(-height // block_h) * block_h - 1, -(-width // block_w) * block_w - 1)
        # Row stride at the boundary (column stride 1), then column stride at the boundary (row stride 1).
        for axis in (0, 1):
            other = tiles[1 - axis]
            stride = (INT32_LIMIT - other) // tiles[axis]
            for s in (stride, stride + 1):
                args = (s, 1) if axis == 0 else (1, s)
                want = _brute_max_offset(height, width, *args, block_h, block_w) > INT32_LIMIT
                assert dilation_wide(height, width, *args, block_h, block_w) == want
            assert not dilation_wide(height, width, *((stride, 1) if axis == 0 else (1, stride)), block_h, block_w)
            assert dilation_wide(height, width, *((stride + 1, 1) if axis == 0 else (1, stride + 1)), block_h, block_w)


def test_dilation_index_width_realistic_layouts():
    # A contiguous 20000 x 12000 heatmap fits int32; a padded row stride or a transposed copy does not.
    assert not dilation_wide(20000, 12000, 12000, 1, 32, 64)
    assert dilation_wide(20000, 12000, 200000, 1, 32, 64)
    assert dilation_wide(20000, 12000, 1, 200000, 32, 64)  # column stride alone
