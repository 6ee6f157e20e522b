"""An optional quantized frozen denoiser (``model.quantize``) through diffusers' quantization configs.

The denoiser (the SD3 / FLUX transformer, the SD / SDXL UNet) is read with ``from_pretrained(quantization_config=...)``; peft
puts its LoRA layers on top of the quantized Linear layers (``bnb.nn.Linear8bitLt`` / ``Linear4bit``, torchao's
int8 tensors), so the trained parameters stay fp32 and the frozen model is still the same denoiser with its
adapters disabled. Methods:

* ``none``: full-precision weights (``model.weight_dtype``);
* ``bnb-8bit``: bitsandbytes LLM.int8 (``BitsAndBytesConfig(load_in_8bit=True)``), about half the bf16 bytes;
* ``bnb-4bit``: bitsandbytes NF4 (``load_in_4bit=True, bnb_4bit_quant_type="nf4"``, computing in the weight
  dtype), about a quarter;
* ``torchao-int8``: torchao int8 weight-only (``TorchAoConfig(Int8WeightOnlyConfig())``), about half.

bitsandbytes quantizes on a CUDA GPU (diffusers loads such a model straight onto it); torchao also runs on the
CPU. :func:`problem` says, without loading anything, why a method cannot run here; preflight turns it into one
line naming the key.
"""
from __future__ import annotations

import importlib.util

import torch

METHODS = ("none", "bnb-8bit", "bnb-4bit", "torchao-int8")
BACKEND = {"bnb-8bit": "bitsandbytes", "bnb-4bit": "bitsandbytes", "torchao-int8": "torchao"}
MIN_BITSANDBYTES = "0.43.3"   # diffusers' BitsAndBytesConfig needs it


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"model.quantize: expected one of {', '.join(METHODS)}, got {method!r}")


def _version(package: str):
    from importlib.metadata import version

    from packaging.version import Version

    return Version(version(package))


def _at_least(package: str, minimum: str) -> bool:
    from packaging.version import Version

    return _version(package) >= Version(minimum)


def problem(method: str, cuda: bool) -> str | None:
    """Why ``method`` cannot run (None: it can), checked without loading a model. ``cuda``: whether training
    runs on a CUDA device."""
    _check_method(method)
    if method == "none":
        return None
    backend = BACKEND[method]
    if importlib.util.find_spec(backend) is None:
        gpu = " (it needs a CUDA GPU)" if backend == "bitsandbytes" else ""
        return f"{method} needs the {backend} package, which is not installed: pip install {backend}{gpu}"
    if backend == "bitsandbytes":
        if not cuda:
            return (f"{method} needs a CUDA device (bitsandbytes quantizes on the GPU), and training would run on "
                    "the CPU; use model.quantize=torchao-int8 or none")
        if not _at_least("bitsandbytes", MIN_BITSANDBYTES):
            return f"{method} needs bitsandbytes >= {MIN_BITSANDBYTES}, found {_version('bitsandbytes')}"
    try:
        quantization_config(method, torch.bfloat16)   # diffusers' own version checks (e.g. torchao >= 0.15)
    except Exception as e:  # noqa: BLE001 - any failure to build the config is the reason
        return f"{method}: diffusers cannot build its quantization config here ({type(e).__name__}: {e})"
    if backend == "torchao" and importlib.util.find_spec("peft.tuners.lora.torchao") is None:
        return f"{method} needs a peft with torchao LoRA layers (peft >= 0.14)"
    return None


def quantization_config(method: str, compute_dtype: torch.dtype):
    """diffusers' quantization config object for ``method`` (None for ``none``)."""
    _check_method(method)
    if method == "none":
        return None
    if method in ("bnb-8bit", "bnb-4bit"):
        from diffusers import BitsAndBytesConfig

        if method == "bnb-8bit":
            return BitsAndBytesConfig(load_in_8bit=True)
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)
    from diffusers import TorchAoConfig

    try:
        from torchao.quantization import Int8WeightOnlyConfig
    except ImportError:  # torchao < 0.10 names the method by string (diffusers < 0.40 accepts it)
        return TorchAoConfig("int8_weight_only")
    return TorchAoConfig(Int8WeightOnlyConfig())


def load_denoiser(cls, folder: str, *, dtype: torch.dtype, method: str = "none", **kwargs):
    """``cls.from_pretrained(folder, torch_dtype=dtype, quantization_config=...)`` (no config for ``none``)."""
    config = quantization_config(method, dtype)
    if config is not None:
        kwargs["quantization_config"] = config
    return cls.from_pretrained(folder, torch_dtype=dtype, **kwargs)


def method_of(module) -> str | None:
    """The diffusers quantization method of a loaded model ("bitsandbytes", "torchao", ...; None: not quantized)."""
    quantizer = getattr(module, "hf_quantizer", None)
    config = getattr(quantizer, "quantization_config", None)
    method = getattr(config, "quant_method", None)
    return None if method is None else str(getattr(method, "value", method))


def move(module: torch.nn.Module, device) -> torch.nn.Module:
    """``module.to(device)``, except for a bitsandbytes-quantized model: its weights stay on the GPU they were
    quantized on (diffusers loads them there; moving them is unsupported)."""
    if method_of(module) == "bitsandbytes":
        return module
    return module.to(device)
