"""Stable Diffusion 3 / 3.5 (StableDiffusion3Pipeline folders): an MMDiT transformer with flow-matching Euler.

Everything follows ``diffusers.StableDiffusion3Pipeline`` so a sample equals the pipeline's image for the same
seed: prompts through CLIP-L, CLIP-G (penultimate hidden states, concatenated, zero-padded to T5's width) and T5
(its tokens appended along the sequence; zeros when the folder has no T5 or it is skipped, as many as the
installed pipeline uses), pooled = both
CLIP projections concatenated; CFG on ``[uncond, cond]``; x_T ~ N(0, I) unscaled; the scheduler's (shifted)
sigmas; decode ``vae(z / scaling_factor + shift_factor)``. LoRA sits on the transformer's attention projections
and is written with ``StableDiffusion3Pipeline.save_lora_weights`` (``pipe.load_lora_weights`` reads it).
"""
from __future__ import annotations

import torch

from ..core import DiffusionModel, ModelLoadError, PromptEmbeds

from . import flow
from .base import (FlowMatchingEuler, FolderComponents, ModelFamily, Schedule, TransformerLoRA, cfg_combine, cfg_inputs,
                   decode_vae, freeze, resolve_dtype, set_vae_precision, unscale_latents)

T5_MAX_SEQUENCE_LENGTH = 256          # StableDiffusion3Pipeline's default max_sequence_length
SD3_DEFAULT_MAX_SHIFT = 1.16          # the pipeline's fallback for a dynamic-shifting config without max_shift
# the joint-attention context projections (the text stream), which diffusers' SD3 LoRA scripts also target
JOINT_LORA_TARGETS = ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


NEEDS = ("transformer, vae, scheduler, text_encoder(_2), tokenizer(_2) (text_encoder_3 / tokenizer_3 are "
         "optional)")


def _zero_t5_uses_clip_length() -> bool:
    """Without T5 the pipeline's zero T5 tokens have CLIP's length (77) before diffusers 0.36 and
    ``max_sequence_length`` (256) from 0.36 on (diffusers PR #12531); we follow the installed pipeline."""
    import re

    import diffusers

    major, minor = (int(n) for n in re.findall(r"\d+", diffusers.__version__)[:2])
    return (major, minor) < (0, 36)


class SD3Family(FlowMatchingEuler, TransformerLoRA, ModelFamily):
    name = "sd3"
    title = "Stable Diffusion 3 / 3.5"
    pipeline_classes = ("StableDiffusion3Pipeline",)
    components = ("transformer", "vae", "scheduler", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0")
    joint_lora_targets = lora_targets + JOINT_LORA_TARGETS
    supports_sepen = False
    native_size = 1024
    fsdp_units = ("JointTransformerBlock",)

    # -------------------------------------------------------------------------------- loading
    def pipeline_class(self):
        from diffusers import StableDiffusion3Pipeline

        return StableDiffusion3Pipeline

    def load(self, path: str, index: dict, *, weight_dtype, device="cpu", text_encoder_3: bool = True,
             max_sequence_length: int = T5_MAX_SEQUENCE_LENGTH, quantize: str = "none"):
        """All components frozen, eval, on ``device``. ``text_encoder_3=False`` skips T5 (also skipped when the
        folder has none): its tokens are then zeros, as the pipeline loaded with ``text_encoder_3=None`` does.
        ``max_sequence_length``: T5 tokens (the pipeline's argument); ``quantize``: the transformer's
        quantization (:mod:`fnf.quantize`, ``model.quantize``)."""
        src = FolderComponents(path, index, "StableDiffusion3Pipeline", NEEDS)
        return self.build(src, weight_dtype=weight_dtype, device=device, text_encoder_3=text_encoder_3,
                          max_sequence_length=max_sequence_length, quantize=quantize)

    def build(self, src, *, weight_dtype, device="cpu", fp16_autocast: bool = False, text_encoder_3: bool = True,
              max_sequence_length: int = T5_MAX_SEQUENCE_LENGTH, quantize: str = "none"):
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        dtype = resolve_dtype(weight_dtype)
        if isinstance(max_sequence_length, bool) or not isinstance(max_sequence_length, int) \
                or max_sequence_length < 1:
            raise ValueError(f"max_sequence_length: expected a positive int, got {max_sequence_length!r}")
        sched_entry = src.index.get("scheduler") or [None, None]
        if sched_entry[1] not in (None, "FlowMatchEulerDiscreteScheduler"):
            raise ModelLoadError(f"{src.path!r}: the SD3 family samples with FlowMatchEulerDiscreteScheduler, but "
                                 f"model_index.json names scheduler {sched_entry[1]!r}")
        transformer = src.denoiser("transformer", SD3Transformer2DModel, dtype=dtype, quantize=quantize)
        # fp16: read the VAE in float32 (set_vae_precision casts it down unless its config sets force_upcast).
        vae = src.module("vae", AutoencoderKL, dtype=torch.float32 if dtype == torch.float16 else dtype)
        scheduler = src.scheduler("scheduler", FlowMatchEulerDiscreteScheduler)
        encoders = [src.module(name, CLIPTextModelWithProjection, dtype=dtype)
                    for name in ("text_encoder", "text_encoder_2")]
        tokenizers = [src.tokenizer(name, CLIPTokenizer, encoder=enc)
                      for name, enc in zip(("tokenizer", "tokenizer_2"), encoders)]
        if text_encoder_3 and src.has("text_encoder_3"):
            encoders.append(src.module("text_encoder_3", T5EncoderModel, dtype=dtype))
            tokenizers.append(src.tokenizer("tokenizer_3", T5TokenizerFast, encoder=encoders[-1]))
        freeze([transformer, vae, *encoders], device)
        model = DiffusionModel(path=src.path, family=self, denoiser=transformer, vae=vae, scheduler=scheduler,
                               text_encoders=encoders, tokenizers=tokenizers, force_zeros_for_empty_prompt=False,
                               settings={"max_sequence_length": max_sequence_length, "t5": len(encoders) == 3})
        set_vae_precision(model, dtype, fp16_autocast)
        return model

    # -------------------------------------------------------------------------------- conditioning
    @torch.no_grad()
    def encode(self, model, prompts: list[str], *, height: int, width: int, zero: bool = False):
        """``StableDiffusion3Pipeline.encode_prompt`` for ``prompts`` (also its negative prompt branch)."""

        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"prompts: expected a list of str, got {prompts!r}")
        device = model.denoiser.device
        clip_l = model.text_encoders[0]
        max_len = model.tokenizers[0].model_max_length      # the pipeline's tokenizer_max_length (both CLIPs)
        hiddens, pooled = [], []
        for tok, enc in zip(model.tokenizers[:2], model.text_encoders[:2]):
            ids = tok(prompts, padding="max_length", max_length=max_len, truncation=True,
                      return_tensors="pt").input_ids
            out = enc(ids.to(enc.device), output_hidden_states=True)
            pooled.append(out[0].to(device))
            hiddens.append(out.hidden_states[-2].to(dtype=clip_l.dtype, device=device))
        t5_tokens = self._t5_embeds(model, prompts, device, clip_l.dtype)
        clip_hidden = torch.cat(hiddens, dim=-1)
        clip_hidden = torch.nn.functional.pad(clip_hidden, (0, t5_tokens.shape[-1] - clip_hidden.shape[-1]))
        hidden = torch.cat([clip_hidden, t5_tokens], dim=-2)
        pooled = torch.cat(pooled, dim=-1)
        if zero:
            hidden, pooled = torch.zeros_like(hidden), torch.zeros_like(pooled)
        return PromptEmbeds(hidden, pooled)

    def _t5_embeds(self, model, prompts, device, zeros_dtype):
        seq = int(model.settings.get("max_sequence_length", T5_MAX_SEQUENCE_LENGTH))
        if len(model.text_encoders) < 3:
            width = model.denoiser.config.joint_attention_dim
            zeros_len = model.tokenizers[0].model_max_length if _zero_t5_uses_clip_length() else seq
            return torch.zeros((len(prompts), zeros_len, width), device=device, dtype=zeros_dtype)
        tok, enc = model.tokenizers[2], model.text_encoders[2]
        ids = tok(prompts, padding="max_length", max_length=seq, truncation=True, add_special_tokens=True,
                  return_tensors="pt").input_ids
        return enc(ids.to(enc.device))[0].to(dtype=enc.dtype, device=device)

    # -------------------------------------------------------------------------------- sampling
    def _latent_hw(self, model, height: int, width: int) -> tuple[int, int]:
        f = model.vae_scale_factor
        multiple = f * int(model.denoiser.config.patch_size)
        for name, v in (("height", height), ("width", width)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0 or v % multiple:
                raise ValueError(f"{name}: expected a positive multiple of {multiple} (VAE factor {f} x patch "
                                 f"size), got {v!r}")
        return height // f, width // f

    def initial_latents(self, model, batch: int, height: int, width: int, generator, device) -> torch.Tensor:
        """x_T ~ N(0, I) (no init_noise_sigma), drawn as the pipeline's prepare_latents draws with a CPU
        generator."""
        h, w = self._latent_hw(model, height, width)
        shape = (batch, model.denoiser.config.in_channels, h, w)
        return torch.randn(shape, generator=generator, dtype=torch.float32).to(device)

    def schedule(self, model, steps: int, height: int, width: int, device) -> Schedule:
        """The scheduler's sigmas for ``steps`` steps; dynamic shifting (mu from the image token count) when the
        scheduler config asks for it, as the pipeline computes it."""
        mu = None
        if model.scheduler.config.get("use_dynamic_shifting", False):
            h, w = self._latent_hw(model, height, width)
            p = int(model.denoiser.config.patch_size)
            mu = flow.shift_mu(model.scheduler, (h // p) * (w // p), default_max_shift=SD3_DEFAULT_MAX_SHIFT)
        return self.flow_schedule(model, steps, height, width, device, mu=mu)

    def predict(self, model, denoiser, x: torch.Tensor, t, cond, uncond, guidance_scale: float,
                schedule: Schedule | None = None):
        cfg, emb, x_in = cfg_inputs(self, model, x, cond, uncond, guidance_scale)
        if emb.pooled is None:
            raise ValueError("cond: SD3 needs pooled prompt embeddings (encode them with the SD3 family)")
        dtype = model.denoiser.dtype
        timestep = torch.as_tensor(t, device=x_in.device).expand(x_in.shape[0])
        out = denoiser(hidden_states=x_in.to(dtype), timestep=timestep, encoder_hidden_states=emb.hidden.to(dtype),
                       pooled_projections=emb.pooled.to(dtype), return_dict=False)[0]
        return cfg_combine(out, cfg, guidance_scale)

    def decode(self, model, latents: torch.Tensor, schedule: Schedule | None = None) -> torch.Tensor:
        """``vae.decode(z / scaling_factor + shift_factor)`` to float32 images in [0, 1]; with grad when enabled."""
        return decode_vae(model, unscale_latents(model, latents))


FAMILIES = [SD3Family()]
