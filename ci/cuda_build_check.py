"""Check a CUDA build of focus-n-fix without a GPU (run by `make cuda-build-check` with the CUDA torch venv).

Usage: python ci/cuda_build_check.py WHEEL  (the wheel must also be installed in this interpreter's venv; run it from
outside the source tree so that `import fnf_kernels` finds the installed copy).

Checks: torch is a CUDA build; the installed fnf_kernels._C loads, says built_with_cuda(), and every op of the
extension that has a CPU kernel also has a kernel for the CUDA dispatch key; the wheel's .so embeds device code for
every architecture asked for (cuobjdump --list-elf). Prints one line per check; exits 1 on the first failure.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile


def fail(message: str) -> None:
    print(f"FAIL {message}")
    raise SystemExit(1)


def ok(message: str) -> None:
    print(f"ok   {message}", flush=True)


def find_cuobjdump() -> str:
    """cuobjdump from PATH, the toolkit setup.py would pick, or the copy triton ships (a toolkit may lack it)."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc"))
    from cuda_toolkit import find

    import torch

    places = [shutil.which("cuobjdump")]
    toolkit = find(torch.version.cuda).path
    if toolkit:
        places.append(os.path.join(toolkit, "bin", "cuobjdump"))
    try:
        import triton
        places.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    for place in places:
        if place and os.path.isfile(place) and os.access(place, os.X_OK):
            return place
    fail(f"no cuobjdump found (looked in {places})")


def main(wheel: str, archs: str) -> None:
    import torch

    if torch.version.cuda is None:
        fail(f"torch {torch.__version__} is a CPU build")
    ok(f"torch {torch.__version__} (CUDA {torch.version.cuda}), GPU visible: {torch.cuda.is_available()}")
    import fnf_kernels
    from fnf_kernels import _extension

    if os.path.realpath(fnf_kernels.__file__).startswith(os.path.realpath(os.getcwd())):
        fail(f"fnf_kernels imported from the working directory ({fnf_kernels.__file__}), not the installed wheel")
    module = _extension.load()
    if module is None:
        fail(f"fnf_kernels._C does not load: {_extension.error()}")
    if not module.built_with_cuda():
        fail("fnf_kernels._C was built without its CUDA kernels")
    ok(f"fnf_kernels._C loads from {module.__file__}, built_with_cuda() = True")
    ops = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("fnf_kernels::"))
    compiled = [n for n in ops if torch._C._dispatch_has_kernel_for_dispatch_key(n, "CPU")]
    if not compiled:
        fail(f"no fnf_kernels op has a CPU kernel (ops: {ops})")
    missing = [n for n in compiled if not torch._C._dispatch_has_kernel_for_dispatch_key(n, "CUDA")]
    if missing:
        fail(f"ops without a CUDA kernel: {missing}")
    ok(f"{len(compiled)} compiled ops have CPU and CUDA kernels: {', '.join(compiled)}")
    with zipfile.ZipFile(wheel) as z:
        libs = [n for n in z.namelist() if re.match(r"fnf_kernels/_C.*\.so$", n)]
        if not libs:
            fail(f"{wheel} holds no fnf_kernels/_C*.so")
        with tempfile.TemporaryDirectory() as tmp:
            so = z.extract(libs[0], tmp)
            cuobjdump = find_cuobjdump()
            listing = subprocess.run([cuobjdump, "--list-elf", so], capture_output=True, text=True)
    found = sorted(set(re.findall(r"sm_(\d+)", listing.stdout)))
    wanted = sorted({a.replace(".", "").replace("+PTX", "") for a in re.split(r"[;\s]+", archs) if a})
    if listing.returncode != 0 or not set(wanted) <= set(found):
        fail(f"{libs[0]} in {os.path.basename(wheel)}: device code for sm_{found}, wanted sm_{wanted} "
             f"({listing.stderr.strip()[:200]})")
    ok(f"{os.path.basename(wheel)}: {libs[0]} embeds device code for " + ", ".join(f"sm_{a}" for a in found))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(os.path.abspath(sys.argv[1]), os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0"))
