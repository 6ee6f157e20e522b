"""A tiny random-weight FLUX.2 folder (Flux2Pipeline layout + model_index.json), built in code, nothing downloaded.

32x32 images: an AutoencoderKLFlux2 with factor 2 and 4 latent channels (latents 4x16x16, patchified 2x2 to
16x8x8 -> 64 packed tokens of 16 channels) with random batch-norm statistics, a Flux2Transformer2DModel with one
double and one single block, and a Mistral3ForConditionalGeneration text encoder with 30 tiny decoder layers (the
pipeline stacks hidden states 10, 20 and 30) and a word-level tokenizer with a Mistral-style chat template.

The tokenizer is a PreTrainedTokenizerFast, not the PixtralProcessor of FLUX.2-dev: the processor needs
torchvision, which the test environment lacks. Flux2Pipeline only calls ``tokenizer.apply_chat_template`` on
text-only conversations, which both classes provide.
"""
from __future__ import annotations

import os

import torch

from tests.fnf_tiny_models import _WORDS

IMAGE_SIZE = 32
TEXT_LAYERS = 30          # Flux2Pipeline's default text_encoder_out_layers are (10, 20, 30)
TEXT_HIDDEN = 16
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}[SYSTEM_PROMPT]{{ m['content'][0]['text'] }}[/SYSTEM_PROMPT]"
    "{% else %}[INST]{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}[/INST]{% endif %}{% endfor %}")


def have_flux2() -> bool:
    """diffusers with Flux2Pipeline and transformers with Mistral3 (diffusers 0.34, the CI floor, has neither)."""
    try:
        from diffusers import AutoencoderKLFlux2, Flux2Pipeline, Flux2Transformer2DModel  # noqa: F401
        from transformers import Mistral3ForConditionalGeneration  # noqa: F401
    except ImportError:
        return False
    return True


def write_tokenizer(folder: str) -> None:
    """A word-level fast tokenizer over the test words and the words of the pipeline's system message."""
    import re

    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"]
    words = list(dict.fromkeys(_WORDS + re.findall(r"\w+|[^\w\s]", SYSTEM_MESSAGE)))
    vocab = {t: i for i, t in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", additional_special_tokens=specials[4:], model_max_length=512,
                                   padding_side="left")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)


def _text_encoder(vocab_size: int, seed: int):
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    torch.manual_seed(seed)
    text = dict(model_type="mistral", vocab_size=vocab_size, hidden_size=TEXT_HIDDEN, intermediate_size=32,
                num_hidden_layers=TEXT_LAYERS, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                max_position_embeddings=1024, sliding_window=None, pad_token_id=3, bos_token_id=1, eos_token_id=2)
    vision = dict(model_type="pixtral", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, head_dim=8, image_size=32, patch_size=16)
    cfg = Mistral3Config(text_config=text, vision_config=vision, image_token_index=0, spatial_merge_size=1,
                         vision_feature_layer=-1)
    return Mistral3ForConditionalGeneration(cfg).eval()


def _vae(seed: int):
    from diffusers import AutoencoderKLFlux2

    torch.manual_seed(seed)
    vae = AutoencoderKLFlux2(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4,
                             down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                             layers_per_block=1, norm_num_groups=4, sample_size=IMAGE_SIZE, use_quant_conv=True,
                             use_post_quant_conv=True, mid_block_add_attention=False)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():   # random latent statistics, so a decode that skipped them would be caught
        vae.bn.running_mean.copy_(torch.randn(vae.bn.running_mean.shape, generator=gen) * 0.5)
        vae.bn.running_var.copy_(torch.rand(vae.bn.running_var.shape, generator=gen) + 0.5)
    return vae


def _transformer(seed: int):
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(seed)
    return Flux2Transformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                   attention_head_dim=8, num_attention_heads=2, joint_attention_dim=3 * TEXT_HIDDEN,
                                   timestep_guidance_channels=32, mlp_ratio=2.0, axes_dims_rope=(2, 2, 2, 2),
                                   guidance_embeds=True)


def _scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    # FLUX.2-dev's scheduler config (dynamic shifting; the pipeline passes its empirical mu)
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                           base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                           max_image_seq_len=4096)


def make_flux2(folder: str, seed: int = 0) -> str:
    """Save a guidance-distilled Flux2Pipeline folder (FLUX.2-dev-shaped)."""
    import shutil

    from diffusers import Flux2Pipeline
    from transformers import PreTrainedTokenizerFast

    tok_dir = os.path.join(folder, "_tok")
    write_tokenizer(tok_dir)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tok_dir)
    pipe = Flux2Pipeline(scheduler=_scheduler(), vae=_vae(seed + 1), text_encoder=_text_encoder(len(tokenizer),
                         seed + 2), tokenizer=tokenizer, transformer=_transformer(seed))
    pipe.save_pretrained(folder)
    shutil.rmtree(tok_dir)
    return folder


_FOLDERS: dict[str, str] = {}


def cached_flux2(root: str) -> str:
    """Build the tiny FLUX.2 folder once per test session under ``root``."""
    if "flux2" not in _FOLDERS:
        folder = os.path.join(root, "tiny_flux2")
        if not os.path.isfile(os.path.join(folder, "model_index.json")):
            make_flux2(folder)
        _FOLDERS["flux2"] = folder
    return _FOLDERS["flux2"]
