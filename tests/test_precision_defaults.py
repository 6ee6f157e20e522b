"""Issue 30: precision 'auto' (fnf/precision.py) on every device kind, explicit values, the trainer's resolution
(printed once, saved in config.yaml and checkpoints, kept by a resume), CPU bit-identity; issue 25: the default
localizer fits the default reward, so a config-less `fnf train --model DIR` runs."""
import json
import os
import sys

import pytest
import torch
import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fnf_tiny_models import RedDetector, cached_model, one_torch_thread, tiny_config  # noqa: E402,F401
from fnf import cli, config, precision  # noqa: E402
from fnf.localize import GradCAM, InputSaliency, build_localizer  # noqa: E402
from fnf.lora import lora_state_dict  # noqa: E402
from fnf.rewards import build_reward  # noqa: E402
from fnf.train import trainer  # noqa: E402
from fnf.train import train  # noqa: E402


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return cached_model("sd", str(tmp_path_factory.getbasetemp()))


@pytest.mark.parametrize("capability, expected", [
    (None, ("fp32", "no")),                                  # CPU
    ((9, 0), ("bf16", "bf16")), ((8, 0), ("bf16", "bf16")),  # H100, A100
    ((8, 9), ("bf16", "bf16")), ((8, 6), ("bf16", "bf16")),  # RTX 4090, 3090
    ((7, 5), ("fp16", "fp16")), ((7, 0), ("fp16", "fp16")),  # T4, V100: fp16 + grad scaler
])
def test_auto_resolves_per_device_kind(capability, expected):
    assert precision.resolve_values("auto", "auto", capability) == expected


@pytest.mark.parametrize("given, capability, expected", [
    (("fp32", "auto"), (9, 0), ("fp32", "bf16")),    # fp32 weights, autocast in the card's half dtype
    (("auto", "no"), (9, 0), ("fp32", "no")),        # no autocast: fp32 weights
    (("auto", "fp16"), (9, 0), ("fp16", "fp16")),
    (("fp16", "auto"), (9, 0), ("fp16", "fp16")),    # half weights autocast in their dtype
    (("bf16", "bf16"), None, ("bf16", "bf16")),      # explicit values are kept, on CPU too
    (("fp32", "no"), (9, 0), ("fp32", "no")),
    (("bf16", "auto"), None, ("bf16", "no")),        # CPU: as before 'auto' (autocast follows half weights)
])
def test_explicit_values_override_auto(given, capability, expected):
    assert precision.resolve_values(*given, capability) == expected


def test_defaults_are_auto_and_config_accepts_every_value():
    cfg = config.Config()
    assert (cfg.model.weight_dtype, cfg.memory.mixed_precision, cfg.localize.spec) == ("auto", "auto", "auto")
    cfg = config.load(None, ["model.weight_dtype=bf16", "memory.mixed_precision=no"])
    assert (cfg.model.weight_dtype, cfg.memory.mixed_precision) == ("bf16", "no")


def test_device_capability_reads_cuda_only(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert precision.device_capability("cpu") is None
    assert precision.device_capability("cuda") == (7, 5)
    assert precision.device_capability(torch.device("cuda", 0)) == (7, 5)


def test_describe_says_what_was_resolved_and_where():
    given = config.Config()
    line = precision.describe(given, precision.resolve(given, (7, 5)), (7, 5))
    assert line == "precision: weights fp16, autocast fp16 with the fp16 grad scaler (weights and autocast auto " \
                   "on CUDA sm_75, no bf16)"
    assert precision.describe(given, precision.resolve(given, None), None) == \
        "precision: weights fp32, autocast off (weights and autocast auto on CPU)"


def test_session_on_cpu_resolves_fp32_no_autocast_and_prints_once(sd, tmp_path, capsys):
    cfg = tiny_config(sd, str(tmp_path / "run"))
    cfg.model.weight_dtype = cfg.memory.mixed_precision = "auto"
    session = trainer.Session(cfg)
    assert session.cfg.model.weight_dtype == "fp32" and session.cfg.memory.mixed_precision == "no"
    assert session.ctx.autocast_dtype is None and not session.scaler.is_enabled()
    assert next(session.model.denoiser.parameters()).dtype == torch.float32
    assert cfg.model.weight_dtype == "auto"          # the caller's config is not changed
    assert capsys.readouterr().out.count("fnf: precision: weights fp32, autocast off") == 1


def test_cpu_default_run_is_bit_identical_to_explicit_fp32(sd, tmp_path):
    auto = tiny_config(sd, str(tmp_path / "auto"))
    auto.model.weight_dtype = auto.memory.mixed_precision = "auto"
    explicit = tiny_config(sd, str(tmp_path / "explicit"), model={"weight_dtype": "fp32"},
                           memory={"mixed_precision": "no"})
    a, b = train(auto), train(explicit)
    sa, sb = lora_state_dict(a.model.denoiser), lora_state_dict(b.model.denoiser)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]


def _state(out, step):
    with open(os.path.join(out, "checkpoints", f"step-{step:07d}", "state.json"), encoding="utf-8") as f:
        return json.load(f)


def test_resolved_values_are_saved_and_a_resume_keeps_them(sd, tmp_path, monkeypatch, capsys):
    """Started where auto means bf16 (capability mocked, the run on the CPU), resumed where it would mean fp32:
    the resume keeps bf16, from the checkpoint; an explicit value on resume wins and is said."""
    out = str(tmp_path / "run")
    monkeypatch.setattr(trainer.precision, "device_capability", lambda device: (9, 0))
    cfg = tiny_config(sd, out, train={"steps": 1, "checkpoint_every": 1})
    cfg.model.weight_dtype = cfg.memory.mixed_precision = "auto"
    first = train(cfg)
    assert next(first.model.denoiser.parameters()).dtype == torch.bfloat16
    with open(os.path.join(out, "config.yaml"), encoding="utf-8") as f:
        saved = yaml.safe_load(f)
    assert saved["model"]["weight_dtype"] == "bf16" and saved["memory"]["mixed_precision"] == "bf16"
    assert _state(out, 1)["precision"] == {"weight_dtype": "bf16", "mixed_precision": "bf16"}
    assert "weights bf16, autocast bf16 (weights and autocast auto on CUDA sm_90, bf16)" in capsys.readouterr().out

    monkeypatch.setattr(trainer.precision, "device_capability", lambda device: None)  # auto would be fp32 now
    cfg = tiny_config(sd, out, train={"steps": 2, "checkpoint_every": 1, "resume": "latest"})
    cfg.model.weight_dtype = cfg.memory.mixed_precision = "auto"
    resumed = train(cfg)
    assert next(resumed.model.denoiser.parameters()).dtype == torch.bfloat16
    assert _state(out, 2)["precision"] == {"weight_dtype": "bf16", "mixed_precision": "bf16"}
    assert [h["step"] for h in resumed.history] == [2]

    cfg = tiny_config(sd, out, train={"steps": 3, "checkpoint_every": 1, "resume": "latest"},
                      model={"weight_dtype": "fp32"}, memory={"mixed_precision": "no"})
    explicit = train(cfg)
    assert next(explicit.model.denoiser.parameters()).dtype == torch.float32
    assert _state(out, 3)["precision"] == {"weight_dtype": "fp32", "mixed_precision": "no"}
    assert "the resumed run started with" in capsys.readouterr().out


def test_default_localizer_fits_the_reward():
    assert isinstance(build_localizer("auto", build_reward("brightness")).source, InputSaliency)
    assert isinstance(build_localizer("auto", RedDetector()).source, GradCAM)


def test_train_with_no_config_runs(sd, tmp_path):
    """`fnf train --model DIR` and nothing else but the run's length and place: the defaults work together."""
    out = str(tmp_path / "bare")
    rc = cli.main(["train", "--model", sd, "--out", out, "--set", "train.steps=1", "--set", "sampling.steps=4",
                   "--set", "train.progress=false", "--set", "train.tensorboard=false"])
    assert rc in (0, None)
    with open(os.path.join(out, "config.yaml"), encoding="utf-8") as f:
        saved = yaml.safe_load(f)
    assert (saved["model"]["weight_dtype"], saved["memory"]["mixed_precision"]) == ("fp32", "no")
    assert saved["localize"]["spec"] == "auto" and saved["reward"]["spec"] == "brightness"
