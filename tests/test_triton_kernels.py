"""Triton backend of masked_frobenius_penalty and threshold_dilate against the torch reference.

Without a CUDA device the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set below before
triton is imported) on CPU tensors: float16/float32/float64 there; bfloat16 only on GPU (the interpreter
has no bf16 arithmetic). Inputs are fresh random tensors on every run.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

import numpy as np  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import fnf_kernels  # noqa: E402
from fnf_kernels.triton_kernels import _common  # noqa: E402
from fnf_kernels.triton_kernels import dilation as tdil  # noqa: E402
from fnf_kernels.triton_kernels import penalty as tpen  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

if not CUDA and not INTERPRET:
    pytest.skip("no CUDA device and TRITON_INTERPRET is not 1", allow_module_level=True)

gpu_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA device (the interpreter has no bf16 arithmetic)")

DTYPES = [torch.float32, torch.float64, torch.float16, pytest.param(torch.bfloat16, marks=gpu_only)]
# (rtol, atol) of the (float32 / float64) norms and of the gradients in the input dtype.
VALUE_TOL = {torch.float16: (1e-5, 1e-5), torch.bfloat16: (1e-5, 1e-5), torch.float32: (1e-5, 1e-5),
             torch.float64: (1e-12, 1e-12)}
GRAD_TOL = {torch.float16: (2e-3, 1e-5), torch.bfloat16: (1.6e-2, 1e-5), torch.float32: (1e-5, 1e-7),
            torch.float64: (1e-12, 1e-14)}


# The interpreter's own scan implementation, while fast_interpreter_scans has replaced it.
_ORIGINAL_SCAN: dict = {}


@pytest.fixture(autouse=True, scope="module")
def fast_interpreter_scans():
    """Run the kernels' max/min associative scans through numpy under the interpreter.

    The interpreter executes tl.associative_scan with a custom combine function one element at a time
    in Python (seconds per call); only the scan primitive is swapped (for np.maximum/minimum.accumulate,
    which is what it computes), everything the kernels feed it and do with it is still exercised.
    test_dilate_genuine_interpreter_scan runs a few cases without this patch.
    """
    scan_ops = None
    if INTERPRET:
        from triton.runtime import interpreter as tinterp
        scan_ops = getattr(tinterp, "ScanOps", None)
    if scan_ops is None or not hasattr(scan_ops, "generic_scan"):
        yield
        return
    original = scan_ops.generic_scan
    ufuncs = {tdil._max_fn: np.maximum, tdil._min_fn: np.minimum}

    def generic_scan(self, inputs):
        ufunc = ufuncs.get(self.combine_fn)
        if ufunc is None or len(inputs) != 1:
            return original(self, inputs)
        data = inputs[0].handle.data
        return [self.to_tensor(ufunc.accumulate(data, axis=self.axis), inputs[0].dtype)]

    scan_ops.generic_scan = generic_scan
    _ORIGINAL_SCAN.update(scan_ops=scan_ops, generic_scan=original)
    try:
        yield
    finally:
        scan_ops.generic_scan = original
        _ORIGINAL_SCAN.clear()


# ----------------------------------------------------------------------------------------------------------
# masked_frobenius_penalty
# ----------------------------------------------------------------------------------------------------------

def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """Same values as t in another memory layout."""
    if layout == "contiguous":
        return t.contiguous()
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "sliced":  # view into a larger tensor: no two of C, H, W can be walked as one dim
        b, c, h, w = t.shape
        big = torch.randn(b, c + 1, h + 2, 2 * w + 1, dtype=t.dtype, device=t.device)
        view = big[:, 1:, 1:h + 1, 1::2]
        view.copy_(t)
        return view
    if layout == "permuted":  # strides in (B, W, C, H) order: none of the standard formats
        return t.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)
    raise ValueError(layout)


def _make_mask(kind: str, b: int, c: int, h: int, w: int, dtype, device) -> torch.Tensor:
    if kind == "soft":  # includes values outside [0, 1] to exercise the clamp
        return (torch.rand(b, 1, h, w, device=device) * 1.6 - 0.3).to(dtype)
    if kind == "binary":
        return (torch.rand(b, 1, h, w, device=device) > 0.5).to(dtype)
    if kind == "bool":
        return torch.rand(b, 1, h, w, device=device) > 0.5
    if kind == "bhw":
        return torch.rand(b, h, w, device=device).to(dtype)
    if kind == "bchw":
        return torch.rand(b, c, h, w, device=device).to(dtype)
    if kind == "expanded":
        return torch.rand(b, 1, h, w, device=device).to(dtype).expand(b, c, h, w)
    if kind == "bchw_channels_last":
        return torch.rand(b, c, h, w, device=device).to(dtype).contiguous(memory_format=torch.channels_last)
    if kind == "bchw_sliced":
        return torch.rand(b, c, h, 2 * w, device=device).to(dtype)[..., ::2]
    raise ValueError(kind)


def _run_penalty(backend, image, reference, mask, squared, reduction, weights):
    image = image.detach().clone().requires_grad_()
    reference = reference.detach().clone().requires_grad_()
    value = fnf_kernels.masked_frobenius_penalty(image, reference, mask, squared=squared, reduction=reduction,
                                                 backend=backend)
    (value * weights).sum().backward()
    return value.detach(), image.grad, reference.grad


def _check_penalty(image, reference, mask, squared=False, reduction="none"):
    dtype = image.dtype
    b = image.shape[0]
    weights = torch.randn(b if reduction == "none" else (), dtype=torch.float64, device=image.device)
    weights = weights.to(torch.float64 if dtype == torch.float64 else torch.float32)
    got = _run_penalty("triton", image, reference, mask, squared, reduction, weights)
    want = _run_penalty("reference", image, reference, mask, squared, reduction, weights)
    rtol, atol = VALUE_TOL[dtype]
    assert got[0].dtype == want[0].dtype
    torch.testing.assert_close(got[0], want[0], rtol=rtol, atol=atol, equal_nan=True)
    rtol, atol = GRAD_TOL[dtype]
    for g, w in zip(got[1:], want[1:]):
        assert g.dtype == dtype and g.shape == image.shape
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol, equal_nan=True)
    return got


def _images(shape, dtype, layout="contiguous"):
    image = torch.randn(shape, device=DEVICE).to(dtype)
    reference = (image.float() + torch.randn(shape, device=DEVICE)).to(dtype)
    return _layout(image, layout), _layout(reference, layout)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced", "permuted"])
@pytest.mark.parametrize("mask_kind", ["soft", "binary", "bool", "bhw", "bchw", "expanded",
                                       "bchw_channels_last", "bchw_sliced"])
def test_penalty_layouts_and_masks(dtype, layout, mask_kind):
    b, c, h, w = 2, 3, 11, 13
    image, reference = _images((b, c, h, w), dtype, layout)
    mask = _make_mask(mask_kind, b, c, h, w, dtype, DEVICE)
    _check_penalty(image, reference, mask, squared=mask_kind in ("binary", "bchw"))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 37, 53), (3, 4, 5, 7), (1, 2, 1, 9), (2, 1, 6, 1)])
@pytest.mark.parametrize("squared", [False, True])
def test_penalty_shapes(dtype, shape, squared):
    image, reference = _images(shape, dtype)
    mask = _make_mask("soft", shape[0], shape[1], shape[2], shape[3], dtype, DEVICE)
    _check_penalty(image, reference, mask, squared=squared)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("squared", [False, True])
def test_penalty_reductions(reduction, squared):
    image, reference = _images((3, 2, 9, 10), torch.float32, "channels_last")
    mask = _make_mask("soft", 3, 2, 9, 10, torch.float32, DEVICE)
    value = _check_penalty(image, reference, mask, squared=squared, reduction=reduction)[0]
    assert value.shape == ((3,) if reduction == "none" else ())


def test_penalty_broadcast_reference():
    """A single reference image expanded over the batch (stride 0); its gradient sums over the batch."""
    image, _ = _images((3, 2, 6, 7), torch.float32, "channels_last")
    reference = torch.randn(1, 2, 6, 7, device=DEVICE).expand(3, 2, 6, 7)
    mask = _make_mask("soft", 3, 2, 6, 7, torch.float32, DEVICE)
    for squared in (False, True):
        _check_penalty(image, reference, mask, squared=squared)
    leaf = {}
    for backend in ("triton", "reference"):
        leaf[backend] = reference[:1].detach().clone().requires_grad_()
        fnf_kernels.masked_frobenius_penalty(image, leaf[backend].expand(3, 2, 6, 7), mask,
                                             backend=backend).backward()
    torch.testing.assert_close(leaf["triton"].grad, leaf["reference"].grad, rtol=1e-5, atol=1e-7)


def test_penalty_module():
    image, reference = _images((2, 3, 8, 9), torch.float32)
    mask = _make_mask("soft", 2, 3, 8, 9, torch.float32, DEVICE)
    got = fnf_kernels.MaskedFrobeniusPenalty(0.5, backend="triton")(image, reference, mask)
    want = fnf_kernels.MaskedFrobeniusPenalty(0.5, backend="reference")(image, reference, mask)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("squared", [False, True])
def test_penalty_zero_norm_gives_zero_gradient(dtype, squared):
    """An all-ones mask gives n_b = 0: exactly zero gradient, never NaN; other samples unaffected."""
    image, reference = _images((3, 2, 7, 9), dtype, "channels_last")
    mask = _make_mask("soft", 3, 2, 7, 9, dtype, DEVICE)
    mask[0] = 1.0
    mask[2] = 2.0  # clamped to 1
    value, g_image, g_reference = _check_penalty(image, reference, mask, squared=squared)
    assert value[0] == 0 and value[2] == 0 and value[1] > 0
    for g in (g_image, g_reference):
        assert torch.isfinite(g).all()
        assert (g[0] == 0).all() and (g[2] == 0).all()
    # image == reference: also n = 0 everywhere.
    value, g_image, _ = _check_penalty(image, image.clone(), torch.zeros_like(mask), squared=squared)
    assert (value == 0).all() and (g_image == 0).all()


@pytest.mark.parametrize("where", ["image", "reference", "mask"])
@pytest.mark.parametrize("squared", [False, True])
def test_penalty_nan_propagates(where, squared):
    dtype = torch.float32
    image, reference = _images((2, 3, 5, 6), dtype)
    mask = _make_mask("soft", 2, 3, 5, 6, dtype, DEVICE)
    {"image": image, "reference": reference, "mask": mask}[where][1, 0, 2, 3] = float("nan")
    value = _check_penalty(image, reference, mask, squared=squared)[0]
    assert torch.isfinite(value[0]) and torch.isnan(value[1])


def test_penalty_multi_chunk(monkeypatch):
    """Several programs per sample, each looping over several blocks, summed as partials."""
    monkeypatch.setattr(tpen, "_OVERRIDE", {"block": 32, "iters": 2})
    for layout in ("contiguous", "channels_last", "sliced"):
        image, reference = _images((2, 3, 7, 9), torch.float64, layout)
        mask = _make_mask("expanded", 2, 3, 7, 9, torch.float64, DEVICE)
        for squared in (False, True):
            _check_penalty(image, reference, mask, squared=squared)


def test_plan_dims():
    c, h, w = 3, 5, 7
    img = torch.empty(2, c, h, w)
    mask = torch.empty(2, 1, h, w).expand(2, c, h, w)
    stride3 = lambda t: tuple(t.stride()[1:])  # noqa: E731
    # Contiguous image and mask: one merged dim, no division.
    assert _common.plan_dims((c, h, w), [stride3(img), stride3(img)]) == (1, (1, 1, c * h * w), [(0, 0, 1)] * 2)
    # (B, 1, H, W) mask: channel stride 0 -> two dims (C, H*W).
    assert _common.plan_dims((c, h, w), [stride3(img), stride3(mask)]) == (
        2, (1, c, h * w), [(0, h * w, 1), (0, 0, 1)])
    # channels_last image with a (B, 1, H, W) mask: walked as (H*W, C).
    cl = img.contiguous(memory_format=torch.channels_last)
    assert _common.plan_dims((c, h, w), [stride3(cl), stride3(mask)]) == (
        2, (1, h * w, c), [(0, c, 1), (0, 1, 0)])
    # A uniform step merges; padded rows do not.
    step = torch.empty(2, c, h, 2 * w)[..., ::2]
    assert _common.plan_dims((c, h, w), [stride3(step)]) == (1, (1, 1, c * h * w), [(0, 0, 2)])
    sl = torch.empty(2, c, h + 1, w + 1)[:, :, 1:, :w]
    assert _common.plan_dims((c, h, w), [stride3(sl)]) == (3, (c, h, w), [((h + 1) * (w + 1), w + 1, 1)])
    # A dense permutation is walked in memory order as one dim.
    perm = torch.empty(2, w, c, h).permute(0, 2, 3, 1)
    assert _common.plan_dims((c, h, w), [stride3(perm)]) == (1, (1, 1, c * h * w), [(0, 0, 1)])
    # Size-1 dims are dropped.
    assert _common.plan_dims((1, 1, 1), [(5, 3, 1)]) == (1, (1, 1, 1), [(0, 0, 0)])


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(b=st.integers(1, 3), c=st.integers(1, 4), h=st.integers(1, 12), w=st.integers(1, 12),
       layout=st.sampled_from(["contiguous", "channels_last", "sliced", "permuted"]),
       mask_kind=st.sampled_from(["soft", "binary", "bhw", "bchw", "expanded", "bchw_sliced"]),
       squared=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_penalty_fuzz(b, c, h, w, layout, mask_kind, squared, dtype):
    image, reference = _images((b, c, h, w), dtype, layout)
    mask = _make_mask(mask_kind, b, c, h, w, dtype, DEVICE)
    _check_penalty(image, reference, mask, squared=squared)


def test_empty_inputs_direct():
    """The ops themselves (the public API answers empty inputs from the reference before reaching them)."""
    image = torch.empty(2, 0, 3, 3, device=DEVICE)
    assert (tpen.penalty_norms(image, image, image, False) == 0).all()
    grad = torch.ops.fnf_kernels.triton_penalty_backward(torch.ones(2, device=DEVICE), image, image, image,
                                                         torch.zeros(2, device=DEVICE), False)
    assert grad.shape == image.shape
    out = tdil.threshold_dilate(torch.empty(2, 0, 4, device=DEVICE), torch.zeros(2, device=DEVICE), 1, False,
                                torch.bool)
    assert out.shape == (2, 0, 4) and out.dtype == torch.bool


@pytest.mark.parametrize("squared", [False, True])
def test_penalty_opcheck(squared):
    image, reference = _images((2, 3, 4, 5), torch.float32, "channels_last")
    mask = _make_mask("soft", 2, 3, 4, 5, torch.float32, DEVICE)
    image.requires_grad_()
    torch.library.opcheck(torch.ops.fnf_kernels.triton_penalty_norms.default, (image, reference, mask, squared))
    norms = tpen.penalty_norms(image.detach(), reference, mask, squared)
    grad = torch.randn(2, device=DEVICE)
    torch.library.opcheck(torch.ops.fnf_kernels.triton_penalty_backward.default,
                          (grad, image.detach(), reference, mask, norms, squared))


# ----------------------------------------------------------------------------------------------------------
# threshold_dilate
# ----------------------------------------------------------------------------------------------------------

OUT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.bool, torch.uint8]


def _heatmap(b, h, w, dtype=torch.float32, nan_fraction=0.0, layout="contiguous"):
    hm = torch.rand(b, h, w, device=DEVICE)
    if nan_fraction:
        hm[torch.rand(b, h, w, device=DEVICE) < nan_fraction] = float("nan")
    hm = hm.to(dtype)
    if layout == "transposed":
        return hm.transpose(1, 2).contiguous().transpose(1, 2)
    if layout == "sliced":
        big = torch.rand(b, 2 * h, w + 3, device=DEVICE).to(dtype)
        view = big[:, ::2, 2:w + 2]
        view.copy_(hm)
        return view
    if layout == "channel":  # (B, 1, H, W) slice of a (B, 3, H, W) tensor
        big = torch.rand(b, 3, h, w, device=DEVICE).to(dtype)
        big[:, 1] = hm
        return big[:, 1:2]
    return hm


def _check_dilate(heatmap, threshold, radius, shape="square", dtype=torch.float32):
    got = fnf_kernels.threshold_dilate(heatmap, threshold, radius, shape=shape, dtype=dtype, backend="triton")
    want = fnf_kernels.threshold_dilate(heatmap, threshold, radius, shape=shape, dtype=dtype, backend="reference")
    assert got.dtype == dtype and got.shape == heatmap.shape and got.is_contiguous()
    if dtype.is_floating_point:
        assert torch.equal(torch.isnan(got), torch.isnan(want))
        assert torch.equal(got.nan_to_num(7.0), want.nan_to_num(7.0))
    else:
        assert torch.equal(got, want)
    return got


@pytest.mark.parametrize("shape", ["square", "disk"])
@pytest.mark.parametrize("radius", [0, 1, 2, 5, 40])
@pytest.mark.parametrize("size", [(1, 1, 1), (2, 7, 9), (3, 13, 6), (1, 1, 17), (2, 15, 1)])
def test_dilate_radii_and_shapes(shape, radius, size):
    hm = _heatmap(*size)
    threshold = torch.rand(size[0], device=DEVICE) * 0.15 + 0.85  # per-sample, a few active pixels
    _check_dilate(hm, threshold, radius, shape)


@pytest.mark.parametrize("dtype", OUT_DTYPES)
@pytest.mark.parametrize("shape", ["square", "disk"])
def test_dilate_output_dtypes_and_nan(dtype, shape):
    hm = _heatmap(2, 12, 14, nan_fraction=0.02)
    hm[0, 0, 0] = float("nan")
    out = _check_dilate(hm, 0.9, 2, shape, dtype)
    if dtype.is_floating_point:
        assert torch.isnan(out[0, :2, :2]).all()
    else:
        assert (out[0, :2, :2] == 1).all()


@pytest.mark.parametrize("hm_dtype", [torch.float32, torch.float64, torch.float16,
                                      pytest.param(torch.bfloat16, marks=gpu_only)])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced", "channel"])
def test_dilate_heatmap_dtypes_and_layouts(hm_dtype, layout):
    hm = _heatmap(2, 11, 10, hm_dtype, nan_fraction=0.01, layout=layout)
    threshold = torch.tensor([0.8, 0.93], device=DEVICE)
    for shape, radius in (("square", 1), ("disk", 3)):
        _check_dilate(hm, threshold, radius, shape)


def test_dilate_threshold_forms():
    hm = _heatmap(3, 9, 8)
    _check_dilate(hm, 0.9, 1)
    _check_dilate(hm, torch.tensor(0.9, dtype=torch.float64, device=DEVICE), 1, "disk")
    _check_dilate(hm, torch.tensor([0.5, 0.95, 2.0], device=DEVICE), 2)
    _check_dilate(hm, torch.tensor([float("nan"), -1.0, 0.9], device=DEVICE), 1, "disk")
    # float64 heatmap: compared in float64 (a float32 compare would round the threshold).
    hm64 = torch.full((1, 3, 3), 0.1, dtype=torch.float64, device=DEVICE)
    hm64[0, 1, 1] = 0.1 + 1e-12
    out = _check_dilate(hm64, 0.1, 0)
    assert out.sum() == 1


@pytest.mark.parametrize("radius", [5, 10, 13, 17, 25])
def test_dilate_disk_exact_at_perfect_squares(radius):
    """Pythagorean radii put disk edge points exactly on dy^2 + dx^2 = r^2 (float sqrt must be corrected)."""
    n = 2 * radius + 3
    hm = torch.zeros(1, n, n, device=DEVICE)
    hm[0, n // 2, n // 2] = 1.0
    hm[0, 0, n - 1] = 1.0
    _check_dilate(hm, 0.5, radius, "disk", torch.uint8)


def test_dilate_tiled_paths(monkeypatch):
    """Small tiles: several row tiles in the column pass and the tiled (carried) row pass."""
    monkeypatch.setattr(tdil, "_OVERRIDE", {"col": (4, 8), "row": (2, 16)})
    for size, radius, shape, dtype in (((2, 9, 37), 3, "square", torch.float32), ((1, 11, 40), 20, "disk", torch.bool),
                                       ((2, 6, 33), 0, "disk", torch.float64)):
        _check_dilate(_heatmap(*size, nan_fraction=0.01), 0.93, radius, shape, dtype)


def test_dilate_genuine_interpreter_scan(monkeypatch):
    """A few tiny cases through the interpreter's own (slow) tl.associative_scan, not the numpy patch."""
    if "scan_ops" in _ORIGINAL_SCAN:
        monkeypatch.setattr(_ORIGINAL_SCAN["scan_ops"], "generic_scan", _ORIGINAL_SCAN["generic_scan"])
    hm = _heatmap(2, 5, 6, nan_fraction=0.05)
    _check_dilate(hm, 0.8, 2, "disk")
    monkeypatch.setattr(tdil, "_OVERRIDE", {"col": (2, 4), "row": (2, 4)})
    _check_dilate(hm, 0.8, 1, "square")


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(b=st.integers(1, 2), h=st.integers(1, 20), w=st.integers(1, 20), radius=st.integers(0, 25),
       shape=st.sampled_from(["square", "disk"]), dtype=st.sampled_from(OUT_DTYPES),
       layout=st.sampled_from(["contiguous", "transposed", "sliced"]), nan=st.booleans(),
       level=st.floats(0.0, 1.0))
def test_dilate_fuzz(b, h, w, radius, shape, dtype, layout, nan, level):
    hm = _heatmap(b, h, w, nan_fraction=0.02 if nan else 0.0, layout=layout)
    threshold = torch.full((b,), 0.9, device=DEVICE) + (level - 0.5) * 0.2
    _check_dilate(hm, threshold, radius, shape, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bool])
def test_dilate_opcheck(dtype):
    # No NaN here: opcheck compares eager and traced outputs without equal_nan (NaN is tested above).
    hm = _heatmap(2, 6, 7, layout="transposed")
    threshold = torch.tensor([0.5, 0.9], device=DEVICE)
    for radius, disk in ((0, False), (2, True)):
        torch.library.opcheck(torch.ops.fnf_kernels.triton_threshold_dilate.default,
                              (hm, threshold, radius, disk, dtype))



class _Spy:
    """Wraps a Triton kernel: ``spy[grid](...)`` records the keyword arguments (constexprs), then launches."""

    def __init__(self, kernel):
        self.kernel, self.kwargs = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.kwargs.append(kwargs)
            return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced", "permuted"])
def test_penalty_forced_wide_offsets_match(monkeypatch, layout):
    """The 64-bit offset path (WIDE=True, forced on a small tensor) gives the reference's values and grads."""
    norms_spy, backward_spy = _Spy(tpen._norms_kernel), _Spy(tpen._backward_kernel)
    monkeypatch.setattr(tpen, "_norms_kernel", norms_spy)
    monkeypatch.setattr(tpen, "_backward_kernel", backward_spy)
    monkeypatch.setattr(tpen, "_OVERRIDE", {"block": 32, "iters": 2, "wide": True})
    image, reference = _images((2, 3, 7, 9), torch.float64, layout)
    mask = _make_mask("soft", 2, 3, 7, 9, torch.float64, DEVICE)
    _check_penalty(image, reference, mask)
    assert [k["WIDE"] for k in norms_spy.kwargs + backward_spy.kwargs] == [True, True]


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced"])
def test_dilate_forced_wide_offsets_match(monkeypatch, layout):
    """The column pass with 64-bit row and column offsets (forced on a small heatmap) matches the reference."""
    spy = _Spy(tdil._column_kernel)
    monkeypatch.setattr(tdil, "_column_kernel", spy)
    monkeypatch.setattr(tdil, "_OVERRIDE", {"col": (4, 8), "wide": True})
    _check_dilate(_heatmap(2, 9, 13, nan_fraction=0.02, layout=layout), 0.9, 2, "disk")
    assert [k["WIDE"] for k in spy.kwargs] == [True]
