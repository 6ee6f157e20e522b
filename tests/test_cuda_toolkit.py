"""setup.py's CUDA toolkit discovery (csrc/cuda_toolkit.py) on fake toolkit folders, the real nvcc wrapper here,
the FNF_CUDA=1 message; and (slow) the whole CUDA build against a real CUDA torch when its venv exists."""
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "csrc"))
import cuda_toolkit  # noqa: E402

CUDA_VENV = os.path.join(ROOT, ".venv-cuda")


def _toolkit(root, version=13000, header=True, nvcc=True):
    os.makedirs(os.path.join(root, "include"))
    os.makedirs(os.path.join(root, "bin"))
    if header:
        with open(os.path.join(root, "include", "cuda_runtime_api.h"), "w") as f:
            f.write(f"/* fake */\n#define CUDART_VERSION  {version}\n")
    if nvcc:
        with open(os.path.join(root, "bin", "nvcc"), "w") as f:
            f.write("#!/bin/sh\nexit 0\n")
        os.chmod(os.path.join(root, "bin", "nvcc"), 0o755)
    return str(root)


def _no_nvcc(_name):
    return None


def test_header_version_and_problems(tmp_path):
    good = _toolkit(tmp_path / "good", 12080)
    assert cuda_toolkit.header_version(good) == "12.8"
    assert cuda_toolkit.problem(good, "12.4") is None
    assert "major versions must match" in cuda_toolkit.problem(good, "13.0")
    assert cuda_toolkit.problem(_toolkit(tmp_path / "nohdr", header=False), "13.0") == \
        "no include/cuda_runtime_api.h"
    assert cuda_toolkit.problem(_toolkit(tmp_path / "nonvcc", nvcc=False), "13.0") == "no bin/nvcc"
    assert cuda_toolkit.problem(str(tmp_path / "missing"), "13.0") == "no such folder"


def test_first_usable_candidate_wins_and_the_others_are_explained(tmp_path):
    broken = _toolkit(tmp_path / "broken", header=False)
    wrong = _toolkit(tmp_path / "wrong", 12080)
    good = _toolkit(tmp_path / "good", 13000)
    env = {"CUDA_HOME": broken, "CUDA_PATH": wrong}
    found = cuda_toolkit.find("13.0", environ=env, which=_no_nvcc)
    assert found.path != broken and found.path != wrong
    assert f"$CUDA_HOME {broken}: no include/cuda_runtime_api.h" in found.explain()
    assert f"$CUDA_PATH {wrong}: CUDA 12.8, but torch was built with CUDA 13.0" in found.explain()
    assert cuda_toolkit.find("13.0", environ={"CUDA_HOME": good}, which=_no_nvcc).path == good


def test_a_wrapper_nvcc_is_followed_to_its_toolkit(tmp_path):
    """/usr/local/bin/nvcc-style wrappers: torch would take CUDA_HOME=<bin>/.. (no headers); nvcc -dryrun's TOP
    names the real toolkit."""
    real = _toolkit(tmp_path / "cuda-13.0", 13000)
    with open(os.path.join(real, "bin", "nvcc"), "w") as f:
        f.write(f"#!/bin/sh\necho '#$ _HERE_={real}/bin' >&2\necho '#$ TOP={real}/bin/..' >&2\n")
    wrapper_dir = tmp_path / "local" / "bin"
    wrapper_dir.mkdir(parents=True)
    wrapper = wrapper_dir / "nvcc"
    wrapper.write_text(f"#!/bin/sh\nexec {real}/bin/nvcc \"$@\"\n")
    wrapper.chmod(0o755)
    found = cuda_toolkit.find("13.0", environ={}, which=lambda name: str(wrapper))
    assert os.path.realpath(found.path) == os.path.realpath(real), found.explain()


@pytest.mark.skipif(not os.path.isfile("/usr/local/bin/nvcc"), reason="no /usr/local/bin/nvcc wrapper here")
def test_the_machines_nvcc_wrapper_resolves():
    found = cuda_toolkit.find("13.0", environ={}, which=shutil.which)
    assert found.path and os.path.isfile(os.path.join(found.path, "include", "cuda_runtime_api.h")), found.explain()


def test_fnf_cuda_1_with_a_cpu_torch_stops_with_one_message():
    proc = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "FNF_CUDA": "1"}, timeout=120)
    import torch

    if torch.version.cuda is not None:
        pytest.skip("this torch has CUDA")
    assert proc.returncode != 0
    assert "FNF_CUDA=1 but this torch" in proc.stderr and "CPU build" in proc.stderr


@pytest.mark.slow
def test_cuda_build_against_a_cuda_torch():
    """`make cuda-build-check`: wheel from a clean clone, FNF_CUDA=1, sm_80 + sm_90, every op on CUDA (minutes)."""
    if not os.path.isfile(os.path.join(CUDA_VENV, "bin", "python")):
        pytest.skip("no CUDA torch venv: make it with `make cuda-venv` (~5 GB), then `make cuda-build-check`")
    if shutil.which("git") is None or shutil.which("nvcc") is None:
        pytest.skip("needs git and nvcc")
    proc = subprocess.run(["make", "cuda-build-check"], cwd=ROOT, capture_output=True, text=True, timeout=1800)
    print(proc.stdout[-4000:], proc.stderr[-4000:])
    assert proc.returncode == 0
    assert "built_with_cuda() = True" in proc.stdout and "sm_80" in proc.stdout and "sm_90" in proc.stdout
