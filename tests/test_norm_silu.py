"""group_norm_silu / rms_norm_silu: every backend (CUDA, Triton, the C++ CPU kernels, the plain-torch op) against the
float64 reference (values and gradients), what the autograd saves, torch.compile, fuzzing, bad input."""
from __future__ import annotations

import pytest
import torch

import fnf_kernels
from fnf_kernels import backends, norm_silu
from fnf_kernels import references as ref

SEED = 20261207
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# Every backend that runs here, and the plain-torch op ("torch", called directly: it is what "auto" falls back to).
PAIRS = [(d, b) for d in DEVICES for b, (ok, _) in backends.op_availability("group_norm_silu", d).items()
         if ok and b in ("cuda", "triton", "cpu", "torch")
         and not (b == "cpu" and backends.cpu_is_torch("group_norm_silu"))]
# Relative error (max |out - ref| / max |ref|) allowed per input dtype: (values, gradients). float32 arithmetic
# with the output and the gradients rounded to the input dtype.
TOL = {torch.float64: (1e-12, 1e-12), torch.float32: (1e-5, 3e-5), torch.float16: (2e-3, 4e-3),
       torch.bfloat16: (1.6e-2, 3e-2)}
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# (shape, groups): C not a power of two, C groups, one group, H*W not a multiple of any block, 3-D, 2-D.
CASES = [((2, 6, 5, 7), 3), ((2, 32, 9, 11), 32), ((1, 7, 13, 17), 1), ((2, 64, 9, 35), 32), ((2, 12, 70), 4),
         ((3, 8), 2)]


def generator(label: str) -> torch.Generator:
    seed = SEED + sum(label.encode())
    print(f"{label}: seed {seed}")
    return torch.Generator().manual_seed(seed)


def rel_error(out: torch.Tensor, want: torch.Tensor, floor: float = 1e-30) -> float:
    """max |out - want| / max |want|, the denominator at least ``floor`` (gradients of tiny groups are all
    cancellation: 2 elements give dx ~ 1e-6 out of terms ~ 1)."""
    out, want = out.detach().double().cpu(), want.detach().double().cpu()
    assert out.shape == want.shape
    return float((out - want).abs().max()) / max(float(want.abs().max()), floor) if want.numel() else 0.0


def make(shape, dtype, device, gen, *, layout="contiguous", affine=(True, True), offset=0.0):
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + offset).to(device=device, dtype=dtype)
    if layout == "channels_last" and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":  # every other column: one spatial stride of 2
        x = torch.randn(shape[:-1] + (2 * shape[-1],), generator=gen, dtype=torch.float64).to(device, dtype)[..., ::2]
    elif layout == "rows":  # every other row: spatial dims that do not merge (the op copies)
        x = torch.randn(shape[:2] + (2 * shape[2], shape[3]), generator=gen, dtype=torch.float64).to(device, dtype)
        x = x[:, :, ::2]
    c = shape[1]
    w = (torch.randn(c, generator=gen, dtype=torch.float64) + 1).to(device) if affine[0] else None
    b = torch.randn(c, generator=gen, dtype=torch.float64).to(device) if affine[1] else None
    return x, (w.to(dtype) if w is not None else None), (b.to(dtype) if b is not None else None)


def gn(x, groups, w, b, eps=1e-5, silu=True, backend="auto"):
    """group_norm_silu through ``backend``; "torch" calls the plain-torch op itself."""
    if backend == "torch":
        x = x if norm_silu._mergeable(x) else x.contiguous()
        return torch.ops.fnf_kernels.group_norm_silu_torch(x, w, b, groups, eps, silu)[0]
    return fnf_kernels.group_norm_silu(x, groups, w, b, eps, silu=silu, backend=backend)


def rms(x, w, eps=1e-6, *, dim, silu=True, backend="auto"):
    """rms_norm_silu through ``backend``; "torch" calls the plain-torch op itself."""
    if backend == "torch" and x.dim() == 1:  # as the public op: a 1-D x is one row
        return rms(x[None], w, eps, dim=1, silu=silu, backend=backend)[0]
    if backend == "torch":
        return torch.ops.fnf_kernels.rms_norm_silu_torch(x, w, dim % x.dim(), eps, silu)[0]
    return fnf_kernels.rms_norm_silu(x, w, eps, dim=dim, silu=silu, backend=backend)


def check_group(pair, x, groups, w, b, silu=True, gen=None, scale=1.0):
    """Values and gradients of one backend against autograd through the float64 reference (tolerances times
    ``scale``, the condition number of an input whose mean dwarfs its spread)."""
    device, backend = pair
    vt, gt = (t * scale for t in TOL[x.dtype])
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b)]
    out = gn(leaves[0], groups, leaves[1], leaves[2], 1e-5, silu=silu, backend=backend)
    assert out.dtype == x.dtype and out.shape == x.shape
    if x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)):
        same = [(a, b) for a, b, n in zip(out.stride(), x.stride(), x.shape) if n > 1]   # a size-1 dim's stride is free
        assert all(a == b for a, b in same), "the output keeps x's layout"
    d64 = [t.detach().double().requires_grad_() if t is not None else None for t in (x, w, b)]
    want = ref.group_norm_silu_reference(d64[0], groups, d64[1], d64[2], 1e-5, silu)
    assert rel_error(out, want) <= vt, f"values {rel_error(out, want):.3g} > {vt}"
    g = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    live = [i for i, t in enumerate(leaves) if t is not None]
    got = torch.autograd.grad(out, [leaves[i] for i in live], g.to(device=x.device, dtype=x.dtype))
    exp = torch.autograd.grad(want, [d64[i] for i in live], g.to(x.device))
    for i, a, e in zip(live, got, exp):
        assert a.dtype == leaves[i].dtype
        assert rel_error(a, e, 0.1) <= gt, f"grad of {'xwb'[i]}: {rel_error(a, e, 0.1):.3g} > {gt}"


@pytest.mark.parametrize("pair", PAIRS, ids=[f"{d}-{b}" for d, b in PAIRS])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_group_norm_silu_matches_float64_reference(pair, dtype):
    gen = generator(f"gn-{pair}-{dtype}")
    for k, (shape, groups) in enumerate(CASES):
        layout = "channels_last" if k % 2 else "contiguous"
        affine = [(True, True), (True, False), (False, True), (False, False)][k % 4]
        x, w, b = make(shape, dtype, pair[0], gen, layout=layout, affine=affine)
        check_group(pair, x, groups, w, b, silu=k != 3, gen=gen)


@pytest.mark.parametrize("pair", PAIRS, ids=[f"{d}-{b}" for d, b in PAIRS])
def test_one_sample_with_an_odd_batch_stride(pair):
    """A (1, C, H, W) channels_last tensor whose (unused) batch stride is C, not C*H*W, as a tiled VAE decode's
    convolutions return: same values and gradients as any other layout (ATen's group norm refused it)."""
    gen = generator(f"gn-unit-batch-{pair}")
    x, w, b = make((1, 8, 5, 7), torch.float32, pair[0], gen, layout="channels_last")
    odd = x.as_strided(x.shape, (8, *x.stride()[1:]))
    assert odd.stride(0) == 8 and torch.equal(odd, x)
    check_group(pair, odd, 4, w, b, gen=gen)


@pytest.mark.parametrize("pair", PAIRS, ids=[f"{d}-{b}" for d, b in PAIRS])
def test_group_norm_silu_layouts_and_large_mean(pair):
    gen = generator(f"gn-layouts-{pair}")
    for layout in ("channels_last", "strided", "rows"):
        x, w, b = make((2, 6, 11, 9), torch.float32, pair[0], gen, layout=layout)
        check_group(pair, x, 2, w, b, gen=gen)
    # mean 1000, std 2: E[x^2] - E[x]^2 in float32 would be off by ~1.5%; a merge of deviations is not.
    x, w, b = make((2, 4, 20, 3), torch.float32, pair[0], gen, offset=1e3)
    check_group(pair, x, 2, w, b, gen=gen, scale=500)


def test_triton_multi_chunk_tiles(monkeypatch):
    """Several channel blocks and spatial chunks per group: the chunk statistics merge (Chan) and the partial sums."""
    if ("cpu", "triton") not in PAIRS:
        pytest.skip("triton not runnable here")
    monkeypatch.setitem(norm_silu._triton._OVERRIDE, "block_c", 2)
    monkeypatch.setitem(norm_silu._triton._OVERRIDE, "block_s", 16)
    gen = generator("gn-triton-tiles")
    for dtype, layout in ((torch.float64, "contiguous"), (torch.float32, "channels_last")):
        x, w, b = make((1, 6, 5, 7), dtype, "cpu", gen, layout=layout, offset=3.0)
        check_group(("cpu", "triton"), x, 2, w, b, gen=gen, scale=2)


def test_torch_op_chunks(monkeypatch):
    """The plain-torch op in chunks of several samples, and of a few groups of one sample."""
    gen = generator("gn-torch-chunks")
    for chunk in (2 * 6 * 35 + 1, 6 * 35 // 3 * 2):
        monkeypatch.setattr(norm_silu, "CHUNK_ELEMENTS", chunk)
        x, w, b = make((5, 6, 5, 7), torch.float32, "cpu", gen, layout="channels_last")
        check_group(("cpu", "cpu"), x, 6, w, b, gen=gen)


@pytest.mark.parametrize("backend", [b for d, b in PAIRS if d == "cpu"])
def test_gradcheck_float64(backend):
    gen = generator(f"gn-gradcheck-{backend}")
    shape = (2, 6, 3, 4) if backend == "cpu" else (1, 4, 2, 3)  # the Triton interpreter pays per call
    x, w, b = make(shape, torch.float64, "cpu", gen, layout="channels_last")
    args = tuple(t.requires_grad_() for t in (x, w, b))
    assert torch.autograd.gradcheck(lambda *a: gn(a[0], 2, a[1], a[2], backend=backend), args,
                                    fast_mode=backend not in ("cpu", "torch"))
    xr = torch.randn(2, 5, 3, generator=gen, dtype=torch.float64).requires_grad_()
    wr = torch.randn(5, generator=gen, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, c: rms(a, c, dim=1, backend=backend), (xr, wr),
                                    fast_mode=backend not in ("cpu", "torch"))


def _saved(fn, *args):
    """Tensors autograd saves while running fn(*args)."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    return out, saved


@pytest.mark.parametrize("backend", [b for d, b in PAIRS if d == "cpu"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_autograd_saves_only_the_input_and_float32_statistics(backend, dtype):
    gen = generator(f"gn-saved-{backend}-{dtype}")
    x, w, b = make((2, 8, 6, 5), dtype, "cpu", gen, layout="channels_last")
    x.requires_grad_()
    out, saved = _saved(lambda: gn(x, 4, w, b, backend=backend))
    big = [t for t in saved if t.numel() >= x.numel()]
    assert len(big) == 1 and big[0].data_ptr() == x.data_ptr() and big[0].dtype == dtype
    stats = [t for t in saved if t.shape == (2, 4)]
    assert len(stats) == 2 and all(t.dtype == torch.float32 for t in stats)
    assert sum(t.numel() for t in saved if t.data_ptr() != x.data_ptr()) <= 2 * 8 + 2 * 8  # stats + w, b
    eager, eager_saved = _saved(lambda: torch.nn.functional.silu(torch.nn.functional.group_norm(x, 4, w, b)))
    assert sum(t.numel() for t in eager_saved if t.numel() >= x.numel()) >= 2 * x.numel()


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_rms_saves_only_the_input(backend):
    x = torch.randn(2, 6, 4, 5, dtype=torch.bfloat16, requires_grad=True)
    _, saved = _saved(lambda: rms(x, torch.ones(6), dim=1, backend=backend))
    big = [t for t in saved if t.numel() >= x.numel()]
    assert len(big) == 1 and big[0].data_ptr() == x.data_ptr()
    assert [t.dtype for t in saved if t.shape == (2, 4, 5)] == [torch.float32]


RMS_PAIRS = [(d, b) for d in DEVICES for b, (ok, _) in backends.op_availability("rms_norm_silu", d).items()
             if ok and b in ("cuda", "triton", "cpu", "torch")
             and not (b == "cpu" and backends.cpu_is_torch("rms_norm_silu"))]


@pytest.mark.parametrize("pair", RMS_PAIRS, ids=[f"{d}-{b}" for d, b in RMS_PAIRS])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dim, shape", [(1, (2, 6, 3, 5)), (-1, (2, 6, 3, 5)), (0, (3, 6, 5)), (-1, (3, 2, 300)),
                                        (2, (2, 6, 5, 3))])
def test_rms_norm_silu_matches_float64_reference(pair, dtype, dim, shape):
    device, backend = pair
    gen = generator(f"rms-{pair}-{dtype}-{dim}")
    vt, gt = TOL[dtype]
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    if dim in (-1, 2):  # channels_last: dim=1 strides 1 / dims around dim=2 that do not merge (copied)
        x = x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x
    x = x.to(device=device, dtype=dtype)
    w = torch.randn(x.shape[dim], generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    for silu in (dim != 0,):  # dim 0 checks the plain RMS norm
        a = x.detach().clone().requires_grad_()
        wa = w.detach().clone().requires_grad_()
        out = rms(a, wa, 1e-6, dim=dim, silu=silu, backend=backend)
        assert out.dtype == dtype and out.shape == x.shape
        xd, wd = x.double().requires_grad_(), w.double().requires_grad_()
        want = ref.rms_norm_silu_reference(xd, wd, 1e-6, dim=dim % x.dim(), silu=silu)
        assert rel_error(out, want) <= vt
        g = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(device)
        got = torch.autograd.grad(out, (a, wa), g.to(dtype))
        exp = torch.autograd.grad(want, (xd, wd), g)
        assert rel_error(got[0], exp[0], 0.1) <= gt and rel_error(got[1], exp[1], 0.1) <= gt


def test_rms_chunks_and_no_weight(monkeypatch):
    monkeypatch.setattr(norm_silu, "CHUNK_ELEMENTS", 50)
    gen = generator("rms-chunks")
    x = torch.randn(4, 5, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    for backend in sorted({"torch", "auto"}):
        for dim in (0, 1, 2):
            assert torch.autograd.gradcheck(lambda a: rms(a, None, dim=dim, backend=backend), (x,))


CPP = not backends.cpu_is_torch("group_norm_silu")
needs_cpp = pytest.mark.skipif(not CPP, reason="the extension has no C++ CPU kernels of the norm ops")


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpp_kernels_large_groups_and_rows(dtype):
    """The C++ CPU kernels past their buffers: a group of 80000 elements (blocks of 2048 merged; dy not kept between
    the backward's passes), a row of 3000 (two blocks) and one of 40000 (not kept) along a unit-stride dim."""
    gen = generator(f"cpp-large-{dtype}")
    x, w, b = make((1, 2, 200, 200), dtype, "cpu", gen, offset=2.0)
    check_group(("cpu", "cpu"), x, 1, w, b, gen=gen, scale=2)
    x, w, b = make((2, 8, 90, 100), dtype, "cpu", gen, layout="channels_last")
    check_group(("cpu", "cpu"), x, 2, w, b, gen=gen, scale=2)
    vt, gt = (2 * t for t in TOL[dtype])
    for shape, dim in (((2, 3000), 1), ((1, 40000), 1), ((3, 700, 5), 1)):
        x = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
        w = (torch.randn(shape[dim], generator=gen, dtype=torch.float64) + 1).to(dtype).requires_grad_()
        out = rms(x, w, dim=dim, backend="cpu")
        xd, wd = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
        want = ref.rms_norm_silu_reference(xd, wd, 1e-6, dim=dim)
        assert rel_error(out, want) <= vt
        g = torch.randn(shape, generator=gen, dtype=torch.float64)
        got, exp = torch.autograd.grad(out, (x, w), g.to(dtype)), torch.autograd.grad(want, (xd, wd), g)
        assert rel_error(got[0], exp[0], 0.1) <= gt and rel_error(got[1], exp[1], 0.1) <= gt


@needs_cpp
def test_cpp_ops_check_direct_calls():
    """torch.ops calls that skip the Python checks get one clear error, not a wrong read."""
    ops = torch.ops.fnf_kernels
    x = torch.randn(2, 6, 5)
    with pytest.raises(ValueError, match="num_groups must divide"):
        ops.group_norm_silu(x, None, None, 4, 1e-5, True)
    with pytest.raises(ValueError, match="weight must have shape"):
        ops.group_norm_silu(x, torch.ones(5), None, 2, 1e-5, True)
    out, mean, rstd = ops.group_norm_silu(x, None, None, 2, 1e-5, True)
    with pytest.raises(TypeError, match="mean and rstd must be"):
        ops.group_norm_silu_backward(out, x, None, None, mean.double(), rstd.double(), 2, True, True, False, False)
    with pytest.raises(ValueError, match="dim must be in"):
        ops.rms_norm_silu(x, None, 3, 1e-6, True)
    with pytest.raises(ValueError, match="must each merge"):
        ops.rms_norm_silu(torch.randn(4, 6, 5, 3)[:, :, ::2], None, 1, 1e-6, True)
    out, rstd = ops.rms_norm_silu(x, None, 1, 1e-6, True)
    with pytest.raises(ValueError, match="rstd must be contiguous"):
        ops.rms_norm_silu_backward(out, x, None, rstd[:1], 1, True, True, False)
    with pytest.raises(TypeError, match="grad must have x's dtype"):
        ops.rms_norm_silu_backward(out.double(), x, None, rstd, 1, True, True, False)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_torch_compile_fullgraph_matches_eager(backend):
    torch._dynamo.reset()
    gen = generator("gn-compile")
    x, w, b = make((2, 8, 5, 6), torch.float32, "cpu", gen, layout="channels_last")
    leaves = [t.requires_grad_() for t in (x, w, b)]

    def f(x, w, b):
        return gn(x, 4, w, b, backend=backend) * 2 + rms(x, w, dim=1, backend=backend)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(*leaves)
    got = torch.autograd.grad(out.sum(), leaves)
    want_out = f(*leaves)
    want = torch.autograd.grad(want_out.sum(), leaves)
    torch.testing.assert_close(out, want_out)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e)


def test_fake_tensors_say_what_is_saved():
    """Under FakeTensorMode (the memory estimator's tracing) the ops run and save x plus (N, G) statistics."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 64, 32, 32, dtype=torch.float16).requires_grad_()
        w, b = torch.ones(64), torch.zeros(64)
        out, saved = _saved(lambda: fnf_kernels.group_norm_silu(x, 32, w, b))
        assert out.shape == x.shape and out.dtype == torch.float16
        assert sum(t.numel() * t.element_size() for t in saved) == x.numel() * 2 + 2 * 2 * 32 * 4 + 2 * 64 * 4
        out.sum().backward()
        assert x.grad.shape == x.shape


def test_empty_inputs():
    for shape in ((0, 4, 3, 3), (2, 4, 0, 3)):
        x = torch.randn(shape, requires_grad=True)
        out = fnf_kernels.group_norm_silu(x, 2, torch.ones(4), None)
        assert out.shape == shape
        out.sum().backward()
    assert fnf_kernels.rms_norm_silu(torch.randn(0, 4), None, dim=1).shape == (0, 4)


def test_backend_selection():
    for op in ("group_norm_silu", "rms_norm_silu"):
        want = "torch" if backends.cpu_is_torch(op) else "cpu"  # the C++ kernel when the extension has it
        auto = "torch" if op == "group_norm_silu" else want  # the faster of the two, measured (RESULTS.md)
        assert backends.select(op, "auto", "cpu") == auto
        assert backends.select(op, "cpu", "cpu") == want
        assert backends.select(op, "auto", "cpu", torch.float64) == auto
    with pytest.raises(ValueError, match="backend='cuda'"):
        fnf_kernels.group_norm_silu(torch.randn(1, 2, 3), 1, backend="cuda")
    assert "group_norm_silu" in backends.info()


@pytest.mark.parametrize("call, exc, match", [
    (lambda: fnf_kernels.group_norm_silu([1.0], 1), TypeError, "x must be a torch.Tensor"),
    (lambda: fnf_kernels.group_norm_silu(torch.ones(2, 4, dtype=torch.int32), 1), TypeError, "x must have a floating"),
    (lambda: fnf_kernels.group_norm_silu(torch.ones(4), 1), ValueError, "x must have at least 2 dims"),
    (lambda: fnf_kernels.group_norm_silu(torch.ones(2, 6, 3), 4), ValueError, "num_groups must divide"),
    (lambda: fnf_kernels.group_norm_silu(torch.ones(2, 6, 3), 0), TypeError, "num_groups must be an int"),
    (lambda: fnf_kernels.group_norm_silu(torch.ones(2, 6, 3), 2.0), TypeError, "num_groups must be an int"),
    (lambda: fnf_kernels.group_norm_silu(torch.ones(2, 6, 3), 2, torch.ones(5)), ValueError, "weight must have shape"),
    (lambda: fnf_kernels.group_norm_silu(torch.ones(2, 6, 3), 2, None, torch.ones(6, 1)), ValueError, "bias must"),
    (lambda: fnf_kernels.group_norm_silu(torch.ones(2, 6, 3), 2, None, None, -1.0), ValueError, "eps must be"),
    (lambda: fnf_kernels.group_norm_silu(torch.ones(2, 6, 3), 2, None, None, float("nan")), ValueError, "eps"),
    (lambda: fnf_kernels.group_norm_silu(torch.ones(2, 6, 3), 2, silu=1), TypeError, "silu must be a bool"),
    (lambda: fnf_kernels.group_norm_silu(torch.ones(2, 6, 3), 2, backend="gpu"), ValueError, "backend must be"),
    (lambda: fnf_kernels.rms_norm_silu(torch.ones(2, 6), dim=2), ValueError, "dim must be in"),
    (lambda: fnf_kernels.rms_norm_silu(torch.ones(2, 6), dim=1.0), TypeError, "dim must be an int"),
    (lambda: fnf_kernels.rms_norm_silu(torch.ones(2, 6), torch.ones(2), dim=1), ValueError, "weight must have shape"),
    (lambda: fnf_kernels.rms_norm_silu(torch.ones(2, 6), torch.ones(6, dtype=torch.long), dim=1), TypeError,
     "weight must have a floating"),
])
def test_bad_input_is_a_clear_error(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_fuzz_against_reference():
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies

    @hypothesis.given(n=st.integers(1, 3), groups=st.integers(1, 5), cpg=st.integers(1, 4),
                      spatial=st.lists(st.integers(1, 9), min_size=0, max_size=2), channels_last=st.booleans(),
                      silu=st.booleans(), affine=st.booleans(), dtype=st.sampled_from(DTYPES),
                      backend=st.sampled_from([b for d, b in PAIRS if d == "cpu"]))
    @hypothesis.settings(max_examples=20, deadline=None)
    def run(n, groups, cpg, spatial, channels_last, silu, affine, dtype, backend):
        gen = torch.Generator().manual_seed(n * 1000 + groups * 100 + cpg)
        shape = (n, groups * cpg, *spatial)
        layout = "channels_last" if channels_last and len(spatial) == 2 else "contiguous"
        x, w, b = make(shape, dtype, "cpu", gen, layout=layout, affine=(affine, affine))
        # The backward's rounding grows with the group's 1/std (it multiplies terms that cancel; up to
        # 1/sqrt(eps) = 316 for a one-element group): the per-dtype tolerances are for 1/std <= 1.
        rstd = (x.double().reshape(n, groups, -1).var(-1, unbiased=False) + 1e-5).rsqrt().max().item()
        check_group(("cpu", backend), x, groups, w, b, silu=silu, gen=gen, scale=max(1.0, rstd))

    run()


# The Triton kernels compiled for sm_80 / sm_90 (through their launchers, every kernel, no spills): the norm_silu
# cases of tests/test_triton_compile.py.


def test_rms_fuzz_against_reference():
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    cpu_backends = [b for d, b in RMS_PAIRS if d == "cpu"]

    @hypothesis.given(shape=st.lists(st.integers(1, 7), min_size=1, max_size=4), data=st.data(),
                      channels_last=st.booleans(), silu=st.booleans(), affine=st.booleans(),
                      dtype=st.sampled_from(DTYPES), backend=st.sampled_from(cpu_backends))
    @hypothesis.settings(max_examples=25, deadline=None)
    def run(shape, data, channels_last, silu, affine, dtype, backend):
        dim = data.draw(st.integers(-len(shape), len(shape) - 1))
        gen = torch.Generator().manual_seed(sum(shape) * 100 + dim)
        x = torch.randn(shape, generator=gen, dtype=torch.float64)
        if channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        x = x.to(dtype).requires_grad_()
        w = ((torch.randn(shape[dim], generator=gen, dtype=torch.float64) + 1).to(dtype).requires_grad_()
             if affine else None)
        out = rms(x, w, dim=dim, silu=silu, backend=backend)
        leaves = [t for t in (x, w) if t is not None]
        d64 = [t.detach().double().requires_grad_() for t in leaves]
        want = ref.rms_norm_silu_reference(d64[0], d64[1] if affine else None, 1e-6, dim=dim % x.dim(), silu=silu)
        # rounding grows with 1/rms of a row (a one-element row of a tiny value cancels), as for group norm
        scale = max(1.0, float((d64[0].detach().pow(2).mean(dim % x.dim()) + 1e-6).rsqrt().max()))
        vt, gt = (t * scale for t in TOL[dtype])
        assert rel_error(out, want) <= vt
        g = torch.randn(x.shape, generator=gen, dtype=torch.float64)
        got = torch.autograd.grad(out, leaves, g.to(dtype))
        exp = torch.autograd.grad(want, d64, g)
        for a, e in zip(got, exp):
            assert rel_error(a, e, 0.1) <= gt

    run()
