"""model.quantize (fnf/quantize.py): config validation, preflight's one-line refusals (backend missing, no CUDA,
a family without the option), the loading path with a stand-in backend, and -- when torchao is importable -- a
real torchao int8 weight-only transformer on the tiny FLUX folder: LoRA gradients flow, the base stays frozen, the
frozen model is the quantized base with adapters disabled."""
from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
import types

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fnf_tiny_models import cached_model, one_torch_thread  # noqa: F401
from tiny_flux import IMAGE_SIZE, cached_flux

from fnf import config as config_mod
from fnf import preflight, quantize
from fnf.config import ConfigError
from fnf.families.registry import LOAD_OPTIONS, load_model
from fnf.lora import adapters_disabled, add_lora

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HAS_TORCHAO = importlib.util.find_spec("torchao") is not None
REAL_FIND_SPEC = importlib.util.find_spec
SEED = 3


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    return cached_flux(str(tmp_path_factory.getbasetemp()))


def _cfg(path, **model):
    return config_mod.from_dict({"model": {"path": path, **model}, "train": {"device": "cpu"},
                                 "localize": {"spec": "none"}, "reward": {"spec": "brightness"}})


# ------------------------------------------------------------------------------------------ config
def test_config_keys_choices_and_defaults():
    cfg = config_mod.from_dict({})
    assert (cfg.model.quantize, cfg.model.text_encoder_3, cfg.model.max_sequence_length) == ("none", True, 0)
    assert {k: getattr(cfg.model, k) for k in LOAD_OPTIONS} == LOAD_OPTIONS   # the defaults pass nothing on
    for value in quantize.METHODS:
        assert config_mod.load(None, [f"model.quantize={value}"]).model.quantize == value
    assert config_mod.load(None, ["model.quantize=off"]).model.quantize == "none"   # YAML's off / no
    assert config_mod.from_dict({"model": {"quantize": False}}).model.quantize == "none"
    with pytest.raises(ConfigError, match=r"'model.quantize'.*bnb-8bit, bnb-4bit, torchao-int8.*'int4'"):
        config_mod.load(None, ["model.quantize=int4"])
    for bad in (-1, 513):
        with pytest.raises(ConfigError, match="'model.max_sequence_length'"):
            config_mod.load(None, [f"model.max_sequence_length={bad}"])
    with pytest.raises(ValueError, match="model.quantize"):
        quantize.quantization_config("int4", torch.float32)


# ------------------------------------------------------------------------------------------ preflight
def _spec_without(missing: str):
    def find_spec(name, *args, **kwargs):
        return None if name == missing else REAL_FIND_SPEC(name, *args, **kwargs)

    return find_spec


@pytest.mark.parametrize("method", ["bnb-8bit", "bnb-4bit"])
def test_preflight_refuses_bitsandbytes_without_cuda(flux, method, monkeypatch):
    """On this CPU: bitsandbytes missing names the package; present (a stand-in spec) but no CUDA device names
    CUDA. One line, naming the key, before any model loads."""
    cfg = _cfg(flux, quantize=method)
    monkeypatch.setattr(importlib.util, "find_spec", _spec_without("bitsandbytes"))
    with pytest.raises(ConfigError) as e:
        preflight.check(cfg)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("config key 'model.quantize'") and method in msg
    assert "bitsandbytes package, which is not installed" in msg and "pip install bitsandbytes" in msg
    present = importlib.machinery.ModuleSpec("bitsandbytes", None)
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: present if name == "bitsandbytes" else REAL_FIND_SPEC(name, *a, **k))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg.train.device = "auto"   # resolves to the CPU
    with pytest.raises(ConfigError, match=r"^config key 'model.quantize': bnb-\dbit needs a CUDA device"):
        preflight.check(cfg)


def test_preflight_refuses_torchao_when_missing(flux, monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", _spec_without("torchao"))
    with pytest.raises(ConfigError) as e:
        preflight.check(_cfg(flux, quantize="torchao-int8"))
    assert str(e.value) == ("config key 'model.quantize': torchao-int8 needs the torchao package, which is not "
                            "installed: pip install torchao")


def test_fnf_train_refuses_in_one_line_before_loading(flux, tmp_path, monkeypatch, capsys):
    """`fnf train --set model.quantize=bnb-8bit` on a CPU: exit status 2, one stderr line naming the key and what
    is missing, no model loaded."""
    from fnf import cli
    from fnf.train import trainer

    monkeypatch.setattr(trainer, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    rc = cli.main(["train", "--model", flux, "--out", str(tmp_path / "run"), "--set", "model.quantize=bnb-8bit",
                   "--set", "train.device=cpu", "--set", "localize.spec=none"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("fnf train: error: config key 'model.quantize': bnb-8bit needs") and "bitsandbytes" in err


def test_preflight_refuses_options_the_family_does_not_take(flux, tmp_path, monkeypatch):
    """SD 1.x has no T5; FLUX.1's T5 is not optional: each is one line naming the key and the families that take
    it. Every family takes model.quantize (SD / SDXL: the UNet's Linear layers); Separate-and-Enhance, which
    trains the UNet's own to_k weights, refuses a quantized UNet in one line."""
    sd = cached_model("sd", str(tmp_path))
    with pytest.raises(ConfigError, match=r"^config key 'model.max_sequence_length': 64 applies to sd3, flux"):
        preflight.check(_cfg(sd, max_sequence_length=64))
    with pytest.raises(ConfigError, match=r"^config key 'model.text_encoder_3': False applies to sd3 models "
                                          r"only; this folder is 'FLUX.1'"):
        preflight.check(_cfg(flux, text_encoder_3=False))
    preflight.check(_cfg(flux, max_sequence_length=64))   # accepted
    from fnf.families.registry import families_accepting

    assert set(families_accepting("quantize")) >= {"sd", "sdxl", "sd3", "flux", "flux2"}
    monkeypatch.setattr(quantize, "problem", lambda method, cuda: None)   # as if torchao were installed
    preflight.check(_cfg(sd, quantize="torchao-int8"))
    cfg = config_mod.from_dict({"model": {"path": sd, "quantize": "torchao-int8"}, "objective": "sepen",
                                "sepen": {"concepts": ["cat", "dog"]}, "train": {"device": "cpu"}})
    with pytest.raises(ConfigError, match=r"^config key 'model.quantize': torchao-int8 with objective sepen: "
                                          r".*attn2.to_k.*leave model.quantize at 'none'"):
        preflight.check(cfg)


# ------------------------------------------------------------------------------------------ loading path
class _FakeQuantizer:
    """What diffusers attaches to a quantized model (``hf_quantizer.quantization_config.quant_method``)."""

    def __init__(self, method):
        self.quantization_config = types.SimpleNamespace(quant_method=method)


@pytest.mark.parametrize("family", ["flux", "sd"])
def test_loading_path_passes_the_quantization_config(family, flux, tmp_path, monkeypatch):
    """With a stand-in backend: the family reads its denoiser (FLUX.1's transformer, SD's UNet) with
    from_pretrained(quantization_config=the method's config, torch_dtype=the weight dtype), everything else
    without one; LoRA goes on top in fp32 and the base stays frozen; a bitsandbytes model is not moved (its
    weights stay on the GPU they were quantized on); the fused LoRA path stays off (auto) or refuses (on) on a
    quantized base, since its kernels read the base weight as floats."""
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel
    from diffusers.models.modeling_utils import ModelMixin

    from fnf.train import fused_lora

    denoiser, path, dtype, method, targets = {
        "flux": (FluxTransformer2DModel, flux, "bf16", "bnb-4bit", ["to_q", "to_v"]),
        "sd": (UNet2DConditionModel, cached_model("sd", str(tmp_path)), "fp32", "bnb-8bit",
               ["to_q", "to_k", "to_v", "to_out.0"])}[family]
    torch_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    sentinel = object()
    seen = []
    monkeypatch.setattr(quantize, "quantization_config",
                        lambda method, dtype: seen.append((method, dtype)) or sentinel)
    original = ModelMixin.from_pretrained.__func__
    calls = []

    def from_pretrained(cls, folder, **kwargs):
        calls.append((cls.__name__, kwargs.get("quantization_config"), kwargs.get("torch_dtype")))
        kwargs.pop("quantization_config", None)
        model = original(cls, folder, **kwargs)
        if cls is denoiser:
            model.hf_quantizer = _FakeQuantizer("bitsandbytes")
        return model

    monkeypatch.setattr(ModelMixin, "from_pretrained", classmethod(from_pretrained))
    moved = []
    monkeypatch.setattr(denoiser, "to", lambda self, *a, **k: moved.append(a) or self)
    m = load_model(path, weight_dtype=dtype, quantize=method)
    assert seen == [(method, torch_dtype)]
    assert [c for c in calls if c[1] is not None] == [(denoiser.__name__, sentinel, torch_dtype)]
    assert moved == [] and quantize.method_of(m.denoiser) == "bitsandbytes"
    params = add_lora(m, rank=2, alpha=2, target_modules=targets)
    assert params and all(p.dtype == torch.float32 for p in params)
    assert {n for n, p in m.denoiser.named_parameters() if p.requires_grad} == \
        {n for n, p in m.denoiser.named_parameters() if "lora_" in n}
    on, why = fused_lora.enable(m.denoiser, "auto", "cpu")
    assert not on and "quantized, bitsandbytes" in why
    with pytest.raises(ValueError, match="memory.fused_lora=on: the frozen base is quantized"):
        fused_lora.enable(m.denoiser, "on", "cpu")


def test_move_and_method_of():
    plain = torch.nn.Linear(2, 2)
    assert quantize.method_of(plain) is None and quantize.move(plain, "cpu") is plain
    plain.hf_quantizer = _FakeQuantizer("torchao")
    assert quantize.method_of(plain) == "torchao"


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                    reason="bitsandbytes is not installed (diffusers' BitsAndBytesConfig needs it to build)")
def test_bitsandbytes_configs():
    c8 = quantize.quantization_config("bnb-8bit", torch.bfloat16)
    c4 = quantize.quantization_config("bnb-4bit", torch.bfloat16)
    assert c8.load_in_8bit and not c8.load_in_4bit
    assert c4.load_in_4bit and c4.bnb_4bit_quant_type == "nf4" and c4.bnb_4bit_compute_dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------ torchao, for real
def _predict(m, denoiser, x, cond, t):
    return m.family.predict(m, denoiser, x, t, cond, None, 3.5)


@pytest.mark.skipif(not HAS_TORCHAO, reason="torchao is not installed (pip install torchao): the real int8 "
                    "weight-only test runs only where it is")
def test_torchao_int8_transformer_trains_lora_on_a_frozen_base(flux):
    """torchao int8 weight-only on the tiny FLUX transformer (CPU): its Linear weights are int8 tensors, its
    output is close to the float one (per-row int8: within 5% of the output's scale) but not equal; with a random
    LoRA the adapters-off output equals the quantized base without LoRA exactly (the frozen model); one backward
    gives every LoRA tensor a non-zero gradient and no base parameter any."""
    from fnf.encoding import encode_prompts

    print("seed", SEED)
    if quantize.problem("torchao-int8", cuda=False):
        pytest.skip(quantize.problem("torchao-int8", cuda=False))
    full = load_model(flux)
    m = load_model(flux, quantize="torchao-int8")
    base = load_model(flux, quantize="torchao-int8")
    assert quantize.method_of(m.denoiser) == "torchao" and quantize.method_of(full.denoiser) is None
    weight = m.denoiser.transformer_blocks[0].attn.to_q.weight
    assert type(weight) is not torch.nn.Parameter and "int8" in repr(type(weight)).lower() + str(weight.dtype)
    g = torch.Generator().manual_seed(SEED)
    x = m.family.initial_latents(m, 1, IMAGE_SIZE, IMAGE_SIZE, g, "cpu")
    t = m.family.schedule(m, 2, IMAGE_SIZE, IMAGE_SIZE, "cpu").timesteps[0]
    cond = encode_prompts(m, ["a photo of a cat"], height=IMAGE_SIZE, width=IMAGE_SIZE)
    with torch.no_grad():
        ref_full, ref_q = _predict(full, full.denoiser, x, cond, t), _predict(base, base.denoiser, x, cond, t)
    err = (ref_q - ref_full).abs().max() / ref_full.abs().max()
    assert 0 < err < 0.05, err
    params = add_lora(m, rank=2, alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    assert type(m.denoiser.transformer_blocks[0].attn.to_q).__name__ == "TorchaoLoraLinear"
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    with torch.no_grad(), adapters_disabled(m.denoiser):
        frozen = _predict(m, m.denoiser, x, cond, t)
    assert torch.equal(frozen, ref_q)
    out = _predict(m, m.denoiser, x, cond, t)
    assert (out - ref_q).abs().max() > 1e-4
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    assert all(p.grad is None for n, p in m.denoiser.named_parameters() if "lora_" not in n)


@pytest.mark.skipif(not HAS_TORCHAO, reason="torchao is not installed (pip install torchao): the real int8 "
                    "weight-only test runs only where it is")
@pytest.mark.parametrize("family", ["flux", "sd", "sdxl"])
def test_torchao_int8_session_step_and_export(family, flux, tmp_path):
    """model.quantize=torchao-int8 through the trainer (preflight, Session, one DRaFT step) on FLUX.1's
    transformer and on the SD / SDXL UNet: the step is applied, the frozen (adapters-off) output is unchanged by
    it, and the exported LoRA loads into a full-precision model of the same folder with the trained tensors."""
    from fnf_tiny_models import IMAGE_SIZE as UNET_SIZE

    from fnf.lora import load_lora, lora_state_dict
    from fnf.train import Session

    print("seed", SEED)
    if quantize.problem("torchao-int8", cuda=False):
        pytest.skip(quantize.problem("torchao-int8", cuda=False))
    path = flux if family == "flux" else cached_model(family, str(tmp_path))
    size = IMAGE_SIZE if family == "flux" else UNET_SIZE
    cfg = config_mod.from_dict({
        "model": {"path": path, "quantize": "torchao-int8"},
        "train": {"device": "cpu", "prompts": ["a photo of a cat"], "steps": 1, "seed": SEED, "lr": 1e-2},
        "sampling": {"steps": 2, "truncation_k": 1, "height": size, "width": size},
        "lora": {"rank": 2, "alpha": 2}, "localize": {"spec": "none"}, "objective": {"beta": 0}})
    preflight.check(cfg, specs=False)
    session = Session(cfg)
    m = session.model
    assert quantize.method_of(m.denoiser) == "torchao"
    g = torch.Generator().manual_seed(SEED)
    x = m.family.initial_latents(m, 1, size, size, g, "cpu")
    t = m.family.schedule(m, 2, size, size, "cpu").timesteps[0]
    with torch.no_grad(), adapters_disabled(m.denoiser):
        before = _predict(m, m.denoiser, x, session.objective.embeds, t)
    lora_before = lora_state_dict(m.denoiser)
    record, _ = session.optimizer_step(0)
    assert not record["skipped"] and record["grad_norm"] > 0
    trained = lora_state_dict(m.denoiser)
    assert any(not torch.equal(trained[k], lora_before[k]) for k in trained)
    with torch.no_grad(), adapters_disabled(m.denoiser):
        assert torch.equal(_predict(m, m.denoiser, x, session.objective.embeds, t), before)
    m.family.save_lora(m, str(tmp_path / "lora"))
    full = load_model(path)
    load_lora(full, str(tmp_path / "lora"))
    loaded = {n: p for n, p in full.denoiser.named_parameters() if "lora_" in n}
    assert sorted(loaded) == sorted(trained)
    assert all(torch.equal(loaded[n].float(), trained[n].float()) for n in trained)
