"""`python -m fnf_kernels selftest`: the table, the exit status, and a planted mismatch that must fail it."""
import io
import os
import subprocess
import sys

import pytest
import torch

from fnf_kernels import __main__ as cli
from fnf_kernels import backends, penalty, selftest


def _table(capsys, argv):
    code = cli.main(["selftest", *argv])
    return code, capsys.readouterr().out


def test_selftest_passes_on_cpu_and_prints_one_row_per_check(capsys):
    code, out = _table(capsys, ["--device", "cpu", "--dtype", "float32", "--dtype", "float64", "--seed", "3"])
    assert code == 0, out
    assert "op" in out and "max error" in out and "tolerance" in out and "seed 3" in out
    rows = [line.split() for line in out.splitlines() if line.split()[:1] and line.split()[0] in backends.OPS]
    runs, _ = selftest.plan("cpu", [torch.float32, torch.float64])
    assert len(rows) == len(runs) and all(r[-1] == "ok" for r in rows)
    assert {r[0] for r in rows} == set(backends.OPS) & set(selftest.CHECKS)
    four = {"masked_frobenius_penalty", "threshold_dilate", "lora_linear", "separate_enhance_losses"}
    assert four <= {r[0] for r in rows}
    assert {"reference"} <= {r[1] for r in rows}  # the torch fallback is always checked
    assert {r[2] for r in rows} == {"float32", "float64"}


def test_selftest_plan_covers_every_available_backend():
    runs, skipped = selftest.plan("cpu", list(selftest.DTYPES.values()))
    for op in selftest.CHECKS:
        for name, (usable, _) in backends.op_availability(op, "cpu").items():
            if not usable or (op, name) in selftest._ABSENT or (name == "cpu" and backends.cpu_is_torch(op)):
                continue
            assert any(r[0] == op and r[1] == name for r in runs), (op, name)
    assert any("cuda" in line for line in skipped) or torch.cuda.is_available()


def test_planted_mismatch_fails_the_selftest(monkeypatch, capsys):
    """A backend that is 0.1 % off (planted in the penalty's dispatch) gives FAIL rows and exit status 1."""
    real = penalty._norms

    def off_by_a_little(backend, *args):
        return real(backend, *args) * 1.001

    monkeypatch.setattr(penalty, "_norms", off_by_a_little)
    code, out = _table(capsys, ["--device", "cpu", "--dtype", "float32"])
    assert code == 1
    failed = [line for line in out.splitlines() if line.split()[-1:] == ["FAIL"]]
    assert failed and all(line.startswith("masked_frobenius_penalty") for line in failed)


def test_a_backend_that_raises_is_a_failed_row(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("planted")

    monkeypatch.setitem(selftest.CHECKS, "threshold_dilate", broken)
    rows = selftest.run("cpu", [torch.float32], out=io.StringIO())
    bad = [r for r in rows if not r.ok]
    assert bad and all(r.op == "threshold_dilate" and "planted" in r.note for r in bad)


def test_selftest_command_line_exit_status():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    result = subprocess.run([sys.executable, "-m", "fnf_kernels", "selftest", "--device", "cpu"],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 failed" in result.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_selftest_on_cuda_without_a_device_says_so(capsys):
    code = cli.main(["selftest", "--device", "cuda"])
    assert code == 2 and "no CUDA device" in capsys.readouterr().err
