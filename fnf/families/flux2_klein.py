"""FLUX.2 [klein] (``flux2-klein``): Flux2KleinPipeline folders (FLUX.2-klein 4B / 9B and their Base models).

The transformer, latents, schedule and VAE are FLUX.2's (:class:`fnf.families.flux2.Flux2Family`: packed 2x2
patches, sigmas ``linspace(1, 1/T, T)`` with the empirical ``mu``, ``timestep / 1000``, the VAE's batch-norm latent
statistics); what differs follows diffusers' ``Flux2KleinPipeline`` text-to-image path:

* prompts: each prompt alone as a user message through the tokenizer's chat template (``add_generation_prompt``,
  ``enable_thinking=False``), tokenized padded and truncated to ``max_sequence_length`` = 512 with its attention
  mask; the Qwen3 text encoder's hidden states 9, 18 and 27 stacked along the feature axis
  (``_get_qwen3_prompt_embeds``); text ids (0, 0, 0, l);
* guidance: no guidance embedding (the transformer gets ``guidance=None``); true classifier-free guidance with the
  negative prompt's embeddings (the pipeline's is "") when the scale is > 1 and the folder is not step-distilled
  (model_index.json ``is_distilled``: FLUX.2-klein-4B / -9B are, their Base models are not); the pipeline runs
  the conditional and unconditional passes one after the other, we batch them ``[uncond, cond]``.

Refused: the KV-cache and inpainting variants (other pipeline classes, :data:`REFUSED`), reference / edit images.
"""
from __future__ import annotations

import torch

from ..core import DiffusionModel, ModelLoadError, PromptEmbeds
from .base import FolderComponents, Schedule, cfg_combine, cfg_inputs, freeze, resolve_dtype, set_vae_precision
from .flux2 import Flux2Family, _tokenizer_class, latent_ids, text_ids

MAX_SEQUENCE_LENGTH = 512                 # Flux2KleinPipeline's default max_sequence_length
TEXT_ENCODER_OUT_LAYERS = (9, 18, 27)     # Flux2KleinPipeline's default text_encoder_out_layers
KLEIN_TOKENIZER = "FLUX.2-klein-4B: ['transformers', 'Qwen2TokenizerFast']"
# pipeline classes of the klein family that fnf refuses, and why (the registry names them in one line)
REFUSED = {
    "Flux2KleinKVPipeline": "FLUX.2 [klein] KV caches reference-image keys/values for editing; fnf trains "
                            "text-to-image Flux2KleinPipeline folders (FLUX.2-klein-4B / -9B or their Base models)",
    "Flux2KleinInpaintPipeline": "inpainting (image + mask inputs) is not a text-to-image pipeline; point fnf at "
                                 "the Flux2KleinPipeline folder of the same model",
}


def _require_klein() -> None:
    """A clear error where the installed diffusers / transformers predate FLUX.2 [klein]."""
    import diffusers

    try:
        from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline, Flux2Transformer2DModel  # noqa: F401
        from transformers import Qwen3ForCausalLM  # noqa: F401
    except ImportError as e:
        raise ModelLoadError(f"FLUX.2 [klein] folders need a diffusers with Flux2KleinPipeline (diffusers "
                             f"{diffusers.__version__} has none; upgrade diffusers) and a transformers with Qwen3: "
                             f"{e}") from None


class Flux2KleinFamily(Flux2Family):
    """FLUX.2 [klein]: Flux2Transformer2DModel without a guidance embedding, a Qwen3 text encoder (stacked hidden
    states 9/18/27), AutoencoderKLFlux2, true CFG unless step-distilled."""

    name = "flux2-klein"
    title = "FLUX.2 [klein]"
    pipeline_classes = ("Flux2KleinPipeline",)
    refused_pipelines = REFUSED

    # -------------------------------------------------------------------------------- loading
    def load(self, path: str, index: dict, *, weight_dtype: torch.dtype, device="cpu",
             max_sequence_length: int = MAX_SEQUENCE_LENGTH, quantize: str = "none"):
        """All components frozen, eval, on ``device``. ``max_sequence_length``: the prompt tokens
        (Flux2KleinPipeline's argument); ``quantize``: the transformer's quantization (``model.quantize``)."""
        _require_klein()
        src = FolderComponents(path, index, "Flux2KleinPipeline", ", ".join(self.components))
        self._check_max_sequence_length(max_sequence_length)
        self._check_scheduler(src)
        return self.build(src, weight_dtype=weight_dtype, device=device, max_sequence_length=max_sequence_length,
                          quantize=quantize, tokenizer_class=_tokenizer_class(index, path, KLEIN_TOKENIZER))

    def build(self, src, *, weight_dtype, device="cpu", fp16_autocast: bool = False,
              max_sequence_length: int = MAX_SEQUENCE_LENGTH, quantize: str = "none", tokenizer_class=None):
        """``tokenizer_class``: the class model_index.json names (None: Qwen2TokenizerFast). ``is_distilled`` is
        model_index.json's flag (the pipeline's config; absent: False, as the pipeline defaults it)."""
        _require_klein()
        from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel
        from transformers import Qwen2TokenizerFast, Qwen3ForCausalLM

        self._check_max_sequence_length(max_sequence_length)
        self._check_scheduler(src)
        dtype = resolve_dtype(weight_dtype)
        transformer = src.denoiser("transformer", Flux2Transformer2DModel, dtype=dtype, quantize=quantize)
        if transformer.config.get("guidance_embeds", False):
            raise ModelLoadError(f"{src.path!r}: the transformer has a guidance embedding (guidance_embeds: true, "
                                 "a FLUX.2-dev transformer?); Flux2KleinPipeline passes no guidance")
        vae = src.module("vae", AutoencoderKLFlux2, dtype=dtype)
        scheduler = src.scheduler("scheduler", FlowMatchEulerDiscreteScheduler)
        encoder = src.module("text_encoder", Qwen3ForCausalLM, dtype=dtype)
        tokenizer = src.tokenizer("tokenizer", tokenizer_class or Qwen2TokenizerFast, encoder=encoder, chat=True)
        if not hasattr(tokenizer, "apply_chat_template"):
            raise ModelLoadError(f"{src.path!r}: the tokenizer ({type(tokenizer).__name__}) has no "
                                 "apply_chat_template, which Flux2KleinPipeline encodes prompts with")
        num_layers = encoder.config.num_hidden_layers
        if max(TEXT_ENCODER_OUT_LAYERS) > num_layers:
            raise ModelLoadError(f"{src.path!r}: Flux2KleinPipeline stacks the text encoder's hidden states "
                                 f"{list(TEXT_ENCODER_OUT_LAYERS)}, but it has {num_layers} layers")
        distilled = src.index.get("is_distilled", False)
        if not isinstance(distilled, bool):
            raise ModelLoadError(f"{src.path!r}: model_index.json's is_distilled must be true or false, got "
                                 f"{distilled!r}")
        freeze([transformer, vae, encoder], device)
        settings = {"guidance_embeds": False, "is_distilled": distilled, "max_sequence_length": max_sequence_length,
                    "text_encoder_out_layers": TEXT_ENCODER_OUT_LAYERS}
        model = DiffusionModel(path=src.path, family=self, denoiser=transformer, vae=vae, scheduler=scheduler,
                               text_encoders=[encoder], tokenizers=[tokenizer], force_zeros_for_empty_prompt=False,
                               settings=settings)
        set_vae_precision(model, dtype, fp16_autocast)
        return model

    def pipeline_class(self):
        from diffusers import Flux2KleinPipeline

        return Flux2KleinPipeline

    # -------------------------------------------------------------------------------- conditioning
    def encode(self, model, prompts: list[str], *, height: int, width: int, zero: bool = False):
        """Flux2KleinPipeline._get_qwen3_prompt_embeds: each prompt as one user message through the chat template
        (generation prompt, thinking off), tokenized to ``max_sequence_length`` (padded, truncated, with its
        mask), hidden states 9, 18, 27 stacked into (B, L, 3 * hidden) (``zero``: all zeros; the pipeline never
        uses it)."""
        if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)) or not prompts or \
                not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"prompts: expected a non-empty list of str, got {prompts!r}")
        encoder, tokenizer = model.text_encoders[0], model.tokenizers[0]
        layers = tuple(model.settings.get("text_encoder_out_layers", TEXT_ENCODER_OUT_LAYERS))
        length = int(model.settings.get("max_sequence_length", MAX_SEQUENCE_LENGTH))
        ids, masks = [], []
        for prompt in prompts:
            text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                 add_generation_prompt=True, enable_thinking=False)
            inputs = tokenizer(text, return_tensors="pt", padding="max_length", truncation=True, max_length=length)
            ids.append(inputs["input_ids"])
            masks.append(inputs["attention_mask"])
        with torch.no_grad():
            out = encoder(input_ids=torch.cat(ids).to(encoder.device), attention_mask=torch.cat(masks).to(
                encoder.device), output_hidden_states=True, use_cache=False)
        stacked = torch.stack([out.hidden_states[k] for k in layers], dim=1)
        b, n, seq, hidden = stacked.shape
        embeds = stacked.permute(0, 2, 1, 3).reshape(b, seq, n * hidden)
        embeds = embeds.to(device=model.denoiser.device, dtype=encoder.dtype)
        return PromptEmbeds(torch.zeros_like(embeds) if zero else embeds)

    def uses_cfg(self, model, uncond, guidance_scale: float) -> bool:
        """Flux2KleinPipeline.do_classifier_free_guidance: a scale > 1 on a model that is not step-distilled
        (and a negative conditioning to guide from)."""
        return uncond is not None and guidance_scale > 1.0 and not model.settings.get("is_distilled", False)

    # -------------------------------------------------------------------------------- sampling
    def predict(self, model, denoiser, x: torch.Tensor, t, cond, uncond, guidance_scale: float,
                schedule: Schedule | None = None):
        """One transformer call (``timestep / 1000``, no guidance embedding, text and image ids) on ``x`` or, with
        CFG, on ``[x, x]`` with ``[uncond, cond]``; ``uncond + scale * (cond - uncond)`` in float32 (float64 for a
        float64 transformer)."""
        dtype, n = model.denoiser.dtype, x.shape[0]
        for name, emb in (("cond", cond), ("uncond", uncond)):
            if emb is not None and emb.hidden.shape[0] != n:
                raise ValueError(f"{name}: expected {n} rows (x's batch), got {emb.hidden.shape[0]}")
        h2, w2 = self.packed_grid(model, x, schedule)
        cfg, emb, x_in = cfg_inputs(self, model, x, cond, uncond, guidance_scale)
        rows = x_in.shape[0]
        t = torch.as_tensor(t, device=x.device)
        timestep = (t.expand(rows) if t.dim() == 0 else t.repeat(rows // t.shape[0])).to(dtype)
        out = denoiser(hidden_states=x_in.to(dtype), timestep=timestep / 1000, guidance=None,
                       encoder_hidden_states=emb.hidden.to(dtype), txt_ids=text_ids(emb.hidden.shape[1], x.device),
                       img_ids=latent_ids(h2, w2, x.device), return_dict=False)[0]
        return cfg_combine(out[:, : x.shape[1]], cfg, guidance_scale)


FLUX2_KLEIN = Flux2KleinFamily()
FAMILIES = [FLUX2_KLEIN]
