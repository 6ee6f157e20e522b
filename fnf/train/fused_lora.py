"""``memory.fused_lora``: run the UNet's peft LoRA through fnf_kernels' fused LoRA attention during training.

When on, :func:`fnf_kernels.patch_lora` switches every peft-LoRA attention to ``FusedLoRAAttnProcessor``
(``lora_linear`` for q/k/v/out: Triton on CUDA, plain torch on CPU) and the trainer runs the no-grad
denoising steps of I0 and of the fine-tuned trajectory as one UNet batch with a per-sample LoRA scale
(:func:`fnf.sampling.denoise_batched`). The processor reads peft's own lora_A / lora_B parameters, so the
optimizer, checkpoints and the exported LoRA (``pipe.load_lora_weights``) are exactly as without it;
:func:`disable` restores diffusers' processors.

Modes: ``off``; ``on`` (any device; an error when the LoRA cannot be fused); ``auto`` (on when training on
CUDA with triton installed and the LoRA can be fused, otherwise off).
"""
from __future__ import annotations

import torch

import fnf_kernels

from .. import quantize

MODES = ("auto", "on", "off")


def enable(unet: torch.nn.Module, mode: str, device) -> tuple[bool, str]:
    """Patch ``unet`` (LoRA already added) when ``mode`` asks for it; returns (on, why) for the log.

    Raises ValueError for ``mode="on"`` when the LoRA cannot be fused (dropout > 0 in training mode, LoRA on
    layers other than nn.Linear, several adapters, ...); ``auto`` falls back to peft then.
    """
    if mode not in MODES:
        raise ValueError(f"memory.fused_lora must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "off":
        return False, "off (memory.fused_lora=off)"

    method = quantize.method_of(unet)
    if method is not None:      # the fused kernels read the base weight as a plain float matrix
        if mode == "on":
            raise ValueError(f"memory.fused_lora=on: the frozen base is quantized ({method}); the fused LoRA "
                             "kernels need float base weights (use memory.fused_lora=auto or off)")
        return False, f"off (memory.fused_lora=auto: the frozen base is quantized, {method})"
    device = torch.device(device)
    if mode == "auto" and fnf_kernels.select_backend("lora_linear", "auto", device) != "triton":
        return False, "off (memory.fused_lora=auto: needs a CUDA device and triton)"
    try:
        fnf_kernels.patch_lora(unet)
        # Raises when some LoRA layer cannot take a per-sample scale.
        with torch.no_grad(), fnf_kernels.lora_scale(unet, 0.0):
            pass
    except ValueError as e:
        fnf_kernels.unpatch_lora(unet)
        if mode == "on":
            raise ValueError(f"memory.fused_lora=on: {e}") from e
        return False, f"off (memory.fused_lora=auto: {e})"
    return True, f"on (memory.fused_lora={mode}): fused LoRA attention, I0 and I no-grad steps in one batch"


def disable(unet: torch.nn.Module) -> None:
    """Restore diffusers' attention processors and peft's forwards (no-op when not patched)."""
    fnf_kernels.unpatch_lora(unet)
