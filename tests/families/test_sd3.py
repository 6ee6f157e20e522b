"""What only the SD3 / SD3.5 family has (tiny StableDiffusion3Pipeline folders): dynamic shifting, the prompt
encoding against ``encode_prompt``, the folder without T5. The shared family contract (pipeline parity, DRaFT-K
grads, export, resume, errors, the shipped config) is tests/families/test_contract.py."""
from __future__ import annotations

import pytest
import torch

from tests.families.common import PROMPTS, SEED, index_of, pipeline, pipeline_images, sample_loop
from tests.fnf_tiny_models import one_torch_thread  # noqa: F401
from tests.tiny_sd3 import IMAGE_SIZE, cached_sd3

from fnf.families import family_for_index
from fnf.families.sd3 import SD3Family

GUIDANCE = 3.0
FAMILY = SD3Family()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return cached_sd3(str(tmp_path_factory.getbasetemp()))


@pytest.fixture(scope="module")
def folder_no_t5(tmp_path_factory):
    return cached_sd3(str(tmp_path_factory.getbasetemp()), t5=False)


def _index(path):
    return index_of(path)


def _load(path, **kw):
    return FAMILY.load(path, index_of(path), weight_dtype=torch.float32, **kw)


def _pipeline(path, **kw):
    return pipeline(path, "StableDiffusion3Pipeline", **kw)


def _pipeline_images(pipe, seed=SEED, prompts=PROMPTS):
    return pipeline_images(pipe, IMAGE_SIZE, GUIDANCE, prompts=prompts, seed=seed)


def _sample(model, seed=SEED, prompts=PROMPTS):
    return sample_loop(FAMILY, model, IMAGE_SIZE, GUIDANCE, negative=True, seed=seed, prompts=prompts)


def test_registry_and_components(folder):
    assert isinstance(family_for_index(_index(folder)), SD3Family)
    m = _load(folder)
    assert m.kind == "sd3" and m.family is FAMILY and m.denoiser.__class__.__name__ == "SD3Transformer2DModel"
    assert len(m.text_encoders) == 3 and m.settings["t5"] and m.native_size == IMAGE_SIZE
    assert not any(p.requires_grad for mod in [m.denoiser, m.vae, *m.text_encoders] for p in mod.parameters())


@pytest.mark.parametrize("dynamic", [False, True])
def test_sample_equals_pipeline(folder, dynamic):
    """Same seed / steps / guidance: the pipeline's image within 1e-4 (float32), static and dynamic shifting."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    print("seed", SEED)
    m, pipe = _load(folder), _pipeline(folder)
    if dynamic:   # SD3.5-style resolution-dependent shift: mu from the image token count
        for obj in (m, pipe):
            obj.scheduler = FlowMatchEulerDiscreteScheduler.from_config(
                pipe.scheduler.config, use_dynamic_shifting=True, base_image_seq_len=16, max_image_seq_len=256)
    ours, ref = _sample(m), _pipeline_images(pipe)
    assert ours.shape == ref.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert (ours - ref).abs().max() < 1e-4, (ours - ref).abs().max()
    assert ours.std() > 1e-3   # not a constant image


def test_encode_equals_encode_prompt(folder):
    m, pipe = _load(folder), _pipeline(folder)
    with torch.no_grad():
        pe, ne, pp, npp = pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=True)
    cond = FAMILY.encode(m, PROMPTS, height=IMAGE_SIZE, width=IMAGE_SIZE)
    uncond = FAMILY.encode(m, ["", ""], height=IMAGE_SIZE, width=IMAGE_SIZE)
    for a, b in [(cond.hidden, pe), (cond.pooled, pp), (uncond.hidden, ne), (uncond.pooled, npp)]:
        assert a.shape == b.shape and torch.equal(a, b)
    # layout: 16 CLIP tokens (16 + 24 wide, zero-padded to T5's 48) then 256 T5 tokens; pooled 16 + 24
    assert cond.hidden.shape == (2, 16 + 256, 48) and cond.pooled.shape == (2, 40)
    assert torch.all(cond.hidden[:, :16, 40:] == 0) and cond.hidden[:, 16:].abs().sum() > 0
    zero = FAMILY.encode(m, ["", ""], height=IMAGE_SIZE, width=IMAGE_SIZE, zero=True)
    assert torch.all(zero.hidden == 0) and torch.all(zero.pooled == 0)


def test_without_t5_equals_pipeline_without_t5(folder, folder_no_t5):
    """A folder without text_encoder_3, and text_encoder_3=False on a full folder: zero T5 tokens, as the
    pipeline loaded with text_encoder_3=None."""
    print("seed", SEED)
    no_t5 = {"text_encoder_3": None, "tokenizer_3": None}
    for path, kw in [(folder_no_t5, {}), (folder, {"text_encoder_3": False})]:
        m = _load(path, **kw)
        assert len(m.text_encoders) == 2 and not m.settings["t5"]
        cond = FAMILY.encode(m, PROMPTS, height=IMAGE_SIZE, width=IMAGE_SIZE)
        assert torch.all(cond.hidden[:, 16:] == 0)
        ours, ref = _sample(m), _pipeline_images(_pipeline(path, **no_t5))
        assert (ours - ref).abs().max() < 1e-4, (ours - ref).abs().max()
