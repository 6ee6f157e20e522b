"""fnf: the Focus-N-Fix training system (model families, sampling with truncated backprop, rewards, localizers,
objectives, the trainer, the CLI).

The names below are the public Python API, what other trainers and scripts import (``import fnf``; the README
lists them). They stay here when internal modules move; everything else is internal. fnf uses
:mod:`fnf_kernels` only through its public API.
"""
from . import train  # the trainer package: fnf.train.train(cfg) -> fnf.train.TrainResult
from .config import Config, ConfigError
from .config import load as load_config
from .core import DiffusionModel, ModelLoadError, PromptEmbeds, SpecError
from .encoding import encode_negative, encode_prompts
from .families.registry import load_model
from .localize import GradCAM, build_localizer, heatmap_to_mask
from .lora import adapters_disabled, add_lora, load_lora, save_lora
from .objectives.penalty import focus_n_fix_loss, region_penalty, region_reward
from .rewards import build_reward, score
from .sampling import decode, draft_k, draft_lv, initial_latents, run_steps, sample_images, schedule

__version__ = "0.1.0"

__all__ = [
    # models: load a local diffusers folder, encode prompts
    "DiffusionModel", "ModelLoadError", "PromptEmbeds", "encode_negative", "encode_prompts", "load_model",
    # LoRA on the denoiser (peft): add, switch off, save / load in the pipeline's format
    "adapters_disabled", "add_lora", "load_lora", "save_lora",
    # sampling with truncated backprop (DRaFT-K / DRaFT-LV) and the differentiable decode
    "decode", "draft_k", "draft_lv", "initial_latents", "run_steps", "sample_images", "schedule",
    # rewards and localizers
    "GradCAM", "SpecError", "build_localizer", "build_reward", "heatmap_to_mask", "score",
    # the objectives' losses, and the region term as reward shaping for other trainers
    "focus_n_fix_loss", "region_penalty", "region_reward",
    # training (the package: fnf.train.train(cfg), fnf.train.TrainResult)
    "Config", "ConfigError", "load_config", "train",
]
