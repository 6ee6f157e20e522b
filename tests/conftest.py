"""Test setup: Triton runs under its CPU interpreter when there is no GPU; no hub downloads ever; hypothesis is
derandomized (the same examples on every machine and every run) unless HYPOTHESIS_PROFILE=dev."""
import os
import re

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HYPOTHESIS_PROFILE", "ci")
HYPOTHESIS_SEED = 20261201   # the ci profile's fixed seed (printed in the report header)

try:
    from hypothesis import settings

    # ci (default): derandomized, the same examples everywhere, so a run's verdict does not depend on the machine.
    settings.register_profile("ci", deadline=None, max_examples=25, derandomize=True, print_blob=True,
                              database=None)
    # dev: fresh random examples each run (hypothesis prints the seed to reproduce a failure).
    settings.register_profile("dev", deadline=None, max_examples=50, print_blob=True)
    settings.load_profile(os.environ["HYPOTHESIS_PROFILE"])
except ImportError:  # hypothesis is a test dependency; tests that need it import it themselves
    settings = None


def pytest_configure(config):
    if settings is not None and os.environ["HYPOTHESIS_PROFILE"] == "ci" and hasattr(config.option, "hypothesis_seed"):
        if config.option.hypothesis_seed is None:
            config.option.hypothesis_seed = HYPOTHESIS_SEED


# The fnf_kernels tests (ops vs their references on every backend, the CUDA build and its emulation), marked `kernels`
# so that the GPU proof (benchmarks/gpu_proof.sh) and `-m kernels` select them by marker: a module whose name matches
# below, any test module under a folder named kernels/ or fnf_kernels/, or one that imports fnf_kernels and not fnf
# (a new kernel test file is picked up without a list to update). A module may also set
# `pytestmark = pytest.mark.kernels` itself.
KERNEL_TEST_MODULE = re.compile(r"test_(api|penalty|dilation|attention_losses|lora_linear|lora_attention|triton_\w+|"
                                r"cuda_\w+|selftest\w*|kernels?_\w+)\.py$")
KERNEL_TEST_DIRS = {"kernels", "fnf_kernels"}
_IMPORTS_KERNELS = re.compile(r"^\s*(import fnf_kernels|from fnf_kernels[\s.])", re.M)
_IMPORTS_FNF = re.compile(r"^\s*(import fnf\b(?!_)|from fnf[\s.])", re.M)
_kernel_modules: dict = {}


def _is_kernel_module(path) -> bool:
    if path not in _kernel_modules:
        kernel = bool(KERNEL_TEST_MODULE.fullmatch(path.name)) or bool(KERNEL_TEST_DIRS & set(path.parent.parts))
        if not kernel:
            try:
                text = path.read_text(encoding="utf-8")
            except OSError:
                text = ""
            kernel = bool(_IMPORTS_KERNELS.search(text)) and not _IMPORTS_FNF.search(text)
        _kernel_modules[path] = kernel
    return _kernel_modules[path]


def pytest_collection_modifyitems(config, items):
    for item in items:
        path = getattr(item, "path", None)
        if path is not None and path.suffix == ".py" and _is_kernel_module(path):
            item.add_marker(pytest.mark.kernels)


def pytest_report_header(config):
    if settings is None:
        return "hypothesis: not installed"
    p = settings.default
    seed = getattr(config.option, "hypothesis_seed", None)
    return (f"hypothesis profile {os.environ['HYPOTHESIS_PROFILE']!r}: derandomize={p.derandomize}, "
            f"max_examples={p.max_examples}, seed={seed}")
