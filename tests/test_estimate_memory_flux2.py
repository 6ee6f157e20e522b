"""fnf estimate-memory for FLUX.2: the named flux2-dev architecture has the released sizes (32.2B transformer, 24.0B
Mistral Small text encoder); the tiny Flux2Pipeline folder's configs build what Flux2Family.load gives; on it the
fake-tensor trace equals the real-tensor counter exactly.

Skipped where diffusers has no Flux2Pipeline (the CI floor, diffusers 0.34)."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fnf_tiny_models import one_torch_thread, tiny_config  # noqa: E402,F401
from tiny_flux2 import IMAGE_SIZE, cached_flux2, have_flux2  # noqa: E402

pytestmark = pytest.mark.skipif(not have_flux2(), reason="the installed diffusers/transformers have no "
                                "Flux2Pipeline / Mistral3 (FLUX.2 needs a newer diffusers than the 0.34 floor)")

from fnf.memory.counter import rounded  # noqa: E402
from fnf.memory.estimate import build_model, estimate, model_spec  # noqa: E402


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return cached_flux2(str(tmp_path_factory.getbasetemp()))


def _device_bytes(module) -> int:
    seen, total = set(), 0
    for t in [*module.parameters(), *module.buffers()]:
        key = t.untyped_storage()._cdata
        if key not in seen:
            seen.add(key)
            total += rounded(t.untyped_storage().nbytes())
    return total


@pytest.mark.slow
def test_flux2_dev_has_the_released_parameter_counts():
    """Built under fake tensors: FLUX.2-dev 32B (32223.3M), Mistral Small 3.x 24B (24011.4M: 22.9B decoder, 0.67B
    untied LM head, 0.40B Pixtral vision tower, projector), the 32-channel VAE with its batch-norm statistics."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        m = build_model(model_spec(arch="flux2-dev"), "bf16")
    count = lambda mod: round(sum(p.numel() for p in mod.parameters()) / 1e6, 1)  # noqa: E731
    assert count(m.denoiser) == 32223.3 and [count(e) for e in m.text_encoders] == [24011.4]
    assert m.vae.bn.running_mean.shape == (128,) and m.native_size == 1024 and m.family.name == "flux2"
    assert m.settings == {"max_sequence_length": 512, "text_encoder_out_layers": (10, 20, 30), "guidance_embeds": True}
    dtypes = {t.dtype for mod in [m.denoiser, m.vae, *m.text_encoders] for t in [*mod.parameters(), *mod.buffers()]
              if t.is_floating_point()}
    assert dtypes == {torch.bfloat16}


def test_folder_configs_build_what_the_family_loads(folder):
    """The fake build from the tiny folder's config.json files holds the same device bytes, types, extras and
    tokenizer class as Flux2Family.load of the real folder (bf16)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fnf.families.registry import load_model

    real = load_model(folder, weight_dtype="bf16")
    with FakeTensorMode(allow_non_fake_inputs=True):
        fake = build_model(model_spec(folder), "bf16")
        fake_parts = [fake.denoiser, fake.vae, *fake.text_encoders]
        fake_bytes = [_device_bytes(m) for m in fake_parts]
    real_parts = [real.denoiser, real.vae, *real.text_encoders]
    assert [type(m) for m in fake_parts] == [type(m) for m in real_parts] and len(real_parts) == 3
    assert fake_bytes == [_device_bytes(m) for m in real_parts]
    assert fake.family is real.family and fake.settings == real.settings and fake.vae_upcast == real.vae_upcast
    assert [type(t).__name__ for t in fake.tokenizers] == [type(t).__name__ for t in real.tokenizers]


@pytest.mark.slow
def test_fake_trace_equals_the_real_tensor_counter(folder, tmp_path):
    cfg = tiny_config(folder, str(tmp_path), model={"path": folder, "weight_dtype": "bf16"},
                      sampling={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                      memory={"mixed_precision": "bf16", "denoiser_checkpointing": True, "vae_checkpointing": True,
                              "offload_text_encoder": True}, localize={"spec": "saliency"})
    fake, real = estimate(cfg, model_dir=folder, fake=True), estimate(cfg, model_dir=folder, fake=False)
    assert fake.peak_bytes == real.peak_bytes > 0 and fake.phases == real.phases
    assert fake.held_at_peak == real.held_at_peak and fake.peak_phase == real.peak_phase
    assert fake.persistent == real.persistent


def test_a_diffusers_without_the_classes_is_a_clear_error():
    """What the 0.34 floor meets with --arch flux2-dev (no Flux2Transformer2DModel there), imitated by a spec whose
    transformer class this diffusers lacks."""
    spec = model_spec(arch="flux2-dev")
    spec["components"]["transformer"][0] = "NoSuchTransformer2DModel"
    with pytest.raises(ValueError, match="has no NoSuchTransformer2DModel; upgrade diffusers"):
        build_model(spec, "bf16")
