"""fnf_kernels' shape: Triton modules that never import an op module, one module of references that imports nothing,
the ops under torch.compile(fullgraph=True). (No cycle and no in-function package import: tests/test_import_graph.py,
whose import graph of fnf/ and fnf_kernels/ these tests read too.)"""
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fnf_kernels  # noqa: E402
from fnf_kernels import references  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_import_graph import _graph  # noqa: E402


def test_triton_modules_never_import_op_modules():
    graph, _ = _graph()
    allowed = {"fnf_kernels._library", "fnf_kernels.references"}
    for name, edges in graph.items():
        if name.startswith("fnf_kernels.triton_kernels."):
            bad = {e for e in edges if not e.startswith("fnf_kernels.triton_kernels") and e not in allowed}
            assert not bad, f"{name} imports {bad}"


def test_leaves_import_nothing_from_the_package_but_leaves():
    graph, _ = _graph()
    assert graph["fnf_kernels.references"] == set()
    assert graph["fnf_kernels._library"] <= {"fnf_kernels.references"}


def test_every_op_has_its_reference_in_references():
    for name in ("penalty_norms", "masked_frobenius_penalty", "threshold_dilate", "separate_reference",
                 "enhance_reference", "smooth_reference", "lora_linear_reference"):
        assert callable(getattr(references, name))
    assert fnf_kernels.reference.penalty_norms is references.penalty_norms  # the old name still works
    assert fnf_kernels.lora.lora_linear_reference is references.lora_linear_reference
    assert fnf_kernels.attention_losses.enhance_reference is references.enhance_reference


def test_every_op_compiles_fullgraph_and_matches_eager():
    """torch.compile(fullgraph=True) over the four ops with backend="auto", values and gradients vs eager."""
    gen = torch.Generator().manual_seed(7)
    image = torch.rand(2, 3, 6, 7, generator=gen)
    ref_img = torch.rand(2, 3, 6, 7, generator=gen)
    heat = torch.rand(2, 6, 7, generator=gen)
    x = torch.randn(2, 5, 8, generator=gen)
    w, b = torch.randn(6, 8, generator=gen), torch.randn(6, generator=gen)
    a, bb = torch.randn(4, 8, generator=gen), torch.randn(6, 4, generator=gen)
    maps = torch.rand(2, 2, 2, 4, 5, generator=gen)

    def step(image, x, maps):
        mask = fnf_kernels.threshold_dilate(heat, 0.7, 1)
        pen = fnf_kernels.masked_frobenius_penalty(image, ref_img, mask)
        y = fnf_kernels.lora_linear(x, w, b, a, bb, torch.tensor([0.5, 1.0]))
        sep, en = fnf_kernels.separate_enhance_losses(maps)
        return pen + y.square().mean() + sep.sum() + en.sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    leaves_c = [t.clone().requires_grad_() for t in (image, x, maps)]
    leaves_e = [t.clone().requires_grad_() for t in (image, x, maps)]
    out_c, out_e = compiled(*leaves_c), step(*leaves_e)
    torch.testing.assert_close(out_c, out_e)
    out_c.backward()
    out_e.backward()
    for c, e in zip(leaves_c, leaves_e):
        torch.testing.assert_close(c.grad, e.grad)
