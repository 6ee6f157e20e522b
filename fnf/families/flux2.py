"""FLUX.2 (``flux2``): Flux2Pipeline folders (FLUX.2-dev), flow-matching Euler on patchified, packed latents.

Everything follows diffusers' ``Flux2Pipeline`` text-to-image path:

* prompts: the pipeline's system message and chat template (``tokenizer.apply_chat_template``, padded to
  ``max_sequence_length`` = 512), the Mistral3 text encoder's hidden states 10, 20 and 30 stacked along the
  feature axis (``_get_mistral_3_small_prompt_embeds``); text ids (0, 0, 0, l);
* latents: N(0, I) of (B, 4*C, h/2, w/2) (already 2x2-patchified), packed to (B, h/2*w/2, 4*C), image ids
  (0, row, column, 0);
* schedule: sigmas ``linspace(1, 1/T, T)`` and the empirical ``mu`` of ``compute_empirical_mu`` (image token
  count and step count); the transformer gets ``timestep / 1000`` and the guidance scale as an embedding
  (FLUX.2-dev is guidance-distilled; the pipeline has no classifier-free guidance and no negative prompt);
* decode: unpack, undo the VAE's batch-norm latent statistics (``z * sqrt(running_var + eps) + running_mean``),
  un-patchify, VAE decode, ``x / 2 + 0.5`` clamped.

Not supported (the pipeline's other inputs): reference / edit images (``image=``) and caption upsampling.
The FLUX.2 [klein] pipelines (Qwen3 text encoder, true CFG) are the ``flux2-klein`` family (``flux2_klein.py``).
"""
from __future__ import annotations

import numpy as np
import torch

from ..core import DiffusionModel, ModelLoadError, PromptEmbeds
from .base import (FlowMatchingEuler, FolderComponents, ModelFamily, PackedLatents, Schedule, TransformerLoRA,
                   cfg_combine, decode_vae, freeze, resolve_dtype, set_vae_precision)

MAX_SEQUENCE_LENGTH = 512                 # Flux2Pipeline's default max_sequence_length
TEXT_ENCODER_OUT_LAYERS = (10, 20, 30)    # Flux2Pipeline's default text_encoder_out_layers


def empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """The shift exponent of Flux2Pipeline (``compute_empirical_mu``, from BFL's flux2 sampling code): linear in
    the image token count, interpolated between the fits for 10 and 200 steps below 4300 tokens."""
    a1, b1 = 8.73809524e-05, 1.89833333
    a2, b2 = 0.00016927, 0.45666666
    if image_seq_len > 4300:
        return float(a2 * image_seq_len + b2)
    m_200 = a2 * image_seq_len + b2
    m_10 = a1 * image_seq_len + b1
    a = (m_200 - m_10) / 190.0
    b = m_200 - 200.0 * a
    return float(a * num_steps + b)


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h*w, C): Flux2Pipeline._pack_latents (on already patchified latents)."""
    b, c, h, w = latents.shape
    return latents.reshape(b, c, h * w).permute(0, 2, 1)


def unpack_latents(latents: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, h*w, C) -> (B, C, h, w): Flux2Pipeline._unpack_latents_with_ids for the ids of :func:`latent_ids`."""
    b, n, c = latents.shape
    if n != h * w:
        raise ValueError(f"latents: expected {h * w} packed tokens for a {h}x{w} patch grid, got {n}")
    return latents.permute(0, 2, 1).reshape(b, c, h, w)


def patchify(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 4*C, H/2, W/2): Flux2Pipeline._patchify_latents."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(b, c * 4, h // 2, w // 2)


def unpatchify(latents: torch.Tensor) -> torch.Tensor:
    """(B, 4*C, h, w) -> (B, C, 2h, 2w): Flux2Pipeline._unpatchify_latents."""
    b, c4, h, w = latents.shape
    x = latents.reshape(b, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(b, c4 // 4, h * 2, w * 2)


def latent_ids(h: int, w: int, device) -> torch.Tensor:
    """(h*w, 4) int64 position ids (t=0, row, column, l=0) of the packed tokens: Flux2Pipeline._prepare_latent_ids."""
    return torch.cartesian_prod(torch.arange(1), torch.arange(h), torch.arange(w), torch.arange(1)).to(device)


def text_ids(length: int, device) -> torch.Tensor:
    """(L, 4) int64 position ids (0, 0, 0, l) of the text tokens: Flux2Pipeline._prepare_text_ids."""
    return torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(length)).to(device)


FLUX2_DEV_TOKENIZER = "FLUX.2-dev: ['transformers', 'PixtralProcessor']"


def _tokenizer_class(index: dict, path: str, example: str = FLUX2_DEV_TOKENIZER):
    """The transformers class model_index.json names for the tokenizer (FLUX.2-dev: PixtralProcessor), as
    ``Flux2Pipeline.from_pretrained`` loads it; ``example``: the released folder's entry, for the error."""
    import transformers

    entry = index.get("tokenizer") or [None, None]
    library, name = (list(entry) + [None, None])[:2]
    try:   # transformers' placeholder for a class whose backend is missing raises ImportError on any attribute
        cls = getattr(transformers, str(name), None) if library == "transformers" else None
        usable = cls is not None and hasattr(cls, "from_pretrained")
    except ImportError as e:
        hint = " (pip install torchvision)" if "orchvision" in str(e) else ""
        raise ModelLoadError(f"{path!r}: the tokenizer class {name!r} cannot be built here{hint}: "
                             f"{str(e).strip()}") from None
    if not usable:
        raise ModelLoadError(f"{path!r}: model_index.json's tokenizer entry {entry!r} is not a transformers "
                             f"tokenizer or processor class ({example})")
    return cls


def _require_flux2() -> None:
    """A clear error where the installed diffusers / transformers predate FLUX.2."""
    import diffusers

    try:
        from diffusers import AutoencoderKLFlux2, Flux2Pipeline, Flux2Transformer2DModel  # noqa: F401
        from transformers import Mistral3ForConditionalGeneration  # noqa: F401
    except ImportError as e:
        raise ModelLoadError(f"FLUX.2 folders need a diffusers with Flux2Pipeline (diffusers {diffusers.__version__} "
                             f"has none; upgrade diffusers) and a transformers with Mistral3: {e}") from None


class Flux2Family(PackedLatents, FlowMatchingEuler, TransformerLoRA, ModelFamily):
    """FLUX.2: Flux2Transformer2DModel, a Mistral3 text encoder (stacked hidden states), AutoencoderKLFlux2 with
    batch-norm latent statistics, flow-matching Euler with the empirical mu."""

    name = "flux2"
    title = "FLUX.2"
    pipeline_classes = ("Flux2Pipeline",)
    components = ("transformer", "vae", "scheduler", "text_encoder", "tokenizer")
    # diffusers' FLUX.2 LoRA script's default: the double blocks' image-stream attention projections
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0")
    # optional: the double blocks' text stream, the single blocks' fused QKV + MLP-in projection, the double blocks'
    # feed-forwards (image and text streams)
    lora_targets_text = ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
    lora_targets_single = ("to_qkv_mlp_proj",)
    lora_targets_ff = ("linear_in", "linear_out")
    supports_sepen = False
    native_size = 1024
    fsdp_units = ("Flux2TransformerBlock", "Flux2SingleTransformerBlock")

    # -------------------------------------------------------------------------------- loading
    def load(self, path: str, index: dict, *, weight_dtype: torch.dtype, device="cpu",
             max_sequence_length: int = MAX_SEQUENCE_LENGTH, quantize: str = "none"):
        """All components frozen, eval, on ``device``. ``max_sequence_length``: the prompt tokens (Flux2Pipeline's
        argument); ``quantize``: the transformer's quantization (:mod:`fnf.quantize`, ``model.quantize``)."""
        _require_flux2()
        src = FolderComponents(path, index, "FLUX.2 pipeline", ", ".join(self.components))
        self._check_max_sequence_length(max_sequence_length)
        self._check_scheduler(src)
        return self.build(src, weight_dtype=weight_dtype, device=device, max_sequence_length=max_sequence_length,
                          quantize=quantize, tokenizer_class=_tokenizer_class(index, path))

    def _check_max_sequence_length(self, max_sequence_length) -> None:
        if isinstance(max_sequence_length, bool) or not isinstance(max_sequence_length, int) \
                or max_sequence_length < 1:
            raise ValueError(f"max_sequence_length: expected a positive int (Flux2Pipeline's default is "
                             f"{MAX_SEQUENCE_LENGTH}), got {max_sequence_length!r}")

    def _check_scheduler(self, src) -> None:
        sched_entry = src.index.get("scheduler") or [None, None]
        if sched_entry[-1] not in (None, "FlowMatchEulerDiscreteScheduler"):
            raise ModelLoadError(f"{src.path!r}: the {self.title} family samples with FlowMatchEulerDiscreteScheduler, "
                                 f"but model_index.json names {sched_entry[-1]!r}")

    def build(self, src, *, weight_dtype, device="cpu", fp16_autocast: bool = False,
              max_sequence_length: int = MAX_SEQUENCE_LENGTH, quantize: str = "none", tokenizer_class=None):
        """``tokenizer_class``: the class model_index.json names for the tokenizer (a config-only build may pass
        None: its components source picks one)."""
        _require_flux2()
        from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel
        from transformers import Mistral3ForConditionalGeneration

        self._check_max_sequence_length(max_sequence_length)
        self._check_scheduler(src)
        dtype = resolve_dtype(weight_dtype)
        transformer = src.denoiser("transformer", Flux2Transformer2DModel, dtype=dtype, quantize=quantize)
        vae = src.module("vae", AutoencoderKLFlux2, dtype=dtype)
        scheduler = src.scheduler("scheduler", FlowMatchEulerDiscreteScheduler)
        encoder = src.module("text_encoder", Mistral3ForConditionalGeneration, dtype=dtype)
        tokenizer = src.tokenizer("tokenizer", tokenizer_class, encoder=encoder, chat=True)
        if not hasattr(tokenizer, "apply_chat_template"):
            raise ModelLoadError(f"{src.path!r}: the tokenizer ({type(tokenizer).__name__}) has no "
                                 "apply_chat_template, which Flux2Pipeline encodes prompts with")
        num_layers = encoder.config.get_text_config().num_hidden_layers
        if max(TEXT_ENCODER_OUT_LAYERS) > num_layers:
            raise ModelLoadError(f"{src.path!r}: Flux2Pipeline stacks the text encoder's hidden states "
                                 f"{list(TEXT_ENCODER_OUT_LAYERS)}, but it has {num_layers} layers")
        freeze([transformer, vae, encoder], device)
        settings = {"guidance_embeds": bool(transformer.config.get("guidance_embeds", False)),
                    "max_sequence_length": max_sequence_length, "text_encoder_out_layers": TEXT_ENCODER_OUT_LAYERS}
        model = DiffusionModel(path=src.path, family=self, denoiser=transformer, vae=vae, scheduler=scheduler,
                               text_encoders=[encoder], tokenizers=[tokenizer], force_zeros_for_empty_prompt=False,
                               settings=settings)
        set_vae_precision(model, dtype, fp16_autocast)
        return model

    def pipeline_class(self):
        from diffusers import Flux2Pipeline

        return Flux2Pipeline

    # -------------------------------------------------------------------------------- conditioning
    def encode(self, model, prompts: list[str], *, height: int, width: int, zero: bool = False):
        """Flux2Pipeline.encode_prompt: system message + prompt through the chat template (padded and truncated to
        ``max_sequence_length``), hidden states 10, 20, 30 of the text encoder stacked into (B, L, 3 * hidden)
        (``zero``: all zeros; Flux2Pipeline never uses it)."""
        from diffusers.pipelines.flux2.pipeline_flux2 import format_input
        from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE

        if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)) or \
                not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"prompts: expected a list of str, got {prompts!r}")
        encoder, tokenizer = model.text_encoders[0], model.tokenizers[0]
        layers = tuple(model.settings.get("text_encoder_out_layers", TEXT_ENCODER_OUT_LAYERS))
        inputs = tokenizer.apply_chat_template(
            format_input(prompts=list(prompts), system_message=SYSTEM_MESSAGE), add_generation_prompt=False,
            tokenize=True, return_dict=True, return_tensors="pt", padding="max_length", truncation=True,
            max_length=int(model.settings.get("max_sequence_length", MAX_SEQUENCE_LENGTH)))
        with torch.no_grad():
            out = encoder(input_ids=inputs["input_ids"].to(encoder.device),
                          attention_mask=inputs["attention_mask"].to(encoder.device), output_hidden_states=True,
                          use_cache=False)
        stacked = torch.stack([out.hidden_states[k] for k in layers], dim=1)
        b, n, length, hidden = stacked.shape
        embeds = stacked.permute(0, 2, 1, 3).reshape(b, length, n * hidden)
        embeds = embeds.to(device=model.denoiser.device, dtype=encoder.dtype)
        return PromptEmbeds(torch.zeros_like(embeds) if zero else embeds)

    def uses_cfg(self, model, uncond, guidance_scale: float) -> bool:
        """Never: Flux2Pipeline has no classifier-free guidance (FLUX.2-dev takes the scale as an embedding)."""
        return False

    # -------------------------------------------------------------------------------- sampling
    def initial_latents(self, model, batch: int, height: int, width: int, generator: torch.Generator,
                        device) -> torch.Tensor:
        """Flux2Pipeline.prepare_latents with a CPU generator: N(0, I) of (B, in_channels, h/2, w/2), packed."""
        h2, w2 = self.token_grid(model, height, width)
        channels = (model.denoiser.config.in_channels // 4) * 4
        x = torch.randn((batch, channels, h2, w2), generator=generator, dtype=torch.float32)
        return pack_latents(x).to(device)

    def schedule(self, model, steps: int, height: int, width: int, device) -> Schedule:
        """Flux2Pipeline's schedule: sigmas linspace(1, 1/T, T) (none with use_flow_sigmas), mu from
        :func:`empirical_mu` of the packed token count and T."""
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps: expected a positive int, got {steps!r}")
        h2, w2 = self.token_grid(model, height, width)
        sigmas = None if model.scheduler.config.get("use_flow_sigmas", False) else np.linspace(1.0, 1 / steps, steps)
        return self.flow_schedule(model, None if sigmas is not None else steps, height, width, device,
                                  mu=empirical_mu(h2 * w2, steps), sigmas=sigmas)

    def predict(self, model, denoiser, x: torch.Tensor, t, cond, uncond, guidance_scale: float,
                schedule: Schedule | None = None):
        """One transformer call (``timestep / 1000``, the guidance scale as embedding, text and image ids) and the
        velocity in float32 (float64 for a float64 transformer). ``uncond`` is unused (no CFG in FLUX.2)."""
        dtype, n = model.denoiser.dtype, x.shape[0]
        if cond.hidden.shape[0] != n:
            raise ValueError(f"cond: expected {n} rows (x's batch), got {cond.hidden.shape[0]}")
        h2, w2 = self.packed_grid(model, x, schedule)
        t = torch.as_tensor(t, device=x.device)
        timestep = (t.expand(n) if t.dim() == 0 else t.repeat(n // t.shape[0])).to(dtype)
        guidance = torch.full([1], guidance_scale, device=x.device, dtype=torch.float32).expand(n)
        out = denoiser(hidden_states=x.to(dtype), timestep=timestep / 1000, guidance=guidance,
                       encoder_hidden_states=cond.hidden.to(dtype), txt_ids=text_ids(cond.hidden.shape[1], x.device),
                       img_ids=latent_ids(h2, w2, x.device), return_dict=False)[0]
        return cfg_combine(out[:, : x.shape[1]], False, guidance_scale)

    def decode(self, model, latents: torch.Tensor, schedule: Schedule | None = None) -> torch.Tensor:
        """Unpack, ``z * bn_std + bn_mean`` (the VAE's batch-norm statistics), un-patchify, VAE decode,
        ``x / 2 + 0.5`` clamped: float32 in [0, 1]."""
        vae = model.vae
        z = unpack_latents(latents, *self.packed_grid(model, latents, schedule))
        z = z.float() if model.vae_upcast else z
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(z.device, z.dtype)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(z.device, z.dtype)
        return decode_vae(model, unpatchify(z * std + mean))


FLUX2 = Flux2Family()
FAMILIES = [FLUX2]
