"""lora_linear vs peft LoRA Linear, per-sample scale, Triton kernels (interpreter on CPU), bad inputs, opcheck."""
import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:  # Triton kernels run under the CPU interpreter; must be set before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402

from fnf_kernels.backends import select  # noqa: E402
from fnf_kernels.lora import lora_linear, lora_linear_reference  # noqa: E402

peft = pytest.importorskip("peft")
DEV = "cuda" if CUDA else "cpu"


def _triton_module():
    try:
        from fnf_kernels.triton_kernels import lora_linear as tk
    except ImportError as exc:  # pragma: no cover
        pytest.skip(f"triton unavailable: {exc}")
    if not CUDA and type(tk._down_kernel).__name__ != "InterpretedFunction":
        pytest.skip("triton kernels were imported without TRITON_INTERPRET=1 and there is no GPU")
    return tk


@pytest.fixture
def tk():
    mod = _triton_module()
    mod._OVERRIDE.clear()
    yield mod
    mod._OVERRIDE.clear()


def _peft_linear(in_f, out_f, r, alpha, dtype, device, bias=True, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential()
    model.add_module("proj", torch.nn.Linear(in_f, out_f, bias=bias))
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["proj"], lora_dropout=0.0)
    model = peft.inject_adapter_in_model(cfg, model)
    layer = model.proj
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.5)  # peft inits B = 0: make the LoRA path count
    layer.base_layer.requires_grad_(False)
    return layer.to(device=device, dtype=dtype)


def _parts(layer):
    base = layer.base_layer
    return (base.weight, base.bias, layer.lora_A["default"].weight, layer.lora_B["default"].weight,
            layer.scaling["default"])


def _tol(dtype):
    return {torch.float64: dict(atol=1e-10, rtol=1e-9), torch.float32: dict(atol=2e-4, rtol=2e-4),
            torch.float16: dict(atol=3e-2, rtol=3e-2), torch.bfloat16: dict(atol=1.5e-1, rtol=5e-2)}[dtype]


def _check_against_peft(in_f, out_f, r, dtype, device, backend, lead=(3, 5)):
    layer = _peft_linear(in_f, out_f, r, 2 * r if r > 1 else 3, dtype, device)
    w, b, a, bb, scaling = _parts(layer)
    x = torch.randn(*lead, in_f, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn(*lead, out_f, device=device, dtype=dtype)
    y_ref = layer(x)
    gx_ref, ga_ref, gb_ref = torch.autograd.grad(y_ref, (x, a, bb), g)
    y = lora_linear(x, w, b, a, bb, scaling, backend=backend)
    gx, ga, gb = torch.autograd.grad(y, (x, a, bb), g)
    tol = _tol(dtype)
    torch.testing.assert_close(y, y_ref, **tol)
    torch.testing.assert_close(gx, gx_ref, **tol)
    scale = max(1.0, ga_ref.abs().max().item())  # dA/dB sum over all rows: compare relative to their size
    torch.testing.assert_close(ga / scale, ga_ref / scale, **tol)
    scale = max(1.0, gb_ref.abs().max().item())
    torch.testing.assert_close(gb / scale, gb_ref / scale, **tol)


SIZES = [(37, 29, 1), (19, 45, 7), (50, 33, 16), (23, 70, 128)]


@pytest.mark.parametrize("in_f,out_f,r", SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_path_matches_peft(in_f, out_f, r, dtype):
    _check_against_peft(in_f, out_f, r, dtype, "cpu", "cpu")


@pytest.mark.parametrize("in_f,out_f,r", [(37, 29, 1), (19, 45, 7), (23, 40, 33)])
def test_triton_matches_peft(tk, in_f, out_f, r):
    _check_against_peft(in_f, out_f, r, torch.float32, DEV, "triton", lead=(2, 9))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="float16/bfloat16 Triton kernels need a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("in_f,out_f,r", SIZES + [(320, 320, 64), (768, 320, 4)])
def test_triton_half_matches_peft_gpu(in_f, out_f, r, dtype):
    _check_against_peft(in_f, out_f, r, dtype, "cuda", "triton", lead=(2, 77))


@pytest.mark.parametrize("backend", ["cpu", "reference", "triton"])
def test_per_sample_scale_matches_separate_runs(backend, request):
    if backend == "triton":
        request.getfixturevalue("tk")
    device = DEV if backend == "triton" else "cpu"
    torch.manual_seed(1)
    in_f, out_f, r = 21, 19, 5
    x = torch.randn(4, 6, in_f, device=device)
    w, b = torch.randn(out_f, in_f, device=device), torch.randn(out_f, device=device)
    a = torch.randn(r, in_f, device=device, requires_grad=True)
    bb = torch.randn(out_f, r, device=device, requires_grad=True)
    s = torch.tensor([0.0, 1.0, 0.5, -2.0], device=device)
    g = torch.randn(4, 6, out_f, device=device)
    y = lora_linear(x, w, b, a, bb, s, backend=backend)
    ga, gb = torch.autograd.grad(y, (a, bb), g)
    ga_sum, gb_sum = torch.zeros_like(a), torch.zeros_like(bb)
    for i in range(4):
        yi = lora_linear(x[i:i + 1], w, b, a, bb, float(s[i]), backend=backend)
        torch.testing.assert_close(y[i:i + 1], yi, atol=1e-5, rtol=1e-5)
        gai, gbi = torch.autograd.grad(yi, (a, bb), g[i:i + 1])
        ga_sum += gai
        gb_sum += gbi
    torch.testing.assert_close(ga, ga_sum, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gb, gb_sum, atol=1e-4, rtol=1e-4)
    # scale 0: exactly the base layer, and those rows add nothing to the LoRA gradients
    torch.testing.assert_close(y[0], F.linear(x[0], w, b), atol=1e-6, rtol=1e-6)
    ga0, gb0 = torch.autograd.grad(lora_linear(x[:1], w, b, a, bb, s[:1], backend=backend), (a, bb), g[:1])
    assert ga0.abs().max() == 0 and gb0.abs().max() == 0


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("groups", [2, 3])
def test_groups_match_separate_projections(backend, groups, request):
    """Grouped (fused q, k, v) lora_linear = G separate LoRA linears concatenated, values and all gradients."""
    if backend == "triton":
        request.getfixturevalue("tk")
    device = DEV if backend == "triton" else "cpu"
    torch.manual_seed(2)
    in_f, og, rg = 27, 22, 6
    x = torch.randn(3, 5, in_f, device=device, requires_grad=True)
    ws = [torch.randn(og, in_f, device=device, requires_grad=True) for _ in range(groups)]
    bs = [torch.randn(og, device=device, requires_grad=True) for _ in range(groups)]
    As = [torch.randn(rg, in_f, device=device, requires_grad=True) for _ in range(groups)]
    Bs = [torch.randn(og, rg, device=device, requires_grad=True) for _ in range(groups)]
    s = torch.tensor([1.0, 0.0, 0.25], device=device)
    y = lora_linear(x, torch.cat(ws), torch.cat(bs), torch.cat(As), torch.cat(Bs), s, groups=groups, backend=backend)
    y_ref = torch.cat([lora_linear_reference(x, w, b_, a, bb, s) for w, b_, a, bb in zip(ws, bs, As, Bs)], -1)
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
    g = torch.randn_like(y)
    leaves = [x] + ws + bs + As + Bs
    for got, want in zip(torch.autograd.grad(y, leaves, g), torch.autograd.grad(y_ref, leaves, g)):
        torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("down", ["separate", "fused"])
@pytest.mark.parametrize("case", ["bias_scale_tensor", "no_bias_float", "frozen_x", "train_weight", "split",
                                  "strided"])
def test_triton_kernel_variants(tk, down, case):
    """Both forward variants (x Aᵀ in the main kernel or before it) and the backward kernels, against the spec."""
    tk._OVERRIDE["down"] = down
    if case == "split":
        tk._OVERRIDE["split"] = 3
    torch.manual_seed(3)
    m_lead, in_f, out_f, r, groups = (4, 7), 35, 42, 9, 1
    if case == "no_bias_float":
        groups, out_f = 3, 45
    x = torch.randn(*m_lead, in_f, device=DEV, requires_grad=case != "frozen_x")
    w = torch.randn(out_f, in_f, device=DEV, requires_grad=case == "train_weight")
    b = None if case == "no_bias_float" else torch.randn(out_f, device=DEV, requires_grad=case == "train_weight")
    a = torch.randn(r * groups, in_f, device=DEV, requires_grad=True)
    bb = torch.randn(out_f, r, device=DEV, requires_grad=True)
    if case == "strided":
        x = torch.randn(in_f, *m_lead, device=DEV).permute(1, 2, 0).requires_grad_()
        w = torch.randn(in_f, out_f, device=DEV).t()
        a = torch.randn(in_f, r, device=DEV).t().requires_grad_()
    scale = 0.75 if case == "no_bias_float" else torch.tensor([0.5, 0.0, 1.0, 2.0], device=DEV)
    y = lora_linear(x, w, b, a, bb, scale, groups=groups, backend="triton")
    y_ref = lora_linear_reference(x, w, b, a, bb, scale, groups=groups)
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
    leaves = [t for t in (x, w, b, a, bb) if t is not None and t.requires_grad]
    g = torch.randn_like(y)
    for got, want in zip(torch.autograd.grad(y, leaves, g), torch.autograd.grad(y_ref, leaves, g)):
        torch.testing.assert_close(got, want, atol=3e-4, rtol=3e-4)


def test_saves_only_what_backward_needs():
    """Frozen W and b, x without grad: backward needs x (dA), B (dA), xs (dB) — never W, A, b or the output."""
    torch.manual_seed(4)
    x, w, b = torch.randn(6, 10), torch.randn(8, 10), torch.randn(8)
    a, bb = torch.randn(3, 10, requires_grad=True), torch.randn(8, 3, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = lora_linear(x, w, b, a, bb, 0.5, backend="cpu")
    shapes = sorted(tuple(t.shape) for t in saved)
    assert shapes == sorted([(6, 10), (8, 3), (6, 3)]), shapes
    assert not any(t.data_ptr() == w.data_ptr() for t in saved)
    y.sum().backward()
    assert a.grad is not None and bb.grad is not None


def test_weight_and_bias_grads_only_when_required():
    torch.manual_seed(5)
    x = torch.randn(5, 11, requires_grad=True)
    w, b = torch.randn(7, 11, requires_grad=True), torch.randn(7, requires_grad=True)
    a, bb = torch.randn(2, 11, requires_grad=True), torch.randn(7, 2, requires_grad=True)
    y = lora_linear(x, w, b, a, bb, 1.5, backend="cpu")
    y_ref = lora_linear_reference(x, w, b, a, bb, 1.5)
    g = torch.randn_like(y)
    for got, want in zip(torch.autograd.grad(y, (x, w, b, a, bb), g), torch.autograd.grad(y_ref, (x, w, b, a, bb), g)):
        torch.testing.assert_close(got, want)


def test_opcheck_torch_op():
    torch.manual_seed(6)
    x = torch.randn(12, 9, requires_grad=True)
    w, b = torch.randn(8, 9), torch.randn(8)
    a, bb = torch.randn(4, 9, requires_grad=True), torch.randn(8, 2, requires_grad=True)
    op = torch.ops.fnf_kernels.lora_linear_torch
    torch.library.opcheck(op, (x, w, b, a, bb, torch.rand(3), 0.5, 4, 2))
    torch.library.opcheck(op, (x, w, None, a[:2], bb, None, 2.0, 12, 1))


def test_opcheck_triton_op(tk):
    torch.manual_seed(7)
    x = torch.randn(12, 9, device=DEV, requires_grad=True)
    w, b = torch.randn(8, 9, device=DEV), torch.randn(8, device=DEV)
    a = torch.randn(4, 9, device=DEV, requires_grad=True)
    bb = torch.randn(8, 2, device=DEV, requires_grad=True)
    op = torch.ops.fnf_kernels.triton_lora_linear
    torch.library.opcheck(op, (x, w, b, a, bb, torch.rand(3, device=DEV), 0.5, 4, 2))


def _args():
    torch.manual_seed(8)
    return dict(x=torch.randn(2, 3, 6), weight=torch.randn(5, 6), bias=torch.randn(5), lora_A=torch.randn(2, 6),
                lora_B=torch.randn(5, 2), scale=1.0)


BAD = [
    (dict(x=[1.0]), TypeError, "x must be a torch.Tensor"),
    (dict(x=torch.ones(2, 3, 6, dtype=torch.int64)), TypeError, "x must have a floating dtype"),
    (dict(x=torch.randn(2, 3, 7)), ValueError, "x's last dimension must be weight's in_features 6"),
    (dict(weight=torch.randn(5, 6, 1)), ValueError, "weight must be 2-D"),
    (dict(bias=torch.randn(4)), ValueError, "bias must be None or 1-D"),
    (dict(bias=torch.randn(5, dtype=torch.float64)), TypeError, "bias must have x's dtype"),
    (dict(lora_A=torch.randn(2, 5)), ValueError, r"lora_A must be 2-D \(rank, in_features\)"),
    (dict(lora_B=torch.randn(5, 3)), ValueError, r"lora_B must be 2-D \(out_features, rank / groups\)"),
    (dict(lora_B=torch.randn(5, 2, dtype=torch.float64)), TypeError, "lora_B must have x's dtype"),
    (dict(scale="1"), TypeError, "scale must be a float or a"),
    (dict(scale=True), TypeError, "scale must be a float or a"),
    (dict(scale=torch.ones(3)), ValueError, r"scale must be a float, a 0-d tensor or a \(B,\) tensor with B = "),
    (dict(scale=torch.ones(2, dtype=torch.int32)), TypeError, "scale must be a float or a floating"),
    (dict(groups=0), ValueError, "groups must be an int >= 1"),
    (dict(groups=2, weight=torch.randn(6, 6), bias=None, lora_B=torch.randn(6, 2)), ValueError,
     r"lora_B must be 2-D \(out_features, rank / groups\) = \(6, 1\)"),
    (dict(groups=2, lora_A=torch.randn(3, 6)), ValueError, "rank 3 must be divisible by groups=2"),
    (dict(groups=3, lora_A=torch.randn(3, 6)), ValueError, "out_features 5 must be divisible by groups=3"),
    (dict(backend="gpu"), ValueError, "backend must be one of"),
    (dict(backend="cuda"), ValueError, "no CUDA C\\+\\+ kernel"),
]


@pytest.mark.parametrize("change,exc,match", BAD)
def test_bad_inputs(change, exc, match):
    args = _args()
    args.update(change)
    with pytest.raises(exc, match=match):
        lora_linear(**args)


def test_backend_selection(monkeypatch):
    args = _args()
    if not CUDA:
        with pytest.raises(ValueError, match="backend='cpu'|cannot run"):
            select("lora_linear", "cpu", torch.device("cuda"), torch.float32)
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match="Triton needs CUDA tensors"):
            lora_linear(**args, backend="triton")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert select("lora_linear", "auto", torch.device("cpu"), torch.float32) == "torch"
    with pytest.raises(TypeError, match="float64"):
        select("lora_linear", "triton", torch.device(DEV), torch.float64)
    y = lora_linear(**args)
    ref = lora_linear_reference(*(args[k] for k in ("x", "weight", "bias", "lora_A", "lora_B", "scale")))
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(lora_linear(**args, backend="reference"), ref)


def test_property_cpu_path_matches_reference():
    """Random odd sizes, ranks 1..128, groups, float or per-sample scale: the plain-torch op equals the spec."""
    hyp = pytest.importorskip("hypothesis")
    st = hyp.strategies

    @hyp.given(m=st.integers(1, 6), t=st.integers(1, 5), k=st.integers(1, 40), og=st.integers(1, 30),
               rg=st.integers(1, 128), groups=st.integers(1, 3), per_sample=st.booleans(), bias=st.booleans(),
               seed=st.integers(0, 2**16))
    @hyp.settings(max_examples=25, deadline=None)
    def check(m, t, k, og, rg, groups, per_sample, bias, seed):
        gen = torch.Generator().manual_seed(seed)
        n, r = og * groups, rg * groups
        x = torch.randn(m, t, k, generator=gen, dtype=torch.float64, requires_grad=True)
        w = torch.randn(n, k, generator=gen, dtype=torch.float64, requires_grad=True)
        b = torch.randn(n, generator=gen, dtype=torch.float64, requires_grad=True) if bias else None
        a = torch.randn(r, k, generator=gen, dtype=torch.float64, requires_grad=True)
        bb = torch.randn(n, rg, generator=gen, dtype=torch.float64, requires_grad=True)
        s = torch.randn(m, generator=gen, dtype=torch.float64) if per_sample else 0.3
        y = lora_linear(x, w, b, a, bb, s, groups=groups, backend="cpu")
        y_ref = lora_linear_reference(x, w, b, a, bb, s, groups=groups)
        torch.testing.assert_close(y, y_ref)
        leaves = [v for v in (x, w, b, a, bb) if v is not None]
        g = torch.randn(y.shape, generator=gen, dtype=torch.float64)
        for got, want in zip(torch.autograd.grad(y, leaves, g), torch.autograd.grad(y_ref, leaves, g)):
            torch.testing.assert_close(got, want)

    check()
