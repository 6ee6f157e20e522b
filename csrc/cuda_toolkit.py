"""Find the CUDA toolkit the extension build uses (imported by setup.py; plain Python, no torch import).

torch derives CUDA_HOME from where ``nvcc`` sits, which is wrong when ``nvcc`` on PATH is a wrapper or a link
(/usr/local/bin/nvcc -> CUDA_HOME=/usr/local, no headers there). Here each candidate is checked for what the build
needs: ``bin/nvcc``, ``include/cuda_runtime_api.h``, and a CUDA major version equal to torch's.

Candidates, in order: $CUDA_HOME, $CUDA_PATH, the toolkit that the ``nvcc`` on PATH reports (``nvcc -dryrun``
prints its TOP), the real path of that ``nvcc`` (two levels up), /usr/local/cuda.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field

HEADER = os.path.join("include", "cuda_runtime_api.h")


@dataclass
class Toolkit:
    """The chosen toolkit (``path`` None when none fits) and every candidate tried, in words."""

    path: str | None
    version: str | None = None
    tried: list = field(default_factory=list)

    def explain(self) -> str:
        return "; ".join(self.tried) if self.tried else "no candidate (CUDA_HOME, CUDA_PATH, nvcc on PATH, /usr/local/cuda)"


def header_version(path: str) -> str | None:
    """'13.0' from ``#define CUDART_VERSION 13000`` in the toolkit's cuda_runtime_api.h, or None."""
    try:
        with open(os.path.join(path, HEADER), encoding="utf-8", errors="replace") as f:
            match = re.search(r"#define\s+CUDART_VERSION\s+(\d+)", f.read())
    except OSError:
        return None
    if not match:
        return None
    value = int(match.group(1))
    return f"{value // 1000}.{(value % 1000) // 10}"


def nvcc_top(nvcc: str) -> str | None:
    """The toolkit folder an ``nvcc`` executable (or wrapper script) really runs from, from ``nvcc -dryrun``."""
    try:
        out = subprocess.run([nvcc, "-dryrun", "-x", "cu", "-E", os.devnull], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    for line in (out.stdout + out.stderr).splitlines():
        match = re.match(r"#\$ TOP=(.+)$", line.strip())
        if match:
            return os.path.normpath(match.group(1).strip())
    return None


def candidates(environ=os.environ, which=shutil.which) -> list[tuple[str, str]]:
    """(where it came from, folder) pairs, first choice first, without duplicates."""
    found = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if environ.get(var):
            found.append((f"${var}", environ[var]))
    nvcc = which("nvcc")
    if nvcc:
        top = nvcc_top(nvcc)
        if top:
            found.append((f"nvcc on PATH ({nvcc}) reports", top))
        found.append((f"real path of {nvcc}", os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))))
    found.append(("default", "/usr/local/cuda"))
    seen, unique = set(), []
    for how, path in found:
        real = os.path.realpath(path)
        if real not in seen:
            seen.add(real)
            unique.append((how, path))
    return unique


def problem(path: str, torch_cuda: str | None) -> str | None:
    """Why ``path`` cannot build the extension for a torch built with CUDA ``torch_cuda`` (None: it can)."""
    if not os.path.isdir(path):
        return "no such folder"
    if not os.path.isfile(os.path.join(path, "bin", "nvcc")):
        return "no bin/nvcc"
    if not os.path.isfile(os.path.join(path, HEADER)):
        return f"no {HEADER}"
    version = header_version(path)
    if torch_cuda and version and version.split(".")[0] != torch_cuda.split(".")[0]:
        return f"CUDA {version}, but torch was built with CUDA {torch_cuda} (the major versions must match)"
    return None


def find(torch_cuda: str | None, environ=os.environ, which=shutil.which) -> Toolkit:
    """The first candidate that can build for this torch; ``tried`` says what was wrong with the others."""
    tried = []
    for how, path in candidates(environ, which):
        why = problem(path, torch_cuda)
        if why is None:
            tried.append(f"{how} {path}: ok")
            return Toolkit(path, header_version(path), tried)
        tried.append(f"{how} {path}: {why}")
    return Toolkit(None, None, tried)
