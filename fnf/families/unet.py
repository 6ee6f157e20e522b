"""The UNet families: Stable Diffusion 1.x/2.x (``sd``) and SDXL (``sdxl``), sampled with DDIM.

Everything here follows the diffusers pipelines (``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline``):
the same text conditioning, CFG formula, ``DDIMScheduler.step`` and VAE decode, so a LoRA trained by fnf gives
the pipeline's images with ``pipe.load_lora_weights``.
"""
from __future__ import annotations

import copy

import torch

from ..core import LORA_WEIGHTS, DiffusionModel, PromptEmbeds, resolve_dtype
from ..lora import export_state
from .base import (FolderComponents, ModelFamily, Schedule, cfg_combine, cfg_inputs, check_lora_folder, decode_vae,
                   freeze, sde_transition, set_vae_precision, unscale_latents)


def _tokenize(tokenizer, prompts: list[str], device) -> torch.Tensor:
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return ids.to(device)


def ddim_step(scheduler, out: torch.Tensor, t, x: torch.Tensor, steps: int, *, eta: float = 0.0,
              generator: torch.Generator | None = None, mean_std: bool = False):
    """``DDIMScheduler.step(out, t, x, eta=, generator=)`` of a scheduler set to ``steps`` inference steps, as a
    pure function: it reads only the fixed alphas and the config of ``scheduler``. ``mean_std``: return the
    Gaussian of x_{t-1} instead, ``(mean, std)``: the step before its noise (``prev_sample`` of eta 0's
    arithmetic with eta's smaller direction term) and ``eta * sqrt(variance)``."""
    cfg = scheduler.config
    prev_t = t - cfg.num_train_timesteps // steps
    alpha_prod_t = scheduler.alphas_cumprod[t]
    alpha_prod_t_prev = scheduler.alphas_cumprod[prev_t] if prev_t >= 0 else scheduler.final_alpha_cumprod
    beta_prod_t = 1 - alpha_prod_t
    if cfg.prediction_type == "epsilon":
        x0 = (x - beta_prod_t ** (0.5) * out) / alpha_prod_t ** (0.5)
        eps = out
    elif cfg.prediction_type == "sample":
        x0 = out
        eps = (x - alpha_prod_t ** (0.5) * x0) / beta_prod_t ** (0.5)
    elif cfg.prediction_type == "v_prediction":
        x0 = (alpha_prod_t**0.5) * x - (beta_prod_t**0.5) * out
        eps = (alpha_prod_t**0.5) * out + (beta_prod_t**0.5) * x
    else:
        raise ValueError(f"scheduler prediction_type: expected epsilon, sample or v_prediction, got "
                         f"{cfg.prediction_type!r}")
    if cfg.thresholding:
        x0 = scheduler._threshold_sample(x0)
    elif cfg.clip_sample:
        x0 = x0.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)
    beta_prod_t_prev = 1 - alpha_prod_t_prev
    variance = (beta_prod_t_prev / beta_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)
    std_dev_t = eta * variance ** (0.5)
    direction = (1 - alpha_prod_t_prev - std_dev_t**2) ** (0.5) * eps
    prev = alpha_prod_t_prev ** (0.5) * x0 + direction
    if mean_std:   # the Gaussian of x_{t-1} given x_t (stochastic DDIM, DDPO)
        return prev, std_dev_t
    if eta > 0:
        from diffusers.utils.torch_utils import randn_tensor

        prev = prev + std_dev_t * randn_tensor(out.shape, generator=generator, device=out.device, dtype=out.dtype)
    return prev


class StableDiffusionFamily(ModelFamily):
    """SD 1.x/2.x: one CLIP text encoder (last hidden state), a UNet2DConditionModel, DDIM."""

    name = "sd"
    title = "Stable Diffusion"
    pipeline_classes = ("StableDiffusionPipeline",)
    components = ("unet", "vae", "scheduler", "text_encoder", "tokenizer")
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0")
    supports_sepen = True
    native_size = 512
    fsdp_units = ("BasicTransformerBlock", "ResnetBlock2D")   # the ResNets hold most of the convolution weights
    denoiser_component = "unet"
    fused_lora = True

    # -------------------------------------------------------------------------------- loading
    def _text_encoders(self, src, dtype) -> tuple[list, list]:
        from transformers import CLIPTextModel, CLIPTokenizer

        encoder = src.module("text_encoder", CLIPTextModel, dtype=dtype)
        return [encoder], [src.tokenizer("tokenizer", CLIPTokenizer, encoder=encoder)]

    def load(self, path: str, index: dict, *, weight_dtype: torch.dtype, device="cpu", quantize: str = "none"):
        """All components frozen, eval, on ``device``; ``quantize``: the UNet's quantization (:mod:`fnf.quantize`,
        ``model.quantize``: its Linear layers; convolutions stay in the weight dtype)."""
        src = FolderComponents(path, index, "Stable Diffusion pipeline", ", ".join(self.components))
        return self.build(src, weight_dtype=weight_dtype, device=device, quantize=quantize)

    def build(self, src, *, weight_dtype, device="cpu", fp16_autocast: bool = False, quantize: str = "none"):
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

        dtype = resolve_dtype(weight_dtype)
        unet = src.denoiser("unet", UNet2DConditionModel, dtype=dtype, quantize=quantize)
        # fp16: read the VAE in float32 (set_vae_precision casts it down unless its config sets force_upcast).
        vae = src.module("vae", AutoencoderKL, dtype=torch.float32 if dtype == torch.float16 else dtype)
        scheduler = src.scheduler("scheduler", DDIMScheduler)
        encoders, tokenizers = self._text_encoders(src, dtype)
        freeze([unet, vae, *encoders], device)
        zeros = bool(src.index.get("force_zeros_for_empty_prompt", self.name == "sdxl"))
        model = DiffusionModel(path=src.path, family=self, denoiser=unet, vae=vae, scheduler=scheduler,
                               text_encoders=encoders, tokenizers=tokenizers, force_zeros_for_empty_prompt=zeros)
        set_vae_precision(model, dtype, fp16_autocast)
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

    def schedule(self, model, steps: int, height: int, width: int, device) -> Schedule:
        """DDIMScheduler.set_timesteps's timesteps (computed on a copy; ``model.scheduler`` keeps its config)."""
        work = copy.copy(model.scheduler)
        work.set_timesteps(steps, device=device)
        return Schedule(work.timesteps, int(height), int(width))

    def _added_cond(self, emb, dtype) -> dict:
        """SDXL's pooled text embeds and time ids (absent for SD 1.x/2.x conditioning)."""
        if emb.pooled is None:
            return {}
        return {"added_cond_kwargs": {"text_embeds": emb.pooled.to(dtype), "time_ids": emb.time_ids.to(dtype)}}

    def predict(self, model, denoiser, x: torch.Tensor, t, cond, uncond, guidance_scale: float,
                schedule: Schedule | None = None):
        """One UNet call and the guided noise prediction, in float32 (float64 for a float64 UNet); with CFG the
        UNet batch is ``[uncond rows of x, cond rows of x]``. ``t`` may be one timestep or one per row."""
        cfg, emb, x_in = cfg_inputs(self, model, x, cond, uncond, guidance_scale)
        x_in = model.scheduler.scale_model_input(x_in, t)
        dtype = model.denoiser.dtype
        out = denoiser(x_in.to(dtype), t, encoder_hidden_states=emb.hidden.to(dtype), return_dict=False,
                       **self._added_cond(emb, dtype))[0]
        return cfg_combine(out, cfg, guidance_scale)

    def step(self, model, schedule: Schedule, i: int, out: torch.Tensor, x: torch.Tensor, *, eta: float = 0.0,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """``DDIMScheduler.step`` at ``schedule.timesteps[i]`` (:func:`ddim_step`)."""
        return ddim_step(model.scheduler, out, schedule.timesteps[i], x, len(schedule), eta=eta, generator=generator)

    sde_noise_level = 1.0   # DDIM eta = 1 (DDPO's default)

    def sde_step(self, model, schedule: Schedule, i: int, out: torch.Tensor, x: torch.Tensor, *, noise_level: float,
                 generator: torch.Generator | None = None, noise: torch.Tensor | None = None,
                 prev: torch.Tensor | None = None):
        """Stochastic DDIM (eta = ``noise_level``) as the Gaussian ``DDIMScheduler.step`` samples from:
        ``(x_next, log_prob, mean, std)`` (:func:`~fnf.families.base.sde_transition`)."""
        wide = torch.promote_types(out.dtype, torch.float32)
        mean, std = ddim_step(model.scheduler, out.to(wide), schedule.timesteps[i], x.to(wide), len(schedule),
                              eta=noise_level, mean_std=True)
        return sde_transition(mean, std, generator=generator, noise=noise, prev=prev)

    def renoise(self, model, schedule: Schedule, i: int, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return model.scheduler.add_noise(x0, noise, torch.as_tensor(schedule.timesteps[i]).reshape(1))

    def decode(self, model, latents: torch.Tensor, schedule: Schedule | None = None) -> torch.Tensor:
        """VAE decode to float32 images in [0, 1] (:func:`~fnf.families.base.decode_vae`)."""
        return decode_vae(model, unscale_latents(model, latents))

    # -------------------------------------------------------------------------------- LoRA
    def save_lora(self, model, directory: str) -> None:
        """``save_lora_weights(unet_lora_layers=...)`` of the pipeline class, with peft's adapter metadata, in peft
        keys (``unet.<module>.lora_A.weight``). Not diffusers' ``convert_state_dict_to_diffusers``: it renames only
        the attention projections (``.lora.down``), and a file that mixes both spellings (LoRA on attention and
        on feed-forward or proj_in layers) loads with its attention LoRAs silently dropped."""
        state, metadata = export_state(model.denoiser)
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

    def _text_encoders(self, src, dtype) -> tuple[list, list]:
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer

        encoders, tokenizers = super()._text_encoders(src, dtype)
        encoders.append(src.module("text_encoder_2", CLIPTextModelWithProjection, dtype=dtype))
        tokenizers.append(src.tokenizer("tokenizer_2", CLIPTokenizer, encoder=encoders[-1]))
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
