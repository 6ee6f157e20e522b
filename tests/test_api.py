"""Public API contract: bad input errors, custom-op registration (opcheck, torch.compile), fallbacks, info."""
import os
import subprocess
import sys

import pytest
import torch

import fnf_kernels
from fnf_kernels import _extension

HAS_EXT = _extension.load() is not None
needs_ext = pytest.mark.skipif(not HAS_EXT, reason="fnf_kernels._C is not built")


def ok_inputs():
    return torch.rand(2, 3, 8, 9), torch.rand(2, 3, 8, 9), torch.rand(2, 1, 8, 9)


@pytest.mark.parametrize("kwargs, exc, words", [
    (dict(image=[1.0]), TypeError, "image must be a torch.Tensor"),
    (dict(image=torch.ones(2, 3, 8, 9, dtype=torch.int64)), TypeError, "image must have a floating dtype"),
    (dict(image=torch.rand(3, 8, 9)), ValueError, "image must be 4-D"),
    (dict(reference=torch.rand(2, 3, 8, 8)), ValueError, "reference must have image's shape"),
    (dict(reference=torch.rand(2, 3, 8, 9, dtype=torch.float64)), TypeError, "reference must have image's dtype"),
    (dict(mask=torch.rand(2, 2, 8, 9)), ValueError, "mask of shape"),
    (dict(mask=torch.rand(2, 8)), ValueError, "mask must be 3-D"),
    (dict(mask=torch.ones(2, 8, 9, dtype=torch.int32)), TypeError, "mask must have a floating dtype"),
    (dict(reduction="max"), ValueError, "reduction must be one of"),
    (dict(squared="yes"), TypeError, "squared must be a bool"),
    (dict(backend="cudnn"), ValueError, "backend must be one of"),
    (dict(backend="cuda"), ValueError, "backend='cuda' cannot run on cpu tensors"),
])
def test_penalty_bad_input(kwargs, exc, words):
    image, reference, mask = ok_inputs()
    args = dict(image=image, reference=reference, mask=mask)
    opts = {k: kwargs.pop(k) for k in list(kwargs) if k in ("reduction", "squared", "backend")}
    args.update(kwargs)
    with pytest.raises(exc, match=words):
        fnf_kernels.masked_frobenius_penalty(args["image"], args["reference"], args["mask"], **opts)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_penalty_mismatched_devices():
    image, reference, mask = ok_inputs()
    with pytest.raises(ValueError, match="same device"):
        fnf_kernels.masked_frobenius_penalty(image.cuda(), reference, mask)


@pytest.mark.parametrize("args, kwargs, exc, words", [
    ((torch.rand(2, 5, 5), 0.5, -1), {}, ValueError, "radius must be >= 0"),
    ((torch.rand(2, 5, 5), 0.5, 1.5), {}, TypeError, "radius must be an int"),
    ((torch.rand(2, 5, 5), 0.5, True), {}, TypeError, "radius must be an int"),
    ((torch.rand(2, 5, 5), 0.5, 1), dict(shape="cross"), ValueError, "shape must be one of"),
    ((torch.rand(2, 5, 5), 0.5, 1), dict(dtype=torch.int32), TypeError, "dtype must be one of"),
    ((torch.rand(2, 2, 5, 5), 0.5, 1), {}, ValueError, "heatmap must be"),
    ((torch.rand(5, 5), 0.5, 1), {}, ValueError, "heatmap must be"),
    ((torch.ones(2, 5, 5, dtype=torch.uint8), 0.5, 1), {}, TypeError, "heatmap must have a floating dtype"),
    ((torch.rand(2, 5, 5), torch.rand(3), 1), {}, ValueError, "threshold must be a float or a tensor of shape"),
    ((torch.rand(2, 5, 5), "0.5", 1), {}, TypeError, "threshold must be a float"),
    ((torch.rand(2, 5, 5), torch.ones(2, dtype=torch.int64), 1), {}, TypeError, "threshold must be a float"),
    ((torch.rand(1, 1, 1).expand(1, 16384, 16384), 0.5, 1), {}, ValueError, "too large"),
])
def test_dilate_bad_input(args, kwargs, exc, words):
    with pytest.raises(exc, match=words):
        fnf_kernels.threshold_dilate(*args, **kwargs)


@needs_ext
def test_opcheck_compiled_ops():
    image, reference, mask = ok_inputs()
    image.requires_grad_()
    torch.library.opcheck(torch.ops.fnf_kernels.penalty_norms.default, (image, reference, mask, False))
    torch.library.opcheck(torch.ops.fnf_kernels.penalty_norms.default, (image, reference, mask, True))
    norms = torch.ops.fnf_kernels.penalty_norms(image.detach(), reference, mask, False)
    torch.library.opcheck(torch.ops.fnf_kernels.penalty_backward.default,
                          (torch.rand(2), image.detach(), reference, mask, norms, False))
    heatmap, threshold = torch.rand(2, 7, 9), torch.tensor([0.5, 0.7])
    torch.library.opcheck(torch.ops.fnf_kernels.threshold_dilate.default,
                          (heatmap, threshold, 2, True, torch.float32))


@needs_ext
def test_torch_compile_fullgraph():
    image, reference, mask = ok_inputs()
    heatmap = torch.rand(2, 8, 9)

    def step(x, r, h):
        m = fnf_kernels.threshold_dilate(h, 0.8, 1)
        return fnf_kernels.masked_frobenius_penalty(x, r, m, backend="cpu")

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x1 = image.clone().requires_grad_()
    x2 = image.clone().requires_grad_()
    out = compiled(x1, reference, heatmap)
    exp = step(x2, reference, heatmap)
    torch.testing.assert_close(out, exp)
    out.backward()
    exp.backward()
    torch.testing.assert_close(x1.grad, x2.grad)


def _run(code, **env):
    full_env = dict(os.environ, **env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=300)


def test_fallback_without_extension_warns_once_and_works():
    code = (
        "import warnings, torch\n"
        "warnings.simplefilter('always')\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import fnf_kernels\n"
        "    x = torch.rand(1, 3, 4, 4, requires_grad=True)\n"
        "    fnf_kernels.masked_frobenius_penalty(x, torch.rand(1, 3, 4, 4), torch.rand(1, 4, 4)).backward()\n"
        "    fnf_kernels.threshold_dilate(torch.rand(1, 4, 4), 0.5, 1)\n"
        "msgs = [str(w.message) for w in caught if 'compiled extension' in str(w.message)]\n"
        "print(len(msgs))\n"
        "from fnf_kernels.backends import select\n"
        "print(select('masked_frobenius_penalty', 'auto', torch.device('cpu')))\n"
    )
    result = _run(code, FNF_KERNELS_DISABLE_EXTENSION="1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["1", "reference"]


def test_info_command_lists_every_backend():
    result = subprocess.run([sys.executable, "-m", "fnf_kernels", "info"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    for word in ("masked_frobenius_penalty", "threshold_dilate", "cuda", "triton", "cpu", "reference"):
        assert word in result.stdout
    if HAS_EXT:
        assert "+ cpu" in result.stdout


def test_info_auto_lines_are_what_select_picks():
    """`python -m fnf_kernels info` prints, per op and device, exactly what backends.select("auto") returns."""
    import re

    from fnf_kernels import backends

    text = backends.info()
    for op in backends.OPS:
        block = text.split(f"\n{op}:\n", 1)[1].split("\n\n", 1)[0]
        for device_type in ("cuda", "cpu"):
            printed = re.search(rf"{device_type} tensors \(auto -> (\w+)", block).group(1)
            assert printed == backends.select(op, "auto", device_type)


def test_one_backend_selector_serves_every_op():
    """Each op's auto choice and explicit-backend errors come from backends.select (one table)."""
    from fnf_kernels import backends

    assert backends.select("lora_linear", "auto", "cpu") == "torch"
    assert backends.select("lora_linear", "cpu", "cpu") == "torch"
    assert backends.select("separate_enhance_losses", "auto", "cpu") == "reference"
    assert backends.select("masked_frobenius_penalty", "auto", "cpu") == ("cpu" if HAS_EXT else "reference")
    assert backends.select("lora_linear", "auto", "cuda", torch.float64) == "torch"
    with pytest.raises(ValueError, match="backend='cuda' cannot run on cpu tensors"):
        backends.select("threshold_dilate", "cuda", "cpu")
    with pytest.raises(ValueError, match="no CUDA C\\+\\+ kernel"):
        backends.select("lora_linear", "cuda", "cuda")
    with pytest.raises(ValueError, match="op must be one of"):
        backends.select("conv", "auto", "cpu")
    assert fnf_kernels.select_backend is backends.select
