"""group_norm_silu / rms_norm_silu: every backend against the float64 reference (values and gradients), what the
autograd saves, torch.compile, fuzzing, bad input, and the Triton kernels compiled for sm_80 / sm_90."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fnf_kernels
from fnf_kernels import backends, norm_silu
from fnf_kernels import references as ref

SEED = 20261207
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
PAIRS = [(d, b) for d in DEVICES for b, (ok, _) in backends.op_availability("group_norm_silu", d).items()
         if ok and b in ("cuda", "triton", "cpu")]
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


def check_group(pair, x, groups, w, b, silu=True, gen=None, scale=1.0):
    """Values and gradients of one backend against autograd through the float64 reference (tolerances times
    ``scale``, the condition number of an input whose mean dwarfs its spread)."""
    device, backend = pair
    vt, gt = (t * scale for t in TOL[x.dtype])
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b)]
    out = fnf_kernels.group_norm_silu(leaves[0], groups, leaves[1], leaves[2], 1e-5, silu=silu, backend=backend)
    assert out.dtype == x.dtype and out.shape == x.shape
    if x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)):
        assert out.stride() == x.stride(), "the output keeps x's layout"
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
    assert torch.autograd.gradcheck(lambda *a: fnf_kernels.group_norm_silu(a[0], 2, a[1], a[2], backend=backend),
                                    args, fast_mode=backend != "cpu")
    xr = torch.randn(2, 5, 3, generator=gen, dtype=torch.float64).requires_grad_()
    wr = torch.randn(5, generator=gen, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, c: fnf_kernels.rms_norm_silu(a, c, dim=1, backend=backend), (xr, wr),
                                    fast_mode=backend != "cpu")


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
    out, saved = _saved(lambda: fnf_kernels.group_norm_silu(x, 4, w, b, backend=backend))
    big = [t for t in saved if t.numel() >= x.numel()]
    assert len(big) == 1 and big[0].data_ptr() == x.data_ptr() and big[0].dtype == dtype
    stats = [t for t in saved if t.shape == (2, 4)]
    assert len(stats) == 2 and all(t.dtype == torch.float32 for t in stats)
    assert sum(t.numel() for t in saved if t.data_ptr() != x.data_ptr()) <= 2 * 8 + 2 * 8  # stats + w, b
    eager, eager_saved = _saved(lambda: torch.nn.functional.silu(torch.nn.functional.group_norm(x, 4, w, b)))
    assert sum(t.numel() for t in eager_saved if t.numel() >= x.numel()) >= 2 * x.numel()


def test_rms_saves_only_the_input():
    x = torch.randn(2, 6, 4, 5, dtype=torch.bfloat16, requires_grad=True)
    _, saved = _saved(lambda: fnf_kernels.rms_norm_silu(x, torch.ones(6), dim=1))
    big = [t for t in saved if t.numel() >= x.numel()]
    assert len(big) == 1 and big[0].data_ptr() == x.data_ptr()
    assert [t.dtype for t in saved if t.shape == (2, 4, 5)] == [torch.float32]


RMS_PAIRS = [(d, b) for d in DEVICES for b, (ok, _) in backends.op_availability("rms_norm_silu", d).items()
             if ok and b in ("triton", "cpu")]


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
        out = fnf_kernels.rms_norm_silu(a, wa, 1e-6, dim=dim, silu=silu, backend=backend)
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
    for dim in (0, 1, 2):
        assert torch.autograd.gradcheck(lambda a: fnf_kernels.rms_norm_silu(a, None, dim=dim), (x,))


def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    gen = generator("gn-compile")
    x, w, b = make((2, 8, 5, 6), torch.float32, "cpu", gen, layout="channels_last")
    leaves = [t.requires_grad_() for t in (x, w, b)]

    def f(x, w, b):
        return fnf_kernels.group_norm_silu(x, 4, w, b) * 2 + fnf_kernels.rms_norm_silu(x, None, dim=1)

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
    assert backends.select("group_norm_silu", "auto", "cpu") == "torch"
    assert backends.select("group_norm_silu", "cpu", "cpu") == "torch"
    assert backends.select("rms_norm_silu", "auto", "cpu") == "torch"
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


# ------------------------------------------------------------------------------- Triton: compiled for sm_80 / sm_90
_COMPILE = textwrap.dedent("""
    import contextlib, io, json, re, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from fnf_kernels.triton_kernels import norm_silu as k
    out = []
    for arch in (80, 90):
        for dt, acc in (("fp32", "fp32"), ("bf16", "fp32"), ("fp16", "fp32"), ("fp64", "fp64")):
            for name, bc, bs in (("contiguous", 2, 1024), ("channels_last", 64, 32)):
                p = "*" + dt
                i = "i32"
                flags = dict(HAS_W=True, HAS_B=True, SILU=True)
                base = dict(ACC=getattr(triton.language, {"fp32": "float32", "fp64": "float64"}[acc]),
                            BLOCK_C=bc, BLOCK_S=bs)
                kernels = [
                    (k._stats_kernel, ["x", "m", "v"], 7, {}),
                    (k._apply_kernel, ["x", "o", "m", "r", "w", "b"], 12, flags),
                    (k._bwd_sums_kernel, ["x", "g", "m", "r", "w", "b", "s1", "s2"], 12, flags),
                    (k._bwd_dx_kernel, ["x", "g", "d", "m", "r", "w", "b", "ca", "cb"], 15, flags),
                ]
                rms = dict(HAS_W=True, SILU=True, ACC=base["ACC"], BLOCK_D=16 if name == "contiguous" else 64,
                           BLOCK_I=128 if name == "contiguous" else 32)
                kernels += [
                    (k._rms_fwd_kernel, ["x", "o", "r", "w"], 10, rms),
                    (k._rms_bwd_kernel, ["x", "g", "r", "w", "d", "p"], 12, {**rms, "NEED_X": True, "NEED_W": True}),
                ]
                for fn, ptrs, ints, fl in kernels:
                    fl = {**base, **fl} if fn.__name__.startswith("_rms") else fl
                    sig, consts = {}, {}
                    names = list(fn.arg_names)
                    for j, a in enumerate(names):
                        if a == "eps":
                            sig[a] = "fp32"
                        elif j < len(ptrs):
                            sig[a] = p if ptrs[j] in ("x", "o", "g", "d") else ("*" + acc if ptrs[j] not in ("w", "b")
                                                                               else p)
                        elif j < len(ptrs) + ints:
                            sig[a] = i
                        else:
                            sig[a] = "constexpr"
                            consts[a] = fl[a] if fn.__name__.startswith("_rms") else {**base, **fl}[a]
                    log = io.StringIO()
                    with contextlib.redirect_stdout(log):
                        ker = triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", arch, 32),
                                             options=dict(num_warps=8))
                    spills = [int(a) for a in re.findall(r"(\\d+) bytes spill stores", log.getvalue())]
                    out.append(dict(arch=arch, dtype=dt, layout=name, kernel=fn.__name__, spills=max(spills or [0]),
                                    cubin=len(ker.asm.get("cubin") or b"")))
    print("RESULT " + json.dumps(out))
""")


@pytest.mark.slow  # a few minutes: 96 compiles through ptxas
def test_triton_kernels_compile_for_sm80_sm90_without_spills(tmp_path):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path / "cache"), TRITON_DUMP_PTXAS_LOG="1")
    done = subprocess.run([sys.executable, "-c", _COMPILE], capture_output=True, text=True, timeout=900, env=env,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines and ("ptxas" in done.stderr and "not found" in done.stderr):
        pytest.skip("no ptxas here")
    assert lines, done.stderr[-4000:]
    results = json.loads(lines[0][7:])
    assert len(results) == 96
    assert all(r["cubin"] > 0 for r in results)
    assert [r for r in results if r["spills"]] == []
