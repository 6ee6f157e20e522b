"""Config validation, overrides and spec errors (no model runs here; the CLI surface is in tests/commands/)."""
import os

import pytest
import yaml

from fnf import config
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
    ({"memory": {"mixed_precision": "fp8"}}, "memory.mixed_precision", "one of auto, no, fp16, bf16"),
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
