"""A tiny random-weight Z-Image folder (ZImagePipeline layout + model_index.json), built in code, nothing downloaded.

32x32 images: an AutoencoderKL with factor 2 and 4 latent channels (Z-Image's scaling 0.3611 and shift 0.1159;
latents 4x16x16 -> 8x8 = 64 image tokens after the transformer's 2x2 patches), a ZImageTransformer2DModel with one
main layer and one noise / context refiner layer each (random pad tokens, so a padding bug shows), a 2-layer
Qwen3Model text encoder (the pipeline reads hidden_states[-2]) and a byte-level Qwen2Tokenizer (256 byte tokens, no
merges: every character is a token) with a Qwen3-style chat template that honours ``add_generation_prompt`` and
``enable_thinking``. The scheduler is Z-Image-Turbo's config (shift 3, no dynamic shifting); ``dynamic=True``
makes a folder whose scheduler shifts by ``mu``.
"""
from __future__ import annotations

import os

import torch

IMAGE_SIZE = 32
TEXT_HIDDEN = 16
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
# Qwen3's template for a text conversation, reduced to what ZImagePipeline uses
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}"
    "{% endif %}")


def have_zimage() -> bool:
    """diffusers with ZImagePipeline (0.36+) and transformers with Qwen3."""
    try:
        from diffusers import ZImagePipeline, ZImageTransformer2DModel  # noqa: F401
        from transformers import Qwen3Model  # noqa: F401
    except ImportError:
        return False
    return True


def write_tokenizer(folder: str) -> None:
    """A byte-level BPE Qwen2Tokenizer (GPT-2 byte alphabet, no merges) with Qwen's special tokens."""
    from transformers import Qwen2Tokenizer

    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    vocab = {chr(c): i for i, c in enumerate(cs)}
    os.makedirs(folder, exist_ok=True)
    tok = Qwen2Tokenizer(vocab=vocab, merges=[])
    tok.add_special_tokens({"additional_special_tokens": SPECIALS[1:]})
    tok.add_special_tokens({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"})
    tok.model_max_length = 1024
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(folder)


def _text_encoder(vocab_size: int, seed: int):
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=vocab_size, hidden_size=TEXT_HIDDEN, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=1024,
                      rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True)
    return Qwen3Model(cfg).eval()


def _vae(seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                         latent_channels=4, norm_num_groups=4, sample_size=IMAGE_SIZE, scaling_factor=0.3611,
                         shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False, force_upcast=True)


def _transformer(seed: int):
    from diffusers import ZImageTransformer2DModel

    torch.manual_seed(seed)
    model = ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=1,
                                     n_refiner_layers=1, n_heads=2, n_kv_heads=2, norm_eps=1e-5, qk_norm=True,
                                     cap_feat_dim=TEXT_HIDDEN, rope_theta=256.0, t_scale=1000.0, axes_dims=[8, 4, 4],
                                     axes_lens=[1024, 32, 32])
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():   # random pad tokens (zeros at init), so a wrong padding changes the output
        for p in (model.x_pad_token, model.cap_pad_token):
            p.copy_(torch.randn(p.shape, generator=gen))
    return model


def _scheduler(dynamic: bool):
    from diffusers import FlowMatchEulerDiscreteScheduler

    if dynamic:
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                               base_shift=0.5, max_shift=1.15, base_image_seq_len=16,
                                               max_image_seq_len=256)
    # Tongyi-MAI/Z-Image-Turbo's scheduler_config.json
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)


def make_zimage(folder: str, seed: int = 0, dynamic: bool = False) -> str:
    """Save a ZImagePipeline folder (Z-Image-Turbo-shaped, tiny)."""
    import shutil

    from diffusers import ZImagePipeline
    from transformers import Qwen2Tokenizer

    tok_dir = os.path.join(folder, "_tok")
    write_tokenizer(tok_dir)
    tokenizer = Qwen2Tokenizer.from_pretrained(tok_dir)
    pipe = ZImagePipeline(scheduler=_scheduler(dynamic), vae=_vae(seed + 1),
                          text_encoder=_text_encoder(len(tokenizer), seed + 2), tokenizer=tokenizer,
                          transformer=_transformer(seed))
    pipe.save_pretrained(folder)
    shutil.rmtree(tok_dir)
    return folder


_FOLDERS: dict[str, str] = {}


def cached_zimage(root: str, dynamic: bool = False) -> str:
    """Build the tiny Z-Image folder once per test session under ``root``."""
    key = "zimage_dynamic" if dynamic else "zimage"
    if key not in _FOLDERS:
        folder = os.path.join(root, f"tiny_{key}")
        if not os.path.isfile(os.path.join(folder, "model_index.json")):
            make_zimage(folder, dynamic=dynamic)
        _FOLDERS[key] = folder
    return _FOLDERS[key]
