"""A tiny random-weight StableDiffusion3Pipeline folder for the SD3 family tests, built in code, nothing downloaded.

32x32 images, latents 4x16x16 (VAE factor 2, scaling and shift factors as SD3's VAE has them), a 2-layer MMDiT
with SD3.5-Medium's extras (a dual-attention layer, RMS qk-norm), CLIP-L (width 16) and CLIP-G (width 24)
text encoders with projections, and a 2-layer T5 encoder (width 48) with a Unigram tokenizer built here.
"""
from __future__ import annotations

import os
import shutil
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fnf_tiny_models

IMAGE_SIZE = 32
T5_WIDTH = 48
CLIP_WIDTHS = (16, 24)
_WORDS = fnf_tiny_models._WORDS


def write_t5_tokenizer(folder: str) -> None:
    """A T5TokenizerFast over a Unigram model of the test words (pad 0, eos 1, unk 2), saved with save_pretrained."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    vocab += [("\u2581" + w, -1.0) for w in _WORDS]
    vocab += [(c, -5.0) for c in sorted({c for w in _WORDS for c in w})]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0,
                    model_max_length=512).save_pretrained(folder)


def _t5(vocab_size: int, seed: int):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=vocab_size, d_model=T5_WIDTH, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                   relative_attention_num_buckets=8, dropout_rate=0.0, feed_forward_proj="gated-gelu",
                   pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return T5EncoderModel(cfg).eval()


def _vae(seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         layers_per_block=1, norm_num_groups=4, sample_size=IMAGE_SIZE,
                         scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                         use_post_quant_conv=False)


def _transformer(seed: int):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(sample_size=IMAGE_SIZE // 2, patch_size=2, in_channels=4, out_channels=4,
                                 num_layers=2, attention_head_dim=8, num_attention_heads=2,
                                 joint_attention_dim=T5_WIDTH, caption_projection_dim=16,
                                 pooled_projection_dim=sum(CLIP_WIDTHS), pos_embed_max_size=16,
                                 dual_attention_layers=(0,), qk_norm="rms_norm")


def make_sd3(folder: str, seed: int = 0, *, t5: bool = True, scheduler_kwargs: dict | None = None) -> str:
    """Save a StableDiffusion3Pipeline folder; ``t5=False`` leaves out text_encoder_3 / tokenizer_3."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import CLIPTokenizer, T5TokenizerFast

    tok_dir = os.path.join(folder, "_tok")
    fnf_tiny_models.write_tokenizer(tok_dir)
    clip_tok = CLIPTokenizer.from_pretrained(tok_dir)
    t5_tok = t5_model = None
    if t5:
        write_t5_tokenizer(os.path.join(folder, "_t5tok"))
        t5_tok = T5TokenizerFast.from_pretrained(os.path.join(folder, "_t5tok"))
        t5_model = _t5(len(t5_tok), seed + 4)
    l_width, g_width = CLIP_WIDTHS
    pipe = StableDiffusion3Pipeline(
        transformer=_transformer(seed), vae=_vae(seed + 1),
        scheduler=FlowMatchEulerDiscreteScheduler(**(scheduler_kwargs or {"shift": 3.0})),
        text_encoder=fnf_tiny_models._text_encoder(l_width, True, len(clip_tok), seed + 2), tokenizer=clip_tok,
        text_encoder_2=fnf_tiny_models._text_encoder(g_width, True, len(clip_tok), seed + 3), tokenizer_2=clip_tok,
        text_encoder_3=t5_model, tokenizer_3=t5_tok)
    pipe.save_pretrained(folder)
    for tmp in ("_tok", "_t5tok"):
        shutil.rmtree(os.path.join(folder, tmp), ignore_errors=True)
    return folder


def cached_sd3(root: str, *, t5: bool = True) -> str:
    """Build each tiny SD3 folder once per test session under ``root`` (like fnf_tiny_models.cached_model)."""
    key = "sd3" if t5 else "sd3_no_t5"
    if key not in fnf_tiny_models._FOLDERS:
        folder = os.path.join(root, f"tiny_{key}")
        if not os.path.isfile(os.path.join(folder, "model_index.json")):
            make_sd3(folder, t5=t5)
        fnf_tiny_models._FOLDERS[key] = folder
    return fnf_tiny_models._FOLDERS[key]
