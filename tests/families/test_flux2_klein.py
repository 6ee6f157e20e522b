"""What only the FLUX.2 [klein] family has (tiny Flux2KleinPipeline folders, Base and step-distilled): the Qwen3
chat-template encoding of the pipeline, true CFG with a negative prompt (Base) and none when distilled, the refused
variants, the quantized transformer and FSDP units, the --arch shapes, the Focus-N-Fix penalty holding pixels
outside the mask. The shared family contract is tests/families/test_contract.py (row ``flux2-klein``).

Skipped where diffusers has no Flux2KleinPipeline (the CI floor, diffusers 0.34)."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from tests.families.common import PROMPTS, SEED, STEPS, index_of, pipeline, pipeline_images
from tests.fnf_tiny_models import one_torch_thread  # noqa: F401
from tests.tiny_flux2_klein import IMAGE_SIZE, cached_flux2_klein, have_klein

pytestmark = pytest.mark.skipif(not have_klein(), reason="the installed diffusers/transformers have no "
                                "Flux2KleinPipeline / Qwen3 (FLUX.2 [klein] needs a newer diffusers than 0.34)")

from fnf import preflight, sampling  # noqa: E402
from fnf.core import ModelLoadError  # noqa: E402
from fnf.encoding import encode_negative, encode_prompts  # noqa: E402
from fnf.families import family_for_index  # noqa: E402
from fnf.families.flux2 import text_ids  # noqa: E402
from fnf.families.flux2_klein import FLUX2_KLEIN  # noqa: E402
from fnf.families.registry import load_model  # noqa: E402

GUIDANCE = 4.0
SIZE = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return cached_flux2_klein(str(tmp_path_factory.getbasetemp()))


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    return cached_flux2_klein(str(tmp_path_factory.getbasetemp()), distilled=True)


def _rows_per_call(m, fn):
    calls = []
    handle = m.denoiser.register_forward_hook(lambda mod, a, kw, out: calls.append(kw["hidden_states"].shape[0]),
                                              with_kwargs=True)
    try:
        return fn(), calls
    finally:
        handle.remove()


def _sample(m, cond, uncond, guidance):
    x_T = sampling.initial_latents(m, len(PROMPTS), IMAGE_SIZE, IMAGE_SIZE, torch.Generator().manual_seed(SEED),
                                   "cpu")
    return sampling.sample_images(m, x_T, cond, uncond, steps=STEPS, guidance_scale=guidance, **SIZE)


def test_encoding_equals_the_pipelines_qwen3_embeds(folder):
    """Our embeddings are Flux2KleinPipeline.encode_prompt's (bit-equal, also at max_sequence_length 64): the chat
    template with the generation prompt and thinking off, padded to the length with a mask (the padding changes
    nothing of a prompt's real tokens' embeddings), hidden states 9, 18, 27 stacked."""
    print("seed", SEED)
    assert type(family_for_index(index_of(folder))).__name__ == "Flux2KleinFamily"
    assert preflight.check_model_folder(folder) == "flux2-klein"
    m = load_model(folder)
    assert m.family.name == "flux2-klein" and m.kind == "flux2-klein"
    assert dict(m.settings) == {"guidance_embeds": False, "is_distilled": False, "max_sequence_length": 512,
                                "text_encoder_out_layers": (9, 18, 27)}
    pipe = pipeline(folder, "Flux2KleinPipeline")
    ours = encode_prompts(m, PROMPTS, **SIZE).hidden
    with torch.no_grad():
        ref, ids = pipe.encode_prompt(PROMPTS, device="cpu")
    assert ours.shape == (2, 512, 3 * 16) and torch.equal(ours, ref) and (ours[0] - ours[1]).abs().max() > 0
    assert torch.equal(text_ids(512, "cpu"), ids[0])
    tok = m.tokenizers[0]
    text = tok.apply_chat_template([{"role": "user", "content": PROMPTS[0]}], tokenize=False,
                                   add_generation_prompt=True, enable_thinking=False)
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n") and PROMPTS[0] in text
    short = load_model(folder, max_sequence_length=64)
    ours64 = encode_prompts(short, PROMPTS, **SIZE).hidden
    with torch.no_grad():
        ref64, _ = pipe.encode_prompt(PROMPTS, device="cpu", max_sequence_length=64)
    assert ours64.shape == (2, 64, 48) and torch.equal(ours64, ref64)
    real = len(tok(text)["input_ids"])   # the masked padding leaves the real tokens' states as they were
    torch.testing.assert_close(ours64[0, :real], ours[0, :real], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="max_sequence_length"):
        FLUX2_KLEIN.load(folder, index_of(folder), weight_dtype=torch.float32, max_sequence_length=0)
    with pytest.raises(TypeError, match="prompts"):
        FLUX2_KLEIN.encode(m, [], **SIZE)


def test_true_cfg_with_a_negative_prompt_equals_the_pipeline(folder):
    """Base klein: CFG doubles the batch ([uncond, cond]) at a scale > 1 and equals the pipeline (its negative "",
    and a negative prompt given as negative_prompt_embeds); at scale 1 one batch, the pipeline's unguided image."""
    print("seed", SEED)
    m = load_model(folder)
    pipe = pipeline(folder, "Flux2KleinPipeline")
    cond = encode_prompts(m, PROMPTS, **SIZE)
    empty = encode_negative(m, "", len(PROMPTS), **SIZE)
    guided, calls = _rows_per_call(m, lambda: _sample(m, cond, empty, GUIDANCE))
    assert calls == [2 * len(PROMPTS)] * STEPS
    assert (guided - pipeline_images(pipe, IMAGE_SIZE, GUIDANCE)).abs().max() < 1e-4
    negative = encode_negative(m, "a blue ball", len(PROMPTS), **SIZE)
    ours_neg = _sample(m, cond, negative, GUIDANCE)
    ref_neg = pipeline_images(pipe, IMAGE_SIZE, GUIDANCE, negative_prompt_embeds=negative.hidden)
    assert (ours_neg - ref_neg).abs().max() < 1e-4
    assert (ours_neg - guided).abs().max() > 1e-3   # the negative prompt matters, so the check above can fail
    unguided, calls = _rows_per_call(m, lambda: _sample(m, cond, empty, 1.0))
    assert calls == [len(PROMPTS)] * STEPS and not FLUX2_KLEIN.uses_cfg(m, empty, 1.0)
    assert (unguided - pipeline_images(pipe, IMAGE_SIZE, 1.0)).abs().max() < 1e-4
    assert (unguided - guided).abs().max() > 1e-3


def test_step_distilled_klein_has_no_cfg(distilled, folder):
    """is_distilled (FLUX.2-klein-4B / -9B): one batch at any scale, the pipeline's image (which ignores the scale);
    the same weights as the Base folder give its unguided image."""
    print("seed", SEED)
    m = load_model(distilled)
    assert m.settings["is_distilled"] and not FLUX2_KLEIN.uses_cfg(m, object(), GUIDANCE)
    cond = encode_prompts(m, PROMPTS, **SIZE)
    ours, calls = _rows_per_call(m, lambda: _sample(m, cond, encode_negative(m, "", 2, **SIZE), GUIDANCE))
    assert calls == [len(PROMPTS)] * STEPS
    assert (ours - pipeline_images(pipeline(distilled, "Flux2KleinPipeline"), IMAGE_SIZE, GUIDANCE)).abs().max() < 1e-4
    base = load_model(folder)
    assert (ours - _sample(base, encode_prompts(base, PROMPTS, **SIZE), None, GUIDANCE)).abs().max() < 1e-6


def test_refusals_are_one_line_naming_the_class(folder, tmp_path):
    """The KV-cache and inpainting pipelines, a guidance-embedding transformer, a non-bool is_distilled, a tokenizer
    class transformers lacks, a forced other family: one clear line each."""
    for cls, words in (("Flux2KleinKVPipeline", "KV caches"), ("Flux2KleinInpaintPipeline", "inpainting")):
        copy = tmp_path / cls
        shutil.copytree(folder, copy)
        (copy / "model_index.json").write_text(json.dumps(dict(index_of(folder), _class_name=cls)))
        with pytest.raises(ModelLoadError, match=f"'{cls}'.*fnf refuses: .*{words}") as e:
            load_model(str(copy))
        assert "\n" not in str(e.value)
    with pytest.raises(ModelLoadError, match="is_distilled"):
        FLUX2_KLEIN.load(folder, dict(index_of(folder), is_distilled="yes"), weight_dtype=torch.float32)
    with pytest.raises(ModelLoadError, match="Qwen2TokenizerFast"):
        FLUX2_KLEIN.load(folder, dict(index_of(folder), tokenizer=["transformers", "NoSuchTokenizer"]),
                         weight_dtype=torch.float32)
    guided = tmp_path / "guided"
    shutil.copytree(folder, guided)
    cfg_file = guided / "transformer" / "config.json"
    cfg_file.write_text(json.dumps(dict(json.loads(cfg_file.read_text()), guidance_embeds=True)))
    with pytest.raises(ModelLoadError, match="guidance embedding"):
        load_model(str(guided))
    with pytest.raises(ModelLoadError, match="looks like 'flux2-klein'"):
        load_model(folder, kind="flux2")


def test_quantized_transformer_and_fsdp_units(folder, monkeypatch):
    """model.quantize reaches only the transformer's from_pretrained (with the weight dtype); the FSDP units are
    the double and single blocks."""
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
    assert [c for c in calls if c[1] is not None] == [("Flux2Transformer2DModel", sentinel)]
    plan = fsdp.wrap_plan(m.denoiser, fsdp.wrap_class_names(m))
    assert sorted(plan) == ["", "single_transformer_blocks.0", "transformer_blocks.0"]


@pytest.mark.slow
def test_released_klein_architectures_have_their_parameter_counts():
    """--arch flux2-klein-4b / -9b built under fake tensors: transformers of 3875.5M / 9078.6M (diffusers'
    convert_flux2_to_diffusers configs), Qwen3-4B 4022.5M (tied head) / Qwen3-8B 8190.7M, step-distilled; the
    -base- archs are the same shapes, not distilled."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fnf.memory.estimate import build_model, model_spec

    count = lambda mod: round(sum(p.numel() for p in mod.parameters()) / 1e6, 1)  # noqa: E731
    for arch, sizes in (("flux2-klein-4b", (3875.5, 4022.5)), ("flux2-klein-9b", (9078.6, 8190.7))):
        with FakeTensorMode(allow_non_fake_inputs=True):
            m = build_model(model_spec(arch=arch), "bf16")
        assert (count(m.denoiser), count(m.text_encoders[0])) == sizes, arch
        assert m.family.name == "flux2-klein" and m.settings["is_distilled"] and m.vae.bn.running_mean.shape == (128,)
        assert m.denoiser.config.joint_attention_dim == 3 * m.text_encoders[0].config.hidden_size
    for arch in ("flux2-klein-base-4b", "flux2-klein-base-9b"):   # the Base models: the same shapes, CFG
        base, distilled = model_spec(arch=arch), model_spec(arch=arch.replace("base-", ""))
        assert base["is_distilled"] is False and base["components"] == distilled["components"]


def test_folder_configs_carry_is_distilled(distilled):
    """The estimator's spec of a folder keeps model_index.json's is_distilled (no CFG batch in its trace)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fnf.memory.estimate import build_model, model_spec

    spec = model_spec(distilled)
    assert spec["kind"] == "flux2-klein" and spec["is_distilled"] is True
    with FakeTensorMode(allow_non_fake_inputs=True):
        m = build_model(spec, "fp32")
    assert m.settings["is_distilled"] and not m.family.uses_cfg(m, object(), GUIDANCE)


def test_localize_and_eval_commands_run_on_klein(folder, tmp_path):
    """`fnf localize` writes the base image, heatmap and mask of a klein folder; `fnf eval` scores the base model and
    a LoRA on it (CFG on: guidance 4 with the empty negative)."""
    from fnf import cli
    from fnf.lora import add_lora, save_lora

    from tests.families.common import randomize_lora

    print("seed", SEED)
    small = ["--set", f"sampling.height={IMAGE_SIZE}", "--set", f"sampling.width={IMAGE_SIZE}", "--set",
             "sampling.steps=2", "--set", f"sampling.guidance_scale={GUIDANCE}", "--set", "train.device=cpu"]
    assert cli.main(["localize", "--model", folder, "--reward", "brightness", "--localizer", "saliency",
                     "--prompts", PROMPTS[0], "--seeds", "1", "--out", str(tmp_path / "loc"), *small]) == 0
    made = sorted(os.listdir(tmp_path / "loc" / "localize"))
    assert "manifest.json" in made and any(f.endswith("_mask.png") for f in made), made
    m = load_model(folder)
    add_lora(m, rank=2, alpha=2, target_modules=m.family.lora_targets)
    randomize_lora(m, SEED)
    save_lora(m, str(tmp_path / "lora"))
    assert cli.main(["eval", "--model", folder, "--lora", str(tmp_path / "lora"), "--prompts", PROMPTS[0],
                     "--seeds", "1", "--steps", "2", "--guidance", str(GUIDANCE), "--reward", "brightness",
                     "--localizer", "saliency", "--metric", "redness", "--out", str(tmp_path / "ev"),
                     "--bootstrap", "50", "--no-progress", "--set", f"sampling.height={IMAGE_SIZE}", "--set",
                     f"sampling.width={IMAGE_SIZE}"]) == 0
    with open(tmp_path / "ev" / "metrics.json") as f:
        models = list(json.load(f)["models"])
    assert len(models) == 2 and models[0] == "base", models


def test_large_beta_holds_pixels_outside_the_mask_beta_zero_lets_them_move(folder, tmp_path):
    """Focus-N-Fix on klein (Base, CFG on): with a left-half mask, beta = 20 keeps the right half near I0 during
    training (the logged change_outside of steps 3-4, once the LoRA has moved), beta = 0 lets it move."""
    from tests.fnf_tiny_models import tiny_config

    from fnf.images import save_png
    from fnf.train import train

    print("seed", SEED)
    mask = torch.zeros(IMAGE_SIZE, IMAGE_SIZE)
    mask[:, : IMAGE_SIZE // 2] = 1
    save_png(mask, str(tmp_path / "mask" / "left.png"))
    change = {}
    for beta in (0.0, 20.0):
        cfg = tiny_config(folder, str(tmp_path / f"b{beta}"), sampling={**SIZE, "guidance_scale": GUIDANCE},
                          localize={"spec": f"file:{tmp_path}/mask/*.png"}, objective={"beta": beta},
                          train={"steps": 4, "lr": 0.3, "prompts": [PROMPTS[0]]})
        res = train(cfg)
        change[beta] = sum(h["change_outside"] for h in res.history[2:]) / len(res.history[2:])
    print("change_outside", change)
    assert change[0.0] > 0.005, change
    assert change[20.0] < 0.5 * change[0.0], change
    assert os.path.isfile(tmp_path / "b20.0" / "lora" / "pytorch_lora_weights.safetensors")
