"""Text encoders and the T5 keys.

* ``memory.offload_text_encoder``: the Session loads the model on the host, encodes the training prompts and the
  negative prompt with only the text encoders on the device, moves them off, and only then places the denoiser
  (fnf.train.placement.encode_before_denoiser); the objective reads the cached embeddings, no encoder runs again. Without
  the key, or for an objective that encodes while training (Separate-and-Enhance), the old order holds.
* ``model.text_encoder_3: false`` (SD3 without T5) and ``model.max_sequence_length`` (SD3, FLUX.1) equal the
  diffusers pipelines: ``StableDiffusion3Pipeline(text_encoder_3=None)`` images within 1e-4, ``encode_prompt``
  embeddings exactly, defaults the pipelines' own.
"""
from __future__ import annotations

import contextlib
import inspect
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fnf_tiny_models import cached_model, one_torch_thread  # noqa: F401
from tiny_flux import IMAGE_SIZE as FLUX_SIZE
from tiny_flux import cached_flux
from tiny_sd3 import IMAGE_SIZE as SD3_SIZE
from tiny_sd3 import cached_sd3

from fnf import config as config_mod
from fnf import precision
from fnf.encoding import encode_prompts
from fnf.families.registry import load_model, model_options
from fnf.objectives.base import NoProbe
from fnf.train import trainer as train_mod

os.environ.setdefault("HF_HUB_OFFLINE", "1")
SEED = 11
PROMPTS = ["a photo of a cat", "a red car"]
ENCODERS = ("CLIPTextModel", "CLIPTextModelWithProjection", "T5EncoderModel")
DENOISERS = ("FluxTransformer2DModel", "SD3Transformer2DModel", "UNet2DConditionModel")


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    return cached_flux(str(tmp_path_factory.getbasetemp()))


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    return cached_sd3(str(tmp_path_factory.getbasetemp()))


def _name(module) -> str:
    cls = type(module).__name__
    return "denoiser" if cls in DENOISERS else "text encoder" if cls in ENCODERS else cls


class RecordingProbe(NoProbe):
    """The Session's phases and placements, in order, in one list shared with the encoder hooks."""

    def __init__(self, events: list):
        self.events = events

    def phase(self, name: str, host: bool = False):
        @contextlib.contextmanager
        def block():
            self.events.append(("enter", name))
            yield
            self.events.append(("exit", name))
        return block()

    def placed(self, modules, on_device: bool) -> None:
        for module in modules:
            self.events.append(("placed", _name(module), on_device))


def _recording_load(monkeypatch, events: list):
    """fnf.train.trainer.load_model, recording the load device and every text-encoder forward."""
    real = train_mod.load_model

    def load(*args, **kwargs):
        events.append(("load", str(kwargs.get("device"))))
        model = real(*args, **kwargs)
        for enc in model.text_encoders:
            enc.register_forward_pre_hook(lambda mod, args: events.append(("encode", type(mod).__name__)))
        return model

    monkeypatch.setattr(train_mod, "load_model", load)


def _flux_cfg(path, **memory):
    return config_mod.from_dict({
        "model": {"path": path, "max_sequence_length": 64},
        "train": {"device": "cpu", "prompts": PROMPTS, "steps": 1, "batch_size": 1},
        "sampling": {"steps": 2, "truncation_k": 1, "height": FLUX_SIZE, "width": FLUX_SIZE, "guidance_scale": 3.5},
        "lora": {"rank": 2, "alpha": 2}, "localize": {"spec": "none"}, "objective": {"beta": 0},
        "memory": memory})


def _first(events, item, start=0) -> int:
    return events.index(item, start)


def test_encoders_finish_before_the_denoiser_reaches_the_device(flux, monkeypatch):
    """Offload on: load on the host; the denoiser is marked off the device, the encoders encode (and only
    then), leave the device, and the denoiser is placed; the objective's embeddings come from the cache (equal
    to a direct encode, max_sequence_length from the config) and no encoder runs in setup or in a training step."""
    print("seed", SEED)
    events: list = []
    _recording_load(monkeypatch, events)
    session = train_mod.Session(_flux_cfg(flux, offload_text_encoder=True), probe=RecordingProbe(events))
    assert events[0] == ("load", "cpu")
    host = _first(events, ("placed", "denoiser", False))
    enc_start = _first(events, ("enter", "prompt encoding"), host)
    off = _first(events, ("placed", "text encoder", False), enc_start)
    arrives = _first(events, ("placed", "denoiser", True))
    assert host < enc_start < off < arrives
    encodes = [i for i, e in enumerate(events) if e[0] == "encode"]
    assert encodes and all(enc_start < i < off for i in encodes)   # the objective's setup encoded nothing
    n_encodes = len(encodes)
    record, _ = session.optimizer_step(0)
    assert not record["skipped"] and sum(e[0] == "encode" for e in events) == n_encodes
    m = session.model
    assert len(session.ctx.prompt_cache.entries) == 2                        # the prompts and the negative prompt
    direct = m.family.encode(m, PROMPTS, height=FLUX_SIZE, width=FLUX_SIZE)
    assert session.objective.embeds.hidden.shape == (2, 64, 32)               # model.max_sequence_length reached the family
    assert torch.equal(session.objective.embeds.hidden, direct.hidden) and torch.equal(session.objective.embeds.pooled, direct.pooled)
    assert all(next(enc.parameters()).device.type == "cpu" for enc in m.text_encoders)


def test_without_offload_the_model_loads_on_the_device_and_encodes_in_setup(flux, monkeypatch):
    events: list = []
    _recording_load(monkeypatch, events)
    session = train_mod.Session(_flux_cfg(flux, offload_text_encoder=False), probe=RecordingProbe(events))
    assert events[0] == ("load", str(session.device))
    assert ("placed", "denoiser", False) not in events and session.ctx.prompt_cache is None
    enc_start = _first(events, ("enter", "prompt encoding"))
    assert any(e[0] == "encode" for e in events[enc_start:])


def test_an_objective_that_encodes_while_training_keeps_its_encoders(tmp_path, monkeypatch):
    """Separate-and-Enhance encodes new two-object prompts every step: no early encoding, no offload."""
    sd = cached_model("sd", str(tmp_path))
    cfg = config_mod.from_dict({"model": {"path": sd}, "objective": "sepen",
                                "train": {"device": "cpu", "steps": 1}, "sampling": {"steps": 2, "truncation_k": 1},
                                "memory": {"offload_text_encoder": True}})
    events: list = []
    _recording_load(monkeypatch, events)
    session = train_mod.Session(cfg, probe=RecordingProbe(events))
    assert events[0] == ("load", str(session.device)) and session.ctx.prompt_cache is None
    assert not any(e[0] == "placed" and e[1] == "text encoder" for e in events)


# ------------------------------------------------------------------------------------------ SD3 / FLUX T5 keys
def _sd3_pipeline(path, **kw):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(path, local_files_only=True, **kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _load_from_config(path, **model):
    cfg = precision.resolve(config_mod.from_dict({"model": {"path": path, **model}}), None)  # 'auto' on the CPU
    return load_model(path, kind=cfg.model.kind, weight_dtype=cfg.model.weight_dtype, **model_options(cfg))


@pytest.mark.parametrize("max_sequence_length", [0, 64])
def test_sd3_without_t5_from_config_equals_the_pipeline_without_t5(sd3, max_sequence_length):
    """model.text_encoder_3: false (and model.max_sequence_length) on a full SD3 folder: fnf's sample equals
    StableDiffusion3Pipeline(text_encoder_3=None, tokenizer_3=None) for the same seed within 1e-4 (float32)."""
    from fnf import sampling

    print("seed", SEED)
    m = _load_from_config(sd3, text_encoder_3=False, max_sequence_length=max_sequence_length)
    assert len(m.text_encoders) == 2 and not m.settings["t5"]
    steps, guidance = 4, 3.0
    cond = encode_prompts(m, PROMPTS, height=SD3_SIZE, width=SD3_SIZE)
    uncond = encode_prompts(m, ["", ""], height=SD3_SIZE, width=SD3_SIZE)
    x_T = sampling.initial_latents(m, 2, SD3_SIZE, SD3_SIZE, torch.Generator().manual_seed(SEED), "cpu")
    ours = sampling.sample_images(m, x_T, cond, uncond, steps=steps, guidance_scale=guidance)
    pipe = _sd3_pipeline(sd3, text_encoder_3=None, tokenizer_3=None)
    kw = {"max_sequence_length": max_sequence_length} if max_sequence_length else {}
    with torch.no_grad():
        ref = pipe(PROMPTS, num_inference_steps=steps, guidance_scale=guidance, height=SD3_SIZE, width=SD3_SIZE,
                   output_type="pt", generator=torch.Generator().manual_seed(SEED), **kw).images
    assert ours.shape == ref.shape and ours.std() > 1e-3
    assert (ours - ref).abs().max() < 1e-4, (ours - ref).abs().max()
    assert torch.all(cond.hidden[:, 16:] == 0)   # the T5 tokens are zeros


def test_max_sequence_length_equals_encode_prompt(sd3, flux):
    """model.max_sequence_length: 64 gives the pipelines' encode_prompt(max_sequence_length=64) exactly (SD3 with
    T5: 16 CLIP + 64 T5 tokens; FLUX.1: 64 T5 tokens)."""
    from diffusers import FluxPipeline

    m = _load_from_config(sd3, max_sequence_length=64)
    cond = encode_prompts(m, PROMPTS, height=SD3_SIZE, width=SD3_SIZE)
    with torch.no_grad():
        pe, _, pp, _ = _sd3_pipeline(sd3).encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=False,
                                                        max_sequence_length=64)
    assert cond.hidden.shape == pe.shape == (2, 16 + 64, 48)
    assert torch.equal(cond.hidden, pe) and torch.equal(cond.pooled, pp)
    f = _load_from_config(flux, max_sequence_length=64)
    fcond = encode_prompts(f, PROMPTS, height=FLUX_SIZE, width=FLUX_SIZE)
    pipe = FluxPipeline.from_pretrained(flux, local_files_only=True)
    with torch.no_grad():
        fpe, fpp, _ = pipe.encode_prompt(PROMPTS, None, max_sequence_length=64)
    assert fcond.hidden.shape == fpe.shape == (2, 64, 32)
    assert torch.equal(fcond.hidden, fpe) and torch.equal(fcond.pooled, fpp)


def test_max_sequence_length_defaults_are_the_pipelines(sd3, flux):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    for path, pipeline in ((sd3, StableDiffusion3Pipeline), (flux, FluxPipeline)):
        default = inspect.signature(pipeline.__call__).parameters["max_sequence_length"].default
        assert _load_from_config(path).settings["max_sequence_length"] == default


class _BnbMarker:
    """What diffusers attaches to a bitsandbytes-quantized model (``hf_quantizer.quantization_config``)."""

    quantization_config = type("Q", (), {"quant_method": "bitsandbytes"})()


@pytest.mark.parametrize("bnb", [False, True])
def test_a_bitsandbytes_denoiser_on_the_gpu_means_encoding_on_the_host(flux, bnb, monkeypatch):
    """encode_before_denoiser: a plain denoiser (on the host) -> the encoders go to the device, encode, and come
    back; a bitsandbytes one (already on its GPU) -> the encoders are never moved to the device (the prompts are
    encoded where they are) and the probe records them as never on it; the embeddings are the same."""
    from fnf.train import placement

    m = load_model(flux, weight_dtype="fp32")
    if bnb:
        m.denoiser.hf_quantizer = _BnbMarker()
    events = []
    for enc in m.text_encoders:
        real_to = enc.to
        monkeypatch.setattr(enc, "to", lambda *a, _real=real_to, **k: events.append(("to",)) or _real(*a, **k))
    cache = placement.encode_before_denoiser(m, PROMPTS, "", height=FLUX_SIZE, width=FLUX_SIZE, device="cpu",
                                             probe=RecordingProbe(events), move_denoiser=False)
    assert ("placed", "denoiser", bnb) in events
    assert (("placed", "text encoder", True) in events) == (not bnb)
    before = events[:events.index(("enter", "prompt encoding"))]
    assert (("to",) in before) == (not bnb)    # moved to the device before encoding only without bitsandbytes
    direct = m.family.encode(m, PROMPTS, height=FLUX_SIZE, width=FLUX_SIZE)
    got = encode_prompts(m, PROMPTS, height=FLUX_SIZE, width=FLUX_SIZE, cache=cache)
    assert torch.equal(got.hidden, direct.hidden)
