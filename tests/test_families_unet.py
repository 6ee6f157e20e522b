"""The model-family seam for the UNet families: detection from model_index.json, the unsupported-pipeline error,
preflight's component check, the step-index contract the samplers rely on, and Separate-and-Enhance refused on
families without separate cross-attention keys."""
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fnf_tiny_models import IMAGE_SIZE, cached_model, one_torch_thread, tiny_config  # noqa: E402,F401
from fnf import preflight  # noqa: E402
from fnf.config import ConfigError  # noqa: E402
from fnf.families import family_by_name, family_for_index  # noqa: E402
from fnf.families.unet import SD, SDXL, StableDiffusionFamily  # noqa: E402
from fnf.core import DiffusionModel, ModelLoadError  # noqa: E402
from fnf.families.registry import detect_kind, family_of, load_model  # noqa: E402
from fnf.encoding import encode_prompts  # noqa: E402
from fnf.sampling import draft_lv, initial_latents, run_steps, schedule  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return cached_model("sd", str(tmp_path_factory.getbasetemp()))


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    return cached_model("sdxl", str(tmp_path_factory.getbasetemp()))


def test_families_are_detected_from_the_pipeline_class(sd, sdxl):
    assert family_for_index({"_class_name": "StableDiffusionPipeline"}) is SD
    assert family_for_index({"_class_name": "StableDiffusionXLPipeline"}) is SDXL
    assert family_for_index({"_class_name": "KandinskyPipeline"}) is None
    assert family_by_name("sd") is SD and family_by_name("sdxl") is SDXL
    assert family_of(sd) is SD and family_of(sdxl) is SDXL
    # A hand-made index without _class_name: the old rule (text_encoder_2 -> SDXL).
    assert family_of("x", {}) is SD and family_of("x", {"text_encoder_2": ["transformers", "C"]}) is SDXL
    m = load_model(sd)
    assert m.family is SD and m.kind == "sd" and m.denoiser is m.denoiser and m.settings == {}
    assert m.pipeline_class.__name__ == "StableDiffusionPipeline"
    # A DiffusionModel built in memory (benchmarks, the memory estimator) gets the family its kind names.
    built = DiffusionModel(path="", family=family_by_name("sdxl"), denoiser=m.denoiser, vae=m.vae, scheduler=m.scheduler)
    assert built.family is SDXL
    # The family's components are what a folder must hold.
    assert all(os.path.isdir(os.path.join(sdxl, c)) for c in SDXL.components)
    assert set(SDXL.components) - set(SD.components) == {"text_encoder_2", "tokenizer_2"}
    assert SD.supports_sepen and SDXL.supports_sepen


def test_an_unsupported_pipeline_class_is_named_with_the_supported_ones(tmp_path):
    folder = tmp_path / "kandinsky"
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    for call in (lambda: load_model(str(folder)), lambda: detect_kind(str(folder)),
                 lambda: preflight.check_model_folder(str(folder))):
        with pytest.raises(ModelLoadError, match="'KandinskyPipeline'.*not support.*StableDiffusionPipeline, "
                                                 "StableDiffusionXLPipeline"):
            call()


def test_preflight_lists_the_family_components(sdxl, tmp_path):
    folder = tmp_path / "partial"
    os.makedirs(folder / "unet")
    with open(os.path.join(sdxl, "model_index.json")) as f:
        (folder / "model_index.json").write_text(f.read())
    with pytest.raises(ModelLoadError, match="no 'vae', .*'tokenizer_2' subfolder.*an? SDXL pipeline folder needs "
                                             + ", ".join(SDXL.components)):
        preflight.check_model_folder(str(folder))
    assert preflight.check_model_folder(sdxl) == "sdxl"


class CountingFamily(StableDiffusionFamily):
    """The SD family, recording the step index of every predict / step / renoise call."""

    def __init__(self):
        self.calls = []

    def predict(self, model, denoiser, x, t, *a, **k):
        self.calls.append(("predict", int(t)))
        return super().predict(model, denoiser, x, t, *a, **k)

    def step(self, model, schedule, i, out, x, **k):
        self.calls.append(("step", i, int(schedule.timesteps[i])))
        return super().step(model, schedule, i, out, x, **k)

    def renoise(self, model, schedule, i, x0, noise):
        self.calls.append(("renoise", i, int(schedule.timesteps[i])))
        return super().renoise(model, schedule, i, x0, noise)


def test_samplers_call_the_family_with_step_indices(sd):
    """The contract transformer families rely on: step i pairs with timesteps[i], a continuation from start=s
    begins at index s, and DRaFT-LV re-noises at the last index."""
    m = load_model(sd)
    m.family = fam = CountingFamily()
    cond = encode_prompts(m, ["a cat"], height=IMAGE_SIZE, width=IMAGE_SIZE)
    x_T = initial_latents(m, 1, IMAGE_SIZE, IMAGE_SIZE, torch.Generator().manual_seed(0), "cpu")
    plan = schedule(m, 4, IMAGE_SIZE, IMAGE_SIZE, "cpu")
    run_steps(m, x_T, plan, cond, None, guidance_scale=1.0)
    ts = [int(t) for t in plan.timesteps]
    assert fam.calls == [c for i in range(4) for c in (("predict", ts[i]), ("step", i, ts[i]))]
    fam.calls.clear()
    run_steps(m, x_T, plan, cond, None, guidance_scale=1.0, start=2)
    assert [c[-1] for c in fam.calls] == [ts[2], ts[2], ts[3], ts[3]]
    fam.calls.clear()
    draft_lv(m, x_T, plan, cond, None, copies=2, guidance_scale=1.0, generator=torch.Generator().manual_seed(1))
    assert fam.calls[8:] == [("renoise", 3, ts[3]), ("predict", ts[3]), ("step", 3, ts[3])] * 2


class JointAttentionFamily(StableDiffusionFamily):
    name, title, supports_sepen = "joint", "Joint", False


def test_sepen_on_a_family_without_cross_attention_keys_is_refused(sd, tmp_path, monkeypatch):
    import fnf.families.registry
    from fnf.train import Session

    cfg = tiny_config(sd, str(tmp_path / "s"), objective={"name": "sepen"},
                      sepen={"concepts": ["cat", "dog", "car"], "downsample": 1})
    preflight.check(cfg)   # the SD family supports it
    monkeypatch.setattr(fnf.families.registry, "family_for_index", lambda index: JointAttentionFamily())
    with pytest.raises(ConfigError, match="objective.name.*sepen.*'Joint' models use joint attention"):
        preflight.check(cfg)   # before any model is loaded
    monkeypatch.undo()
    m = load_model(sd)
    m.family = JointAttentionFamily()
    with pytest.raises(ValueError, match="sepen.*'Joint' models use joint attention"):
        Session(cfg, model=m)


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_a_lora_beyond_attention_saves_and_loads_whole(kind, sd, sdxl, tmp_path):
    """LoRA on attention projections AND feed-forward / proj_in layers: save_lora writes peft keys throughout, and
    both our load_lora and the pipeline's load_lora_weights get every LoRA tensor back (diffusers' key conversion
    would write attention keys as '.lora.down' beside 'lora_A' ones, and the loader then drops the attention
    LoRAs without a word)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    from fnf.core import ADAPTER
    from fnf.lora import add_lora, load_lora, save_lora

    path = {"sd": sd, "sdxl": sdxl}[kind]
    torch.manual_seed(5)
    print("seed", 5)
    m = load_model(path, weight_dtype="fp32")
    add_lora(m, rank=2, alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "proj_in"])
    with torch.no_grad():
        for name, p in m.denoiser.named_parameters():
            if "lora_" in name:
                p.normal_()
    save_lora(m, str(tmp_path / "lora"))
    keys = load_file(str(tmp_path / "lora" / "pytorch_lora_weights.safetensors")).keys()
    assert not any(".lora.down" in k or ".lora.up" in k for k in keys)
    assert any("attn1.to_q.lora_A" in k for k in keys) and any("ff.net.0.proj.lora_A" in k for k in keys)
    want = get_peft_model_state_dict(m.denoiser, adapter_name=ADAPTER)
    fresh = load_model(path, weight_dtype="fp32")
    load_lora(fresh, str(tmp_path / "lora"))
    got = get_peft_model_state_dict(fresh.denoiser, adapter_name=ADAPTER)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    pipe_cls = {"sd": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}[kind]
    pipe = pipe_cls.from_pretrained(path, local_files_only=True)
    pipe.load_lora_weights(str(tmp_path / "lora"), weight_name="pytorch_lora_weights.safetensors", adapter_name="x")
    loaded = get_peft_model_state_dict(pipe.unet, adapter_name="x")
    assert len(loaded) == len(want) and all(torch.equal(loaded[k], want[k]) for k in want)
