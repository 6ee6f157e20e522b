"""Build focus-n-fix: the pure-Python packages plus one torch C++ extension, fnf_kernels._C.

Environment:
  FNF_CUDA=auto|0|1      build the CUDA kernels: auto (default) when torch has CUDA and a matching toolkit is
                         found (CUDA_HOME, CUDA_PATH, nvcc on PATH, /usr/local/cuda; csrc/cuda_toolkit.py), with a
                         warning saying why when it is not; 1 stops with that reason instead.
  TORCH_CUDA_ARCH_LIST   GPU architectures; default: the visible GPUs, or 8.0;8.6;8.9;9.0+PTX when none.
  MAX_JOBS               parallel compile jobs (ninja).
  FNF_NO_EXTENSION=1     skip the extension entirely (the ops fall back to Triton / torch); recorded in
                         fnf_kernels/_build.json so that importing does not warn about a choice the user made.

`pip install .` (also -e, git+URL) builds against the torch already installed: the in-tree backend
_build_backend/fnf_backend.py hands that torch to this file inside pip's isolated build (README, Install).
"""
import glob
import json
import os

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;8.6;8.9;9.0+PTX"


def _cuda_toolkit():
    """The CUDA toolkit to build with, or None (CPU kernels only); FNF_CUDA=1 stops when there is none.

    torch's own guess (from where nvcc sits) fails for a wrapper such as /usr/local/bin/nvcc, so the folder is
    chosen here (csrc/cuda_toolkit.py) and handed to torch as CUDA_HOME before torch.utils.cpp_extension loads."""
    import sys
    import warnings

    import torch

    mode = os.environ.get("FNF_CUDA", "auto").lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"FNF_CUDA must be auto, 0 or 1; got {mode!r}")
    if mode == "0":
        return None
    if torch.version.cuda is None:
        if mode == "1":
            raise SystemExit(f"FNF_CUDA=1 but this torch ({torch.__version__}) is a CPU build (torch.version.cuda is "
                             "None): install a CUDA build of torch first")
        return None
    sys.path.insert(0, os.path.join(ROOT, "csrc"))
    from cuda_toolkit import find

    toolkit = find(torch.version.cuda)
    if toolkit.path is None:
        why = (f"no usable CUDA toolkit for torch {torch.__version__} (CUDA {torch.version.cuda}): tried "
               f"{toolkit.explain()}. Set CUDA_HOME to the toolkit folder (the one holding bin/nvcc and "
               "include/cuda_runtime_api.h)")
        if mode == "1":
            raise SystemExit(f"FNF_CUDA=1: {why}.")
        warnings.warn(f"focus-n-fix: building the CPU kernels only: {why}, or FNF_CUDA=0 to silence this.",
                      stacklevel=2)
        return None
    os.environ["CUDA_HOME"] = toolkit.path
    print(f"focus-n-fix: building CUDA kernels with the toolkit in {toolkit.path} (CUDA {toolkit.version})")
    return toolkit.path


def extensions():
    if os.environ.get("FNF_NO_EXTENSION") == "1":
        return [], {"build_py": BuildPy}
    try:
        import torch
    except ImportError:
        raise SystemExit("focus-n-fix builds its C++ extension against your installed torch, and this Python has "
                         "none: install torch first (README, Install), then run this install again; or set "
                         "FNF_NO_EXTENSION=1 to install without the compiled kernels") from None

    toolkit = _cuda_toolkit()  # sets CUDA_HOME, which cpp_extension reads when it is imported
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    rel = lambda pattern: sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))  # noqa: E731
    sources = rel("csrc/*.cpp") + rel("csrc/cpu/*.cpp")
    include = [os.path.join(ROOT, "csrc", "include")]
    openmp = ["-fopenmp"]
    cxx = ["-O3", *openmp]
    if toolkit is not None:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCHS
        sources += rel("csrc/cuda/*.cpp") + rel("csrc/cuda/*.cu")
        ext = CUDAExtension(
            "fnf_kernels._C", sources, include_dirs=include, define_macros=[("FNF_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo"]},
            extra_link_args=openmp,
        )
    else:
        ext = CppExtension("fnf_kernels._C", sources, include_dirs=include,
                           extra_compile_args={"cxx": cxx}, extra_link_args=openmp)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True), "build_py": BuildPy}


class BuildPy(build_py):
    """Also writes fnf_kernels/_build.json: whether the extension was skipped on purpose (FNF_NO_EXTENSION=1), so
    that fnf_kernels._extension warns only about an extension that should be there and is not."""

    def run(self):
        super().run()
        info = {"extension": os.environ.get("FNF_NO_EXTENSION") != "1"}
        folder = (os.path.join(ROOT, "fnf_kernels") if getattr(self, "editable_mode", False)
                  else os.path.join(self.build_lib, "fnf_kernels"))
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "_build.json"), "w", encoding="utf-8") as f:
            json.dump(info, f)


ext_modules, cmdclass = extensions()

setup(
    name="focus-n-fix",
    version="0.1.0",
    description="Fused GPU kernels and a lean trainer for local reward fine-tuning of diffusion models "
                "(Focus-N-Fix, DRaFT-K, Separate-and-Enhance)",
    long_description=open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    if os.path.exists(os.path.join(ROOT, "README.md")) else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",  # torch 2.11's own floor
    packages=find_packages(include=["fnf_kernels", "fnf_kernels.*", "fnf", "fnf.*"]),
    include_package_data=True,
    package_data={"fnf": ["assets/**/*"]},
    # Floors are the versions `make floor-check` installs together (ci/floors.txt), builds the C++ extension against
    # and runs the kernel and fnf tests on (tests/test_floors.py checks what they can do). torch 2.11 / triton 3.6 is
    # what the GPU machines carry (torch.library.custom_op + register_fake/register_autograd, opcheck, FSDP2's
    # torch.distributed.fsdp.fully_shard are all older than that); diffusers 0.34 is the first with LoRA adapter
    # metadata (save_lora_weights / lora_state_dict); transformers 4.48 fails bf16 CLIP text encoding (causal mask
    # overflow), 4.53 passes.
    # triton is not a plain requirement: PyPI's CUDA builds of torch for Linux already require the triton they were
    # built with (torch 2.11: triton==3.6.0), and a CPU torch cannot run Triton kernels, so requiring it here would
    # only download ~300 MB for CPU users. The `triton` extra is for a CUDA torch that came without it.
    install_requires=[
        "torch>=2.11.0",
        "numpy>=1.26.4",
    ],
    extras_require={
        "triton": ["triton>=3.6.0; platform_system == 'Linux'"],
        "train": ["diffusers>=0.34.0", "peft>=0.15.0", "accelerate>=1.0.0", "transformers>=4.53.0",
                  "safetensors>=0.4.3", "tqdm>=4.66.0", "PyYAML>=6.0", "matplotlib>=3.8.0", "Pillow>=10.0.0"],
        # triton: the suite runs the Triton kernels on CPU under TRITON_INTERPRET=1
        "test": ["pytest>=8.0.0", "hypothesis>=6.100.0", "pytest-benchmark", "expecttest>=0.2.1", "onnx>=1.16.0",
                 "onnxruntime>=1.17.0", "triton>=3.6.0; platform_system == 'Linux'"],
        "bench": ["pytest-benchmark", "kornia"],
        # boxes:PATH.onnx localizers (ONNX box detectors); onnx 1.16 / onnxruntime 1.17 run with numpy 1.26.4
        "boxes": ["onnxruntime>=1.17.0"],
    },
    entry_points={"console_scripts": ["fnf=fnf.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
