"""`fnf <command> --help` explains every command, and an option means one thing everywhere."""
import os

import pytest

from fnf import cli
from fnf.commands import COMMANDS

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def help_text(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as e:
        cli.main([*argv, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def option_help(text: str, flag: str) -> str:
    """The help of ``flag`` in an argparse help text, joined into one line."""
    lines = text.split("\noptions:\n", 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith(flag + " ") or line.strip() == flag
                 or line.strip().startswith(flag + ","))
    block = [lines[start].strip()[len(flag):]]
    for line in lines[start + 1:]:
        if line.startswith("  -") or not line.startswith("    "):
            break
        block.append(line.strip())
    return " ".join(" ".join(block).split())


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_help_has_its_own_description(capsys, command):
    text = help_text(capsys, command)
    description = text.split("\n\n", 1)[1].split("options:")[0].strip()
    assert len(description) > 60, (command, description)
    assert "commands:" not in text                        # not the top-level text again
    assert max(len(line) for line in text.splitlines()) <= 120, command


def test_top_level_help_names_every_family(capsys):
    text = help_text(capsys)
    for family in ("SD 1.x/2.x", "SDXL", "SD3", "FLUX.1", "FLUX.2"):
        assert family in text


def test_prompts_means_the_prompts_and_prompts_file_a_file_everywhere(capsys):
    texts = {c: help_text(capsys, c) for c in ("sample", "localize", "eval")}
    prompts = {c: option_help(t, "--prompts").split("(default")[0] for c, t in texts.items()}
    files = {c: option_help(t, "--prompts-file").split("(default")[0] for c, t in texts.items()}
    assert len(set(prompts.values())) == 1 and "the prompts themselves" in prompts["eval"], prompts
    assert len(set(files.values())) == 1 and "file of prompts, one per line" in files["eval"], files


def test_out_help_says_what_the_command_writes(capsys):
    for command, folder in (("sample", "<out>/samples_compare/"), ("localize", "<out>/localize/")):
        text = help_text(capsys, command)
        out = option_help(text, "--out")
        assert folder in out and "(train.out)" not in out, out
        assert "manifest.json" in text and "--overwrite" in text
    assert "--reward" not in help_text(capsys, "sample")         # sample uses no reward or localizer
    assert "checkpoints" in option_help(help_text(capsys, "train"), "--out")


def test_eval_prompts_given_a_file_says_to_use_prompts_file(tmp_path, capsys):
    prompts = tmp_path / "heldout.txt"
    prompts.write_text("a red car\n")
    assert cli.main(["eval", "--model", str(tmp_path), "--reward", "brightness", "--prompts", str(prompts),
                     "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"use --prompts-file {prompts}" in err, err
