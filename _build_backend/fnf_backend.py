"""PEP 517 build backend of focus-n-fix: setuptools, built against the torch the user already has.

fnf_kernels._C is a torch C++ extension: it must be compiled against the very torch that will import it (torch has
no stable C++ ABI across versions or builds). Declaring torch as a build requirement would make pip put a *second*
torch into its isolated build environment: the newest release from PyPI (a multi-GB CUDA build on Linux), whatever
torch the user has, so the extension would be built for the wrong torch. Instead this backend leaves torch out of the
build requirements and, when the isolated build environment has no torch, finds the torch of the environment being
installed into (the interpreter that runs pip, without pip's isolation) and puts it on sys.path, after the build
environment's own packages. So `pip install .`, `pip install -e .` and `pip install git+URL` work without flags and
download no torch; `--no-build-isolation` keeps working as before (the build environment then has torch itself).

No torch anywhere: one line saying to install torch first (or FNF_NO_EXTENSION=1 to install without the kernels).
"""
from __future__ import annotations

import os
import subprocess
import sys

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F401,F403  (every hook not wrapped below)

NO_TORCH = ("focus-n-fix builds its C++ extension against your installed torch, and {where} has none: install "
            "torch first (CPU: pip install torch --index-url https://download.pytorch.org/whl/cpu; CUDA: pip install "
            "torch), then run this install again; or set FNF_NO_EXTENSION=1 to install without the compiled kernels")

# What the target interpreter reports, run without pip's build isolation (PYTHONPATH / PYTHONNOUSERSITE are pip's).
_PROBE = "import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))"


def _target_torch_dir() -> str | None:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE", "PYTHONHOME")}
    try:
        result = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env, timeout=300,
                                cwd=os.path.expanduser("~") if os.path.isdir(os.path.expanduser("~")) else "/")
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = result.stdout.strip().splitlines()
    return lines[-1] if result.returncode == 0 and lines and os.path.isdir(lines[-1]) else None


def _with_torch() -> None:
    """Make `import torch` in setup.py find the target environment's torch (no-op when it already works)."""
    if os.environ.get("FNF_NO_EXTENSION") == "1":
        return
    try:
        import torch  # noqa: F401  (--no-build-isolation, or torch in the build environment)
        return
    except ImportError:
        pass
    found = _target_torch_dir()
    if found is None:
        raise SystemExit(NO_TORCH.format(where=f"this Python ({sys.executable})"))
    if found not in sys.path:
        sys.path.append(found)  # after the build environment's setuptools/wheel/ninja
    os.environ["FNF_BUILD_TORCH_FROM"] = found  # for setup.py's message and child processes
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), found) if p)


def get_requires_for_build_wheel(config_settings=None):
    _with_torch()
    return _setuptools.get_requires_for_build_wheel(config_settings)


def get_requires_for_build_editable(config_settings=None):
    _with_torch()
    return _setuptools.get_requires_for_build_editable(config_settings)


def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
    _with_torch()
    return _setuptools.prepare_metadata_for_build_wheel(metadata_directory, config_settings)


def prepare_metadata_for_build_editable(metadata_directory, config_settings=None):
    _with_torch()
    return _setuptools.prepare_metadata_for_build_editable(metadata_directory, config_settings)


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    _with_torch()
    return _setuptools.build_wheel(wheel_directory, config_settings, metadata_directory)


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    _with_torch()
    return _setuptools.build_editable(wheel_directory, config_settings, metadata_directory)
