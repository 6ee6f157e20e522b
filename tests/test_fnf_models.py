"""Loading local SD / SDXL folders, errors for bad folders, LoRA attachment, adapters-off = pretrained,
and sampling that matches the diffusers pipelines."""
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fnf_tiny_models import IMAGE_SIZE, cached_model, one_torch_thread  # noqa: E402,F401
from fnf.core import ModelLoadError
from fnf.lora import adapters_disabled, add_lora
from fnf.families.registry import detect_kind, load_model
from fnf.encoding import encode_prompts
from fnf.sampling import initial_latents, sample_images

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return cached_model("sd", str(tmp_path_factory.getbasetemp()))


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    return cached_model("sdxl", str(tmp_path_factory.getbasetemp()))


def test_missing_and_malformed_folders(tmp_path, sd):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(ModelLoadError, match="model_index.json is missing"):
        load_model(str(tmp_path))
    (tmp_path / "model_index.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        load_model(str(tmp_path))
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(ModelLoadError, match="no 'unet' subfolder"):
        load_model(str(tmp_path))
    broken = tmp_path / "broken"
    os.makedirs(broken / "unet")
    (broken / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    (broken / "unet" / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="could not load 'unet'"):
        load_model(str(broken))
    with pytest.raises(ModelLoadError, match="looks like 'sd'"):
        load_model(sd, kind="sdxl")


def test_detects_kinds(sd, sdxl):
    assert detect_kind(sd) == "sd" and detect_kind(sdxl) == "sdxl"
    m = load_model(sdxl)
    assert m.kind == "sdxl" and len(m.text_encoders) == 2 and m.native_size == IMAGE_SIZE
    emb = encode_prompts(m, ["a cat", "a dog"], height=32, width=32)
    assert emb.hidden.shape[-1] == 64 and emb.pooled.shape == (2, 32) and emb.time_ids.shape == (2, 6)


def test_lora_params_only_trainable_and_adapters_off_is_pretrained(sd):
    m = load_model(sd)
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    emb = encode_prompts(m, ["a photo of a cat"], height=32, width=32)
    with torch.no_grad():
        before = m.denoiser(x, 10, encoder_hidden_states=emb.hidden).sample
    n_before = sum(p.numel() for p in m.denoiser.parameters())
    params = add_lora(m, rank=4, alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    trainable = [n for n, p in m.denoiser.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable) and len(trainable) == len(params)
    assert all(p.dtype == torch.float32 for p in params)
    assert not any(p.requires_grad for mod in (m.vae, *m.text_encoders) for p in mod.parameters())
    # no second copy of the weights: only the LoRA tensors were added
    assert sum(p.numel() for p in m.denoiser.parameters()) == n_before + sum(p.numel() for p in params)
    with torch.no_grad():
        for n, p in m.denoiser.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
        tuned = m.denoiser(x, 10, encoder_hidden_states=emb.hidden).sample
        with adapters_disabled(m.denoiser):
            off = m.denoiser(x, 10, encoder_hidden_states=emb.hidden).sample
    assert torch.equal(off, before)
    assert not torch.allclose(tuned, before)
    with pytest.raises(ValueError, match="matched no UNet module|could not attach"):
        add_lora(load_model(sd), rank=4, alpha=4, target_modules=["no_such_proj"])


def _pipeline_image(pipe_cls, folder, prompt, x_T, steps, guidance):
    pipe = pipe_cls.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return pipe(prompt, latents=x_T.clone(), num_inference_steps=steps, guidance_scale=guidance,
                    output_type="pt", height=IMAGE_SIZE, width=IMAGE_SIZE).images


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_sampler_matches_diffusers_pipeline(kind, sd, sdxl):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    folder = sd if kind == "sd" else sdxl
    m = load_model(folder)
    cond = encode_prompts(m, ["a photo of a cat"], height=32, width=32)
    uncond = encode_prompts(m, [""], height=32, width=32, zero=kind == "sdxl")
    x_T = initial_latents(m, 1, 32, 32, torch.Generator().manual_seed(3), "cpu")
    ours = sample_images(m, x_T, cond, uncond, steps=4, guidance_scale=3.0)
    cls = StableDiffusionXLPipeline if kind == "sdxl" else StableDiffusionPipeline
    ref = _pipeline_image(cls, folder, "a photo of a cat", x_T, 4, 3.0)
    assert ours.shape == ref.shape == (1, 3, 32, 32)
    assert torch.allclose(ours, ref, atol=1e-4), (ours - ref).abs().max()
