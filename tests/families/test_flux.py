"""What only the FLUX.1 family has (tiny FluxPipeline folders, dev-shaped and schnell-shaped): 2x2 packing, the
guidance embedding that never doubles the batch, true CFG without one, its own errors. The
shared family contract is tests/families/test_contract.py."""
from __future__ import annotations

import pytest
import torch

from tests.families.common import PROMPTS, SEED, STEPS, index_of, pipeline, pipeline_images, sample_loop
from tests.fnf_tiny_models import one_torch_thread  # noqa: F401
from tests.tiny_flux import IMAGE_SIZE, cached_flux

from fnf.families import family_for_index
from fnf.families.flux import FluxFamily, pack_latents, unpack_latents

GUIDANCE = 3.5
FAMILY = FluxFamily()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return cached_flux(str(tmp_path_factory.getbasetemp()))


@pytest.fixture(scope="module")
def schnell(tmp_path_factory):
    return cached_flux(str(tmp_path_factory.getbasetemp()), "flux_schnell")


def _index(path):
    return index_of(path)


def _load(path):
    return FAMILY.load(path, index_of(path), weight_dtype=torch.float32)


def _pipeline(path):
    return pipeline(path, "FluxPipeline")


def _pipeline_images(pipe, guidance=GUIDANCE, **kw):
    return pipeline_images(pipe, IMAGE_SIZE, guidance, **kw)


def _sample(m, *, guidance=GUIDANCE, negative=False, grad_steps=0, calls=None):
    return sample_loop(FAMILY, m, IMAGE_SIZE, guidance, negative=negative, grad_steps=grad_steps, calls=calls)


def test_registry_and_packing(folder):
    """model_index.json's FluxPipeline picks this family; pack/unpack are inverse (FluxPipeline's layout)."""
    assert type(family_for_index(_index(folder))).__name__ == "FluxFamily"
    assert FAMILY.supports_sepen is False and FAMILY.lora_targets == ("to_q", "to_k", "to_v", "to_out.0")
    z = torch.randn(2, 16, 6, 8, generator=torch.Generator().manual_seed(SEED))
    from diffusers import FluxPipeline

    packed = pack_latents(z)
    assert torch.equal(packed, FluxPipeline._pack_latents(z, 2, 16, 6, 8))
    assert torch.equal(unpack_latents(packed, 6, 8), z)


@pytest.mark.parametrize("guidance", [GUIDANCE, 1.0])
def test_guidance_distilled_sample_equals_pipeline(folder, guidance):
    """FLUX.1-dev-shaped: the guidance embedding, one transformer row per image even with a negative given."""
    print("seed", SEED)
    m = _load(folder)
    assert m.settings["guidance_embeds"] and not FAMILY.uses_cfg(m, object(), guidance)
    calls = []
    ours = _sample(m, guidance=guidance, negative=True, calls=calls)
    assert [b for b, _ in calls] == [len(PROMPTS)] * STEPS
    ref = _pipeline_images(_pipeline(folder), guidance=guidance)
    assert (ours - ref).abs().max() < 1e-4, (ours - ref).abs().max()
    if guidance != 1.0:   # the embedding matters, so the check above can fail
        assert (ours - _sample(m, guidance=1.0)).abs().max() > 1e-3


def test_true_cfg_sample_equals_pipeline(schnell):
    """Not guidance-distilled (schnell-shaped): guidance > 1 with a negative is the pipeline's true CFG (batch
    doubled); without a negative, the plain conditional sample."""
    print("seed", SEED)
    m = _load(schnell)
    assert not m.settings["guidance_embeds"]
    pipe = _pipeline(schnell)
    calls = []
    ours = _sample(m, guidance=3.0, negative=True, calls=calls)
    assert [b for b, _ in calls] == [2 * len(PROMPTS)] * STEPS
    ref = _pipeline_images(pipe, guidance=0.0, true_cfg_scale=3.0, negative_prompt=[""] * len(PROMPTS))
    assert (ours - ref).abs().max() < 1e-4, (ours - ref).abs().max()
    plain = _sample(m, guidance=3.0)
    ref_plain = _pipeline_images(pipe, guidance=0.0)
    assert (plain - ref_plain).abs().max() < 1e-4
    assert (ours - plain).abs().max() > 1e-3


def test_clear_errors_of_packed_latents(folder):
    m = _load(folder)
    with pytest.raises(ValueError, match="width"):
        FAMILY.schedule(m, STEPS, IMAGE_SIZE, 32.0, "cpu")
    x = FAMILY.initial_latents(m, 1, IMAGE_SIZE, IMAGE_SIZE, torch.Generator(), "cpu")
    with pytest.raises(ValueError, match="packed tokens"):
        unpack_latents(x, 8, 8)
