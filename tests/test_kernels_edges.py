"""Edges every backend handles the same way: empty tensors, batches above the CUDA grid's 65535, "auto" falling
back (saying why) from a backend that cannot take an input, and the attention reference's exact smoothing."""
import os
import random
import warnings

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import fnf_kernels  # noqa: E402
from fnf_kernels import _extension, backends, references  # noqa: E402
from tests.backends import ids, runnable  # noqa: E402

PAIRS = runnable() + [("cpu", "reference")]
TRITON = backends.triton_installed() and (torch.cuda.is_available() or backends.triton_interpreter())
needs_triton = pytest.mark.skipif(not TRITON, reason="triton needs CUDA or TRITON_INTERPRET=1")
# Relative tolerance of values/gradients per dtype (fp32 accumulation, outputs rounded to the dtype).
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=2e-5, atol=1e-6)}


@pytest.fixture
def seed():
    value = random.randrange(2**31)
    print(f"seed {value}")
    torch.manual_seed(value)
    return value


# ------------------------------------------------------------------------------------------------ empty inputs
@pytest.mark.parametrize("pair", PAIRS, ids=ids(PAIRS))
@pytest.mark.parametrize("shape", [(0, 3, 5, 7), (2, 0, 5, 7), (2, 3, 0, 7), (3, 2, 4, 0)])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_penalty_empty_inputs(pair, shape, reduction):
    device, backend = pair
    image = torch.rand(shape, device=device, requires_grad=True)
    reference = torch.rand(shape, device=device, requires_grad=True)
    mask = torch.rand(shape[0], 1, *shape[2:], device=device)
    out = fnf_kernels.masked_frobenius_penalty(image, reference, mask, reduction=reduction, backend=backend)
    assert out.dtype == torch.float32
    if reduction == "none":
        assert out.shape == (shape[0],)
        assert (out == 0).all()
    elif reduction == "sum" or shape[0] > 0:
        assert out.shape == () and out.item() == 0
    else:  # the mean of an empty batch: NaN, as torch's own losses
        assert out.shape == () and torch.isnan(out)
    out.sum().backward()
    for t in (image, reference):
        assert t.grad is not None and t.grad.shape == shape and (t.grad == 0).all()


@pytest.mark.parametrize("pair", PAIRS, ids=ids(PAIRS))
@pytest.mark.parametrize("shape", [(0, 5, 7), (2, 0, 7), (2, 5, 0), (0, 1, 4, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bool])
def test_dilate_empty_inputs(pair, shape, dtype):
    device, backend = pair
    heatmap = torch.rand(shape, device=device)
    out = fnf_kernels.threshold_dilate(heatmap, 0.5, 2, shape="disk", dtype=dtype, backend=backend)
    assert out.shape == shape and out.dtype == dtype and out.device == heatmap.device


LORA_PAIRS = [("cpu", "cpu"), ("cpu", "reference")] + ([("cpu", "triton")] if TRITON and not torch.cuda.is_available()
                                                       else [("cuda", "triton")] if TRITON else [])


@pytest.mark.parametrize("pair", LORA_PAIRS, ids=ids(LORA_PAIRS))
@pytest.mark.parametrize("case", ["no-rows", "no-batch", "rank0", "in0", "out0"])
def test_lora_empty_inputs(pair, case, seed):
    device, backend = pair
    m, t, k, n, r = 2, 3, 6, 5, 4
    if case == "no-rows":
        t = 0
    elif case == "no-batch":
        m = 0
    elif case == "rank0":
        r = 0
    elif case == "in0":
        k = 0
    elif case == "out0":
        n = 0

    def leaf(*shape):
        return torch.randn(*shape, device=device, dtype=torch.float32, requires_grad=True)

    x, w, b, a, bb = leaf(m, t, k), leaf(n, k), leaf(n), leaf(r, k), leaf(n, r)
    scale = torch.rand(m, device=device)
    y = fnf_kernels.lora_linear(x, w, b, a, bb, scale, backend=backend)
    y_ref = references.lora_linear_reference(x, w, b, a, bb, scale)
    assert y.shape == (m, t, n) and y.dtype == x.dtype
    torch.testing.assert_close(y, y_ref, **TOL[torch.float32])
    g = torch.randn(y.shape, device=device)
    got = torch.autograd.grad(y, (x, w, b, a, bb), g, allow_unused=True)
    want = torch.autograd.grad(y_ref, (x, w, b, a, bb), g, allow_unused=True)
    for gg, ww, leaf_t in zip(got, want, (x, w, b, a, bb)):
        gg = torch.zeros_like(leaf_t) if gg is None else gg
        ww = torch.zeros_like(leaf_t) if ww is None else ww
        assert gg.shape == leaf_t.shape
        torch.testing.assert_close(gg, ww, **TOL[torch.float32])


ATTN_BACKENDS = ["reference"] + (["triton"] if TRITON else [])


@pytest.mark.parametrize("backend", ATTN_BACKENDS)
def test_attention_losses_empty_batch(backend):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    maps = torch.rand(0, 2, 3, 4, 5, device=device, requires_grad=True)
    sep, en = fnf_kernels.separate_enhance_losses(maps, backend=backend)
    assert sep.shape == en.shape == (0,) and sep.dtype == en.dtype == torch.float32
    assert fnf_kernels.separate_loss(maps, backend=backend).shape == (0,)
    assert fnf_kernels.enhance_loss(maps, backend=backend).shape == (0,)
    (sep.sum() + en.sum()).backward()
    assert maps.grad.shape == maps.shape
    with pytest.raises(ValueError, match="no heads"):
        fnf_kernels.separate_enhance_losses(torch.rand(2, 0, 3, 4, 5, device=device), backend=backend)


# ------------------------------------------------------------------------------------- batch > 65535 (grid)
class _GridRecorder:
    """Wraps a Triton kernel: ``k[grid](...)`` checks ``grid`` against the CUDA limits (the interpreter checks
    nothing), records it, and launches only when ``run`` is set."""

    def __init__(self, kernel, grids, run):
        self.kernel, self.grids, self.run = kernel, grids, run

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            # an autotuned launch sizes its grid from the config: the smallest tiles give the largest grid
            g = grid(dict(kwargs, BLOCK_M=16, BLOCK_N=16)) if callable(grid) else tuple(grid)
            self.grids.append(g)
            assert g[0] <= 2**31 - 1 and all(n <= 65535 for n in g[1:]), f"grid {g} exceeds the CUDA limits"
            if self.run:
                return self.kernel[grid](*args, **kwargs)
        return launch


def _record(monkeypatch, module, names, run=False, grids=None):
    grids = [] if grids is None else grids
    for name in names:
        monkeypatch.setattr(module, name, _GridRecorder(getattr(module, name), grids, run))
    return grids


@needs_triton
def test_triton_penalty_grid_takes_more_than_65535_samples(monkeypatch):
    """65537 samples: every launch stays within the CUDA grid limits (meta tensors: nothing is allocated)."""
    from fnf_kernels.triton_kernels import penalty as tpen

    grids = _record(monkeypatch, tpen, ["_norms_kernel", "_backward_kernel"])
    image = torch.empty(65537, 1, 1, 1, device="meta")
    tpen.triton_penalty_norms._init_fn(image, image, image, False)
    grad = torch.empty(65537, device="meta")
    tpen.triton_penalty_backward._init_fn(grad, image, image, image, grad, False)
    assert len(grids) == 2


@needs_triton
def test_triton_dilate_grid_takes_more_than_65535_samples(monkeypatch):
    from fnf_kernels.triton_kernels import dilation as tdil

    grids = _record(monkeypatch, tdil, ["_column_kernel", "_row_kernel"])
    heatmap = torch.empty(65537, 3, 5, device="meta")
    tdil.triton_threshold_dilate._init_fn(heatmap, torch.empty(65537, device="meta"), 1, True, torch.bool)
    assert len(grids) == 2


@needs_triton
def test_triton_attention_and_lora_grids_take_large_batches(monkeypatch):
    from fnf_kernels.triton_kernels import attention_losses as tatt
    from fnf_kernels.triton_kernels import lora_linear as tlora

    grids = _record(monkeypatch, tatt, ["_forward_kernel", "_backward_kernel"])
    maps = torch.empty(65537, 2, 2, 3, 3, device="meta")
    tatt.triton_attention_maxima._init_fn(maps, 1e-8)
    _record(monkeypatch, tlora, ["_down_kernel", "_fused_kernel", "_fused_tuned", "_wgrad_kernel"], grids=grids)
    m = 65537 * 4
    x, w = torch.empty(m, 8, device="meta"), torch.empty(6, 8, device="meta")
    a, b = torch.empty(128, 8, device="meta"), torch.empty(6, 128, device="meta")
    tlora.triton_lora_linear._init_fn(x, w, None, a, b, torch.empty(65537, device="meta"), 1.0, 4, 1)
    assert len(grids) >= 3


@needs_triton
def test_triton_penalty_batch_and_chunks_on_one_axis(monkeypatch, seed):
    """Several samples x several chunks per sample on the one grid axis: values and gradients vs the reference."""
    from fnf_kernels.triton_kernels import penalty as tpen

    monkeypatch.setattr(tpen, "_OVERRIDE", {"block": 16, "iters": 1})
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for dtype in (torch.float32, torch.float64):
        image = torch.rand(5, 3, 7, 5, device=device, dtype=dtype)
        reference = torch.rand(5, 3, 7, 5, device=device, dtype=dtype)
        mask = torch.rand(5, 1, 7, 5, device=device, dtype=dtype)
        x1, x2 = image.clone().requires_grad_(), image.clone().requires_grad_()
        out = fnf_kernels.masked_frobenius_penalty(x1, reference, mask, reduction="none", backend="triton")
        exp = fnf_kernels.masked_frobenius_penalty(x2, reference, mask, reduction="none", backend="reference")
        torch.testing.assert_close(out, exp, **TOL[dtype])
        w = torch.rand(5, device=device, dtype=out.dtype)
        (out * w).sum().backward()
        (exp * w).sum().backward()
        torch.testing.assert_close(x1.grad, x2.grad, **TOL[dtype])


NON_TRITON = [p for p in PAIRS if p[1] != "triton"]


@pytest.mark.parametrize("pair", NON_TRITON, ids=ids(NON_TRITON))
def test_more_than_65535_samples_cpu_and_reference(pair, seed):
    """65537 tiny samples through the CPU C++ kernels and the reference (Triton: the grid tests above)."""
    device, backend = pair
    b = 65537
    image = torch.rand(b, 1, 1, 2, device=device, requires_grad=True)
    reference, mask = torch.rand(b, 1, 1, 2, device=device), torch.rand(b, 1, 1, 2, device=device)
    out = fnf_kernels.masked_frobenius_penalty(image, reference, mask, reduction="none", backend=backend)
    exp = references.penalty_norms(image.double(), reference.double(), mask.double()).float()
    torch.testing.assert_close(out, exp, **TOL[torch.float32])
    heatmap = torch.rand(b, 1, 3, device=device)
    got = fnf_kernels.threshold_dilate(heatmap, 0.5, 1, backend=backend)
    torch.testing.assert_close(got, references.threshold_dilate(heatmap, torch.full((b,), 0.5), 1))


# --------------------------------------------------------------------------------------- auto falls back
class _FakeCudaExtension:
    """An extension that reports CUDA kernels (and, optionally, its batch limits)."""

    def __init__(self, limits=None):
        if limits is not None:
            self.cuda_limits = lambda: limits

    @staticmethod
    def built_with_cuda():
        return True


def _fake_extension(monkeypatch, ext):
    monkeypatch.setattr(_extension, "_state", {"module": ext, "error": None})
    monkeypatch.setattr(backends, "_WARNED", set())


def test_auto_skips_cuda_dilation_above_its_batch_limit_and_says_why(monkeypatch):
    _fake_extension(monkeypatch, _FakeCudaExtension())
    assert backends.select("threshold_dilate", "auto", "cuda", torch.float32, 65535) == "cuda"
    with pytest.warns(RuntimeWarning, match="65535"):
        chosen = backends.select("threshold_dilate", "auto", "cuda", torch.float32, 65537)
    assert chosen == ("triton" if backends.triton_installed() else "reference")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        backends.select("threshold_dilate", "auto", "cuda", torch.float32, 70000)
    with pytest.raises(ValueError, match="at most 65535 samples"):
        backends.select("threshold_dilate", "cuda", "cuda", torch.float32, 65537)


def test_auto_keeps_cuda_when_the_extension_reports_no_limit(monkeypatch):
    _fake_extension(monkeypatch, _FakeCudaExtension({"threshold_dilate_batch": -1}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backends.select("threshold_dilate", "auto", "cuda", torch.float32, 10**6) == "cuda"
    assert backends.input_problem("threshold_dilate", "cuda", 10**6) is None


# ------------------------------------------------------------------------------- exact attention smoothing
def _tf32(t: torch.Tensor) -> torch.Tensor:
    """Round float32 values to TF32 (10 mantissa bits, round to nearest even), as Ampere tensor cores read them."""
    bits = t.contiguous().view(torch.int32)
    rounded = (bits + 0xFFF + ((bits >> 13) & 1)) & ~0x1FFF
    return rounded.view(torch.float32)


def _smooth_float64(maps: torch.Tensor) -> torch.Tensor:
    """G * A with reflect padding, brute force in float64 (pixel loops, no shared code with the reference)."""
    m = maps.double()
    g = references.gaussian_kernel(torch.float64)
    hh, ww = m.shape[-2:]
    out = torch.zeros_like(m)
    for y in range(hh):
        for x in range(ww):
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    yy, xx = abs(y + dy), abs(x + dx)
                    yy = 2 * hh - 2 - yy if yy >= hh else yy
                    xx = 2 * ww - 2 - xx if xx >= ww else xx
                    out[..., y, x] += g[dy + 1, dx + 1] * m[..., yy, xx]
    return out


def test_attention_reference_smoothing_is_exact_even_where_conv2d_takes_tf32(monkeypatch, seed):
    """The reference's smoothed maps equal the float64 smoothing rounded to float32, even when F.conv2d rounds
    its float32 operands to TF32 (as cuDNN may on CUDA; emulated here)."""
    real_conv2d = F.conv2d

    def conv2d_tf32(x, weight, *args, **kwargs):
        if x.dtype == torch.float32:
            x, weight = _tf32(x), _tf32(weight)
        return real_conv2d(x, weight, *args, **kwargs)

    monkeypatch.setattr(F, "conv2d", conv2d_tf32)
    maps = torch.rand(2, 3, 2, 9, 11)
    got = references.smooth_reference(maps)
    assert got.dtype == torch.float32
    want = _smooth_float64(maps)
    # one float32 rounding of the exact value: within half an ulp (2**-24 relative)
    assert ((got.double() - want).abs() <= want.abs() * (2.0**-24 + 1e-15)).all()
    sep, en = fnf_kernels.separate_enhance_losses(maps, backend="reference")
    exp_en = 1.0 - want.transpose(1, 2).flatten(2).amax(dim=2).min(dim=1).values
    torch.testing.assert_close(en, exp_en.float(), rtol=0, atol=2.0**-23)
