"""Separate-and-Enhance losses: the fused Triton op against the torch reference, values, gradients, ties."""
import pytest
import torch

import fnf_kernels
from fnf_kernels import attention_losses as al
from fnf_kernels.backends import availability

TRITON = availability("cuda" if torch.cuda.is_available() else "cpu")["triton"][0]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not TRITON, reason="triton needs CUDA or TRITON_INTERPRET=1")
SHAPES = [(2, 3, 2, 5, 7), (1, 2, 3, 7, 5), (3, 1, 2, 3, 3), (1, 4, 3, 9, 2)]
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=2e-5, atol=1e-6)}


def random_maps(shape, dtype=torch.float32, device=DEVICE, seed=0):
    g = torch.Generator().manual_seed(seed)
    b, h, k, hh, ww = shape
    logits = torch.randn(b, h, hh * ww, k + 3, generator=g, dtype=torch.float64) * 2
    probs = logits.softmax(-1)[..., 1:k + 1]  # like attention rows over tokens, the object tokens kept
    return probs.permute(0, 1, 3, 2).reshape(shape).to(dtype=dtype, device=device).contiguous()


def manual(maps, eps=1e-8):
    """The formulas written out per sample, with loops (no shared code with the reference)."""
    m = maps.double()
    b, h, k, hh, ww = m.shape
    g = al.gaussian_kernel(torch.float64)
    sep, en = [], []
    for n in range(b):
        ratio = torch.prod(m[n], dim=1) / (torch.sum(m[n], dim=1) + eps)
        sep.append(ratio.max())
        best = []
        for i in range(k):
            top = -1.0
            for head in range(h):
                a = m[n, head, i]
                s = torch.zeros(hh, ww, dtype=torch.float64)
                for y in range(hh):
                    for x in range(ww):
                        for dy in (-1, 0, 1):
                            for dx in (-1, 0, 1):
                                yy, xx = abs(y + dy), abs(x + dx)
                                yy = 2 * hh - 2 - yy if yy >= hh else yy
                                xx = 2 * ww - 2 - xx if xx >= ww else xx
                                s[y, x] += g[dy + 1, dx + 1] * a[yy, xx]
                top = max(top, float(s.max()))
            best.append(top)
        en.append(1.0 - min(best))
    return torch.stack(sep), torch.tensor(en, dtype=torch.float64)


def test_gaussian_kernel():
    g = al.gaussian_kernel(torch.float64)
    assert torch.allclose(g.sum(), torch.tensor(1.0, dtype=torch.float64))
    e = torch.exp(torch.tensor(-2.0, dtype=torch.float64))  # exp(-1 / (2 sigma^2)), sigma = 0.5
    assert torch.allclose(g[0, 1] / g[1, 1], e) and torch.allclose(g[0, 0] / g[1, 1], e * e)


@pytest.mark.parametrize("shape", SHAPES[:3])
def test_reference_matches_hand_computation(shape):
    maps = random_maps(shape, torch.float64, "cpu")
    sep, en = manual(maps)
    torch.testing.assert_close(fnf_kernels.separate_loss(maps, backend="reference"), sep)
    torch.testing.assert_close(fnf_kernels.enhance_loss(maps, backend="reference"), en)
    s2, e2 = fnf_kernels.separate_enhance_losses(maps, backend="reference")
    torch.testing.assert_close(s2, sep) and torch.testing.assert_close(e2, en)


def test_two_objects_separate_is_a1a2_over_sum():
    maps = random_maps((2, 2, 2, 4, 4), torch.float64, "cpu")
    a1, a2 = maps[:, :, 0], maps[:, :, 1]
    expected = (a1 * a2 / (a1 + a2 + 1e-8)).flatten(1).max(dim=1).values
    torch.testing.assert_close(fnf_kernels.separate_loss(maps), expected)


def test_eps_keeps_zero_maps_finite():
    maps = torch.zeros(1, 2, 2, 3, 3)
    sep = fnf_kernels.separate_loss(maps.requires_grad_())
    assert torch.isfinite(sep).all() and sep.item() == 0
    sep.sum().backward()
    assert torch.isfinite(maps.grad).all()


def test_gradcheck_reference_float64():
    maps = random_maps((2, 2, 3, 4, 5), torch.float64, "cpu").requires_grad_()
    assert torch.autograd.gradcheck(lambda m: fnf_kernels.separate_loss(m, backend="reference"), (maps,))
    assert torch.autograd.gradcheck(lambda m: fnf_kernels.enhance_loss(m, backend="reference"), (maps,))


def _compare(shape, dtype, seed=0, eps=1e-8):
    maps = random_maps(shape, dtype, seed=seed)
    m1, m2 = maps.clone().requires_grad_(), maps.clone().requires_grad_()
    s1, e1 = fnf_kernels.separate_enhance_losses(m1, eps, backend="triton")
    s2, e2 = fnf_kernels.separate_enhance_losses(m2, eps, backend="reference")
    assert s1.dtype == s2.dtype == al.accumulate_dtype(dtype) and s1.shape == (shape[0],)
    torch.testing.assert_close(s1, s2, **TOL[dtype])
    torch.testing.assert_close(e1, e2, **TOL[dtype])
    w = torch.rand(2, shape[0], dtype=s1.dtype, device=s1.device) + 0.5
    (w[0] * s1 + w[1] * e1).sum().backward()
    (w[0] * s2 + w[1] * e2).sum().backward()
    assert m1.grad.dtype == dtype and m1.grad.shape == maps.shape
    torch.testing.assert_close(m1.grad, m2.grad, **TOL[dtype])


@needs_triton
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_triton_matches_reference(shape, dtype):
    _compare(shape, dtype)


@pytest.mark.slow  # ~30 s under the Triton interpreter on 2 cores
@needs_triton
def test_triton_several_chunks(monkeypatch):
    from fnf_kernels.triton_kernels import attention_losses as tk
    monkeypatch.setitem(tk._OVERRIDE, "block", 8)
    for seed in range(3):
        _compare((2, 2, 3, 7, 5), torch.float32, seed=seed)


@needs_triton
def test_triton_single_loss_functions():
    maps = random_maps((2, 3, 2, 5, 5))
    m1, m2 = maps.clone().requires_grad_(), maps.clone().requires_grad_()
    fnf_kernels.separate_loss(m1, backend="triton").sum().backward()
    fnf_kernels.separate_loss(m2, backend="reference").sum().backward()
    torch.testing.assert_close(m1.grad, m2.grad)
    m1.grad = m2.grad = None
    fnf_kernels.enhance_loss(m1, backend="triton").sum().backward()
    fnf_kernels.enhance_loss(m2, backend="reference").sum().backward()
    torch.testing.assert_close(m1.grad, m2.grad)


@needs_triton
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_ties_go_to_the_first_index(backend):
    """Constant maps: every pixel and head ties; the gradient goes to head 0, pixel 0 (and its 3x3 window,
    reflected: (0, 1) and (1, 0) receive twice the side weight), object 0 for the min over objects."""
    maps = torch.full((1, 3, 2, 4, 5), 0.25, dtype=torch.float64, device=DEVICE, requires_grad=True)
    sep, en = fnf_kernels.separate_enhance_losses(maps, backend=backend)
    (sep + en).sum().backward()
    g = maps.grad
    nz = g.nonzero().tolist()
    assert all(idx[0] == 0 and idx[1] == 0 for idx in nz)  # first head only
    side, centre = al.gaussian_1d()
    expected_en = torch.zeros(4, 5, dtype=torch.float64)
    expected_en[0, 0] = -centre * centre
    expected_en[0, 1] = expected_en[1, 0] = -2 * side * centre
    expected_en[1, 1] = -4 * side * side
    d_sep = 0.25 / (0.5 + 1e-8) - 0.0625 / (0.5 + 1e-8) ** 2
    expected0 = expected_en.clone()
    expected0[0, 0] += d_sep
    torch.testing.assert_close(g[0, 0, 0].cpu(), expected0)
    expected1 = torch.zeros(4, 5, dtype=torch.float64)
    expected1[0, 0] = d_sep  # object 1 gets only the Separate term: the min over objects picked object 0
    torch.testing.assert_close(g[0, 0, 1].cpu(), expected1)


@needs_triton
def test_opcheck_custom_ops():
    from fnf_kernels.triton_kernels import attention_losses as tk
    maps = random_maps((2, 2, 2, 3, 4)).requires_grad_()
    torch.library.opcheck(torch.ops.fnf_kernels.triton_attention_maxima, (maps, 1e-8),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    sep, sep_idx, en, en_idx = tk.attention_maxima(maps.detach(), 1e-8)
    torch.library.opcheck(torch.ops.fnf_kernels.triton_attention_maxima_backward,
                          (maps.detach(), torch.ones_like(sep), sep_idx, torch.ones_like(en), en_idx, 1e-8),
                          test_utils=("test_schema", "test_faketensor"))


def test_bad_inputs():
    good = torch.rand(1, 2, 2, 3, 3)
    with pytest.raises(TypeError, match="maps"):
        fnf_kernels.separate_loss([[1.0]])
    with pytest.raises(TypeError, match="maps"):
        fnf_kernels.enhance_loss(good.long())
    with pytest.raises(ValueError, match="maps must be 5-D"):
        fnf_kernels.separate_loss(good[0])
    with pytest.raises(ValueError, match="k >= 2"):
        fnf_kernels.enhance_loss(good[:, :, :1])
    with pytest.raises(ValueError, match="H, W >= 2"):
        fnf_kernels.enhance_loss(good[..., :1])
    with pytest.raises(ValueError, match="no heads"):
        fnf_kernels.separate_loss(good[:, :0])
    with pytest.raises(ValueError, match="eps"):
        fnf_kernels.separate_loss(good, eps=-1.0)
    with pytest.raises(ValueError, match="eps"):
        fnf_kernels.separate_loss(good, eps=float("nan"))
    with pytest.raises(ValueError, match="backend"):
        fnf_kernels.separate_loss(good, backend="cuda")
    if not TRITON:
        with pytest.raises(ValueError, match="triton"):
            fnf_kernels.separate_loss(good, backend="triton")


def test_auto_is_reference_on_cpu():
    maps = random_maps((1, 2, 2, 4, 4), device="cpu")
    torch.testing.assert_close(fnf_kernels.separate_loss(maps), al.separate_reference(maps))


hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies


@pytest.mark.slow  # ~60 s under the Triton interpreter on 2 cores
@needs_triton
@hypothesis.settings(max_examples=10, deadline=None)
@hypothesis.given(b=st.integers(1, 2), h=st.integers(1, 3), k=st.integers(2, 4), hh=st.integers(2, 9),
                  ww=st.integers(2, 9), seed=st.integers(0, 2**16))
def test_fuzz_shapes(b, h, k, hh, ww, seed):
    _compare((b, h, k, hh, ww), torch.float64, seed=seed)
