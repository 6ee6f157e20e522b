"""The ``fnf`` command surface: help texts, one-line errors with exit status 2 (no model runs here)."""
import os

import pytest

from fnf import cli

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def test_cli_help_explains(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for word in ("train", "localize", "sample", "beta", "gradcam", "file:GLOB"):
        assert word in text
    for command in ("train", "localize", "sample"):
        with pytest.raises(SystemExit) as e:
            cli.main([command, "--help"])
        assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--model", "--reward", "--localizer", "--beta", "--steps", "--lr", "--seed", "--out", "--resume",
                 "--set", "--lora"):
        assert flag in text


def test_cli_errors_are_clear(tmp_path, capsys):
    assert cli.main(["train", "--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2
    assert "model folder does not exist" in capsys.readouterr().err
    assert cli.main(["train", "--set", "sampling.steps=zero"]) == 2
    assert "'sampling.steps': expected an integer" in capsys.readouterr().err


def test_cli_help_lists_every_command_and_seed_only_where_it_acts(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = capsys.readouterr().out
    for command in ("train", "localize", "sample", "demo"):
        assert f"  {command} " in text, command
    for command in ("localize", "sample"):       # they take --seeds (noise seeds); a --seed would do nothing
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        assert "--seed " not in capsys.readouterr().out.replace("--seeds", "")
    with pytest.raises(SystemExit):
        cli.main(["demo", "--help"])
    assert "--eval-seed" in capsys.readouterr().out


def test_cli_input_errors_are_one_line_before_any_model_loads(tmp_path, capsys, monkeypatch):
    import fnf.families.registry

    def no_load(*a, **k):
        raise AssertionError("the model must not be loaded before the input is checked")

    monkeypatch.setattr(fnf.families.registry, "load_model", no_load)
    cases = [
        (["--set", "train.prompts_file=" + str(tmp_path / "missing.txt")], "train.prompts_file"),
        (["--reward", "no_such_module_xyz:fn"], "cannot import module 'no_such_module_xyz'"),
        (["--reward", "brightness", "--set", "reward.kwargs={scale: 2}"], "does not accept kwargs"),
        (["--localizer", "file:" + str(tmp_path / "*.png")], "no files match"),
        (["--localizer", "heatmap:box", "--set", "localize.kwargs={bogus: 1}"], "does not accept kwargs"),
        (["--localizer", "gradcam", "--set", "localize.kwargs={explain: why}"], "explain must be"),
        (["--set", "train.device=cuda"], "train.device"),
    ]
    for extra, expected in cases:
        for command in ("train", "localize"):
            argv = [command, "--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"), *extra]
            assert cli.main(argv) == 2, argv
            err = capsys.readouterr().err
            assert expected in err and err.count("\n") == 1, (argv, err)


def test_cli_turns_runtime_errors_into_one_line(monkeypatch, capsys):
    def boom(args):
        raise RuntimeError("something\nwent wrong")

    monkeypatch.setattr("fnf.commands.demo.run", boom)
    assert cli.main(["demo"]) == 2
    assert capsys.readouterr().err == "fnf demo: error: something went wrong\n"
    monkeypatch.setenv("FNF_DEBUG", "1")
    with pytest.raises(RuntimeError):
        cli.main(["demo"])


def test_only_the_running_command_module_is_imported():
    """fnf/cli.py imports a command's module only when that command runs: `fnf --help` none, `fnf estimate-memory
    --help` only fnf.commands.estimate_memory (a fresh interpreter, so other tests' imports do not count)."""
    import subprocess
    import sys

    code = ("import contextlib, io, sys\nfrom fnf import cli\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    try:\n        cli.main(sys.argv[1:])\n    except SystemExit:\n        pass\n"
            "print(sorted(m for m in sys.modules if m.startswith('fnf.commands.') and m != 'fnf.commands.common'))")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for argv, expected in ((["--help"], []), (["estimate-memory", "--help"], ["fnf.commands.estimate_memory"])):
        out = subprocess.run([sys.executable, "-c", code, *argv], cwd=root, capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip().splitlines()[-1] == repr(expected), (argv, out.stdout, out.stderr)
