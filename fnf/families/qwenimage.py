"""Qwen-Image (``qwen-image``): QwenImagePipeline folders, flow-matching Euler on packed latents, true CFG.

Everything follows diffusers' ``QwenImagePipeline`` text-to-image path:

* prompts: the pipeline's prompt template (a system message asking for a detailed description, then the prompt, in
  Qwen's chat markup), tokenized with padding to the longest prompt (at most 1024 + 34 tokens); the
  Qwen2.5-VL text encoder's last hidden state; the first 34 tokens (the template's prefix,
  ``prompt_template_encode_start_idx``) dropped from each prompt's valid tokens, the rest padded with zeros to the
  longest with a mask, cut to ``max_sequence_length`` (512); the mask goes to the transformer (the pipeline drops
  it when it is all ones);
* latents: N(0, I) of (B, 1, C, h, w) (a one-frame video latent), packed 2x2 into (B, h/2*w/2, 4*C); the
  transformer gets ``img_shapes`` [(1, h/2, w/2)] per row and ``timestep / 1000``;
* schedule: sigmas ``linspace(1, 1/T, T)`` with ``mu`` from the packed token count (``calculate_shift`` with the
  scheduler config's values; Qwen-Image's config shifts exponentially and stretches to ``shift_terminal``);
* guidance: true CFG (``true_cfg_scale`` with a negative prompt): two transformer calls (the negative and the
  prompt keep their own text lengths), ``neg + g * (cond - neg)`` rescaled per token to the norm of the
  conditional prediction. Qwen-Image is not guidance-distilled; a transformer with ``guidance_embeds`` is refused;
* decode: unpack to (B, C, 1, h, w), ``z * latents_std + latents_mean`` (the VAE config's per-channel statistics),
  the VAE's post-quant conv and decoder on the one frame, clamp to [-1, 1], the frame axis squeezed,
  ``x / 2 + 0.5``.

The decode runs the decoder without the VAE's causal frame cache (for one frame the cache is never read: the
same image as ``vae.decode``); so the decoder's parts can be checkpointed (``memory.vae_checkpointing: resnet``,
:mod:`fnf.train.vae_memory`) with exact recomputation. AutoencoderKLQwenImage has no diffusers gradient
checkpointing (``vae_checkpointing: blocks`` is refused by diffusers) and no 2D tiled decode (``memory.vae_tile``).

Not supported (other pipeline classes, refused by name when a folder holds them): QwenImageEditPipeline,
QwenImageEditPlusPipeline, QwenImageImg2ImgPipeline, QwenImageInpaintPipeline, QwenImageEditInpaintPipeline,
QwenImageControlNetPipeline, QwenImageControlNetInpaintPipeline, QwenImageLayeredPipeline.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..core import DiffusionModel, ModelLoadError, PromptEmbeds
from . import flow
from .base import (FlowMatchingEuler, FolderComponents, ModelFamily, PackedLatents, Schedule, TransformerLoRA,
                   freeze, resolve_dtype, set_vae_precision)
from .flux import pack_latents, unpack_latents

# QwenImagePipeline's prompt handling (its __init__ and __call__ defaults)
PROMPT_TEMPLATE = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, "
                   "text, spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}"
                   "<|im_end|>\n<|im_start|>assistant\n")
TEMPLATE_START_IDX = 34          # prompt_template_encode_start_idx: the template's prefix tokens, dropped
TOKENIZER_MAX_LENGTH = 1024      # tokenizer_max_length (the tokenizer gets this + 34)
MAX_SEQUENCE_LENGTH = 512        # __call__'s max_sequence_length (at most 1024)


@dataclass
class MaskedEmbeds(PromptEmbeds):
    """Qwen-Image's text conditioning: the hidden states (B, L, D) padded with zeros and their (B, L) mask (1: a
    token, 0: padding); indexing, moving, repeating and joining keep the mask with the states."""

    mask: torch.Tensor | None = None

    def __post_init__(self):
        if self.mask is None:   # no mask: every token is valid
            self.mask = torch.ones(self.hidden.shape[:2], dtype=torch.long, device=self.hidden.device)
        if tuple(self.mask.shape) != tuple(self.hidden.shape[:2]):
            raise ValueError(f"mask: expected shape {tuple(self.hidden.shape[:2])} (hidden's batch and length), got "
                             f"{tuple(self.mask.shape)}")

    def index(self, idx: torch.Tensor) -> "MaskedEmbeds":
        return MaskedEmbeds(self.hidden[idx], mask=self.mask[idx])

    def to(self, device) -> "MaskedEmbeds":
        return MaskedEmbeds(self.hidden.to(device), mask=self.mask.to(device))

    def repeat(self, n: int) -> "MaskedEmbeds":
        return MaskedEmbeds(self.hidden.repeat(n, 1, 1), mask=self.mask.repeat(n, 1))

    @staticmethod
    def cat(a: "MaskedEmbeds", b: "MaskedEmbeds") -> "MaskedEmbeds":
        """Rows of ``a`` then ``b``, the shorter padded (zeros, mask 0) to the longer text length."""
        n = max(a.hidden.shape[1], b.hidden.shape[1])
        pad = lambda e: (torch.nn.functional.pad(e.hidden, (0, 0, 0, n - e.hidden.shape[1])),  # noqa: E731
                         torch.nn.functional.pad(e.mask, (0, n - e.mask.shape[1])))
        (ha, ma), (hb, mb) = pad(a), pad(b)
        return MaskedEmbeds(torch.cat([ha, hb]), mask=torch.cat([ma, mb]))


def _require_qwenimage() -> None:
    """A clear error where the installed diffusers / transformers predate Qwen-Image."""
    import diffusers

    try:
        from diffusers import AutoencoderKLQwenImage, QwenImagePipeline, QwenImageTransformer2DModel  # noqa: F401
        from transformers import Qwen2_5_VLForConditionalGeneration  # noqa: F401
    except ImportError as e:
        raise ModelLoadError(f"Qwen-Image folders need a diffusers with QwenImagePipeline (diffusers "
                             f"{diffusers.__version__} has none; upgrade diffusers) and a transformers with "
                             f"Qwen2.5-VL: {e}") from None


def vae_factor(vae) -> int:
    """The spatial downscale of AutoencoderKLQwenImage (QwenImagePipeline's ``vae_scale_factor``)."""
    return 2 ** len(vae.temperal_downsample)


class QwenImageFamily(PackedLatents, FlowMatchingEuler, TransformerLoRA, ModelFamily):
    """Qwen-Image: QwenImageTransformer2DModel (dual-stream MMDiT), a Qwen2.5-VL text encoder (last hidden state,
    template prefix dropped, masked), AutoencoderKLQwenImage (one-frame causal 3D VAE with latent statistics),
    flow-matching Euler with calculate_shift's mu, true CFG with norm rescale."""

    name = "qwen-image"
    title = "Qwen-Image"
    pipeline_classes = ("QwenImagePipeline",)
    components = ("transformer", "vae", "scheduler", "text_encoder", "tokenizer")
    # diffusers' Qwen-Image LoRA script's default: the image stream's attention projections
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0")
    # optional: the text stream's projections, both streams' MLPs
    lora_targets_text = ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
    lora_targets_ff = ("img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2")
    supports_sepen = False
    native_size = 1024             # QwenImagePipeline's default (default_sample_size 128 x 8)
    fsdp_units = ("QwenImageTransformerBlock",)
    # other Qwen-Image pipelines (fnf.families.registry.refusal: one line naming the class)
    refused_pipelines = {
        cls: why for why, classes in (
            ("fnf trains text-to-image; image editing takes an input image (QwenImagePipeline folders load)",
             ("QwenImageEditPipeline", "QwenImageEditPlusPipeline", "QwenImageEditInpaintPipeline")),
            ("fnf trains text-to-image from noise; img2img / inpainting start from an input image",
             ("QwenImageImg2ImgPipeline", "QwenImageInpaintPipeline")),
            ("ControlNet conditioning is not supported", ("QwenImageControlNetPipeline",
                                                           "QwenImageControlNetInpaintPipeline")),
            ("the layered (RGBA layer decomposition) variant is not supported", ("QwenImageLayeredPipeline",)))
        for cls in classes}

    # -------------------------------------------------------------------------------- loading
    def load(self, path: str, index: dict, *, weight_dtype: torch.dtype, device="cpu",
             max_sequence_length: int = MAX_SEQUENCE_LENGTH, quantize: str = "none"):
        """All components frozen, eval, on ``device``. ``max_sequence_length``: the text tokens kept
        (QwenImagePipeline's argument, at most 1024); ``quantize``: the transformer's quantization
        (:mod:`fnf.quantize`, ``model.quantize``)."""
        _require_qwenimage()
        src = FolderComponents(path, index, "Qwen-Image pipeline", ", ".join(self.components))
        return self.build(src, weight_dtype=weight_dtype, device=device, max_sequence_length=max_sequence_length,
                          quantize=quantize)

    def build(self, src, *, weight_dtype, device="cpu", fp16_autocast: bool = False,
              max_sequence_length: int = MAX_SEQUENCE_LENGTH, quantize: str = "none"):
        _require_qwenimage()
        from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
        from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

        if isinstance(max_sequence_length, bool) or not isinstance(max_sequence_length, int) \
                or not 1 <= max_sequence_length <= 1024:
            raise ValueError(f"max_sequence_length: expected an int in [1, 1024] (QwenImagePipeline's limit), got "
                             f"{max_sequence_length!r}")
        sched_entry = src.index.get("scheduler") or [None, None]
        if sched_entry[-1] not in (None, "FlowMatchEulerDiscreteScheduler"):
            raise ModelLoadError(f"{src.path!r}: the Qwen-Image family samples with FlowMatchEulerDiscreteScheduler, "
                                 f"but model_index.json names {sched_entry[-1]!r}")
        dtype = resolve_dtype(weight_dtype)
        transformer = src.denoiser("transformer", QwenImageTransformer2DModel, dtype=dtype, quantize=quantize)
        if transformer.config.get("guidance_embeds", False):
            raise ModelLoadError(f"{src.path!r}: the transformer sets guidance_embeds, which no released Qwen-Image "
                                 "uses and QwenImageTransformer2DModel's timestep embedding cannot take")
        vae = src.module("vae", AutoencoderKLQwenImage, dtype=dtype)
        scheduler = src.scheduler("scheduler", FlowMatchEulerDiscreteScheduler)
        encoder = src.module("text_encoder", Qwen2_5_VLForConditionalGeneration, dtype=dtype)
        tokenizer = src.tokenizer("tokenizer", Qwen2Tokenizer, encoder=encoder)
        freeze([transformer, vae, encoder], device)
        settings = {"max_sequence_length": max_sequence_length}
        model = DiffusionModel(path=src.path, family=self, denoiser=transformer, vae=vae, scheduler=scheduler,
                               text_encoders=[encoder], tokenizers=[tokenizer], force_zeros_for_empty_prompt=False,
                               settings=settings)
        set_vae_precision(model, dtype, fp16_autocast)
        return model

    def pipeline_class(self):
        from diffusers import QwenImagePipeline

        return QwenImagePipeline

    # -------------------------------------------------------------------------------- conditioning
    def encode(self, model, prompts: list[str], *, height: int, width: int, zero: bool = False):
        """QwenImagePipeline.encode_prompt: the template around each prompt, the text encoder's last hidden state,
        each prompt's valid tokens after the 34-token template prefix, zero-padded to the longest with a mask, cut
        to ``max_sequence_length`` (``zero``: all-zero states; QwenImagePipeline never uses it)."""
        if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)) or \
                not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"prompts: expected a list of str, got {prompts!r}")
        encoder, tokenizer = model.text_encoders[0], model.tokenizers[0]
        tokens = tokenizer([PROMPT_TEMPLATE.format(p) for p in prompts],
                           max_length=TOKENIZER_MAX_LENGTH + TEMPLATE_START_IDX, padding=True, truncation=True)
        # each prompt's valid token positions after the template prefix, from the host-side mask (no
        # data-dependent indexing of device tensors: the memory estimator traces this under fake tensors)
        valid = [[j for j, v in enumerate(row) if v][TEMPLATE_START_IDX:] for row in tokens["attention_mask"]]
        length = max(len(v) for v in valid)
        if length == 0:
            raise ValueError("prompts: the prompt template left no tokens after its 34-token prefix (a tokenizer "
                             "that is not Qwen's?)")
        ids = torch.tensor(tokens["input_ids"], dtype=torch.long, device=encoder.device)
        attn = torch.tensor(tokens["attention_mask"], dtype=torch.long, device=encoder.device)
        with torch.no_grad():
            hidden = encoder(input_ids=ids, attention_mask=attn, output_hidden_states=True).hidden_states[-1]
        rows = [hidden[b, torch.tensor(v, dtype=torch.long, device=hidden.device)] for b, v in enumerate(valid)]
        embeds = torch.stack([torch.cat([r, r.new_zeros(length - r.shape[0], r.shape[1])]) for r in rows])
        mask = torch.tensor([[1] * len(v) + [0] * (length - len(v)) for v in valid], dtype=torch.long)
        keep = int(model.settings.get("max_sequence_length", MAX_SEQUENCE_LENGTH))
        device = model.denoiser.device
        embeds = embeds[:, :keep].to(device=device, dtype=encoder.dtype)
        mask = mask[:, :keep].to(device)
        return MaskedEmbeds(torch.zeros_like(embeds) if zero else embeds, mask=mask)

    def uses_cfg(self, model, uncond, guidance_scale: float) -> bool:
        """True CFG when a negative conditioning is given and the scale is > 1 (QwenImagePipeline's
        ``true_cfg_scale`` with a negative prompt)."""
        return uncond is not None and guidance_scale > 1.0

    # -------------------------------------------------------------------------------- sampling
    def latent_factor(self, model) -> int:
        """The VAE's spatial factor as QwenImagePipeline computes it (:func:`vae_factor`)."""
        return vae_factor(model.vae)

    def initial_latents(self, model, batch: int, height: int, width: int, generator: torch.Generator,
                        device) -> torch.Tensor:
        """QwenImagePipeline.prepare_latents with a CPU generator: N(0, I) of (B, 1, C, h, w), packed 2x2."""
        h2, w2 = self.token_grid(model, height, width)
        channels = model.denoiser.config.in_channels // 4
        x = torch.randn((batch, 1, channels, 2 * h2, 2 * w2), generator=generator, dtype=torch.float32)
        return pack_latents(x[:, 0]).to(device)

    def schedule(self, model, steps: int, height: int, width: int, device) -> Schedule:
        """QwenImagePipeline's schedule: sigmas linspace(1, 1/T, T), mu from the packed token count."""
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps: expected a positive int, got {steps!r}")
        h2, w2 = self.token_grid(model, height, width)
        mu = flow.shift_mu(model.scheduler, h2 * w2, default_max_shift=1.15)
        return self.flow_schedule(model, None, height, width, device, mu=mu,
                                  sigmas=np.linspace(1.0, 1 / steps, steps))

    def _call(self, denoiser, x, emb, timestep, img_shapes, dtype):
        mask = emb.mask
        if mask is not None and bool(mask.all()):
            mask = None   # as encode_prompt: an all-ones mask is dropped
        return denoiser(hidden_states=x.to(dtype), timestep=timestep / 1000, guidance=None,
                        encoder_hidden_states_mask=mask, encoder_hidden_states=emb.hidden.to(dtype),
                        img_shapes=img_shapes, return_dict=False)[0]

    def predict(self, model, denoiser, x: torch.Tensor, t, cond, uncond, guidance_scale: float,
                schedule: Schedule | None = None):
        """The transformer on the prompt (and, with true CFG, on the negative: a second call), ``timestep / 1000``,
        ``img_shapes``; the guided velocity ``neg + g * (cond - neg)`` rescaled per token to the conditional
        prediction's norm, in float32 (float64 for a float64 transformer)."""
        dtype, n = model.denoiser.dtype, x.shape[0]
        for name, emb in (("cond", cond), ("uncond", uncond)):
            if emb is not None and emb.hidden.shape[0] != n:
                raise ValueError(f"{name}: expected {n} rows (x's batch), got {emb.hidden.shape[0]}")
        h2, w2 = self.packed_grid(model, x, schedule)
        img_shapes = [[(1, h2, w2)]] * n
        t = torch.as_tensor(t, device=x.device)
        timestep = (t.expand(n) if t.dim() == 0 else t.repeat(n // t.shape[0])).to(dtype)
        wide = torch.promote_types(dtype, torch.float32)
        out = self._call(denoiser, x, cond, timestep, img_shapes, dtype).to(wide)
        if not self.uses_cfg(model, uncond, guidance_scale):
            return out
        neg = self._call(denoiser, x, uncond, timestep, img_shapes, dtype).to(wide)
        comb = neg + guidance_scale * (out - neg)
        return comb * (torch.norm(out, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))

    def decode(self, model, latents: torch.Tensor, schedule: Schedule | None = None) -> torch.Tensor:
        """Unpack to one frame, ``z / (1 / latents_std) + latents_mean``, post-quant conv and decoder (no frame
        cache: one frame never reads it), clamp to [-1, 1], frame axis squeezed, ``x / 2 + 0.5``: float32 in
        [0, 1]."""
        vae = model.vae
        if getattr(vae, "use_tiling", False):
            raise ValueError("memory.vae_tile: the Qwen-Image VAE (AutoencoderKLQwenImage) has no 2D tiled decode "
                             "in fnf; set memory.vae_tile to 0")
        h2, w2 = self.packed_grid(model, latents, schedule)
        z = unpack_latents(latents, 2 * h2, 2 * w2).unsqueeze(2).to(vae.dtype)
        channels = vae.config.z_dim
        mean = torch.tensor(vae.config.latents_mean).view(1, channels, 1, 1, 1).to(z.device, z.dtype)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, channels, 1, 1, 1).to(z.device, z.dtype)
        z = z / inv_std + mean
        x = vae.decoder(vae.post_quant_conv(z)).clamp(-1.0, 1.0)[:, :, 0]
        return (x.to(torch.promote_types(x.dtype, torch.float32)) / 2 + 0.5).clamp(0, 1)


QWEN_IMAGE = QwenImageFamily()
FAMILIES = [QWEN_IMAGE]
