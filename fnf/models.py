"""Load a local diffusers folder through its model family (fnf/families/), encode prompts, attach and export LoRA.

Only local diffusers folders are read (``local_files_only=True``); nothing is ever fetched from a hub.
The frozen pretrained model is the same UNet with its adapters disabled (:func:`adapters_disabled`):
there is no second copy of the weights.
"""
from __future__ import annotations

import contextlib
import inspect
import json
import os
from dataclasses import dataclass, field

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"   # the file save_lora_weights writes into the LoRA folder
ADAPTER = "default"


class ModelLoadError(RuntimeError):
    """The model folder is missing, is not a diffusers pipeline folder, or a component fails to load."""


@dataclass
class PromptEmbeds:
    """Text conditioning for a batch: cross-attention states, plus SDXL's pooled embeds and time ids."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None

    def index(self, idx: torch.Tensor) -> "PromptEmbeds":
        pick = lambda t: None if t is None else t[idx]  # noqa: E731
        return PromptEmbeds(self.hidden[idx], pick(self.pooled), pick(self.time_ids))

    def to(self, device) -> "PromptEmbeds":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return PromptEmbeds(self.hidden.to(device), move(self.pooled), move(self.time_ids))

    def repeat(self, n: int) -> "PromptEmbeds":
        rep = lambda t: None if t is None else t.repeat(n, *([1] * (t.dim() - 1)))  # noqa: E731
        return PromptEmbeds(rep(self.hidden), rep(self.pooled), rep(self.time_ids))

    @staticmethod
    def cat(a: "PromptEmbeds", b: "PromptEmbeds") -> "PromptEmbeds":
        join = lambda x, y: None if x is None else torch.cat([x, y])  # noqa: E731
        return PromptEmbeds(torch.cat([a.hidden, b.hidden]), join(a.pooled, b.pooled), join(a.time_ids, b.time_ids))


@dataclass
class DiffusionModel:
    """The components of one pipeline folder, loaded for training and sampling.

    ``family`` (:class:`fnf.families.base.ModelFamily`) knows how to sample, decode and export this model;
    ``unet`` holds the denoiser (a UNet or a transformer, also reachable as ``denoiser``); ``extras`` holds
    family-specific state."""

    path: str
    kind: str                      # the family name: "sd", "sdxl", ...
    unet: torch.nn.Module
    vae: torch.nn.Module
    scheduler: object
    text_encoders: list = field(default_factory=list)
    tokenizers: list = field(default_factory=list)
    force_zeros_for_empty_prompt: bool = False
    vae_upcast: bool = False       # VAE kept in float32, decoded with autocast off (see set_vae_precision)
    family: object = None          # ModelFamily; None: the family named by ``kind``
    extras: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.family is None:
            from .families import family_by_name

            self.family = family_by_name(self.kind)

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.unet

    @property
    def vae_dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def native_size(self) -> int:
        sample = getattr(self.unet.config, "sample_size", None)
        if not isinstance(sample, int):
            return int(self.family.native_size)
        return int(sample) * self.vae_scale_factor

    @property
    def pipeline_class(self):
        return self.family.pipeline_class()

    def lora_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in self.unet.named_parameters() if p.requires_grad]


def _read_index(path: str) -> dict:
    if not path:
        raise ModelLoadError("no model folder given: set model.path (or --model DIR) to a local diffusers folder")
    if not os.path.exists(path):
        raise ModelLoadError(f"model folder does not exist: {path!r} (fnf loads local diffusers folders only; "
                             "download the model yourself and point model.path at it)")
    if not os.path.isdir(path):
        raise ModelLoadError(f"model path is not a folder: {path!r}")
    index_file = os.path.join(path, "model_index.json")
    if not os.path.isfile(index_file):
        raise ModelLoadError(f"{path!r} is not a diffusers pipeline folder: model_index.json is missing")
    try:
        with open(index_file, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{index_file} is not valid JSON: {e}") from None


def family_of(path: str, index: dict | None = None):
    """The :class:`~fnf.families.base.ModelFamily` of a folder, from its model_index.json ``_class_name``.

    An index without ``_class_name`` (hand-made folders) is SD or SDXL (SDXL when it lists text_encoder_2);
    a pipeline class fnf does not support is a ModelLoadError naming it and the supported ones."""
    from .families import family_by_name, family_for_index, supported_pipelines

    index = index if index is not None else _read_index(path)
    if "_class_name" not in index:
        return family_by_name("sdxl" if "text_encoder_2" in index else "sd")
    family = family_for_index(index)
    if family is None:
        raise ModelLoadError(f"{path!r} holds a {index['_class_name']!r} (model_index.json _class_name), which fnf "
                             f"does not support; supported pipelines: {', '.join(supported_pipelines())}")
    return family


def detect_kind(path: str, index: dict | None = None) -> str:
    """The family name of the folder ("sd", "sdxl", ...), see :func:`family_of`."""
    return family_of(path, index).name


# model.* keys passed to a family's ``load`` when they differ from their default; a family supports a key when
# its ``load`` takes the keyword (SD3: all three; FLUX.1: quantize, max_sequence_length).
LOAD_OPTIONS = {"quantize": "none", "text_encoder_3": True, "max_sequence_length": 0}


def model_options(cfg) -> dict:
    """The load options of ``cfg.model`` (:data:`LOAD_OPTIONS`) for :func:`load_model`."""
    return {key: getattr(cfg.model, key) for key in LOAD_OPTIONS}


def families_accepting(option: str) -> list[str]:
    from .families import all_families

    return [f.name for f in all_families() if option in inspect.signature(f.load).parameters]


def family_options(family, options: dict) -> dict:
    """The options that differ from their default, as keywords for ``family.load``; one the family does not
    take is a ValueError naming the config key and the families that take it."""
    unknown = [k for k in options if k not in LOAD_OPTIONS]
    if unknown:
        raise TypeError(f"load options: unknown {unknown}; expected some of {sorted(LOAD_OPTIONS)}")
    chosen = {k: v for k, v in options.items() if v != LOAD_OPTIONS[k]}
    accepted = inspect.signature(family.load).parameters
    for key, value in chosen.items():
        if key not in accepted:
            raise ValueError(f"config key 'model.{key}': {value!r} applies to {', '.join(families_accepting(key))} "
                             f"models only; this folder is {family.title or family.name!r} (leave model.{key} at "
                             f"{LOAD_OPTIONS[key]!r})")
    return chosen


def load_model(path: str, *, kind: str = "auto", weight_dtype: str = "fp32", device="cpu",
               **options) -> DiffusionModel:
    """Every component of a local diffusers folder, all frozen, through the folder's model family.

    ``options``: ``quantize``, ``text_encoder_3``, ``max_sequence_length`` (the model.* keys of the same names,
    see :data:`LOAD_OPTIONS`), passed on to the family when not at their defaults."""
    index = _read_index(path)
    family = family_of(path, index)
    if kind not in ("auto", family.name):
        raise ModelLoadError(f"model.kind is {kind!r} but {path!r} looks like {family.name!r}")
    if weight_dtype not in DTYPES:
        raise ValueError(f"weight_dtype must be one of {', '.join(DTYPES)}, got {weight_dtype!r}")
    model = family.load(path, index, weight_dtype=DTYPES[weight_dtype], device=device,
                        **family_options(family, options))
    model.family = family
    return model


def set_vae_precision(model: DiffusionModel, weight_dtype: torch.dtype, fp16_autocast: bool = False) -> bool:
    """Cast the VAE to ``weight_dtype``, except when its config sets ``force_upcast`` (SD and SDXL VAEs overflow
    in float16) and float16 is in play (fp16 weights or fp16 autocast): then the VAE is kept in float32 and
    :func:`fnf.sampling.decode` runs it with autocast off, as the diffusers pipelines do. Sets and returns
    ``model.vae_upcast``."""
    if model.vae is None:
        return False
    fp16 = weight_dtype == torch.float16 or fp16_autocast
    model.vae_upcast = bool(fp16 and getattr(model.vae.config, "force_upcast", False))
    target = torch.float32 if model.vae_upcast else weight_dtype
    if model.vae_dtype != target:
        model.vae.to(target)
    return model.vae_upcast


# ----------------------------------------------------------------------------------------------- prompts
@torch.no_grad()
def encode_prompts(model: DiffusionModel, prompts: list[str], *, height: int, width: int,
                   zero: bool = False) -> PromptEmbeds:
    """Text conditioning as the model's diffusers pipeline computes it (``model.family.encode``).

    ``zero`` gives the all-zero negative conditioning of pipelines that use it (SDXL's
    force_zeros_for_empty_prompt); families without it ignore it. Prompts encoded by
    :func:`encode_before_denoiser` come from its cache (moved to the denoiser's device)."""
    cached = model.extras.get(PROMPT_CACHE, {}).get(_cache_key(model, prompts, height, width, zero))
    if cached is not None:
        return cached.to(model.unet.device)
    return model.family.encode(model, prompts, height=height, width=width, zero=zero)


@torch.no_grad()
def encode_negative(model: DiffusionModel, negative_prompt: str, batch: int, *, height: int,
                    width: int) -> PromptEmbeds:
    """The negative (unconditional) conditioning for ``batch`` rows: all zeros for an empty negative prompt
    when the folder's pipeline sets force_zeros_for_empty_prompt."""
    zero = not negative_prompt and model.force_zeros_for_empty_prompt
    return encode_prompts(model, [negative_prompt] * batch, height=height, width=width, zero=zero)


def offload_text_encoders(model: DiffusionModel) -> None:
    """Move the text encoders to CPU once all embeddings exist (frees their device memory)."""
    for enc in model.text_encoders:
        enc.to("cpu")


def text_encoders_first(cfg) -> bool:
    """Whether training encodes the prompts before the denoiser reaches the device (:func:`encode_before_denoiser`):
    ``memory.offload_text_encoder`` with an objective that encodes only its fixed prompts
    (``Objective.encodes_prompts_once``)."""
    from .objectives import objective_class

    return bool(cfg.memory.offload_text_encoder and objective_class(cfg.objective.name).encodes_prompts_once)


PROMPT_CACHE = "prompt_cache"   # model.extras key: embeddings computed before the denoiser reached the device


def _cache_key(model: DiffusionModel, prompts, height: int, width: int, zero: bool) -> tuple:
    return (tuple(prompts), int(height), int(width), bool(zero), model.extras.get("max_sequence_length"))


@torch.no_grad()
def encode_before_denoiser(model: DiffusionModel, prompts: list[str], negative_prompt: str, *, height: int,
                           width: int, device, probe=None, move_denoiser: bool = True) -> None:
    """Encode ``prompts`` and the negative prompt (one row) with only the text encoders on ``device``, keep the
    embeddings on the host (``model.extras["prompt_cache"]``, read by :func:`encode_prompts` and
    :func:`encode_negative`), move the encoders back to the host, then the denoiser onto ``device``: the device
    never holds the text encoders beside the denoiser. The denoiser must still be on the host (a bitsandbytes one
    is already on its GPU and stays there); ``move_denoiser=False`` leaves it there (FSDP shards it later).
    ``probe``: the trainer's :class:`fnf.train.Probe` (phases and placements for ``fnf estimate-memory``)."""
    from . import quantize

    probe = probe if probe is not None else _NoProbe()
    on_gpu_already = quantize.method_of(model.unet) == "bitsandbytes"
    probe.placed([model.unet], on_device=on_gpu_already)
    for enc in model.text_encoders:
        enc.to(device)
    probe.placed(model.text_encoders, on_device=True)
    cache = model.extras.setdefault(PROMPT_CACHE, {})
    zero = not negative_prompt and model.force_zeros_for_empty_prompt
    with probe.phase("prompt encoding"):
        for rows, z in ((list(prompts), False), ([negative_prompt], zero)):
            if not rows:
                continue
            key = _cache_key(model, rows, height, width, z)
            cache[key] = model.family.encode(model, rows, height=height, width=width, zero=z).to("cpu")
    offload_text_encoders(model)
    probe.placed(model.text_encoders, on_device=False)
    if move_denoiser:
        quantize.move(model.unet, device)
        probe.placed([model.unet], on_device=True)


class _NoProbe:
    def phase(self, name: str, host: bool = False):
        return contextlib.nullcontext()

    def placed(self, modules, on_device: bool) -> None:
        pass


# ----------------------------------------------------------------------------------------------- LoRA
def add_lora(model: DiffusionModel, *, rank: int, alpha: float, target_modules, dropout: float = 0.0) -> list:
    """Attach a peft LoRA adapter to the UNet through diffusers' add_adapter; LoRA params are fp32 and the
    only trainable parameters. Returns them."""
    from peft import LoraConfig

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                        init_lora_weights=True)
    try:
        model.unet.add_adapter(config, adapter_name=ADAPTER)
    except ValueError as e:
        raise ValueError(f"could not attach LoRA (lora.target_modules={list(target_modules)}): {e}") from e
    params = []
    for name, p in model.unet.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
            p.requires_grad_(True)
            params.append(p)
        else:
            p.requires_grad_(False)
    if not params:
        raise ValueError(f"lora.target_modules={list(target_modules)} matched no UNet module")
    _dropout_off(model.unet)
    return params


def _dropout_off(unet) -> None:
    """New peft layers start in training mode: LoRA dropout stays off outside lora_dropout_active."""
    for layer in lora_dropout_layers(unet):
        layer.eval()


def lora_dropout_layers(unet) -> list[torch.nn.Module]:
    """peft's lora_dropout layers (nn.Dropout, or nn.Identity for p = 0) of every LoRA module in ``unet``."""
    layers = []
    for module in unet.modules():
        dropout = getattr(module, "lora_dropout", None)
        if isinstance(dropout, torch.nn.ModuleDict):
            layers.extend(dropout.values())
    return layers


@contextlib.contextmanager
def lora_dropout_active(unet, active: bool = True):
    """LoRA dropout on (``active``) inside the block, whatever the UNet's train/eval mode; restored after.

    The trainer keeps the UNet in eval mode and switches LoRA dropout on only for the UNet calls that carry
    gradient: the no-grad steps of the fine-tuned trajectory then match a no-dropout run, and I0 never sees it."""
    layers = lora_dropout_layers(unet) if active else []
    before = [layer.training for layer in layers]
    for layer in layers:
        layer.train(True)
    try:
        yield unet
    finally:
        for layer, mode in zip(layers, before):
            layer.train(mode)


@contextlib.contextmanager
def adapters_disabled(unet):
    """The frozen pretrained model: the same UNet with its LoRA adapters switched off."""
    unet.disable_adapters()
    try:
        yield unet
    finally:
        unet.enable_adapters()


def lora_state_dict(unet) -> dict[str, torch.Tensor]:
    """Trainable LoRA tensors by parameter name (used by checkpoints)."""
    return {n: p.detach().clone() for n, p in unet.named_parameters() if p.requires_grad}


def load_lora_state_dict(unet, state: dict[str, torch.Tensor]) -> None:
    params = dict(unet.named_parameters())
    missing = [n for n in state if n not in params]
    if missing:
        raise ValueError(f"checkpoint LoRA tensors not in this UNet (different lora settings?): {missing[:3]}")
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t)


def save_lora_diffusers(model: DiffusionModel, directory: str) -> None:
    """Write the LoRA so that the family's ``pipe.load_lora_weights(directory)`` loads it."""
    model.family.save_lora(model, directory)


def load_lora_for_sampling(model: DiffusionModel, directory: str, adapter_name: str = ADAPTER) -> None:
    """Load a LoRA folder (written by :func:`save_lora_diffusers` or diffusers) into the model's denoiser, with
    the loader the family's ``pipe.load_lora_weights`` uses."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"LoRA folder does not exist: {directory!r}")
    model.family.load_lora(model, directory, adapter_name)
    _dropout_off(model.unet)  # a LoRA saved with lora_dropout > 0 must not drop out while sampling
