"""Checks of a whole training/sampling config that run before any model is loaded.

Everything here is cheap: files exist, specs import and accept their kwargs, the device is there, the model folder
looks like the pipeline it claims to be. Errors name the config key and what was expected, so a typo costs a
second, not the minutes of loading a model first.
"""
from __future__ import annotations

import os

from . import quantize
from .config import Config, ConfigError
from .core import ModelLoadError, resolve_device
from .families.registry import family_of, family_options, model_options, read_index
from .localize import check_localizer_spec
from .rewards import check_reward_spec


def check_model_folder(path: str, kind: str = "auto") -> str:
    """The folder is a diffusers pipeline folder of a supported family (the given kind, unless auto) with every
    component the family lists; returns the family name."""
    index = read_index(path)
    family = family_of(path, index)
    if kind not in ("auto", family.name):
        raise ModelLoadError(f"model.kind is {kind!r} but {path!r} looks like {family.name!r}")
    missing = [c for c in family.components if not os.path.isdir(os.path.join(path, c))]
    if missing:
        raise ModelLoadError(f"model folder {path!r} has no {', '.join(repr(m) for m in missing)} subfolder(s); a "
                             f"{family.title or family.name} pipeline folder needs {', '.join(family.components)}")
    return family.name


def training_on_cuda(cfg: Config) -> bool:
    """Whether train.device resolves to a CUDA device ('cuda' with none visible is check_device's error)."""
    return cfg.train.device == "cuda" or resolve_device(cfg.train.device) == "cuda"


def check_model_options(cfg: Config) -> None:
    """model.quantize / text_encoder_3 / max_sequence_length suit the folder's family, and the quantization
    backend is installed and usable on this device."""

    if cfg.model.path:
        try:
            family_options(family_of(cfg.model.path), model_options(cfg))
        except ValueError as e:
            raise ConfigError(str(e)) from None
    why = quantize.problem(cfg.model.quantize, training_on_cuda(cfg))
    if why:
        raise ConfigError(f"config key 'model.quantize': {why}")


def check_objective(cfg: Config) -> None:
    """Separate-and-Enhance needs a family with separate cross-attention keys (the UNet families)."""
    if cfg.objective.name != "sepen" or not cfg.model.path:
        return
    family = family_of(cfg.model.path)
    if not family.supports_sepen:
        raise ConfigError(sepen_unsupported(family))
    if cfg.model.quantize != "none":
        raise ConfigError(f"config key 'model.quantize': {cfg.model.quantize} with objective sepen: "
                          "Separate-and-Enhance trains the UNet's own attn2.to_k weights, which a quantized UNet "
                          "does not have as trainable floats (leave model.quantize at 'none')")


def sepen_unsupported(family) -> str:
    return (f"config key 'objective.name': sepen (Separate-and-Enhance) needs a model with separate "
            f"cross-attention keys (SD 1.x/2.x, SDXL); {family.title or family.name!r} models use joint attention, "
            "which has none. Use objective.name=fnf")


def check_prompts(cfg: Config) -> list[str]:
    """The prompts file exists and the prompts are not empty; returns them."""
    path = cfg.train.prompts_file
    if path and not os.path.isfile(path):
        raise ConfigError(f"config key 'train.prompts_file': expected a file of prompts (one per line), "
                          f"got {path!r}, which does not exist")
    prompts = cfg.all_prompts()
    if not prompts and cfg.objective.name != "sepen":
        raise ConfigError("config key 'train.prompts': expected at least one prompt; train.prompts is empty and "
                          f"{'train.prompts_file ' + repr(path) + ' has no non-empty line' if path else 'no train.prompts_file is set'}")
    return prompts


def check_device(cfg: Config) -> None:
    try:
        resolve_device(cfg.train.device)
    except RuntimeError:
        raise ConfigError("config key 'train.device': expected a visible CUDA device for 'cuda', found none "
                          "(use auto or cpu)") from None


def check_specs(cfg: Config) -> None:
    """Reward and localizer specs resolve and accept their kwargs (objective fnf only: sepen uses neither)."""
    if cfg.objective.name == "sepen":
        return
    check_reward_spec(cfg.reward.spec, cfg.reward.kwargs)
    check_localizer_spec(cfg.localize.spec, cfg.localize.kwargs)


def check(cfg: Config, *, model: bool = True, prompts: bool = True, specs: bool = True) -> None:
    """Everything about ``cfg`` that can be checked without loading a model (raises ConfigError, SpecError,
    LocalizerError or ModelLoadError naming the key). ``model=False`` skips the model folder (the caller
    passes a built model); ``prompts=False`` the prompts (given another way); ``specs=False`` the reward and
    localizer (commands that use neither)."""
    check_device(cfg)
    if prompts:
        check_prompts(cfg)
    if specs:
        check_specs(cfg)
    if model:
        check_model_folder(cfg.model.path, cfg.model.kind)
        check_model_options(cfg)
        check_objective(cfg)
