"""Z-Image (``z-image``): ZImagePipeline folders (Z-Image, Z-Image-Turbo), a single-stream DiT with flow-matching Euler.

Everything follows diffusers' ``ZImagePipeline`` text-to-image path, so a sample equals the pipeline's image for the
same seed:

* prompts: each prompt as one user message through the tokenizer's chat template (``add_generation_prompt=True``,
  ``enable_thinking=True``), tokenized padded / truncated to ``max_sequence_length`` (512), the Qwen3 text
  encoder's second-to-last hidden state (``hidden_states[-2]``); the transformer gets each prompt's real tokens
  only (the attention mask selects them: variable-length captions). :class:`CaptionEmbeds` keeps the padded
  (B, L, D) states with their (B, L) bool token mask, so embeddings of different prompts concatenate and index as
  every family's do;
* latents: N(0, I) of (B, C, 2*(H//16), 2*(W//16)) in float32, unpacked (the transformer patchifies 2x2 itself);
* schedule: sigmas ``linspace(1, 1/T, T)`` (``get_default_z_image_sigmas``) and ``mu`` from the image token count
  (``calculate_shift`` with the scheduler config's values; used when the config sets ``use_dynamic_shifting``);
* the transformer gets ``(1000 - t) / 1000`` (the flow time, 1 = clean) and predicts the negated velocity, so
  the scheduler's velocity is ``-out``;
* guidance: CFG when ``guidance_scale > 0`` (Z-Image-Turbo: 0, no CFG), ``pos + g * (pos - neg)`` on a batch of
  ``[cond rows, uncond rows]`` (the pipeline's order); the pipeline's ``cfg_normalization`` / ``cfg_truncation``
  options are off by default as there (the load keywords of the same names set them);
* decode: ``vae.decode(z / scaling_factor + shift_factor)``, ``x / 2 + 0.5`` clamped.

LoRA is written with ``ZImagePipeline.save_lora_weights(transformer_lora_layers=...)`` (peft keys), so
``pipe.load_lora_weights`` reproduces the fine-tuned images. The image-input pipelines (img2img, inpaint,
ControlNet, Omni / edit) are refused by name (:data:`REFUSED`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core import DiffusionModel, ModelLoadError, PromptEmbeds
from . import flow
from .base import (FlowMatchingEuler, FolderComponents, ModelFamily, Schedule, TransformerLoRA, decode_vae, freeze,
                   resolve_dtype, set_vae_precision, unscale_latents)

MAX_SEQUENCE_LENGTH = 512          # ZImagePipeline's default max_sequence_length
DEFAULT_MAX_SHIFT = 1.15           # the pipeline's fallback for a scheduler config without max_shift
TEXT_ENCODERS = ("Qwen3Model", "Qwen3ForCausalLM")   # model_index.json's text_encoder classes we load
NEEDS = "transformer, vae, scheduler, text_encoder (Qwen3), tokenizer (with a chat template)"
# pipeline classes of the Z-Image family that need image inputs: refused with one line (fnf trains text-to-image)
REFUSED = {
    "ZImageImg2ImgPipeline": "Z-Image's image-to-image pipeline (it needs an input image)",
    "ZImageInpaintPipeline": "Z-Image's inpainting pipeline (it needs an image and a mask)",
    "ZImageControlNetPipeline": "Z-Image's ControlNet pipeline (it needs a control image)",
    "ZImageControlNetInpaintPipeline": "Z-Image's ControlNet inpainting pipeline (it needs images and a mask)",
    "ZImageOmniPipeline": "Z-Image's Omni / edit pipeline (it conditions on input images through SigLIP)",
}


@dataclass
class CaptionEmbeds(PromptEmbeds):
    """Z-Image's text conditioning: the encoder states (B, L, D), padded to ``max_sequence_length``, and the (B, L)
    bool ``mask`` of the prompt's tokens; indexing, moving, repeating and joining keep the mask with the states."""

    mask: torch.Tensor | None = None

    def index(self, idx: torch.Tensor) -> "CaptionEmbeds":
        return CaptionEmbeds(self.hidden[idx], mask=self.mask[idx])

    def to(self, device) -> "CaptionEmbeds":
        return CaptionEmbeds(self.hidden.to(device), mask=self.mask.to(device))

    def repeat(self, n: int) -> "CaptionEmbeds":
        return CaptionEmbeds(self.hidden.repeat(n, 1, 1), mask=self.mask.repeat(n, 1))

    @staticmethod
    def cat(a: "CaptionEmbeds", b: "CaptionEmbeds") -> "CaptionEmbeds":
        return CaptionEmbeds(torch.cat([a.hidden, b.hidden]), mask=torch.cat([a.mask, b.mask]))


def _require_zimage() -> None:
    """A clear error where the installed diffusers / transformers predate Z-Image."""
    import diffusers

    try:
        from diffusers import ZImagePipeline, ZImageTransformer2DModel  # noqa: F401
        from transformers import Qwen3Model  # noqa: F401
    except ImportError as e:
        raise ModelLoadError(f"Z-Image folders need a diffusers with ZImagePipeline (diffusers {diffusers.__version__} "
                             f"has none; upgrade diffusers) and a transformers with Qwen3: {e}") from None


def _named_class(src, component: str, allowed: tuple[str, ...], default: str, library: str):
    """The class model_index.json names for ``component`` (one of ``allowed``; ``default`` when unnamed)."""
    import importlib

    entry = src.index.get(component) or [None, None]
    name = entry[-1] if isinstance(entry, (list, tuple)) and entry and entry[-1] not in (None, "?") else default
    if allowed and name not in allowed:
        raise ModelLoadError(f"{src.path!r}: the Z-Image family loads {component} as one of {', '.join(allowed)}, but "
                             f"model_index.json names {name!r}")
    lib = importlib.import_module(library)
    cls = getattr(lib, str(name), None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise ModelLoadError(f"{src.path!r}: model_index.json's {component} class {name!r} is not in the installed "
                             f"{library} {lib.__version__}")
    return cls


def _is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return is_fake(t)


def token_lengths(mask: torch.Tensor) -> list[int]:
    """The real token count of each row of a (B, L) prompt mask. Under the memory estimator's fake tensors (no
    values) every row counts as ``L`` tokens: an upper bound (a prompt of ``max_sequence_length`` tokens)."""
    if _is_fake(mask):
        return [int(mask.shape[1])] * int(mask.shape[0])
    return [int(n) for n in mask.sum(dim=1).tolist()]


def captions(embeds: PromptEmbeds) -> list[torch.Tensor]:
    """The per-prompt caption features the transformer takes: each row's real tokens (``hidden[i][mask[i]]``, as
    ``ZImagePipeline._encode_prompt`` returns them)."""
    mask = getattr(embeds, "mask", None)
    if mask is None or mask.dtype != torch.bool or mask.shape != embeds.hidden.shape[:2]:
        raise ValueError("cond: Z-Image needs CaptionEmbeds with a (B, L) bool token mask (encode the prompts with "
                         "the Z-Image family)")
    if _is_fake(mask):
        return list(embeds.hidden.unbind(0))
    return [h[m] for h, m in zip(embeds.hidden, mask)]


class ZImageFamily(FlowMatchingEuler, TransformerLoRA, ModelFamily):
    """Z-Image: ZImageTransformer2DModel (single-stream DiT over [image tokens, caption tokens]), a Qwen3 text
    encoder (second-to-last hidden state, real tokens only), AutoencoderKL with scaling and shift, flow-matching
    Euler with the pipeline's sigmas."""

    name = "z-image"
    title = "Z-Image"
    pipeline_classes = ("ZImagePipeline",)
    refused_pipelines = REFUSED
    components = ("transformer", "vae", "scheduler", "text_encoder", "tokenizer")
    # the attention projections of every block (the main layers and both refiners); diffusers' Z-Image LoRA
    # tests target these
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0")
    # optional: the blocks' SwiGLU feed-forwards
    lora_targets_ff = ("w1", "w2", "w3")
    supports_sepen = False
    native_size = 1024
    fsdp_units = ("ZImageTransformerBlock",)

    # -------------------------------------------------------------------------------- loading
    def pipeline_class(self):
        from diffusers import ZImagePipeline

        return ZImagePipeline

    def load(self, path: str, index: dict, *, weight_dtype, device="cpu",
             max_sequence_length: int = MAX_SEQUENCE_LENGTH, quantize: str = "none", cfg_normalization: float = 0.0,
             cfg_truncation: float = 1.0):
        """All components frozen, eval, on ``device``. ``max_sequence_length``: the prompt tokens (the pipeline's
        argument); ``quantize``: the transformer's quantization (:mod:`fnf.quantize`, ``model.quantize``);
        ``cfg_normalization`` / ``cfg_truncation``: the pipeline's arguments of the same names (off by default)."""
        _require_zimage()
        src = FolderComponents(path, index, "ZImagePipeline", NEEDS)
        return self.build(src, weight_dtype=weight_dtype, device=device, max_sequence_length=max_sequence_length,
                          quantize=quantize, cfg_normalization=cfg_normalization, cfg_truncation=cfg_truncation)

    def build(self, src, *, weight_dtype, device="cpu", fp16_autocast: bool = False,
              max_sequence_length: int = MAX_SEQUENCE_LENGTH, quantize: str = "none", cfg_normalization: float = 0.0,
              cfg_truncation: float = 1.0):
        _require_zimage()
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel

        if isinstance(max_sequence_length, bool) or not isinstance(max_sequence_length, int) \
                or max_sequence_length < 1:
            raise ValueError(f"max_sequence_length: expected a positive int (ZImagePipeline's default is "
                             f"{MAX_SEQUENCE_LENGTH}), got {max_sequence_length!r}")
        for key, value in (("cfg_normalization", cfg_normalization), ("cfg_truncation", cfg_truncation)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{key}: expected a number >= 0, got {value!r}")
        sched_entry = src.index.get("scheduler") or [None, None]
        if sched_entry[-1] not in (None, "FlowMatchEulerDiscreteScheduler"):
            raise ModelLoadError(f"{src.path!r}: the Z-Image family samples with FlowMatchEulerDiscreteScheduler, but "
                                 f"model_index.json names scheduler {sched_entry[-1]!r}")
        dtype = resolve_dtype(weight_dtype)
        encoder_cls = _named_class(src, "text_encoder", TEXT_ENCODERS, "Qwen3Model", "transformers")
        transformer = src.denoiser("transformer", ZImageTransformer2DModel, dtype=dtype, quantize=quantize)
        # fp16: read the VAE in float32 (set_vae_precision casts it down unless its config sets force_upcast).
        vae = src.module("vae", AutoencoderKL, dtype=torch.float32 if dtype == torch.float16 else dtype)
        scheduler = src.scheduler("scheduler", FlowMatchEulerDiscreteScheduler)
        encoder = src.module("text_encoder", encoder_cls, dtype=dtype)
        tokenizer_cls = _named_class(src, "tokenizer", (), "AutoTokenizer", "transformers") \
            if isinstance(src, FolderComponents) else None
        tokenizer = src.tokenizer("tokenizer", tokenizer_cls, encoder=encoder, chat=True)
        if not hasattr(tokenizer, "apply_chat_template") or getattr(tokenizer, "chat_template", None) is None:
            raise ModelLoadError(f"{src.path!r}: the tokenizer ({type(tokenizer).__name__}) has no chat template, "
                                 "which ZImagePipeline encodes prompts with (tokenizer/chat_template.jinja or "
                                 "tokenizer_config.json's chat_template)")
        freeze([transformer, vae, encoder], device)
        settings = {"max_sequence_length": max_sequence_length, "cfg_normalization": float(cfg_normalization),
                    "cfg_truncation": float(cfg_truncation)}
        model = DiffusionModel(path=src.path, family=self, denoiser=transformer, vae=vae, scheduler=scheduler,
                               text_encoders=[encoder], tokenizers=[tokenizer], force_zeros_for_empty_prompt=False,
                               settings=settings)
        set_vae_precision(model, dtype, fp16_autocast)
        return model

    # -------------------------------------------------------------------------------- conditioning
    @torch.no_grad()
    def encode(self, model, prompts: list[str], *, height: int, width: int, zero: bool = False):
        """``ZImagePipeline._encode_prompt``: chat template (user message, generation prompt, thinking enabled),
        padded to ``max_sequence_length``, ``hidden_states[-2]`` of the Qwen3 encoder under the token mask;
        returned padded, with the mask (:class:`CaptionEmbeds`; ``zero``: all-zero states, the pipeline never uses
        it)."""
        if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)) or \
                not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"prompts: expected a list of str, got {prompts!r}")
        encoder, tokenizer = model.text_encoders[0], model.tokenizers[0]
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                               add_generation_prompt=True, enable_thinking=True) for p in prompts]
        inputs = tokenizer(texts, padding="max_length", truncation=True, return_tensors="pt",
                           max_length=int(model.settings.get("max_sequence_length", MAX_SEQUENCE_LENGTH)))
        mask = inputs.attention_mask.bool()
        body = encoder.model if hasattr(encoder, "lm_head") else encoder   # Qwen3ForCausalLM: skip the logits
        out = body(input_ids=inputs.input_ids.to(encoder.device), attention_mask=mask.to(encoder.device),
                   output_hidden_states=True, use_cache=False)
        hidden = out.hidden_states[-2].to(model.denoiser.device)
        return CaptionEmbeds(torch.zeros_like(hidden) if zero else hidden, mask=mask.to(hidden.device))

    def uses_cfg(self, model, uncond, guidance_scale: float) -> bool:
        """ZImagePipeline runs CFG whenever ``guidance_scale > 0`` (its formula is ``pos + g * (pos - neg)``)."""
        return uncond is not None and guidance_scale > 0

    # -------------------------------------------------------------------------------- sampling
    def _latent_hw(self, model, height: int, width: int) -> tuple[int, int]:
        multiple = model.vae_scale_factor * 2
        for name, side in (("height", height), ("width", width)):
            if isinstance(side, bool) or not isinstance(side, int) or side < multiple or side % multiple:
                raise ValueError(f"{name}: expected a positive multiple of {multiple} (ZImagePipeline: VAE factor "
                                 f"{model.vae_scale_factor} x 2x2 patches), got {side!r}")
        return 2 * (height // multiple), 2 * (width // multiple)

    def initial_latents(self, model, batch: int, height: int, width: int, generator: torch.Generator,
                        device) -> torch.Tensor:
        """ZImagePipeline.prepare_latents with a CPU generator: N(0, I) of (B, in_channels, h, w) in float32."""
        h, w = self._latent_hw(model, height, width)
        shape = (batch, int(model.denoiser.config.in_channels), h, w)
        return torch.randn(shape, generator=generator, dtype=torch.float32).to(device)

    def schedule(self, model, steps: int, height: int, width: int, device) -> Schedule:
        """The pipeline's sigmas ``linspace(1, 1/T, T)`` through the folder's scheduler config (its shift), with
        ``mu`` of the (h/2)*(w/2) image tokens for a dynamic-shifting config."""
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps: expected a positive int, got {steps!r}")
        h, w = self._latent_hw(model, height, width)
        mu = flow.shift_mu(model.scheduler, (h // 2) * (w // 2), default_max_shift=DEFAULT_MAX_SHIFT)
        sigmas = torch.linspace(1.0, 1 / steps, steps).tolist()
        return self.flow_schedule(model, None, height, width, device, mu=mu, sigmas=sigmas)

    def predict(self, model, denoiser, x: torch.Tensor, t, cond, uncond, guidance_scale: float,
                schedule: Schedule | None = None):
        """One transformer call on the list of (C, 1, h, w) latents at ``(1000 - t) / 1000`` with each prompt's
        caption tokens, guided as the pipeline guides (``[cond, uncond]`` rows), returned as the scheduler's
        velocity (the negated output) in float32 (float64 for a float64 transformer)."""
        n = x.shape[0]
        if cond.hidden.shape[0] != n:
            raise ValueError(f"cond: expected {n} rows (x's batch), got {cond.hidden.shape[0]}")
        t = torch.as_tensor(t, device=x.device)
        timestep = t.expand(n) if t.dim() == 0 else t.repeat(n // t.shape[0])
        timestep = (1000 - timestep) / 1000
        g = float(guidance_scale)
        cfg = self.uses_cfg(model, uncond, g) and not self._truncated(model, t)
        caps = captions(cond)
        x_in = x
        if cfg:
            if uncond.hidden.shape[0] != n:
                raise ValueError(f"uncond: expected {n} rows (x's batch), got {uncond.hidden.shape[0]}")
            caps, x_in, timestep = caps + captions(uncond), torch.cat([x, x]), timestep.repeat(2)
        dtype = model.denoiser.dtype
        latents = list(x_in.to(dtype).unsqueeze(2).unbind(0))
        out = denoiser(latents, timestep, [c.to(dtype) for c in caps], return_dict=False)[0]
        out = torch.stack(list(out)).squeeze(2)
        out = out.to(torch.promote_types(out.dtype, torch.float32))
        if cfg:
            pos, neg = out[:n], out[n:]
            out = pos + g * (pos - neg)
            limit = float(model.settings.get("cfg_normalization", 0.0))
            if limit > 0:
                out = self._renormalize(pos, out, limit)
        return -out

    @staticmethod
    def _truncated(model, t: torch.Tensor) -> bool:
        """The pipeline's ``cfg_truncation``: no CFG once the flow time ``(1000 - t) / 1000`` exceeds it (never at
        the default 1.0)."""
        limit = float(model.settings.get("cfg_truncation", 1.0))
        if limit > 1:
            return False
        if t.dim() and t.numel() > 1 and not bool((t == t.flatten()[0]).all()):
            raise ValueError("t: cfg_truncation needs one timestep for the whole batch")
        return float((1000 - t.flatten()[0].float()) / 1000) > limit

    @staticmethod
    def _renormalize(pos: torch.Tensor, pred: torch.Tensor, limit: float) -> torch.Tensor:
        """The pipeline's ``cfg_normalization``: each row's guided output scaled down to at most ``limit`` times
        the norm of its conditional output."""
        rows = []
        for p, q in zip(pos, pred):
            max_norm = torch.linalg.vector_norm(p) * limit
            norm = torch.linalg.vector_norm(q)
            rows.append(torch.where(norm > max_norm, q * (max_norm / norm), q))
        return torch.stack(rows)

    def decode(self, model, latents: torch.Tensor, schedule: Schedule | None = None) -> torch.Tensor:
        """``vae.decode(z / scaling_factor + shift_factor)`` to float32 images in [0, 1]; with grad when enabled."""
        return decode_vae(model, unscale_latents(model, latents))


ZIMAGE = ZImageFamily()
FAMILIES = [ZIMAGE]
