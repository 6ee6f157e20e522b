"""masked_frobenius_penalty: every backend against the torch reference, values and gradients."""
import math

import pytest
import torch

import fnf_kernels
from fnf_kernels import reference as ref
from tests.backends import ids, runnable

PAIRS = runnable()
# Tolerances per input dtype: (values rtol, atol), (grads rtol, atol). Values are float32 accumulations
# of the same inputs, so they differ only by summation order; gradients are rounded to the input dtype.
TOL = {
    torch.float64: ((1e-10, 1e-12), (1e-10, 1e-12)),
    torch.float32: ((2e-5, 1e-6), (2e-5, 1e-6)),
    torch.float16: ((1e-4, 1e-5), (2e-3, 1e-4)),
    torch.bfloat16: ((1e-4, 1e-5), (1.6e-2, 1e-3)),
}
SHAPES = [(1, 1, 1, 1), (2, 3, 37, 53), (3, 1, 5, 7), (1, 4, 16, 1), (2, 3, 1, 33)]


def dtypes_for(device, backend):
    out = [torch.float32, torch.float64, torch.float16]
    if device == "cuda" or backend != "triton":  # the Triton interpreter has no bf16 arithmetic
        out.append(torch.bfloat16)
    if device == "cpu" and backend == "triton":
        out.remove(torch.float16)
    return out


def make(shape, dtype, device, layout="contiguous", mask_layout="b1hw", soft=True):
    b, c, h, w = shape
    image = torch.rand(shape, device=device).to(dtype)
    reference = torch.rand(shape, device=device).to(dtype)
    mshape = {"bhw": (b, h, w), "b1hw": (b, 1, h, w), "bchw": shape}[mask_layout]
    mask = torch.rand(mshape, device=device)
    mask = (mask if soft else (mask > 0.5).float()).to(dtype)
    if layout == "channels_last":
        image = image.to(memory_format=torch.channels_last)
        reference = reference.to(memory_format=torch.channels_last)
    elif layout == "strided":  # non-contiguous views with odd strides
        image = torch.rand(b, c, h, 2 * w, device=device).to(dtype)[..., ::2]
        reference = torch.rand(b, c + 1, h, w, device=device).to(dtype)[:, 1:]
        if mask.dim() == 4:
            mask = mask.transpose(2, 3).contiguous().transpose(2, 3)
    elif layout == "expanded":
        if mask.dim() == 4 and mask.shape[1] == c:
            mask = mask[:, :1].expand(shape)
    return image, reference, mask


def check(pair, image, reference, mask, squared, reduction, ref_grad=True):
    device, backend = pair
    vt, gt = TOL[image.dtype]
    x1 = image.detach().clone().requires_grad_()
    r1 = reference.detach().clone().requires_grad_(ref_grad)
    x2 = image.detach().clone().requires_grad_()
    r2 = reference.detach().clone().requires_grad_(ref_grad)
    out = fnf_kernels.masked_frobenius_penalty(x1, r1, mask, squared=squared, reduction=reduction, backend=backend)
    exp = fnf_kernels.masked_frobenius_penalty(x2, r2, mask, squared=squared, reduction=reduction,
                                               backend="reference")
    assert out.dtype == exp.dtype == ref.accumulate_dtype(image.dtype)
    assert out.shape == exp.shape
    torch.testing.assert_close(out, exp, rtol=vt[0], atol=vt[1])
    seed = torch.rand(out.shape, device=out.device, dtype=out.dtype) + 0.5
    (out * seed).sum().backward()
    (exp * seed).sum().backward()
    assert x1.grad.dtype == image.dtype and x1.grad.shape == image.shape
    torch.testing.assert_close(x1.grad, x2.grad, rtol=gt[0], atol=gt[1])
    if ref_grad:
        torch.testing.assert_close(r1.grad, r2.grad, rtol=gt[0], atol=gt[1])


@pytest.mark.parametrize("pair", PAIRS, ids=ids(PAIRS))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mask_layout", ["bhw", "b1hw", "bchw"])
def test_values_and_grads_float32(pair, shape, mask_layout):
    image, reference, mask = make(shape, torch.float32, pair[0], mask_layout=mask_layout)
    check(pair, image, reference, mask, squared=False, reduction="none")


@pytest.mark.parametrize("pair", PAIRS, ids=ids(PAIRS))
@pytest.mark.parametrize("layout", ["channels_last", "strided", "expanded"])
@pytest.mark.parametrize("mask_layout", ["b1hw", "bchw"])
@pytest.mark.parametrize("squared", [False, True])
def test_layouts(pair, layout, mask_layout, squared):
    image, reference, mask = make((2, 3, 19, 23), torch.float32, pair[0], layout=layout, mask_layout=mask_layout)
    check(pair, image, reference, mask, squared=squared, reduction="mean")


@pytest.mark.parametrize("pair", PAIRS, ids=ids(PAIRS))
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("soft", [True, False])
def test_dtypes(pair, reduction, soft):
    for dtype in dtypes_for(*pair):
        image, reference, mask = make((2, 3, 11, 13), dtype, pair[0], soft=soft)
        check(pair, image, reference, mask, squared=False, reduction=reduction)
        check(pair, image, reference, mask, squared=True, reduction=reduction, ref_grad=False)


@pytest.mark.parametrize("pair", PAIRS + [("cpu", "reference")], ids=ids(PAIRS + [("cpu", "reference")]))
def test_all_ones_mask_gives_zero_gradient(pair):
    device, backend = pair
    image = torch.rand(3, 3, 9, 10, device=device, requires_grad=True)
    reference = torch.rand(3, 3, 9, 10, device=device)
    mask = torch.ones(3, 1, 9, 10, device=device)
    mask[1] = 0.3  # only sample 1 is constrained
    for squared in (False, True):
        out = fnf_kernels.masked_frobenius_penalty(image, reference, mask, squared=squared, reduction="none",
                                                   backend=backend)
        (grad,) = torch.autograd.grad(out.sum(), image)
        assert out[0] == 0 and out[2] == 0 and out[1] > 0
        assert torch.isfinite(grad).all()
        assert (grad[0] == 0).all() and (grad[2] == 0).all() and (grad[1] != 0).any()


@pytest.mark.parametrize("pair", PAIRS + [("cpu", "reference")], ids=ids(PAIRS + [("cpu", "reference")]))
def test_identical_images_give_zero_and_finite_gradient(pair):
    device, backend = pair
    image = torch.rand(2, 3, 8, 8, device=device, requires_grad=True)
    out = fnf_kernels.masked_frobenius_penalty(image, image.detach().clone(), torch.zeros(2, 8, 8, device=device),
                                               backend=backend)
    out.backward()
    assert out.item() == 0 and (image.grad == 0).all()


@pytest.mark.parametrize("pair", PAIRS + [("cpu", "reference")], ids=ids(PAIRS + [("cpu", "reference")]))
def test_nan_propagates(pair):
    device, backend = pair
    image, reference, mask = make((2, 3, 6, 7), torch.float32, device)
    image[1, 2, 3, 4] = float("nan")
    out = fnf_kernels.masked_frobenius_penalty(image, reference, mask, reduction="none", backend=backend)
    assert torch.isfinite(out[0]) and torch.isnan(out[1])
    mask2 = mask.clone()
    mask2[0, 0, 1, 1] = float("nan")
    out = fnf_kernels.masked_frobenius_penalty(image, reference, mask2, reduction="none", backend=backend)
    assert torch.isnan(out[0])


@pytest.mark.parametrize("pair", PAIRS + [("cpu", "reference")], ids=ids(PAIRS + [("cpu", "reference")]))
def test_mask_values_are_clamped(pair):
    device, backend = pair
    image, reference, mask = make((2, 3, 6, 7), torch.float32, device)
    wild = mask * 3 - 1  # values in [-1, 2]
    out = fnf_kernels.masked_frobenius_penalty(image, reference, wild, backend=backend)
    exp = fnf_kernels.masked_frobenius_penalty(image, reference, wild.clamp(0, 1), backend="reference")
    torch.testing.assert_close(out, exp)


def test_known_value():
    image = torch.zeros(1, 1, 2, 2)
    reference = torch.tensor([[[[3.0, 4.0], [5.0, 6.0]]]])
    mask = torch.tensor([[[0.0, 0.0], [1.0, 0.5]]])
    # (1-M)*(I0-I) = [[3, 4], [0, 3]] -> ||.||_F = sqrt(9 + 16 + 0 + 9) = sqrt(34)
    for backend in ["reference"] + [b for d, b in PAIRS if d == "cpu"]:
        out = fnf_kernels.masked_frobenius_penalty(image, reference, mask, backend=backend)
        assert math.isclose(out.item(), math.sqrt(34), rel_tol=1e-6)
        sq = fnf_kernels.masked_frobenius_penalty(image, reference, mask, squared=True, backend=backend)
        assert math.isclose(sq.item(), 34, rel_tol=1e-6)


def test_bool_mask_matches_float_mask():
    image, reference, mask = make((2, 3, 6, 7), torch.float32, "cpu", soft=False)
    a = fnf_kernels.masked_frobenius_penalty(image, reference, mask > 0.5)
    b = fnf_kernels.masked_frobenius_penalty(image, reference, mask)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", ["reference"] + [b for d, b in PAIRS if d == "cpu" and b != "triton"])
@pytest.mark.parametrize("squared", [False, True])
def test_gradcheck_float64(backend, squared):
    image = torch.rand(2, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    reference = torch.rand(2, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(2, 1, 5, 4, dtype=torch.float64)

    def fn(x, r):
        return fnf_kernels.masked_frobenius_penalty(x, r, mask, squared=squared, reduction="none", backend=backend)

    assert torch.autograd.gradcheck(fn, (image, reference))


def test_module_drop_in_loss():
    loss_fn = fnf_kernels.MaskedFrobeniusPenalty(beta=0.25, squared=True, reduction="sum")
    image, reference, mask = make((2, 3, 6, 7), torch.float32, "cpu")
    expected = 0.25 * ref.masked_frobenius_penalty(image, reference, mask, squared=True, reduction="sum")
    torch.testing.assert_close(loss_fn(image, reference, mask), expected)
    assert "beta=0.25" in repr(loss_fn)
    with pytest.raises(ValueError, match="beta"):
        fnf_kernels.MaskedFrobeniusPenalty(beta=-1.0)
    with pytest.raises(ValueError, match="reduction"):
        fnf_kernels.MaskedFrobeniusPenalty(reduction="max")


try:
    from hypothesis import given, strategies as st

    @given(b=st.integers(1, 3), c=st.integers(1, 4), h=st.integers(1, 24), w=st.integers(1, 24),
           mask_layout=st.sampled_from(["bhw", "b1hw", "bchw"]), squared=st.booleans(),
           layout=st.sampled_from(["contiguous", "channels_last", "strided"]))
    def test_fuzz_shapes(b, c, h, w, mask_layout, squared, layout):
        for pair in [p for p in PAIRS if p[1] != "triton"]:
            image, reference, mask = make((b, c, h, w), torch.float32, pair[0], layout=layout,
                                          mask_layout=mask_layout)
            check(pair, image, reference, mask, squared=squared, reduction="none")
except ImportError:  # pragma: no cover
    pass


# ----------------------------------------------------------------------------- CPU kernel accuracy
cpu_kernel = pytest.mark.skipif(("cpu", "cpu") not in PAIRS, reason="the C++ CPU kernels are not built")


@cpu_kernel
@pytest.mark.parametrize("kind", ["constant", "random"])
def test_cpu_float32_4096_plane_within_1e6_of_float64(kind):
    """One 4096 x 4096 float32 plane (16.8M terms): relative error <= 1e-6 against the float64 reference.

    A constant difference is the worst case for float summation (every rounding has the same sign): a
    single float accumulator is off by ~2e-2, float blocks of 4096 by ~2e-5."""
    n = 4096
    seed = 1234
    print(f"seed={seed}")
    g = torch.Generator().manual_seed(seed)
    if kind == "constant":
        image, reference = torch.full((1, 1, n, n), 0.1), torch.full((1, 1, n, n), 0.8)
        mask = torch.zeros(1, 1, n, n)
    else:
        image, reference = torch.rand(1, 1, n, n, generator=g), torch.rand(1, 1, n, n, generator=g)
        mask = torch.rand(1, 1, n, n, generator=g) * 1.2 - 0.1
    x = image.clone().requires_grad_()
    value = fnf_kernels.masked_frobenius_penalty(x, reference, mask, reduction="sum", backend="cpu")
    x64 = image.double().requires_grad_()
    want = ref.masked_frobenius_penalty(x64, reference.double(), mask.double(), reduction="sum")
    rel = abs(value.double().item() - want.item()) / want.item()
    print(f"{kind}: relative error {rel:.3g}")
    assert rel <= 1e-6
    value.backward()
    want.backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=2e-6, atol=1e-12)


@cpu_kernel
def test_cpu_norms_do_not_depend_on_thread_count():
    """Blocks, not threads, define the partial sums: 1 and 2 threads give bitwise the same norms."""
    image, reference, mask = make((2, 3, 300, 301), torch.float32, "cpu", layout="strided")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fnf_kernels.masked_frobenius_penalty(image, reference, mask, reduction="none", backend="cpu")
        torch.set_num_threads(2)
        two = fnf_kernels.masked_frobenius_penalty(image, reference, mask, reduction="none", backend="cpu")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


# ----------------------------------------------------------------------------- Triton index width
from fnf_kernels.triton_kernels.index_width import INT32_LIMIT, penalty_wide  # noqa: E402


def test_penalty_index_width_flat_index_at_int32_boundary():
    """A contiguous sample walked as one dim: 64-bit exactly when the padded flat index passes 2**31 - 1."""
    per_program = 4096
    fits = (INT32_LIMIT + 1) // per_program * per_program  # flat indices 0 .. fits - 1 = 2**31 - 1
    assert not penalty_wide(1, (1, 1, fits), [(0, 0, 1)], per_program)
    assert penalty_wide(1, (1, 1, fits + 1), [(0, 0, 1)], per_program)  # padded up to one more program


def test_penalty_index_width_offsets_at_int32_boundary():
    """Few elements, large strides: 64-bit exactly when some (masked lanes included) offset passes 2**31 - 1."""
    per_program = 64
    # (C, H*W) walk, C = 2 planes of 32 elements: the flat index reaches 63, i0 at most 1.
    dims = (1, 2, 32)
    for stride in (INT32_LIMIT - 31, INT32_LIMIT - 30):
        want = (2 - 1) * stride + 31 > INT32_LIMIT
        assert penalty_wide(2, dims, [(0, stride, 1)], per_program) == want
    assert not penalty_wide(2, dims, [(0, INT32_LIMIT - 31, 1)], per_program)
    # Padding to whole programs adds rows past the last plane: C = 3 with 64-element programs walks i0 = 0..3.
    dims = (1, 3, 32)
    stride = (INT32_LIMIT - 31) // 2  # fits for i0 <= 2 ...
    assert penalty_wide(2, dims, [(0, stride, 1)], per_program)  # ... but the padded walk reaches i0 = 3
    assert not penalty_wide(2, dims, [(0, (INT32_LIMIT - 31) // 3, 1)], per_program)
    # Any of the tensors can force it (here the third, with a stride-0 broadcast in the second).
    assert penalty_wide(3, (2, 3, 4), [(12, 4, 1), (0, 0, 1), (2**30, 4, 1)], 32)
