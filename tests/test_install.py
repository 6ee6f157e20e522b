"""The package installs the ways a user types it (README, Install), into fresh venvs that see an existing torch.

Each venv gets this interpreter's torch (and its other packages) through a folder of symlinks named by a .pth file, so
nothing is downloaded but setuptools/wheel/ninja for pip's isolated build environment, and pip sees torch as
installed (it never resolves torch itself), as in a user's venv that already has torch. The source is a copy of the
working tree (an editable install writes its fnf_kernels._C and _build.json there, not into this checkout).

  - `pip install .`            (build isolation on): compiles fnf_kernels._C against that torch; it imports and runs
  - `pip install -e .`         editable, with FNF_NO_EXTENSION=1: the choice recorded in the tree, no warning
  - `pip install git+file://…` (a git URL, as `git+https://…`) with FNF_NO_EXTENSION=1: no compile, no warning
  - `pip install --dry-run .` (metadata only, no compile): pip's isolated build imports the venv's torch in setup.py
  - a venv without torch: `pip install .` stops with one line saying to install torch first
Slow: the one compile is a few minutes on 2 cores (much more on a loaded machine); the others ~20-40 s each.
"""
import signal
import os
import shutil
import subprocess
import sys
import venv

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCH_SITE = os.path.dirname(os.path.dirname(torch.__file__))
# Never linked: this project (its editable hooks) and the packaging tools each venv brings itself.
OWN = ("focus_n_fix", "__editable__", "fnf", "pip", "setuptools", "wheel", "_distutils_hack", "pkg_resources",
       "distutils-precedence")
SMOKE = ("import warnings, torch\n"
         "warnings.simplefilter('error')\n"
         "import fnf_kernels, fnf\n"
         "from fnf_kernels import _extension\n"
         "x = torch.rand(1, 3, 8, 8, requires_grad=True)\n"
         "fnf_kernels.masked_frobenius_penalty(x, torch.rand(1, 3, 8, 8), torch.rand(1, 8, 8)).backward()\n"
         "print('extension', _extension.load() is not None, fnf_kernels.__file__)\n")



def _copy_tree(dest):
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.split(b"\0")
    for rel in filter(None, (f.decode() for f in files)):
        src = os.path.join(ROOT, rel)
        if os.path.isfile(src) and not rel.startswith(("runs/", "build/")) and not rel.endswith(".so"):
            os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
            shutil.copy2(src, os.path.join(dest, rel))
    return dest


def _venv(path, with_torch=True):
    venv.EnvBuilder(with_pip=True, symlinks=True).create(path)
    py = os.path.join(path, "bin", "python")
    if with_torch:
        farm = os.path.join(path, "torch-site")
        os.makedirs(farm)
        for name in os.listdir(TORCH_SITE):
            if not name.startswith(OWN) and not name.endswith(".pth"):
                os.symlink(os.path.join(TORCH_SITE, name), os.path.join(farm, name))
        site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              capture_output=True, text=True, check=True).stdout.strip()
        with open(os.path.join(site, "existing-torch.pth"), "w") as f:
            f.write(farm + "\n")
    return py


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FNF_", "PYTHON", "VIRTUAL_ENV"))}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", FNF_CUDA="0", MAX_JOBS=os.environ.get("MAX_JOBS", "2"), **extra)
    return env


def _pip(py, *args, cwd, **env):
    proc = subprocess.Popen([py, "-m", "pip", "install", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env(**env), start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=1800)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the compilers too, not just pip
        raise
    result = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    downloads = [line for line in result.stdout.splitlines() if "Downloading" in line and "torch" in line.lower()]
    assert not downloads, downloads  # the installed torch is used, never a second one
    return result


def _smoke(py, **env):
    result = subprocess.run([py, "-c", SMOKE], capture_output=True, text=True, env=_env(**env), cwd="/",
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return _copy_tree(str(tmp_path_factory.mktemp("src") / "focus-n-fix"))


@pytest.mark.slow
def test_pip_install_dot_builds_against_the_installed_torch(source, tmp_path):
    py = _venv(str(tmp_path / "venv"))
    result = _pip(py, ".", cwd=source)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = _smoke(py)
    assert "extension True" in out and str(tmp_path) in out, out


@pytest.mark.slow
def test_pip_install_editable_without_the_extension(source, tmp_path):
    """Editable, with the compile left out (the isolated build's torch is proven by the dry run and `pip install .`;
    one compile per suite is enough): the choice is recorded in the source tree and importing does not warn."""
    py = _venv(str(tmp_path / "venv"))
    result = _pip(py, "-e", ".", cwd=source, FNF_NO_EXTENSION="1")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = _smoke(py)
    assert "extension False" in out and source in out, out
    assert open(os.path.join(source, "fnf_kernels", "_build.json")).read() == '{"extension": false}'


@pytest.mark.slow
def test_isolated_build_sees_the_installed_torch(source, tmp_path):
    """The metadata hooks run setup.py, which imports torch, inside pip's isolated build environment."""
    py = _venv(str(tmp_path / "venv"))
    result = _pip(py, "--dry-run", ".", cwd=source)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Would install focus-n-fix" in result.stdout, result.stdout


@pytest.mark.slow
def test_pip_install_git_url_without_the_extension_imports_quietly(source, tmp_path):
    repo = str(tmp_path / "repo")
    shutil.copytree(source, repo)
    for cmd in (["init", "-q"], ["add", "-A"], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x"]):
        subprocess.run(["git", *cmd], cwd=repo, check=True, capture_output=True)
    py = _venv(str(tmp_path / "venv"))
    result = _pip(py, f"git+file://{repo}", cwd=str(tmp_path), FNF_NO_EXTENSION="1")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = _smoke(py)  # warnings are errors in SMOKE: the missing extension was a choice, so no warning
    assert "extension False" in out, out


@pytest.mark.slow
def test_a_venv_without_torch_gets_one_line(source, tmp_path):
    py = _venv(str(tmp_path / "venv"), with_torch=False)
    result = _pip(py, ".", cwd=source)
    assert result.returncode != 0
    lines = [line for line in (result.stdout + result.stderr).splitlines() if "install torch first" in line]
    assert len(lines) == 1, result.stdout + result.stderr


def test_no_warning_when_the_extension_is_left_out_on_purpose(tmp_path):
    """FNF_NO_EXTENSION=1 at run time, or an install that recorded it (fnf_kernels/_build.json): no warning, and
    _extension.error() says why; a missing extension nobody chose still warns (tests/test_api.py)."""
    code = ("import warnings; warnings.simplefilter('error')\n"
            "import fnf_kernels\n"
            "from fnf_kernels import _extension\n"
            "print(_extension.load() is None, _extension.error())\n")
    env = dict(os.environ, FNF_NO_EXTENSION="1")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("True left out on purpose (FNF_NO_EXTENSION=1 is set)"), result.stdout


def test_a_recorded_choice_is_read(tmp_path, monkeypatch):
    from fnf_kernels import _extension

    monkeypatch.delenv("FNF_NO_EXTENSION", raising=False)
    info = tmp_path / "_build.json"
    monkeypatch.setattr(_extension, "_BUILD_INFO", str(info))
    assert _extension.skipped_on_purpose() is None  # no record: an ordinary install
    info.write_text('{"extension": false}')
    assert _extension.skipped_on_purpose() == "installed with FNF_NO_EXTENSION=1"
    info.write_text('{"extension": true}')
    assert _extension.skipped_on_purpose() is None
