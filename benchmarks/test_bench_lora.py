"""pytest-benchmark timings of lora_linear vs peft LoRA vs the base linear (GPU only; skipped without CUDA).

    pytest benchmarks/test_bench_lora.py --benchmark-group-by=param:shape
"""
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="lora benchmarks need a CUDA device")
pytest.importorskip("pytest_benchmark")

SHAPES = {"64sq-320": (2 * 4096, 320, 320), "32sq-640": (2 * 1024, 640, 640), "16sq-1280": (2 * 256, 1280, 1280),
          "cross-768-320": (2 * 77, 768, 320)}


def _setup(shape, r):
    from bench_lora import _peft_layer  # noqa: E402  (benchmarks/ is on sys.path)
    m, k, n = SHAPES[shape]
    torch.manual_seed(0)
    layer = _peft_layer(k, n, r, torch.bfloat16)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    return layer, x, g


def _timed(benchmark, fn):
    def run():
        fn()
        torch.cuda.synchronize()
    run()
    benchmark.pedantic(run, rounds=50, iterations=5, warmup_rounds=5)


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("r", [4, 16, 64])
@pytest.mark.parametrize("impl", ["base", "peft", "fused"])
def test_lora_linear_fwd_bwd(benchmark, shape, r, impl):
    from fnf_kernels import lora_linear
    layer, x, g = _setup(shape, r)
    w, a, b = layer.base_layer.weight, layer.lora_A["default"].weight, layer.lora_B["default"].weight
    s = layer.scaling["default"]
    benchmark.group = f"{shape} r={r}"
    fns = {"base": lambda: F.linear(x, w).backward(g),
           "peft": lambda: layer(x).backward(g),
           "fused": lambda: lora_linear(x, w, None, a, b, s).backward(g)}
    _timed(benchmark, fns[impl])
