"""The UNet families: Stable Diffusion 1.x/2.x (``sd``) and SDXL (``sdxl``), sampled with DDIM.

Everything here follows the diffusers pipelines (``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline``):
the same text conditioning, CFG formula, ``DDIMScheduler.step`` and VAE decode, so a LoRA trained by fnf gives
the pipeline's images with ``pipe.load_lora_weights``.
"""
from __future__ import annotations

import contextlib

import torch

from .. import quantize as quant
from ..core import LORA_WEIGHTS, DiffusionModel, PromptEmbeds
from ..lora import export_state
from .base import ModelFamily, check_lora_folder, load_component, set_vae_precision


def _load(component: str, path: str, loader, needs: tuple[str, ...]):
    return load_component(component, path, loader, "Stable Diffusion pipeline", ", ".join(needs))


def _tokenize(tokenizer, prompts: list[str], device) -> torch.Tensor:
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return ids.to(device)


class StableDiffusionFamily(ModelFamily):
    """SD 1.x/2.x: one CLIP text encoder (last hidden state), a UNet2DConditionModel, DDIM."""

    name = "sd"
    title = "Stable Diffusion"
    pipeline_classes = ("StableDiffusionPipeline",)
    components = ("unet", "vae", "scheduler", "text_encoder", "tokenizer")
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0")
    supports_sepen = True
    native_size = 512

    # -------------------------------------------------------------------------------- loading
    def _text_encoders(self, path: str, dtype, kw) -> tuple[list, list]:
        from transformers import CLIPTextModel, CLIPTokenizer

        need = self.components
        encoders = [_load("text_encoder", path,
                          lambda f: CLIPTextModel.from_pretrained(f, torch_dtype=dtype, **kw), need)]
        tokenizers = [_load("tokenizer", path, lambda f: CLIPTokenizer.from_pretrained(f, **kw), need)]
        return encoders, tokenizers

    def load(self, path: str, index: dict, *, weight_dtype: torch.dtype, device="cpu", quantize: str = "none"):
        """All components frozen, eval, on ``device``; ``quantize``: the UNet's quantization (:mod:`fnf.quantize`,
        ``model.quantize``: its Linear layers; convolutions stay in the weight dtype)."""
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

        dtype, kw, need = weight_dtype, {"local_files_only": True}, self.components
        unet = _load("unet", path, lambda f: quant.load_denoiser(UNet2DConditionModel, f, dtype=dtype,
                                                                 method=quantize, **kw), need)
        # fp16: read the VAE in float32 (set_vae_precision casts it down unless its config sets force_upcast).
        vae_read = torch.float32 if dtype == torch.float16 else dtype
        vae = _load("vae", path, lambda f: AutoencoderKL.from_pretrained(f, torch_dtype=vae_read, **kw), need)
        scheduler = _load("scheduler", path,
                          lambda f: DDIMScheduler.from_config(DDIMScheduler.load_config(f, **kw)), need)
        encoders, tokenizers = self._text_encoders(path, dtype, kw)
        for module in [unet, vae, *encoders]:
            module.requires_grad_(False)
            module.eval()
            quant.move(module, device)
        zeros = bool(index.get("force_zeros_for_empty_prompt", self.name == "sdxl"))
        model = DiffusionModel(path=path, family=self, denoiser=unet, vae=vae, scheduler=scheduler,
                               text_encoders=encoders, tokenizers=tokenizers, force_zeros_for_empty_prompt=zeros)
        set_vae_precision(model, dtype)
        return model

    def pipeline_class(self):
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline

    # -------------------------------------------------------------------------------- conditioning
    def encode(self, model, prompts: list[str], *, height: int, width: int, zero: bool = False):
        """The last hidden state of the CLIP text encoder (``zero`` is an SDXL option; ignored here)."""

        enc = model.text_encoders[0]
        hidden = enc(_tokenize(model.tokenizers[0], prompts, enc.device))[0]
        return PromptEmbeds(hidden.to(model.denoiser.device))

    # -------------------------------------------------------------------------------- sampling
    def initial_latents(self, model, batch: int, height: int, width: int, generator: torch.Generator,
                        device) -> torch.Tensor:
        """x_T ~ N(0, I) * init_noise_sigma, drawn on CPU from ``generator`` (device independent)."""
        f = model.vae_scale_factor
        shape = (batch, model.denoiser.config.in_channels, height // f, width // f)
        x = torch.randn(shape, generator=generator, dtype=torch.float32)
        return (x * model.scheduler.init_noise_sigma).to(device)

    def schedule(self, model, steps: int, height: int, width: int, device) -> torch.Tensor:
        model.scheduler.set_timesteps(steps, device=device)
        return model.scheduler.timesteps

    def _added_cond(self, emb, dtype) -> dict:
        """SDXL's pooled text embeds and time ids (absent for SD 1.x/2.x conditioning)."""
        if emb.pooled is None:
            return {}
        return {"added_cond_kwargs": {"text_embeds": emb.pooled.to(dtype), "time_ids": emb.time_ids.to(dtype)}}

    def predict(self, model, denoiser, x: torch.Tensor, i: int, t, cond, uncond, guidance_scale: float):
        """One UNet call and the guided noise prediction, in float32 (float64 for a float64 UNet); with CFG the
        UNet batch is ``[uncond rows of x, cond rows of x]``. ``t`` may be one timestep or one per row."""

        cfg = self.uses_cfg(model, uncond, guidance_scale)
        emb = PromptEmbeds.cat(uncond, cond) if cfg else cond
        x_in = torch.cat([x, x]) if cfg else x
        x_in = model.scheduler.scale_model_input(x_in, t)
        dtype = model.denoiser.dtype
        out = denoiser(x_in.to(dtype), t, encoder_hidden_states=emb.hidden.to(dtype), return_dict=False,
                       **self._added_cond(emb, dtype))[0]
        out = out.to(torch.promote_types(out.dtype, torch.float32))  # half -> float32; float64 stays float64
        if cfg:
            out_uncond, out_cond = out.chunk(2)
            out = out_uncond + guidance_scale * (out_cond - out_uncond)
        return out

    def step(self, model, out: torch.Tensor, i: int, t, x: torch.Tensor, *, eta: float = 0.0,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """``DDIMScheduler.step`` (stateless: it reads only the configured timesteps)."""
        return model.scheduler.step(out, t, x, eta=eta, generator=generator, return_dict=False)[0]

    def renoise(self, model, x0: torch.Tensor, noise: torch.Tensor, i: int, t) -> torch.Tensor:
        return model.scheduler.add_noise(x0, noise, torch.as_tensor(t).reshape(1))

    def decode(self, model, latents: torch.Tensor) -> torch.Tensor:
        """VAE decode to float32 images in [0, 1]. With ``model.vae_upcast`` (force_upcast with fp16 in play) the
        float32 VAE runs with autocast off: an fp16 decode of SD/SDXL VAEs overflows to NaN images."""
        vae = model.vae
        z = (latents.float() if model.vae_upcast else latents) / vae.config.scaling_factor
        shift = getattr(vae.config, "shift_factor", None)
        if shift:
            z = z + shift
        with torch.autocast(z.device.type, enabled=False) if model.vae_upcast else contextlib.nullcontext():
            x = vae.decode(z.to(vae.dtype), return_dict=False)[0]
        return (x.to(torch.promote_types(x.dtype, torch.float32)) / 2 + 0.5).clamp(0, 1)

    # -------------------------------------------------------------------------------- LoRA
    def save_lora(self, model, directory: str) -> None:
        """``save_lora_weights(unet_lora_layers=...)`` of the pipeline class, with peft's adapter metadata."""
        from diffusers.utils import convert_state_dict_to_diffusers

        state, metadata = export_state(model.denoiser)
        state = convert_state_dict_to_diffusers(state)
        self.pipeline_class().save_lora_weights(directory, unet_lora_layers=state, safe_serialization=True,
                                                weight_name=LORA_WEIGHTS, unet_lora_adapter_metadata=metadata)

    def load_lora(self, model, directory: str, adapter_name: str) -> None:
        """The loader ``pipe.load_lora_weights`` uses (``lora_state_dict`` + ``load_lora_into_unet``)."""

        check_lora_folder(directory)
        cls = self.pipeline_class()
        # weight_name explicitly: diffusers < 0.40 refuses a folder without it when HF_HUB_OFFLINE is set.
        state, alphas, metadata = cls.lora_state_dict(directory, weight_name=LORA_WEIGHTS, return_lora_metadata=True)
        cls.load_lora_into_unet(state, network_alphas=alphas, unet=model.denoiser, adapter_name=adapter_name,
                                metadata=metadata)


class StableDiffusionXLFamily(StableDiffusionFamily):
    """SDXL: two CLIP text encoders (penultimate hidden states concatenated, pooled output of the second),
    micro-conditioning time ids, all-zero negative conditioning for an empty negative prompt."""

    name = "sdxl"
    title = "SDXL"
    pipeline_classes = ("StableDiffusionXLPipeline",)
    components = StableDiffusionFamily.components + ("text_encoder_2", "tokenizer_2")
    native_size = 1024

    def _text_encoders(self, path: str, dtype, kw) -> tuple[list, list]:
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer

        encoders, tokenizers = super()._text_encoders(path, dtype, kw)
        need = self.components
        encoders.append(_load("text_encoder_2", path,
                              lambda f: CLIPTextModelWithProjection.from_pretrained(f, torch_dtype=dtype, **kw), need))
        tokenizers.append(_load("tokenizer_2", path, lambda f: CLIPTokenizer.from_pretrained(f, **kw), need))
        return encoders, tokenizers

    def pipeline_class(self):
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline

    def encode(self, model, prompts: list[str], *, height: int, width: int, zero: bool = False):
        device = model.denoiser.device
        hiddens, pooled = [], None
        for tok, enc in zip(model.tokenizers, model.text_encoders):
            out = enc(_tokenize(tok, prompts, enc.device), output_hidden_states=True)
            hiddens.append(out.hidden_states[-2])
            pooled = out.text_embeds if hasattr(out, "text_embeds") else out[0]
        hidden = torch.cat(hiddens, dim=-1).to(device)
        pooled = pooled.to(device)
        if zero:
            hidden, pooled = torch.zeros_like(hidden), torch.zeros_like(pooled)
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=hidden.dtype, device=device)
        return PromptEmbeds(hidden, pooled, time_ids.repeat(len(prompts), 1))


SD = StableDiffusionFamily()
SDXL = StableDiffusionXLFamily()
FAMILIES = [SD, SDXL]
