"""What only the Qwen-Image family has (the family contract rows are in test_contract.py): the prompt template and
its 34-token prefix, masked embeddings of different lengths, true CFG with the norm rescale, the one-frame VAE decode
with latent statistics, the refused Qwen-Image pipelines."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from tests.families.common import PROMPTS, SEED, STEPS, pipeline, pipeline_images
from tests.fnf_tiny_models import one_torch_thread  # noqa: F401  (autouse: one thread for tiny models)
from tests.tiny_qwenimage import cached_qwenimage, have_qwenimage

from fnf import sampling
from fnf.core import ModelLoadError
from fnf.families import qwenimage
from fnf.families.registry import load_model

pytestmark = pytest.mark.skipif(not have_qwenimage(), reason="the installed diffusers has no QwenImagePipeline")
SIZE = 32
LONG = "a photo of a red car in the sky the tree house"   # a longer prompt: padding and a mask


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return cached_qwenimage(str(tmp_path_factory.getbasetemp()))


@pytest.fixture(scope="module")
def model(folder):
    return load_model(folder)


@pytest.fixture(scope="module")
def pipe(folder):
    return pipeline(folder, "QwenImagePipeline")


def test_template_constants_are_the_pipelines_and_the_prefix_is_34_tokens(pipe):
    """Our template, prefix length and tokenizer length are the pipeline's; the tiny tokenizer splits the template's
    prefix into 34 tokens, as Qwen's tokenizer does (so the dropped prefix is exactly the system message)."""
    assert pipe.prompt_template_encode == qwenimage.PROMPT_TEMPLATE
    assert pipe.prompt_template_encode_start_idx == qwenimage.TEMPLATE_START_IDX == 34
    assert pipe.tokenizer_max_length == qwenimage.TOKENIZER_MAX_LENGTH
    prefix = qwenimage.PROMPT_TEMPLATE.split("{}")[0]
    tokens = pipe.tokenizer.convert_ids_to_tokens(pipe.tokenizer(prefix).input_ids)
    assert len(tokens) == 34, tokens
    assert tokens[0] == "<|im_start|>" and tokens[29] == "<|im_end|>" and tokens[-2] == "user"


@pytest.mark.parametrize("max_len", [512, 3])
def test_encode_equals_encode_prompt_with_its_mask(folder, pipe, max_len):
    """Prompts of different lengths: the pipeline's embeddings and mask (None when all ones, as ours is then all
    ones); max_sequence_length cuts both."""
    m = load_model(folder, max_sequence_length=max_len) if max_len != 512 else load_model(folder)
    prompts = [PROMPTS[0], LONG]
    ours = m.family.encode(m, prompts, height=SIZE, width=SIZE)
    with torch.no_grad():
        ref, ref_mask = pipe.encode_prompt(prompts, device="cpu", max_sequence_length=max_len)
    assert ours.hidden.shape == ref.shape and (ours.hidden - ref).abs().max() < 1e-6
    if ref_mask is None:
        assert bool(ours.mask.all())
    else:
        assert torch.equal(ours.mask, ref_mask)
    if max_len == 512:   # the short prompt is padded: zeros where the mask is 0
        assert not bool(ours.mask.all()) and ours.hidden[0][ours.mask[0] == 0].abs().max() == 0


def test_masked_embeds_keep_their_mask():
    gen = torch.Generator().manual_seed(SEED)
    a = qwenimage.MaskedEmbeds(torch.randn(2, 3, 4, generator=gen), mask=torch.tensor([[1, 1, 0], [1, 1, 1]]))
    b = qwenimage.MaskedEmbeds(torch.randn(1, 5, 4, generator=gen), mask=torch.ones(1, 5, dtype=torch.long))
    assert torch.equal(a.index(torch.tensor([1])).mask, a.mask[1:])
    assert torch.equal(a.repeat(2).mask, torch.cat([a.mask, a.mask])) and a.repeat(2).hidden.shape == (4, 3, 4)
    joined = qwenimage.MaskedEmbeds.cat(a, b)
    assert joined.hidden.shape == (3, 5, 4) and torch.equal(joined.mask[0], torch.tensor([1, 1, 0, 0, 0]))
    assert torch.equal(joined.hidden[:2, :3], a.hidden) and joined.hidden[:2, 3:].abs().max() == 0
    assert isinstance(a.to("cpu"), qwenimage.MaskedEmbeds)
    assert torch.equal(qwenimage.MaskedEmbeds(b.hidden).mask, b.mask)   # no mask: all tokens valid
    with pytest.raises(ValueError, match="mask"):
        qwenimage.MaskedEmbeds(a.hidden, mask=b.mask)


def test_true_cfg_with_norm_rescale_equals_pipeline(model, pipe):
    """true_cfg_scale 4 with the negative prompt " ": our loop equals the pipeline; the guided velocity is
    neg + g (cond - neg) rescaled per token to the conditional velocity's norm (computed here from two unguided
    calls)."""
    print("seed", SEED)
    fam = model.family
    cond = fam.encode(model, PROMPTS, height=SIZE, width=SIZE)
    neg = fam.encode(model, [" "] * len(PROMPTS), height=SIZE, width=SIZE)
    x_T = fam.initial_latents(model, len(PROMPTS), SIZE, SIZE, torch.Generator().manual_seed(SEED), "cpu")
    plan = fam.schedule(model, STEPS, SIZE, SIZE, "cpu")
    with torch.no_grad():
        ours = sampling.sample_images(model, x_T, cond, neg, steps=STEPS, guidance_scale=4.0, height=SIZE,
                                      width=SIZE)
        plain = sampling.sample_images(model, x_T, cond, None, steps=STEPS, guidance_scale=4.0, height=SIZE,
                                       width=SIZE)
        ref = pipeline_images(pipe, SIZE, None, negative_prompt=" ", true_cfg_scale=4.0)
        guided = fam.predict(model, model.denoiser, x_T, plan.timesteps[0], cond, neg, 4.0, plan)
        c = fam.predict(model, model.denoiser, x_T, plan.timesteps[0], cond, None, 4.0, plan)
        u = fam.predict(model, model.denoiser, x_T, plan.timesteps[0], neg, None, 4.0, plan)
    assert (ours - ref).abs().max() < 1e-4, (ours - ref).abs().max()
    assert (ours - plain).abs().max() > 1e-3   # the guidance is applied, so the check above can fail
    comb = u + 4.0 * (c - u)
    expected = comb * c.norm(dim=-1, keepdim=True) / comb.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(guided, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(guided, comb, atol=1e-4)   # the rescale matters


def test_decode_uses_the_latent_statistics_and_equals_vae_decode(model):
    """Our cache-free one-frame decode equals vae.decode on (B, C, 1, h, w) of z * std + mean (the VAE's own
    frame loop with its causal cache), and skipping the statistics would give another image."""
    print("seed", SEED)
    vae = model.vae
    fam = model.family
    latents = fam.initial_latents(model, 2, SIZE, SIZE, torch.Generator().manual_seed(SEED), "cpu")
    plan = fam.schedule(model, STEPS, SIZE, SIZE, "cpu")
    with torch.no_grad():
        ours = fam.decode(model, latents, plan)
        z = qwenimage.unpack_latents(latents, SIZE // 2, SIZE // 2).unsqueeze(2)
        mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
        std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
        ref = (vae.decode(z * std + mean, return_dict=False)[0][:, :, 0] / 2 + 0.5).clamp(0, 1)
        raw = (vae.decode(z, return_dict=False)[0][:, :, 0] / 2 + 0.5).clamp(0, 1)
    assert ours.shape == (2, 3, SIZE, SIZE)
    assert (ours - ref).abs().max() < 1e-5, (ours - ref).abs().max()
    assert (ours - raw).abs().max() > 1e-3


def test_schedule_is_the_pipelines_shifted_schedule(model):
    """sigmas linspace(1, 1/T, T) shifted with calculate_shift's mu from the config (max_shift 0.9, 8192 tokens,
    exponential shift, shift_terminal): a fresh scheduler's set_timesteps gives the same timesteps."""
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    plan = model.family.schedule(model, STEPS, SIZE, SIZE, "cpu")
    cfg = model.scheduler.config
    fresh = FlowMatchEulerDiscreteScheduler.from_config(cfg)
    n = (SIZE // 4) ** 2
    mu = calculate_shift(n, cfg["base_image_seq_len"], cfg["max_image_seq_len"], cfg["base_shift"], cfg["max_shift"])
    fresh.set_timesteps(sigmas=np.linspace(1.0, 1 / STEPS, STEPS), mu=mu)
    torch.testing.assert_close(plan.timesteps, fresh.timesteps)
    assert cfg["time_shift_type"] == "exponential" and abs(float(plan.sigmas[-2]) - 0.02) < 0.1


@pytest.mark.parametrize("cls", ["QwenImageEditPipeline", "QwenImageEditPlusPipeline", "QwenImageImg2ImgPipeline",
                                 "QwenImageInpaintPipeline", "QwenImageControlNetPipeline",
                                 "QwenImageLayeredPipeline"])
def test_other_qwenimage_pipelines_are_refused_in_one_line(folder, tmp_path, cls):
    other = tmp_path / "other"
    shutil.copytree(folder, other)
    index = json.loads((other / "model_index.json").read_text())
    (other / "model_index.json").write_text(json.dumps(dict(index, _class_name=cls)))
    with pytest.raises(ModelLoadError, match=cls) as err:
        load_model(str(other))
    assert "\n" not in str(err.value) and "refuses" in str(err.value)


def test_bad_options_are_clear_errors(folder, model, tmp_path):
    with pytest.raises(ValueError, match="max_sequence_length"):
        load_model(folder, max_sequence_length=1025)
    guided = tmp_path / "guided"
    shutil.copytree(folder, guided)
    cfg_file = guided / "transformer" / "config.json"
    cfg_file.write_text(json.dumps(dict(json.loads(cfg_file.read_text()), guidance_embeds=True)))
    with pytest.raises(ModelLoadError, match="guidance_embeds"):
        load_model(str(guided))
    x = model.family.initial_latents(model, 1, SIZE, SIZE, torch.Generator(), "cpu")
    cond = model.family.encode(model, PROMPTS, height=SIZE, width=SIZE)
    with pytest.raises(ValueError, match="cond"):
        model.family.predict(model, model.denoiser, x, 1.0, cond, None, 1.0)
    assert os.path.isdir(folder)


def test_checkpointed_decode_gives_the_plain_gradient(folder):
    """memory.vae_checkpointing resnet on AutoencoderKLQwenImage: our cache-free decode recomputes exactly, so the
    latents' gradient through the checkpointed decoder parts equals the plain one."""
    from fnf.train import vae_memory

    print("seed", SEED)
    m = load_model(folder)
    fam = m.family
    plan = fam.schedule(m, STEPS, SIZE, SIZE, "cpu")
    weights = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(SEED))
    grads = []
    for mode in ("off", "resnet"):
        vae_memory.apply(m.vae, mode)
        x = fam.initial_latents(m, 1, SIZE, SIZE, torch.Generator().manual_seed(SEED), "cpu").requires_grad_()
        (fam.decode(m, x, plan) * weights).sum().backward()
        grads.append(x.grad)
    assert vae_memory.checkpoint_decoder_parts(m.vae.decoder) > 0
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)


def test_fsdp_units_are_the_dual_stream_blocks(model):
    """Each QwenImageTransformerBlock is an FSDP unit; every LoRA-targeted projection lives in one of them."""
    from fnf.fsdp import unit_of, wrap_class_names, wrap_plan

    plan = wrap_plan(model.denoiser, wrap_class_names(model))
    assert plan == ["transformer_blocks.0", "transformer_blocks.1", ""]
    for name, _ in model.denoiser.named_parameters():
        if name.endswith(tuple(f"{t}.weight" for t in model.family.lora_targets)):
            assert unit_of(plan, name).startswith("transformer_blocks."), name


def test_arch_spec_has_the_released_sizes():
    """`--arch qwen-image` (fnf/memory/archs.py) builds the released sizes: the 20.43B transformer, Qwen2.5-VL-7B
    (8.29B with its vision tower), the 127M VAE (meta tensors: no memory, no weights)."""
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from fnf.memory.archs import ARCHS

    spec = ARCHS["qwen-image"]
    assert spec["kind"] == "qwen-image"
    c = spec["components"]
    with torch.device("meta"):
        sizes = [sum(p.numel() for p in m.parameters()) for m in (
            QwenImageTransformer2DModel.from_config(c["transformer"][1]),
            Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**c["text_encoder"][1])),
            AutoencoderKLQwenImage.from_config(c["vae"][1]))]
    assert [round(n / 1e6) for n in sizes] == [20430, 8292, 127], sizes


def test_quantized_base_loads_only_the_transformer_quantized(folder, monkeypatch):
    """model.quantize with a stand-in backend (no bitsandbytes on CPU): only the transformer is read with the
    method's quantization_config in the weight dtype, a bitsandbytes model is not moved, LoRA on top is fp32 and the
    only trainable part."""
    import types

    from diffusers import QwenImageTransformer2DModel
    from diffusers.models.modeling_utils import ModelMixin

    from fnf import quantize
    from fnf.lora import add_lora

    sentinel, seen, calls, moved = object(), [], [], []
    monkeypatch.setattr(quantize, "quantization_config", lambda method, dtype: seen.append((method, dtype)) or sentinel)
    original = ModelMixin.from_pretrained.__func__

    def from_pretrained(cls, path, **kwargs):
        calls.append((cls.__name__, kwargs.pop("quantization_config", None), kwargs.get("torch_dtype")))
        model = original(cls, path, **kwargs)
        if cls is QwenImageTransformer2DModel:
            model.hf_quantizer = types.SimpleNamespace(
                quantization_config=types.SimpleNamespace(quant_method="bitsandbytes"))
        return model

    monkeypatch.setattr(ModelMixin, "from_pretrained", classmethod(from_pretrained))
    monkeypatch.setattr(QwenImageTransformer2DModel, "to", lambda self, *a, **k: moved.append(a) or self)
    m = load_model(folder, weight_dtype="bf16", quantize="bnb-4bit")
    assert seen == [("bnb-4bit", torch.bfloat16)]
    assert [c for c in calls if c[1] is not None] == [("QwenImageTransformer2DModel", sentinel, torch.bfloat16)]
    assert moved == [] and quantize.method_of(m.denoiser) == "bitsandbytes"
    params = add_lora(m, rank=2, alpha=2, target_modules=m.family.lora_targets)
    assert params and all(p.dtype == torch.float32 for p in params)
    assert {n for n, p in m.denoiser.named_parameters() if p.requires_grad} == \
        {n for n, p in m.denoiser.named_parameters() if "lora_" in n}


def test_vae_levers_it_cannot_take_are_refused_naming_the_vae(model):
    """memory.vae_checkpointing blocks (diffusers has no checkpointing for this VAE) and memory.vae_tile (no 2D
    tiled decode) are one clear error naming AutoencoderKLQwenImage; the decode refuses a tiling VAE too."""
    from fnf.train import vae_memory

    with pytest.raises(ValueError, match="AutoencoderKLQwenImage"):
        vae_memory.apply(model.vae, "blocks")
    with pytest.raises(ValueError, match="AutoencoderKLQwenImage"):
        vae_memory.apply(model.vae, "off", 64)
    vae_memory.reset(model.vae)
    model.vae.use_tiling = True
    try:
        x = model.family.initial_latents(model, 1, SIZE, SIZE, torch.Generator(), "cpu")
        with pytest.raises(ValueError, match="vae_tile"):
            model.family.decode(model, x)
    finally:
        model.vae.use_tiling = False
