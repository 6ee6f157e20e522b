"""What only the Z-Image family has (a tiny Z-Image-Turbo-shaped ZImagePipeline folder): variable-length caption
tokens from the chat template and hidden_states[-2], the (1000 - t) / 1000 timestep and negated output, CFG as
``pos + g * (pos - neg)`` (none at g = 0), the pipeline's sigmas and mu (a dynamic-shifting folder too), its
cfg_normalization / cfg_truncation options, the VAE's scaling and shift, the refused image-input pipelines and the
memory estimator's fake-tensor path. The shared family contract is tests/families/test_contract.py.

Skipped where diffusers has no ZImagePipeline (the CI floor, diffusers 0.34)."""
from __future__ import annotations

import json
import math
import os
import shutil

import pytest
import torch

from tests.families.common import PROMPTS, SEED, STEPS, pipeline, pipeline_images
from tests.fnf_tiny_models import one_torch_thread  # noqa: F401
from tests.tiny_zimage import IMAGE_SIZE, cached_zimage, have_zimage

pytestmark = pytest.mark.skipif(not have_zimage(), reason="the installed diffusers has no ZImagePipeline (Z-Image "
                                "needs a newer diffusers than the 0.34 floor)")

from fnf import sampling  # noqa: E402
from fnf.core import ModelLoadError  # noqa: E402
from fnf.encoding import encode_prompts  # noqa: E402
from fnf.families.registry import load_model  # noqa: E402
from fnf.families.zimage import CaptionEmbeds, captions, token_lengths  # noqa: E402

SIZE = IMAGE_SIZE
GUIDANCE = 3.0


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return cached_zimage(str(tmp_path_factory.getbasetemp()))


@pytest.fixture(scope="module")
def model(folder):
    return load_model(folder)


def _sample(m, guidance, *, negative=True, prompts=PROMPTS):
    cond = encode_prompts(m, list(prompts), height=SIZE, width=SIZE)
    uncond = encode_prompts(m, [""] * len(prompts), height=SIZE, width=SIZE) if negative else None
    x_T = sampling.initial_latents(m, len(prompts), SIZE, SIZE, torch.Generator().manual_seed(SEED), "cpu")
    return sampling.sample_images(m, x_T, cond, uncond, steps=STEPS, guidance_scale=guidance, height=SIZE, width=SIZE)


def test_captions_are_the_templated_tokens_at_the_second_to_last_layer(model, folder):
    """Each prompt's caption is its chat-templated token count long and equals the pipeline's _encode_prompt and an
    independent run of the encoder (hidden_states[-2] at the real tokens); the padded positions are left out."""
    tok, enc = model.tokenizers[0], model.text_encoders[0]
    cond = encode_prompts(model, PROMPTS, height=SIZE, width=SIZE)
    assert isinstance(cond, CaptionEmbeds) and cond.hidden.shape[:2] == cond.mask.shape == (2, 512)
    caps = captions(cond)
    for prompt, cap in zip(PROMPTS, caps):
        text = f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
        ids = tok(text, return_tensors="pt").input_ids
        assert cap.shape == (ids.shape[1], enc.config.hidden_size)
        with torch.no_grad():
            states = enc(input_ids=ids, output_hidden_states=True).hidden_states
        torch.testing.assert_close(cap, states[-2][0], rtol=1e-5, atol=1e-5)
        assert (cap - states[-1][0]).abs().max() > 1e-3   # the last layer would be a different caption
    pipe = pipeline(folder, "ZImagePipeline")
    with torch.no_grad():
        ref = pipe._encode_prompt(list(PROMPTS), device="cpu")
    assert len(ref) == 2 and all(torch.equal(a, b) for a, b in zip(caps, ref))
    assert token_lengths(cond.mask) == [c.shape[0] for c in caps]


def test_timestep_convention_negated_output_and_cfg_formula(model):
    """The transformer gets (1000 - t) / 1000 and a list of (C, 1, h, w) latents; predict returns -out; with CFG
    one call on [cond, uncond] rows and pos + g * (pos - neg); g = 0 runs no CFG even with a negative."""
    m = model
    cond = encode_prompts(m, PROMPTS, height=SIZE, width=SIZE)
    uncond = encode_prompts(m, ["", ""], height=SIZE, width=SIZE)
    x = m.family.initial_latents(m, 2, SIZE, SIZE, torch.Generator().manual_seed(SEED), "cpu")
    t = torch.tensor(750.0)
    seen = []
    hook = m.denoiser.register_forward_hook(lambda mod, args, out: seen.append((args[0], args[1])))
    try:
        with torch.no_grad():
            plain = m.family.predict(m, m.denoiser, x, t, cond, None, GUIDANCE)
            zero = m.family.predict(m, m.denoiser, x, t, cond, uncond, 0.0)
            guided = m.family.predict(m, m.denoiser, x, t, cond, uncond, GUIDANCE)
            neg = m.family.predict(m, m.denoiser, x, t, uncond, None, GUIDANCE)
            raw = m.denoiser([r.unsqueeze(1) for r in x], torch.full((2,), 0.25), captions(cond),
                             return_dict=False)[0]
    finally:
        hook.remove()
    assert [len(a) for a, _ in seen[:4]] == [2, 2, 4, 2]
    assert seen[0][0][0].shape == (x.shape[1], 1, *x.shape[2:])
    torch.testing.assert_close(seen[0][1], torch.full((2,), 0.25))
    torch.testing.assert_close(plain, -torch.stack(raw).squeeze(2))
    torch.testing.assert_close(zero, plain)
    pos, ng = -plain, -neg
    torch.testing.assert_close(guided, -(pos + GUIDANCE * (pos - ng)), rtol=1e-5, atol=1e-6)
    assert (guided - plain).abs().max() > 1e-3


def test_schedule_is_the_pipelines_sigmas_with_mu(model, folder, tmp_path_factory):
    """linspace(1, 1/T, T) through the shift-3 scheduler (Z-Image-Turbo: no dynamic shifting); a dynamic-shifting
    folder shifts by mu of the (h/2)*(w/2) image tokens; both sample as the pipeline does."""
    plan = model.family.schedule(model, STEPS, SIZE, SIZE, "cpu")
    base = torch.linspace(1.0, 1 / STEPS, STEPS).double()
    torch.testing.assert_close(plan.sigmas[:-1].double(), 3 * base / (1 + 2 * base), rtol=1e-6, atol=1e-6)
    assert float(plan.sigmas[-1]) == 0
    torch.testing.assert_close(plan.timesteps, plan.sigmas[:-1] * 1000)
    dyn = cached_zimage(str(tmp_path_factory.getbasetemp()), dynamic=True)
    m = load_model(dyn)
    tokens = (SIZE // 4) ** 2   # 32 px / VAE factor 2 -> 16 latents -> 8x8 tokens
    cfg = m.scheduler.config
    mu = 0.5 + (cfg.max_shift - 0.5) / (cfg.max_image_seq_len - cfg.base_image_seq_len) * (
        tokens - cfg.base_image_seq_len)
    dplan = m.family.schedule(m, STEPS, SIZE, SIZE, "cpu")
    expect = math.exp(mu) / (math.exp(mu) + (1 / base - 1))
    torch.testing.assert_close(dplan.sigmas[:-1].double(), expect, rtol=1e-6, atol=1e-6)
    for path, mod in ((dyn, m), (folder, model)):
        ours = _sample(mod, GUIDANCE)
        ref = pipeline_images(pipeline(path, "ZImagePipeline"), SIZE, GUIDANCE)
        assert (ours - ref).abs().max() < 1e-4, (ours - ref).abs().max()


@pytest.mark.parametrize("options", [{"cfg_normalization": 1.05}, {"cfg_truncation": 0.3}])
def test_cfg_normalization_and_truncation_equal_the_pipeline(folder, options):
    """The pipeline's cfg_normalization (renorm to at most 1.05x |pos|) and cfg_truncation (no CFG once the flow
    time passes 0.3), set as load options, give the pipeline's images; and differ from plain CFG."""
    from fnf.families.registry import read_index

    m = load_model(folder)
    tuned = m.family.load(folder, read_index(folder), weight_dtype=torch.float32, **options)
    ours, plain = _sample(tuned, GUIDANCE), _sample(m, GUIDANCE)
    ref = pipeline_images(pipeline(folder, "ZImagePipeline"), SIZE, GUIDANCE, **options)
    assert (ours - ref).abs().max() < 1e-4, (ours - ref).abs().max()
    assert (ours - plain).abs().max() > 1e-3
    with pytest.raises(ValueError, match="cfg_truncation"):
        m.family.load(folder, read_index(folder), weight_dtype=torch.float32, cfg_truncation=-1)


def test_decode_unscales_and_shifts(model):
    """decode(z) = vae.decode(z / 0.3611 + 0.1159) / 2 + 0.5, clamped (Z-Image's VAE factors)."""
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(SEED))
    with torch.no_grad():
        ours = model.family.decode(model, z)
        ref = model.vae.decode(z / 0.3611 + 0.1159).sample
    assert model.vae.config.scaling_factor == 0.3611 and model.vae.config.shift_factor == 0.1159
    torch.testing.assert_close(ours, (ref / 2 + 0.5).clamp(0, 1))


def test_refused_pipelines_and_bad_input(folder, tmp_path):
    """Image-input Z-Image pipelines are one line naming the class; a non-Qwen3 text encoder and embeddings without
    a mask are clear errors; max_sequence_length truncates the captions."""
    for cls in ("ZImageImg2ImgPipeline", "ZImageOmniPipeline", "ZImageControlNetPipeline"):
        bad = tmp_path / cls
        shutil.copytree(folder, bad)
        index = json.loads((bad / "model_index.json").read_text())
        (bad / "model_index.json").write_text(json.dumps({**index, "_class_name": cls}))
        with pytest.raises(ModelLoadError, match=cls) as e:
            load_model(str(bad))
        assert "refuses" in str(e.value) and "\n" not in str(e.value)
    index = json.loads(open(os.path.join(folder, "model_index.json")).read())
    m = load_model(folder)
    with pytest.raises(ModelLoadError, match="T5EncoderModel"):
        m.family.load(folder, {**index, "text_encoder": ["transformers", "T5EncoderModel"]}, weight_dtype=torch.float32)
    cond = encode_prompts(m, PROMPTS, height=SIZE, width=SIZE)
    from fnf.core import PromptEmbeds

    x = m.family.initial_latents(m, 2, SIZE, SIZE, torch.Generator().manual_seed(SEED), "cpu")
    with pytest.raises(ValueError, match="mask"):
        m.family.predict(m, m.denoiser, x, torch.tensor(500.0), PromptEmbeds(cond.hidden), None, 0.0)
    plain = tmp_path / "no_template"
    shutil.copytree(folder, plain)
    for name in os.listdir(plain / "tokenizer"):
        if name.endswith(".jinja"):
            os.remove(plain / "tokenizer" / name)
    tok_cfg = plain / "tokenizer" / "tokenizer_config.json"
    tok_cfg.write_text(json.dumps({k: v for k, v in json.loads(tok_cfg.read_text()).items() if k != "chat_template"}))
    with pytest.raises(ModelLoadError, match="chat template"):
        load_model(str(plain))
    short = m.family.load(folder, index, weight_dtype=torch.float32, max_sequence_length=8)
    assert [c.shape[0] for c in captions(encode_prompts(short, PROMPTS, height=SIZE, width=SIZE))] == [8, 8]


def test_token_lengths_under_fake_tensors_are_the_padded_length():
    """The memory estimator traces with fake tensors (no values): every prompt counts as max_sequence_length tokens
    (an upper bound), and captions keep the padded states."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, :3] = mask[1, :5] = True
    assert token_lengths(mask) == [3, 5]
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = mode.from_tensor(mask)
        assert token_lengths(fake) == [16, 16]
        caps = captions(CaptionEmbeds(torch.zeros(2, 16, 4), mask=fake))
        assert [tuple(c.shape) for c in caps] == [(16, 4), (16, 4)]


def test_quantized_transformer_and_fsdp_units(folder, monkeypatch):
    """model.quantize reaches only the transformer's from_pretrained (with the weight dtype); the FSDP units are
    every ZImageTransformerBlock (the main layers and both refiners)."""
    from diffusers.models.modeling_utils import ModelMixin

    from fnf import fsdp, quantize

    sentinel, seen, calls = object(), [], []
    monkeypatch.setattr(quantize, "quantization_config", lambda method, dtype: seen.append((method, dtype)) or sentinel)
    original = ModelMixin.from_pretrained.__func__

    def from_pretrained(cls, path, **kwargs):
        calls.append((cls.__name__, kwargs.pop("quantization_config", None)))
        return original(cls, path, **kwargs)

    monkeypatch.setattr(ModelMixin, "from_pretrained", classmethod(from_pretrained))
    m = load_model(folder, weight_dtype="bf16", quantize="bnb-8bit")
    assert seen == [("bnb-8bit", torch.bfloat16)]
    assert [c for c in calls if c[1] is not None] == [("ZImageTransformer2DModel", sentinel)]
    plan = fsdp.wrap_plan(m.denoiser, fsdp.wrap_class_names(m))
    assert sorted(plan) == ["", "context_refiner.0", "layers.0", "noise_refiner.0"]


@pytest.mark.slow
def test_released_zimage_architecture_has_its_parameter_counts():
    """--arch z-image built under fake tensors: the 6154.9M transformer (Z-Image's "6B"), Qwen3-4B 4022.5M, the
    FLUX.1 VAE 83.8M; no CFG at the Turbo's guidance 0."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fnf.memory.estimate import build_model, model_spec

    count = lambda mod: round(sum(p.numel() for p in mod.parameters()) / 1e6, 1)  # noqa: E731
    with FakeTensorMode(allow_non_fake_inputs=True):
        m = build_model(model_spec(arch="z-image"), "bf16")
    assert (count(m.denoiser), count(m.text_encoders[0]), count(m.vae)) == (6154.9, 4022.5, 83.8)
    assert m.family.name == "z-image" and not m.family.uses_cfg(m, object(), 0.0)
