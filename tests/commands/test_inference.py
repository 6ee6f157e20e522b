"""What the commands share, without a model: device resolution, the --lora check, flags to a config."""
import pytest
import torch

from fnf.commands.common import config_from_flags
from fnf.config import ConfigError
from fnf.core import LORA_WEIGHTS, resolve_device
from fnf.inference import check_lora_arg


def test_resolve_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu" and resolve_device("cpu") == "cpu"
    with pytest.raises(RuntimeError, match="no CUDA device is visible"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "cuda" and resolve_device("cuda") == "cuda" and resolve_device("cpu") == "cpu"


def test_check_lora_arg_names_the_flag_and_the_file(tmp_path):
    for folder in (tmp_path / "missing", tmp_path):
        with pytest.raises(FileNotFoundError, match=f"--lora '{folder}': expected a LoRA folder written by "
                                                    f"`fnf train` \\(<out>/lora with {LORA_WEIGHTS}\\)"):
            check_lora_arg(str(folder))
    (tmp_path / LORA_WEIGHTS).write_bytes(b"")
    check_lora_arg(str(tmp_path))


def test_config_from_flags_sets_given_values_then_checks_then_validates(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("sampling: {steps: 7}\n")
    seen = []
    cfg = config_from_flags(str(path), ["lora.rank=3"], {"train.lr": 0.5, "train.seed": None},
                            check=lambda c: seen.append((c.sampling.steps, c.lora.rank, c.train.lr)))
    assert seen == [(7, 3, 0.5)] and cfg.train.seed == 0
    with pytest.raises(ConfigError, match="sampling.steps"):
        config_from_flags(None, [], {"sampling.steps": 0})
