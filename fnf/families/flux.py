"""FLUX.1 (``flux``): FluxPipeline folders (FLUX.1-dev, FLUX.1-schnell), flow-matching Euler on packed latents.

Everything follows diffusers' ``FluxPipeline``: T5 sequence embeddings + CLIP-L pooled output
(``encode_prompt``), 2x2-packed latents with latent image ids (``prepare_latents``), custom sigmas
``linspace(1, 1/T, T)`` with ``mu`` from the image sequence length (``calculate_shift``), the transformer called
with ``timestep / 1000``, the VAE's scaling and shift factors. Guidance-distilled folders (FLUX.1-dev:
``transformer.config.guidance_embeds``) get the guidance scale as an embedding and never double the batch;
other folders (FLUX.1-schnell) run true CFG (the pipeline's ``true_cfg_scale`` with a negative prompt) when the
guidance scale is > 1 and a negative conditioning is given, else no guidance.

The T5 encoder is required: FluxPipeline has no path without it (its ``encode_prompt`` always runs
``text_encoder_2``). To save memory the trainer encodes the prompts before the transformer reaches the device
and moves the encoders off it (``memory.offload_text_encoder``, ``fnf.models.encode_before_denoiser``).
``model.max_sequence_length`` sets the T5 tokens, ``model.quantize`` the transformer's quantization.

Latents are packed, (B, (h/2)*(w/2), 4*C); their image size comes from the schedule (else a square grid).
"""
from __future__ import annotations

import numpy as np
import torch

from ..core import DiffusionModel, ModelLoadError, PromptEmbeds
from . import flow
from .base import (FlowMatchingEuler, FolderComponents, ModelFamily, PackedLatents, Schedule, TransformerLoRA,
                   cfg_combine, cfg_inputs, decode_vae, freeze, resolve_dtype, set_vae_precision, unscale_latents)

MAX_SEQUENCE_LENGTH = 512   # FluxPipeline's default max_sequence_length for the T5 tokens


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, (h/2)*(w/2), 4*C): FluxPipeline._pack_latents."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(latents: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, (h/2)*(w/2), 4*C) -> (B, C, h, w) for latent height/width h, w: FluxPipeline._unpack_latents."""
    b, n, c4 = latents.shape
    if n != (h // 2) * (w // 2):
        raise ValueError(f"latents: expected {(h // 2) * (w // 2)} packed tokens for a {h}x{w} latent grid, got {n}")
    x = latents.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, h, w)


def latent_image_ids(h2: int, w2: int, device, dtype) -> torch.Tensor:
    """(h2*w2, 3) position ids of the packed tokens (row, column): FluxPipeline._prepare_latent_image_ids."""
    ids = torch.zeros(h2, w2, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(h2)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(w2)[None, :]
    return ids.reshape(h2 * w2, 3).to(device=device, dtype=dtype)


def _tokenize(tokenizer, prompts: list[str], max_length: int) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                     return_tensors="pt").input_ids


class FluxFamily(PackedLatents, FlowMatchingEuler, TransformerLoRA, ModelFamily):
    """FLUX.1: FluxTransformer2DModel, CLIP-L (pooled) + T5 (sequence), 16-channel VAE, flow-matching Euler."""

    name = "flux"
    title = "FLUX.1"
    lora_network_alphas = True       # FluxPipeline.lora_state_dict returns kohya-style alphas
    pipeline_classes = ("FluxPipeline",)
    components = ("transformer", "vae", "scheduler", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0")
    # optional targets: the text stream's projections of the double blocks, the single blocks' MLP / output
    lora_targets_text = ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
    lora_targets_single = ("proj_mlp", "proj_out")
    supports_sepen = False
    native_size = 1024
    fsdp_units = ("FluxTransformerBlock", "FluxSingleTransformerBlock")

    # -------------------------------------------------------------------------------- loading
    def load(self, path: str, index: dict, *, weight_dtype: torch.dtype, device="cpu",
             max_sequence_length: int = MAX_SEQUENCE_LENGTH, quantize: str = "none"):
        """All components frozen, eval, on ``device``. ``max_sequence_length``: T5 tokens (FluxPipeline's
        argument); ``quantize``: the transformer's quantization (:mod:`fnf.quantize`, ``model.quantize``)."""
        t5_note = " (FluxPipeline cannot run without its T5 encoder)"
        src = FolderComponents(path, index, "FLUX.1 pipeline", ", ".join(self.components),
                               {"text_encoder_2": t5_note, "tokenizer_2": t5_note})
        return self.build(src, weight_dtype=weight_dtype, device=device, max_sequence_length=max_sequence_length,
                          quantize=quantize)

    def build(self, src, *, weight_dtype, device="cpu", fp16_autocast: bool = False,
              max_sequence_length: int = MAX_SEQUENCE_LENGTH, quantize: str = "none"):
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
        from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        if isinstance(max_sequence_length, bool) or not isinstance(max_sequence_length, int) \
                or not 1 <= max_sequence_length <= 512:
            raise ValueError(f"max_sequence_length: expected an int in [1, 512] (FluxPipeline's limit), got "
                             f"{max_sequence_length!r}")
        dtype = resolve_dtype(weight_dtype)
        sched_entry = src.index.get("scheduler") or [None, None]
        if sched_entry[-1] not in (None, "FlowMatchEulerDiscreteScheduler"):
            raise ModelLoadError(f"{src.path!r}: the FLUX.1 family samples with FlowMatchEulerDiscreteScheduler, but "
                                 f"model_index.json names {sched_entry[-1]!r}")
        transformer = src.denoiser("transformer", FluxTransformer2DModel, dtype=dtype, quantize=quantize)
        vae = src.module("vae", AutoencoderKL, dtype=torch.float32 if dtype == torch.float16 else dtype)
        scheduler = src.scheduler("scheduler", FlowMatchEulerDiscreteScheduler)
        clip = src.module("text_encoder", CLIPTextModel, dtype=dtype)
        clip_tok = src.tokenizer("tokenizer", CLIPTokenizer, encoder=clip)
        t5 = src.module("text_encoder_2", T5EncoderModel, dtype=dtype)
        t5_tok = src.tokenizer("tokenizer_2", T5TokenizerFast, encoder=t5)
        freeze([transformer, vae, clip, t5], device)
        settings = {"guidance_embeds": bool(transformer.config.get("guidance_embeds", False)),
                    "max_sequence_length": max_sequence_length}
        model = DiffusionModel(path=src.path, family=self, denoiser=transformer, vae=vae, scheduler=scheduler,
                               text_encoders=[clip, t5], tokenizers=[clip_tok, t5_tok],
                               force_zeros_for_empty_prompt=False, settings=settings)
        set_vae_precision(model, dtype, fp16_autocast)
        return model

    def pipeline_class(self):
        from diffusers import FluxPipeline

        return FluxPipeline

    # -------------------------------------------------------------------------------- conditioning
    def encode(self, model, prompts: list[str], *, height: int, width: int, zero: bool = False):
        """FluxPipeline.encode_prompt: T5 last hidden state (``max_sequence_length`` tokens) as ``hidden``, the
        CLIP text model's pooled output as ``pooled`` (``zero``: both all-zero; FluxPipeline never uses it)."""

        if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)) or \
                not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"prompts: expected a list of str, got {prompts!r}")
        prompts = list(prompts)
        clip, t5 = model.text_encoders
        clip_tok, t5_tok = model.tokenizers
        device = model.denoiser.device
        with torch.no_grad():
            pooled = clip(_tokenize(clip_tok, prompts, clip_tok.model_max_length).to(clip.device),
                          output_hidden_states=False).pooler_output
            max_len = int(model.settings.get("max_sequence_length", MAX_SEQUENCE_LENGTH))
            hidden = t5(_tokenize(t5_tok, prompts, max_len).to(t5.device), output_hidden_states=False)[0]
        hidden, pooled = hidden.to(device=device, dtype=t5.dtype), pooled.to(device=device, dtype=clip.dtype)
        if zero:
            hidden, pooled = torch.zeros_like(hidden), torch.zeros_like(pooled)
        return PromptEmbeds(hidden, pooled)

    def uses_cfg(self, model, uncond, guidance_scale: float) -> bool:
        """Guidance-distilled (FLUX.1-dev): never (the scale is an embedding). Otherwise true CFG when a negative
        conditioning is given and the scale is > 1 (FluxPipeline's ``true_cfg_scale`` with a negative prompt)."""
        if model.settings.get("guidance_embeds", False):
            return False
        return uncond is not None and guidance_scale > 1.0

    # -------------------------------------------------------------------------------- sampling
    def initial_latents(self, model, batch: int, height: int, width: int, generator: torch.Generator,
                        device) -> torch.Tensor:
        """FluxPipeline.prepare_latents with a CPU generator: N(0, I) of (B, C, h, w), packed 2x2."""
        h2, w2 = self.token_grid(model, height, width)
        channels = model.denoiser.config.in_channels // 4
        x = torch.randn((batch, channels, 2 * h2, 2 * w2), generator=generator, dtype=torch.float32)
        return pack_latents(x).to(device)

    def schedule(self, model, steps: int, height: int, width: int, device) -> Schedule:
        """FluxPipeline's schedule: sigmas linspace(1, 1/T, T) (none with use_flow_sigmas), mu from the packed
        sequence length (used with dynamic shifting)."""
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps: expected a positive int, got {steps!r}")
        h2, w2 = self.token_grid(model, height, width)
        sched = model.scheduler
        sigmas = None if sched.config.get("use_flow_sigmas", False) else np.linspace(1.0, 1 / steps, steps)
        mu = flow.shift_mu(sched, h2 * w2, default_max_shift=1.15)
        return self.flow_schedule(model, None if sigmas is not None else steps, height, width, device, mu=mu,
                                  sigmas=sigmas)

    def predict(self, model, denoiser, x: torch.Tensor, t, cond, uncond, guidance_scale: float,
                schedule: Schedule | None = None):
        """One transformer call (``timestep / 1000``, guidance embedding for guidance-distilled folders, text ids
        zeros, latent image ids) and the guided velocity in float32 (float64 for a float64 transformer); with
        true CFG the batch is ``[uncond rows of x, cond rows of x]``."""
        cfg, emb, x_in = cfg_inputs(self, model, x, cond, uncond, guidance_scale)
        dtype, n = model.denoiser.dtype, x_in.shape[0]
        h2, w2 = self.packed_grid(model, x, schedule)
        img_ids = latent_image_ids(h2, w2, x.device, dtype)
        txt_ids = torch.zeros(emb.hidden.shape[1], 3, device=x.device, dtype=dtype)
        t = torch.as_tensor(t, device=x.device)
        timestep = (t.expand(n) if t.dim() == 0 else t.repeat(n // t.shape[0])).to(dtype)
        guidance = None
        if model.settings.get("guidance_embeds", False):
            guidance = torch.full([1], guidance_scale, device=x.device, dtype=torch.float32).expand(n)
        out = denoiser(hidden_states=x_in.to(dtype), timestep=timestep / 1000, guidance=guidance,
                       pooled_projections=emb.pooled.to(dtype), encoder_hidden_states=emb.hidden.to(dtype),
                       txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        return cfg_combine(out, cfg, guidance_scale)

    def decode(self, model, latents: torch.Tensor, schedule: Schedule | None = None) -> torch.Tensor:
        """Unpack, ``z / scaling_factor + shift_factor``, VAE decode, ``x / 2 + 0.5`` clamped: float32 in [0, 1]."""
        h2, w2 = self.packed_grid(model, latents, schedule)
        return decode_vae(model, unscale_latents(model, unpack_latents(latents, 2 * h2, 2 * w2)))


FLUX = FluxFamily()
FAMILIES = [FLUX]
