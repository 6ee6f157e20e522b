"""A tiny random-weight Qwen-Image folder (QwenImagePipeline layout + model_index.json), built in code, nothing
downloaded.

32x32 images: an AutoencoderKLQwenImage with factor 2 (dim_mult (1, 2), one temporal flag) and 4 latent channels
with random latents_mean / latents_std (latents 4x16x16, packed 2x2 to 64 tokens of 16 channels), a
QwenImageTransformer2DModel with two dual-stream blocks, a Qwen2_5_VLForConditionalGeneration text encoder with two
tiny decoder layers (and a one-block vision tower, never run for text prompts) and a byte-level BPE Qwen2Tokenizer.

The tokenizer is realistic where the pipeline depends on it: the pre-tokenization is Qwen2's (byte-level, the
Qwen2 split regex), ``<|im_start|>`` / ``<|im_end|>`` are special tokens, and the BPE merges make every word of the
pipeline's prompt template one token as Qwen's vocabulary does, so the template's prefix is 34 tokens (the
pipeline's ``prompt_template_encode_start_idx``) exactly as with the released tokenizer.
"""
from __future__ import annotations

import json
import os

import torch

from tests.fnf_tiny_models import _WORDS

IMAGE_SIZE = 32
TEXT_HIDDEN = 16
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def have_qwenimage() -> bool:
    """diffusers with QwenImagePipeline and transformers with Qwen2.5-VL."""
    try:
        from diffusers import AutoencoderKLQwenImage, QwenImagePipeline, QwenImageTransformer2DModel  # noqa: F401
        from transformers import Qwen2_5_VLForConditionalGeneration  # noqa: F401
    except ImportError:
        return False
    return True


def template() -> str:
    """QwenImagePipeline's prompt template (fnf's copy; tests/families/test_qwenimage.py checks the pipeline's)."""
    from fnf.families.qwenimage import PROMPT_TEMPLATE

    return PROMPT_TEMPLATE


def write_tokenizer(folder: str) -> None:
    """A Qwen2Tokenizer whose byte-level BPE merges make every word of the template and the test words one token."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    probe = Qwen2Tokenizer(vocab={"<|endoftext|>": 0}, merges=[])   # only its pre-tokenizer is used
    corpus = [template().replace("{}", " ".join(_WORDS)), " ".join(_WORDS), "a photo of a cat", "a red car"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = probe._tokenizer.pre_tokenizer
    trainer = trainers.BpeTrainer(vocab_size=2000, min_frequency=1, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    state = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    qwen = Qwen2Tokenizer(vocab=state["vocab"], merges=merges, additional_special_tokens=SPECIALS[1:],
                          model_max_length=32768)
    qwen.save_pretrained(folder)


def _text_encoder(vocab_size: int, seed: int):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    text = dict(vocab_size=vocab_size, hidden_size=TEXT_HIDDEN, intermediate_size=32, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048, rms_norm_eps=1e-6,
                rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]}, rope_theta=1000000.0,
                bos_token_id=0, eos_token_id=2, pad_token_id=0)
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=TEXT_HIDDEN,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                  fullatt_block_indexes=[0])
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=vocab_size - 1,
                           video_token_id=vocab_size - 2, vision_start_token_id=vocab_size - 3,
                           vision_end_token_id=vocab_size - 4)
    return Qwen2_5_VLForConditionalGeneration(cfg).eval()


def _vae(seed: int):
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    # random latent statistics, so a decode that skipped them would be caught
    mean = (torch.randn(4, generator=gen) * 0.5).tolist()
    std = (torch.rand(4, generator=gen) + 0.5).tolist()
    return AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, attn_scales=[],
                                  temperal_downsample=[False], latents_mean=mean, latents_std=std)


def _transformer(seed: int):
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(seed)
    return QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                       attention_head_dim=8, num_attention_heads=2, joint_attention_dim=TEXT_HIDDEN,
                                       guidance_embeds=False, axes_dims_rope=(2, 2, 4))


def _scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    # Qwen/Qwen-Image's scheduler config (dynamic exponential shifting; the pipeline passes calculate_shift's mu)
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True,
                                           base_shift=0.5, max_shift=0.9, base_image_seq_len=256,
                                           max_image_seq_len=8192, time_shift_type="exponential",
                                           shift_terminal=0.02, invert_sigmas=False, stochastic_sampling=False,
                                           use_karras_sigmas=False, use_exponential_sigmas=False,
                                           use_beta_sigmas=False)


def make_qwenimage(folder: str, seed: int = 0) -> str:
    """Save a QwenImagePipeline folder (Qwen-Image-shaped, tiny)."""
    import shutil

    from diffusers import QwenImagePipeline
    from transformers import Qwen2Tokenizer

    tok_dir = os.path.join(folder, "_tok")
    write_tokenizer(tok_dir)
    tokenizer = Qwen2Tokenizer.from_pretrained(tok_dir)
    pipe = QwenImagePipeline(scheduler=_scheduler(), vae=_vae(seed + 1),
                             text_encoder=_text_encoder(len(tokenizer), seed + 2), tokenizer=tokenizer,
                             transformer=_transformer(seed))
    pipe.save_pretrained(folder)
    shutil.rmtree(tok_dir)
    return folder


_FOLDERS: dict[str, str] = {}


def cached_qwenimage(root: str) -> str:
    """Build the tiny Qwen-Image folder once per test session under ``root``."""
    if "qwenimage" not in _FOLDERS:
        folder = os.path.join(root, "tiny_qwenimage")
        if not os.path.isfile(os.path.join(folder, "model_index.json")):
            make_qwenimage(folder)
        _FOLDERS["qwenimage"] = folder
    return _FOLDERS["qwenimage"]
