"""pytest-benchmark versions of the op benchmarks: `pytest benchmarks --benchmark-only`.

Each group times our backends next to the baselines of the same run; compare within a group.
"""
import pytest
import torch

import fnf_kernels
from fnf_kernels.backends import availability

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _ours(device):
    return [name for name, (ok, _) in availability(device).items() if ok and name not in ("reference", "triton")
            or (ok and name == "triton" and device == "cuda")]


def _eager(x, r, m):
    d = (1 - m.clamp(0, 1)) * (r - x)
    return d.pow(2).flatten(1).sum(1).sqrt().mean()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("provider", ["eager", "reference", "cpu", "cuda", "triton"])
def test_penalty_fwd_bwd(benchmark, device, provider):
    if provider not in ("eager", "reference") and provider not in _ours(device):
        pytest.skip(f"{provider} not available for {device} tensors")
    shape = (8, 3, 512, 512) if device == "cpu" else (16, 3, 1024, 1024)
    x = torch.rand(shape, device=device, requires_grad=True)
    r = torch.rand(shape, device=device)
    m = (torch.rand(shape[0], 1, *shape[2:], device=device) > 0.3).float()
    benchmark.group = f"penalty fwd+bwd {device} {shape}"

    def run():
        x.grad = None
        if provider == "eager":
            out = _eager(x, r, m)
        else:
            out = fnf_kernels.masked_frobenius_penalty(x, r, m, backend=provider)
        out.backward()
        _sync()

    benchmark(run)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("radius", [1, 15, 63])
@pytest.mark.parametrize("provider", ["max_pool2d", "cpu", "cuda", "triton"])
def test_dilation(benchmark, device, radius, provider):
    if provider != "max_pool2d" and provider not in _ours(device):
        pytest.skip(f"{provider} not available for {device} tensors")
    if provider == "max_pool2d" and device == "cpu" and radius > 15:
        pytest.skip("max_pool2d at r=63 takes >10 s per call on CPU; bench_ops.py measures it once")
    hm = torch.rand(8, 512, 512, device=device)
    benchmark.group = f"dilation r={radius} {device}"

    def run():
        if provider == "max_pool2d":
            pooled = torch.nn.functional.max_pool2d(hm.unsqueeze(1), 2 * radius + 1, stride=1, padding=radius)
            (pooled.squeeze(1) > 0.99).float()
        else:
            fnf_kernels.threshold_dilate(hm, 0.99, radius, backend=provider)
        _sync()

    benchmark(run)
