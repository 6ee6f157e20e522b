"""What only the FLUX.2 family has (a tiny FLUX.2-dev-shaped Flux2Pipeline folder): the latent layout and mu of
the pipeline, the guidance embedding (no CFG batch), max_sequence_length, its tokenizer errors, the Focus-N-Fix
penalty holding pixels outside the mask. The shared family contract is tests/families/test_contract.py.

Skipped where diffusers has no Flux2Pipeline (the CI floor, diffusers 0.34)."""
from __future__ import annotations

import pytest
import torch

from tests.families.common import PROMPTS, SEED, STEPS, index_of, pipeline, pipeline_images
from tests.fnf_tiny_models import one_torch_thread  # noqa: F401
from tests.tiny_flux2 import IMAGE_SIZE, cached_flux2, have_flux2

pytestmark = pytest.mark.skipif(not have_flux2(), reason="the installed diffusers/transformers have no "
                                "Flux2Pipeline / Mistral3 (FLUX.2 needs a newer diffusers than the 0.34 floor)")

from fnf.families import family_for_index  # noqa: E402
from fnf.families.flux2 import (  # noqa: E402
    Flux2Family,
    empirical_mu,
    latent_ids,
    pack_latents,
    patchify,
    text_ids,
    unpack_latents,
    unpatchify,
)
from fnf.core import ModelLoadError  # noqa: E402
from fnf.families.registry import load_model  # noqa: E402

GUIDANCE = 4.0
FAMILY = Flux2Family()
SIZE = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return cached_flux2(str(tmp_path_factory.getbasetemp()))


def _index(path):
    return index_of(path)


def _pipeline(path):
    return pipeline(path, "Flux2Pipeline")


def _pipeline_images(pipe, prompts=PROMPTS, guidance=GUIDANCE, seed=SEED):
    return pipeline_images(pipe, IMAGE_SIZE, guidance, prompts=prompts, seed=seed)


def test_latent_layout_and_mu_equal_the_pipelines():
    """pack / unpack / patchify / ids are Flux2Pipeline's static helpers; empirical_mu is compute_empirical_mu."""
    from diffusers import Flux2Pipeline
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

    print("seed", SEED)
    z = torch.randn(2, 4, 6, 10, generator=torch.Generator().manual_seed(SEED))
    p = patchify(z)
    assert torch.equal(p, Flux2Pipeline._patchify_latents(z)) and torch.equal(unpatchify(p), z)
    packed = pack_latents(p)
    assert torch.equal(packed, Flux2Pipeline._pack_latents(p))
    ids = Flux2Pipeline._prepare_latent_ids(p)
    assert torch.equal(latent_ids(3, 5, "cpu"), ids[0]) and ids.dtype == latent_ids(3, 5, "cpu").dtype
    assert torch.equal(unpack_latents(packed, 3, 5), Flux2Pipeline._unpack_latents_with_ids(packed, ids))
    assert torch.equal(text_ids(7, "cpu"), Flux2Pipeline._prepare_text_ids(torch.zeros(2, 7, 3))[1])
    for seq, steps in [(64, 4), (1024, 28), (4096, 50), (4301, 50), (16384, 10)]:
        assert empirical_mu(seq, steps) == compute_empirical_mu(seq, steps)


def test_registry_and_generic_sampler_equal_pipeline(folder):
    """model_index.json's Flux2Pipeline picks this family; load_model + fnf.sampling.sample_images give the
    pipeline's images; no CFG batch doubling even with a negative; the guidance embedding matters."""
    from fnf import preflight, sampling
    from fnf.encoding import encode_prompts

    print("seed", SEED)
    assert type(family_for_index(_index(folder))).__name__ == "Flux2Family"
    assert preflight.check_model_folder(folder) == "flux2"
    m = load_model(folder)
    assert m.family.name == "flux2" and m.kind == "flux2" and m.settings["guidance_embeds"]
    cond = encode_prompts(m, PROMPTS, **SIZE)
    uncond = encode_prompts(m, [""] * len(PROMPTS), **SIZE)
    assert cond.hidden.shape == (2, 512, 3 * 16) and (cond.hidden[0] - cond.hidden[1]).abs().max() > 0
    assert not FAMILY.uses_cfg(m, uncond, GUIDANCE)
    x_T = sampling.initial_latents(m, len(PROMPTS), IMAGE_SIZE, IMAGE_SIZE, torch.Generator().manual_seed(SEED),
                                   "cpu")
    calls = []
    handle = m.denoiser.register_forward_hook(lambda mod, a, kw, out: calls.append(kw["hidden_states"].shape[0]),
                                          with_kwargs=True)
    ours = sampling.sample_images(m, x_T, cond, uncond, steps=STEPS, guidance_scale=GUIDANCE, **SIZE)
    handle.remove()
    assert calls == [len(PROMPTS)] * STEPS
    pipe = _pipeline(folder)
    ref = _pipeline_images(pipe)
    assert (ours - ref).abs().max() < 1e-4, (ours - ref).abs().max()
    low = _pipeline_images(pipe, guidance=1.0)
    assert (ref - low).abs().max() > 1e-3           # the embedding matters, so the check above can fail
    ours_low = sampling.sample_images(m, x_T, cond, None, steps=STEPS, guidance_scale=1.0, **SIZE)
    assert (ours_low - low).abs().max() < 1e-4


def test_max_sequence_length_equals_encode_prompt(folder):
    """model.max_sequence_length = 64: our embeddings are Flux2Pipeline.encode_prompt(max_sequence_length=64)'s."""
    from fnf.encoding import encode_prompts

    m = load_model(folder, max_sequence_length=64)
    ours = encode_prompts(m, PROMPTS, **SIZE).hidden
    pipe = _pipeline(folder)
    with torch.no_grad():
        ref, ids = pipe.encode_prompt(PROMPTS, device="cpu", max_sequence_length=64)
    assert ours.shape == (2, 64, 48) and torch.equal(ours, ref)
    assert torch.equal(text_ids(64, "cpu"), ids[0])
    with pytest.raises(ValueError, match="max_sequence_length"):
        FAMILY.load(folder, _index(folder), weight_dtype=torch.float32, max_sequence_length=0)


def test_large_beta_holds_pixels_outside_the_mask_beta_zero_lets_them_move(folder, tmp_path):
    """Focus-N-Fix on FLUX.2: with a left-half mask, beta = 20 keeps the right half near I0 during training (the
    logged change_outside of steps 3-4, once the LoRA has moved), beta = 0 lets it move."""
    from fnf_tiny_models import tiny_config

    from fnf.images import save_png
    from fnf.train import train

    print("seed", SEED)
    mask = torch.zeros(IMAGE_SIZE, IMAGE_SIZE)
    mask[:, : IMAGE_SIZE // 2] = 1
    save_png(mask, str(tmp_path / "mask" / "left.png"))
    change = {}
    for beta in (0.0, 20.0):
        cfg = tiny_config(folder, str(tmp_path / f"b{beta}"), sampling=dict(SIZE),
                          localize={"spec": f"file:{tmp_path}/mask/*.png"}, objective={"beta": beta},
                          train={"steps": 4, "lr": 0.3, "prompts": [PROMPTS[0]]})
        res = train(cfg)
        change[beta] = sum(h["change_outside"] for h in res.history[2:]) / len(res.history[2:])
    print("change_outside", change)
    assert change[0.0] > 0.005, change
    assert change[20.0] < 0.5 * change[0.0], change



def test_clear_errors_of_flux2(folder):
    """FLUX.2's own refusals: packed tokens, a cond batch unlike x's, tokenizer classes, a forced other family."""
    m = load_model(folder)
    x = FAMILY.initial_latents(m, 1, IMAGE_SIZE, IMAGE_SIZE, torch.Generator(), "cpu")
    plan = FAMILY.schedule(m, STEPS, IMAGE_SIZE, IMAGE_SIZE, "cpu")
    with pytest.raises(ValueError, match="width"):
        FAMILY.schedule(m, STEPS, IMAGE_SIZE, 32.0, "cpu")
    with pytest.raises(ValueError, match="packed tokens"):
        unpack_latents(x, 4, 4)
    cond = FAMILY.encode(m, PROMPTS, **SIZE)
    with pytest.raises(ValueError, match="cond"):
        FAMILY.predict(m, m.denoiser, x, plan.timesteps[0], cond, None, GUIDANCE, plan)
    with pytest.raises(ModelLoadError, match="tokenizer"):
        FAMILY.load(folder, dict(_index(folder), tokenizer=["transformers", "NoSuchTokenizer"]),
                    weight_dtype=torch.float32)
    import importlib.util

    pixtral = "torchvision" if importlib.util.find_spec("torchvision") is None else "tokenizer"
    with pytest.raises(ModelLoadError, match=pixtral):   # FLUX.2-dev's PixtralProcessor needs torchvision
        FAMILY.load(folder, dict(_index(folder), tokenizer=["transformers", "PixtralProcessor"]),
                    weight_dtype=torch.float32)
    with pytest.raises(ModelLoadError, match="looks like 'flux2'"):
        load_model(folder, kind="flux")
