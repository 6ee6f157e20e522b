"""The types, constants and errors every layer of fnf shares; this module imports nothing from fnf.

* :class:`DiffusionModel`: the components of one pipeline folder and the family that knows how to use them;
* :class:`PromptEmbeds`: text conditioning for a batch;
* :data:`DTYPES`, :data:`ADAPTER`, :data:`LORA_WEIGHTS`: the names config keys and LoRA folders use;
* :class:`ModelLoadError`, :class:`SpecError`: the errors the loaders raise;
* :func:`resolve_device`: the device a ``train.device`` setting means on this machine.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"   # the file save_lora_weights writes into the LoRA folder
ADAPTER = "default"                                  # the peft adapter name of the trained LoRA


class ModelLoadError(RuntimeError):
    """The model folder is missing, is not a diffusers pipeline folder, or a component fails to load."""


class SpecError(ValueError):
    """A reward / heatmap / localizer spec string that cannot be built (unknown name, bad argument)."""


def resolve_dtype(weight_dtype) -> torch.dtype:
    """A torch dtype, or a name of :data:`DTYPES` ("fp32", "bf16", ...), as a torch dtype."""
    if isinstance(weight_dtype, torch.dtype):
        return weight_dtype
    if weight_dtype in DTYPES:
        return DTYPES[weight_dtype]
    raise ValueError(f"weight_dtype: expected a torch dtype or one of {sorted(DTYPES)}, got {weight_dtype!r}")


def resolve_device(name: str) -> str:
    """A device setting (train.device: "auto", "cpu" or "cuda") -> the device to use; "auto" is CUDA when one is
    visible, else the CPU. RuntimeError for "cuda" when none is visible."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is visible")
    return name


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

    ``family`` (:class:`fnf.families.base.ModelFamily`) knows how to encode, sample, decode and export this model;
    ``denoiser`` is the UNet or transformer; ``settings`` holds the family's load-time settings (a read-only
    mapping set once at load: max_sequence_length, t5, guidance_embeds, text_encoder_out_layers)."""

    path: str
    family: object
    denoiser: torch.nn.Module
    vae: torch.nn.Module
    scheduler: object
    text_encoders: list = field(default_factory=list)
    tokenizers: list = field(default_factory=list)
    force_zeros_for_empty_prompt: bool = False
    vae_upcast: bool = False       # VAE kept in float32, decoded with autocast off (see set_vae_precision)
    settings: Mapping = field(default_factory=dict)

    def __post_init__(self):
        self.settings = MappingProxyType(dict(self.settings))

    @property
    def kind(self) -> str:
        """The family name: "sd", "sdxl", "sd3", "flux", "flux2"."""
        return self.family.name

    @property
    def vae_dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def native_size(self) -> int:
        sample = getattr(self.denoiser.config, "sample_size", None)
        if not isinstance(sample, int):
            return int(self.family.native_size)
        return int(sample) * self.vae_scale_factor

    @property
    def pipeline_class(self):
        return self.family.pipeline_class()

    def lora_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in self.denoiser.named_parameters() if p.requires_grad]
