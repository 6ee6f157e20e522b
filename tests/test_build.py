"""Build checks: every .cu compiles with the local nvcc (no CUDA torch needed), for sm_80 and sm_90; the CUDA
launch geometry; setup.py's dependency floors are the versions `make floor-check` installs (ci/floors.txt)."""
import glob
import os
import re
import shutil
import subprocess
import sysconfig

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CU_FILES = sorted(glob.glob(os.path.join(ROOT, "csrc", "**", "*.cu"), recursive=True))
NVCC = shutil.which("nvcc") or (os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc")
                                if os.environ.get("CUDA_HOME") else None)
needs_nvcc = pytest.mark.skipif(NVCC is None or not os.path.exists(NVCC), reason="nvcc not found")


def test_cu_files_include_no_torch_headers():
    assert CU_FILES, "no .cu sources found"
    for path in CU_FILES + glob.glob(os.path.join(ROOT, "csrc", "include", "**", "*.h"), recursive=True):
        text = open(path).read()
        for banned in ("torch/", "ATen/", "c10/"):
            assert f"#include <{banned}" not in text, f"{path} includes a {banned} header"


@pytest.mark.slow  # ~6 s per file and arch
@needs_nvcc
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("path", CU_FILES, ids=[os.path.relpath(p, ROOT) for p in CU_FILES])
def test_nvcc_compiles(path, arch, tmp_path):
    cmd = [NVCC, "-c", "-std=c++17", "-O2", f"-arch={arch}", "-I", os.path.join(ROOT, "csrc", "include"),
           path, "-o", str(tmp_path / "out.o")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr.lower(), result.stderr


def _cuda_include():
    if NVCC is None:
        return None
    nvcc_real = os.path.realpath(NVCC)
    candidates = [os.environ.get("CUDA_HOME", ""), os.path.dirname(os.path.dirname(nvcc_real))]
    candidates += sorted(glob.glob("/usr/local/cuda*"), reverse=True)
    for base in candidates:
        if base and os.path.exists(os.path.join(base, "include", "cuda_runtime_api.h")):
            return os.path.join(base, "include")
    return None


@pytest.mark.slow  # ~40 s: parses torch's headers
@pytest.mark.skipif(_cuda_include() is None, reason="CUDA headers not found")
def test_cuda_bindings_syntax(tmp_path):
    """The torch-side CUDA binding parses against this torch's headers (a stub stands in for the one
    generated header that CPU-only torch wheels lack)."""
    stub = tmp_path / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
    tinc = os.path.join(os.path.dirname(torch.__file__), "include")
    cmd = ["g++", "-std=c++17", "-fsyntax-only", "-DFNF_WITH_CUDA=1", "-DTORCH_EXTENSION_NAME=_C",
           "-I", os.path.join(ROOT, "csrc", "include"), "-I", tinc, "-I", os.path.join(tinc, "torch/csrc/api/include"),
           "-I", _cuda_include(), "-I", str(tmp_path), "-I", sysconfig.get_paths()["include"],
           os.path.join(ROOT, "csrc", "cuda", "bindings_cuda.cpp")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]


PENALTY_GRID_TEST = r"""
#include <cstdio>
#include <vector>
#include "fnf/penalty_grid.h"
using namespace fnf;
static int failures = 0;
#define CHECK(c) do { if (!(c)) { std::printf("FAILED line %d: %s\n", __LINE__, #c); ++failures; } } while (0)

// Walk the launch as the kernels do: block (bx, by) handles chunk bx of planes by, by + gridDim.y, ...
static void check_covers(int64_t planes, int64_t n) {
  const PenaltyGrid g = penalty_grid(planes, n);
  CHECK(g.ok && g.x <= kMaxGridX && g.y <= kMaxGridY);
  std::vector<int> seen(size_t(planes * g.chunks), 0);
  for (int64_t by = 0; by < g.y; ++by)
    for (int64_t plane = by; plane < planes; plane += g.y)
      for (int64_t bx = 0; bx < g.x; ++bx) ++seen[size_t(plane * g.x + bx)];  // the partial's index
  for (int v : seen) CHECK(v == 1);
}

int main() {
  CHECK(kPenaltyChunk == 2048);
  // A plane above 65535 * 2048 = 134,215,680 elements: 65537 chunks go on x (the old y axis stopped at 65535).
  PenaltyGrid g = penalty_grid(48, 134217729);
  CHECK(g.ok && g.chunks == 65537 && g.x == 65537 && g.y == 48);
  g = penalty_grid(3, int64_t(65535) * 2048);
  CHECK(g.ok && g.chunks == 65535 && g.y == 3);
  g = penalty_grid(1, int64_t(1) << 40);  // 2^40 elements: 2^29 chunks
  CHECK(g.ok && g.chunks == (int64_t(1) << 29) && g.x == g.chunks);
  // Up to 2^31 - 1 chunks per plane, not one more.
  CHECK(penalty_grid(2, kMaxGridX * kPenaltyChunk).ok);
  CHECK(!penalty_grid(2, kMaxGridX * kPenaltyChunk + 1).ok);
  // More planes than gridDim.y allows: y is capped and blocks stride over the planes.
  g = penalty_grid(70000, 5000);
  CHECK(g.ok && g.y == 65535 && g.chunks == 3);
  check_covers(70000, 5000);
  check_covers(7, 2048 * 3 + 1);
  check_covers(1, 1);
  CHECK(!penalty_grid(0, 10).ok && !penalty_grid(4, 0).ok);
  std::printf("%d failures\n", failures);
  return failures != 0;
}
"""


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not found")
def test_penalty_cuda_grid_math(tmp_path):
    """The CUDA penalty's launch geometry (fnf/penalty_grid.h, pure C++) at planes above 134M elements and
    above 65535 planes, checked on CPU without allocating anything of that size."""
    src = tmp_path / "grid_test.cpp"
    src.write_text(PENALTY_GRID_TEST)
    exe = tmp_path / "grid_test"
    result = subprocess.run(["g++", "-std=c++17", "-O1", "-Wall", "-Werror", "-I", os.path.join(ROOT, "csrc", "include"),
                             str(src), "-o", str(exe)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    result = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 failures" in result.stdout


def _floors_in_setup() -> dict[str, str]:
    with open(os.path.join(ROOT, "setup.py"), encoding="utf-8") as f:
        text = f.read()
    return {name.lower(): version for name, version in re.findall(r'"([A-Za-z0-9_.-]+)>=([0-9][0-9.]*)', text)}


def _floor_pins() -> dict[str, str]:
    pins = {}
    with open(os.path.join(ROOT, "ci", "floors.txt"), encoding="utf-8") as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                name, version = line.split("==")
                pins[name.strip().lower()] = version.strip()
    return pins


def test_setup_floors_are_what_the_floor_check_installs():
    """Every `>=` floor in setup.py is pinned to the same version in ci/floors.txt (what `make floor-check` installs,
    builds against and tests), and nothing else is pinned there."""
    floors, pins = _floors_in_setup(), _floor_pins()
    assert {"torch", "triton", "numpy", "diffusers", "transformers", "peft", "accelerate"} <= floors.keys(), floors
    assert floors == pins, {"setup.py only": floors.keys() - pins.keys(), "floors.txt only": pins.keys() - floors.keys(),
                            "differ": {k: (floors[k], pins[k]) for k in floors.keys() & pins.keys() if floors[k] != pins[k]}}


def test_gpu_proof_script_parses_and_its_summary_gives_verdicts(tmp_path):
    """benchmarks/gpu_proof.sh is valid bash; gpu_proof_summary.py turns its step records and a JUnit file into the
    stage verdict (a failed test fails the stage; a step cut off by the budget makes it incomplete, not failed)."""
    import json
    import sys

    script = os.path.join(ROOT, "benchmarks", "gpu_proof.sh")
    assert subprocess.run(["bash", "-n", script], capture_output=True, text=True).returncode == 0
    steps = tmp_path / "s.tsv"
    steps.write_text("build\t12\t0\tb.log\ntests: kernels and not slow\t30\t0\ta.log\ntests: slow\t5\t124\tc.log\n")
    junit = tmp_path / "kernels-test.xml"
    cases = ('<testcase classname="tests.test_x" name="test_a" time="1.0"/>'
             '<testcase classname="tests.test_x" name="test_b" time="0.1"><skipped message="no cuda"/></testcase>')
    junit.write_text(f'<testsuites><testsuite name="pytest" time="1.1">{cases}</testsuite></testsuites>')

    def summary(xml_text):
        junit.write_text(xml_text)
        out = tmp_path / "sum.json"
        result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_proof_summary.py"),
                                 "--stage", "kernels-test", "--device", "cpu", "--steps", str(steps), "--budget", "540",
                                 "--seconds", "47", "--junit", str(junit), str(tmp_path / "missing.xml"),
                                 "--out", str(out)], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        return json.loads(out.read_text())

    s = summary(f'<testsuites><testsuite name="pytest" time="1.1">{cases}</testsuite></testsuites>')
    assert s["verdict"] == "incomplete" and [x["verdict"] for x in s["steps"]] == ["ok", "ok", "incomplete"]
    assert (s["tests"][0]["passed"], s["tests"][0]["skipped"], s["tests"][0]["failed"]) == (1, 1, 0)
    failing = cases + '<testcase classname="tests.test_x" name="test_c" time="0.2"><failure message="no"/></testcase>'
    s = summary(f'<testsuites><testsuite name="pytest" time="1.3">{failing}</testsuite></testsuites>')
    assert s["verdict"] == "failed" and s["tests"][0]["failures"][0]["test"] == "tests.test_x::test_c"
