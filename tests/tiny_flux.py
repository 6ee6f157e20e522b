"""A tiny random-weight FLUX.1 folder (FluxPipeline layout + model_index.json), built in code, nothing downloaded.

32x32 images: a 16-channel VAE with factor 2 (latents 16x16 -> 64 packed tokens of 64 channels), a
FluxTransformer2DModel with one double and one single block, a tiny CLIP text model (pooled 32) and a tiny T5
encoder (hidden 32) with a word-level Unigram tokenizer built here.
"""
from __future__ import annotations

import os

import torch

from tests.fnf_tiny_models import _WORDS, _text_encoder, write_tokenizer

IMAGE_SIZE = 32
T5_MAX_LENGTH = 512   # the pipeline's default max_sequence_length (fnf's FLUX family uses the same)


def write_t5_tokenizer(folder: str) -> None:
    """A T5TokenizerFast over the test words (Unigram, <pad>=0, </s>=1, <unk>=2, '</s>' appended)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)] + [("\u2581" + w, -1.0) for w in _WORDS]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    fast = T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                           extra_ids=0, model_max_length=T5_MAX_LENGTH)
    fast.save_pretrained(folder)


def _t5(vocab_size: int, seed: int):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                   relative_attention_num_buckets=8, relative_attention_max_distance=32, dropout_rate=0.0,
                   feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
                   pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return T5EncoderModel(cfg).eval()


def _vae(seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=16,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         layers_per_block=1, norm_num_groups=4, sample_size=IMAGE_SIZE, scaling_factor=0.3611,
                         shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)


def _transformer(seed: int, guidance_embeds: bool):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                  attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                  pooled_projection_dim=32, guidance_embeds=guidance_embeds, axes_dims_rope=(2, 2, 4))


def _scheduler(dynamic: bool):
    from diffusers import FlowMatchEulerDiscreteScheduler

    if dynamic:  # FLUX.1-dev's scheduler config
        return FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                               base_image_seq_len=256, max_image_seq_len=4096)
    return FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)  # FLUX.1-schnell's


def make_flux(folder: str, seed: int = 0, *, guidance_embeds: bool = True) -> str:
    """Save a FluxPipeline folder: guidance-distilled with dynamic shifting (FLUX.1-dev-shaped) by default,
    ``guidance_embeds=False``: no guidance embedding, shift 1, no dynamic shifting (FLUX.1-schnell-shaped)."""
    import shutil

    from diffusers import FluxPipeline
    from transformers import CLIPTokenizer, T5TokenizerFast

    tok_dir, t5_dir = os.path.join(folder, "_tok"), os.path.join(folder, "_t5tok")
    write_tokenizer(tok_dir)
    write_t5_tokenizer(t5_dir)
    tokenizer, t5_tokenizer = CLIPTokenizer.from_pretrained(tok_dir), T5TokenizerFast.from_pretrained(t5_dir)
    pipe = FluxPipeline(scheduler=_scheduler(guidance_embeds), vae=_vae(seed + 1),
                        text_encoder=_text_encoder(32, False, len(tokenizer), seed + 2), tokenizer=tokenizer,
                        text_encoder_2=_t5(len(t5_tokenizer), seed + 3), tokenizer_2=t5_tokenizer,
                        transformer=_transformer(seed, guidance_embeds))
    pipe.save_pretrained(folder)
    shutil.rmtree(tok_dir)
    shutil.rmtree(t5_dir)
    return folder


_FOLDERS: dict[str, str] = {}


def cached_flux(root: str, kind: str = "flux") -> str:
    """Build each tiny FLUX folder once per test session under ``root``: "flux" (dev-shaped) or "flux_schnell"."""
    if kind not in ("flux", "flux_schnell"):
        raise ValueError(f"kind: expected 'flux' or 'flux_schnell', got {kind!r}")
    if kind not in _FOLDERS:
        folder = os.path.join(root, f"tiny_{kind}")
        if not os.path.isfile(os.path.join(folder, "model_index.json")):
            make_flux(folder, guidance_embeds=kind == "flux")
        _FOLDERS[kind] = folder
    return _FOLDERS[kind]
