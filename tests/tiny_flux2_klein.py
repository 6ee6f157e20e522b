"""A tiny random-weight FLUX.2 [klein] folder (Flux2KleinPipeline layout + model_index.json), built in code.

32x32 images with tiny_flux2's AutoencoderKLFlux2 (random batch-norm statistics) and FlowMatchEulerDiscreteScheduler,
a Flux2Transformer2DModel with one double and one single block and no guidance embedding, a Qwen3ForCausalLM text
encoder with 27 tiny decoder layers (the pipeline stacks hidden states 9, 18 and 27) and a byte-level BPE
``Qwen2TokenizerFast`` (no merges: one token per byte) with a Qwen3-style chat template that honours
``add_generation_prompt`` and ``enable_thinking=False``. model_index.json names the classes the released
FLUX.2-klein-4B folder names (``Qwen2TokenizerFast``) and sets ``is_distilled`` (false: the Base models, true CFG;
``distilled=True``: FLUX.2-klein-4B / -9B, no CFG).
"""
from __future__ import annotations

import json
import os

import torch

from tests.tiny_flux2 import IMAGE_SIZE, _scheduler, _vae  # noqa: F401  (IMAGE_SIZE: the tests' image side)

TEXT_LAYERS = 27          # Flux2KleinPipeline's default text_encoder_out_layers are (9, 18, 27)
TEXT_HIDDEN = 16
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}")


def have_klein() -> bool:
    """diffusers with Flux2KleinPipeline and transformers with Qwen3 (diffusers 0.34, the CI floor, has neither)."""
    try:
        from diffusers import Flux2KleinPipeline  # noqa: F401
        from transformers import Qwen3ForCausalLM  # noqa: F401
    except ImportError:
        return False
    return True


def tokenizer():
    """A byte-level BPE Qwen2 tokenizer without merges (every byte one token) and a Qwen3-style chat template."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2TokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    tok = Qwen2TokenizerFast(vocab=vocab, merges=[], unk_token=None, eos_token="<|im_end|>",
                             pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": SPECIALS[1:]})
    tok.chat_template = CHAT_TEMPLATE
    tok.model_max_length = 512
    return tok


def _text_encoder(vocab_size: int, pad_token_id: int, seed: int):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=vocab_size, hidden_size=TEXT_HIDDEN, intermediate_size=32,
                      num_hidden_layers=TEXT_LAYERS, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                      max_position_embeddings=1024, pad_token_id=pad_token_id, tie_word_embeddings=True)
    return Qwen3ForCausalLM(cfg).eval()


def _transformer(seed: int):
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(seed)
    return Flux2Transformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                   attention_head_dim=8, num_attention_heads=2, joint_attention_dim=3 * TEXT_HIDDEN,
                                   timestep_guidance_channels=32, mlp_ratio=2.0, axes_dims_rope=(2, 2, 2, 2),
                                   guidance_embeds=False)


def make_flux2_klein(folder: str, seed: int = 0, distilled: bool = False) -> str:
    """Save a Flux2KleinPipeline folder (FLUX.2-klein-base-shaped; ``distilled``: is_distilled true)."""
    from diffusers import Flux2KleinPipeline

    tok = tokenizer()
    pipe = Flux2KleinPipeline(scheduler=_scheduler(), vae=_vae(seed + 1),
                              text_encoder=_text_encoder(len(tok), tok.pad_token_id, seed + 2), tokenizer=tok,
                              transformer=_transformer(seed), is_distilled=distilled)
    pipe.save_pretrained(folder)
    index_file = os.path.join(folder, "model_index.json")
    with open(index_file) as f:
        index = json.load(f)
    index["tokenizer"] = ["transformers", "Qwen2TokenizerFast"]   # as the released folders name it
    with open(index_file, "w") as f:
        json.dump(index, f, indent=2)
    return folder


_FOLDERS: dict[str, str] = {}


def cached_flux2_klein(root: str, distilled: bool = False) -> str:
    """Build the tiny klein folder (Base, or ``distilled``) once per test session under ``root``."""
    name = "tiny_flux2_klein_distilled" if distilled else "tiny_flux2_klein"
    if name not in _FOLDERS:
        folder = os.path.join(root, name)
        if not os.path.isfile(os.path.join(folder, "model_index.json")):
            make_flux2_klein(folder, distilled=distilled)
        _FOLDERS[name] = folder
    return _FOLDERS[name]
