"""Config validation, overrides, spec errors and the CLI surface (no model runs here)."""
import os

import pytest
import yaml

from fnf import cli, config
from fnf.config import ConfigError
from fnf.rewards import SpecError, build_reward, load_object

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def test_defaults_are_valid_and_documented_choices():
    cfg = config.from_dict({})
    assert cfg.sampling.steps == 50 and cfg.sampling.truncation_k == 2 and cfg.sampling.guidance_scale == 7.5
    assert cfg.lora.rank == 64 and cfg.lora.target_modules == ["to_q", "to_k", "to_v", "to_out.0"]
    assert cfg.objective.beta == 1.0 and cfg.objective.squared is False


@pytest.mark.parametrize("data, key, expected", [
    ({"sampling": {"steps": "many"}}, "sampling.steps", "an integer"),
    ({"sampling": {"stepz": 3}}, "sampling.stepz", "section 'sampling' has"),
    ({"samplin": {"steps": 3}}, "samplin.steps", "section one of"),
    ({"sampling": {"steps": 10, "truncation_k": 11}}, "sampling.truncation_k", "[1, sampling.steps=10]"),
    ({"sampling": {"lv_copies": 4, "truncation_k": 2}}, "sampling.truncation_k", "DRaFT-LV"),
    ({"objective": {"beta": -1}}, "objective.beta", ">= 0"),
    ({"objective": {"squared": "maybe"}}, "objective.squared", "true or false"),
    ({"memory": {"mixed_precision": "fp8"}}, "memory.mixed_precision", "one of no, fp16, bf16"),
    ({"train": {"lr": 0}}, "train.lr", "> 0"),
    ({"train": {"adam_betas": [0.9]}}, "train.adam_betas", "two numbers"),
    ({"localize": {"spec": "blur"}}, "localize.spec", "gradcam[:layer]"),
    ({"localize": {"spec": "file:"}}, "localize.spec", "file:<GLOB>"),
    ({"localize": {"threshold": 1.5}}, "localize.threshold", "[0, 1]"),
    ({"lora": {"target_modules": []}}, "lora.target_modules", "non-empty"),
    ({"sampling": {"height": 33}}, "sampling.height", "multiple of 8"),
])
def test_bad_config_names_key_and_expected_value(data, key, expected):
    with pytest.raises(ConfigError) as e:
        config.from_dict(data)
    assert f"'{key}'" in str(e.value) and expected in str(e.value)


def test_yaml_load_and_set_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"sampling": {"steps": 20}, "objective": {"beta": 0.5}}))
    cfg = config.load(str(path), ["sampling.steps=10", "objective.squared=true", "lora.target_modules=[to_k, to_v]",
                                  "reward.kwargs={box: [0, 0.5, 0, 0.5]}"])
    assert cfg.sampling.steps == 10 and cfg.objective.beta == 0.5 and cfg.objective.squared is True
    assert cfg.lora.target_modules == ["to_k", "to_v"] and cfg.reward.kwargs == {"box": [0, 0.5, 0, 0.5]}
    with pytest.raises(ConfigError, match="section.key=value"):
        config.load(None, ["sampling.steps"])
    with pytest.raises(ConfigError, match="not found"):
        config.load(str(tmp_path / "missing.yaml"))


def test_example_configs_validate():
    folder = os.path.join(ROOT, "configs")
    files = [f for f in os.listdir(folder) if f.endswith(".yaml")]
    assert files
    for name in files:
        config.load(os.path.join(folder, name))


def test_bad_reward_specs_give_clear_errors(tmp_path):
    with pytest.raises(SpecError, match="unknown reward 'nope'.*brightness"):
        build_reward("nope")
    with pytest.raises(SpecError, match="does not exist"):
        build_reward(str(tmp_path / "missing.py") + ":fn")
    with pytest.raises(SpecError, match="cannot import module"):
        build_reward("no_such_module_xyz:fn")
    with pytest.raises(SpecError, match="has no attribute 'missing'"):
        build_reward("fnf.rewards:missing")
    bad = tmp_path / "broken.py"
    bad.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(SpecError, match="boom"):
        load_object(f"{bad}:x")
    with pytest.raises(SpecError, match="does not accept kwargs"):
        build_reward("brightness", wrong=1)
    with pytest.raises(SpecError, match="reward.kwargs.model"):
        build_reward("classifier")


def test_user_reward_from_file_and_module(tmp_path):
    import torch
    f = tmp_path / "my_reward.py"
    f.write_text("def score(images, prompts):\n    return images.mean(dim=(1, 2, 3)) * 2\n"
                 "def factory(scale=1.0):\n    return lambda images, prompts: images.mean(dim=(1, 2, 3)) * scale\n")
    x = torch.full((2, 3, 8, 8), 0.25)
    assert torch.allclose(build_reward(f"{f}:score")(x, ["a", "b"]), torch.full((2,), 0.5))
    assert torch.allclose(build_reward(f"{f}:factory", scale=4.0)(x, ["a", "b"]), torch.full((2,), 1.0))
    assert torch.allclose(build_reward("fnf.rewards:brightness")(x, None), torch.full((2,), 0.25))


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
        (["--set", "localize.kwargs={explain: why}"], "explain must be"),
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

    monkeypatch.setattr(cli, "cmd_demo", boom)
    assert cli.main(["demo"]) == 2
    assert capsys.readouterr().err == "fnf demo: error: something went wrong\n"
    monkeypatch.setenv("FNF_DEBUG", "1")
    with pytest.raises(RuntimeError):
        cli.main(["demo"])
