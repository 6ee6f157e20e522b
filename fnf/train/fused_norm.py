"""``memory.fused_norm``: the VAE decoder's norm → SiLU pairs run as one fnf_kernels op that keeps only its input.

Under CUDA autocast every ``group_norm`` runs in float32, and autograd saves its float32 input, output and SiLU
output: at the decoder's last up block (128–256 channels at full resolution) 0.5–1 GiB each. The fused ops
(:func:`fnf_kernels.group_norm_silu`, :func:`fnf_kernels.rms_norm_silu`) save only the input, in its own dtype,
and the per-group statistics, and recompute the rest in backward: the same image and gradients up to float
rounding (statistics in float32; the output is rounded to the input's dtype, which the next convolution does
under autocast anyway).

The pairs fused (whitelisted layouts only; anything else is left as it is):

* diffusers ``ResnetBlock2D`` with ``time_embedding_norm`` "default" or "group" (not "scale_shift", whose
  norm2 output is modulated before the SiLU): norm1 → nonlinearity and norm2 →
  nonlinearity (the decoder's mid-block and up-block ResNets of AutoencoderKL, SD3/FLUX's 16-channel VAEs,
  AutoencoderKLFlux2);
* the decoder tail ``conv_norm_out`` → ``conv_act`` (diffusers' ``Decoder``);
* Qwen-Image's VAE (``AutoencoderKLQwenImage``): ``QwenImageResidualBlock`` norm1/norm2 → nonlinearity and the
  decoder head norm_out → nonlinearity, ``QwenImageRMS_norm`` (F.normalize · √C · γ) as ``rms_norm_silu`` over
  the channel dim.

Instance ``forward`` attributes as fnf/train/vae_memory.py sets them (bound methods: a deepcopy rebinds them;
parameter names unchanged): the norm returns the SiLU'd output, tagged, and the SiLU module passes a tagged
tensor through (any other input, e.g. a time embedding, still gets its SiLU). :func:`disable` undoes it; it
composes with vae_memory's checkpointing (its tail checkpoint asks :func:`tail_norm_act`) and tiling.
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F

import fnf_kernels

MODES = ("auto", "on", "off")
FUSED = "_fnf_fused_norm"      # on a patched norm (its forward is fused) or SiLU (its forward passes tagged input)
_DONE = "_fnf_silu_applied"    # on a tensor a fused norm returned


def _tagged(y: torch.Tensor) -> torch.Tensor:
    setattr(y, _DONE, True)
    return y


def _group_norm_silu(norm: torch.nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    return fnf_kernels.group_norm_silu(x, norm.num_groups, norm.weight, norm.bias, norm.eps)


def _rms_norm_silu(norm, x: torch.Tensor) -> torch.Tensor:
    """QwenImageRMS_norm + SiLU: F.normalize(x, dim=1) * √C * γ equals x / sqrt(mean(x²)) * γ (F.normalize's
    1e-12 floor on the norm becomes an eps of 1e-24 / C on the mean square)."""
    c = x.shape[1]
    return fnf_kernels.rms_norm_silu(x, norm.gamma.reshape(c), 1e-24 / c, dim=1)


def _fused_forward(self, x):
    return _tagged(_group_norm_silu(self, x) if isinstance(self, torch.nn.GroupNorm) else _rms_norm_silu(self, x))


def _silu_forward(self, x):
    return x if getattr(x, _DONE, False) else F.silu(x)


def _group_norm_ok(norm) -> bool:
    return type(norm) is torch.nn.GroupNorm and norm.affine


def _rms_norm_ok(norm) -> bool:
    gamma = getattr(norm, "gamma", None)
    return (type(norm).__name__ == "QwenImageRMS_norm" and norm.channel_first and isinstance(gamma, torch.Tensor)
            and not isinstance(norm.bias, torch.Tensor) and norm.bias == 0)


def _silu_ok(act) -> bool:
    return type(act) is torch.nn.SiLU


def pairs(decoder: torch.nn.Module) -> list[tuple[torch.nn.Module, torch.nn.Module]]:
    """The (norm, SiLU module) pairs of ``decoder`` this module fuses (see the module docstring)."""
    found = []
    for module in decoder.modules():
        name = type(module).__name__
        if name == "ResnetBlock2D" and getattr(module, "time_embedding_norm", None) in ("default", "group"):
            if _silu_ok(module.nonlinearity) and _group_norm_ok(module.norm1) and _group_norm_ok(module.norm2):
                found += [(module.norm1, module.nonlinearity), (module.norm2, module.nonlinearity)]
        elif name == "QwenImageResidualBlock":
            if _silu_ok(module.nonlinearity) and _rms_norm_ok(module.norm1) and _rms_norm_ok(module.norm2):
                found += [(module.norm1, module.nonlinearity), (module.norm2, module.nonlinearity)]
        elif name == "QwenImageDecoder3d":
            if _silu_ok(module.nonlinearity) and _rms_norm_ok(module.norm_out):
                found.append((module.norm_out, module.nonlinearity))
    conv_norm_out, conv_act = getattr(decoder, "conv_norm_out", None), getattr(decoder, "conv_act", None)
    if _group_norm_ok(conv_norm_out) and _silu_ok(conv_act):
        found.append((conv_norm_out, conv_act))
    return found


def _patch(module, forward) -> None:
    if FUSED not in module.__dict__:
        if "forward" not in module.__dict__:  # vae_memory's tail checkpoint keeps its own forward (tail_norm_act)
            module.forward = types.MethodType(forward, module)
        setattr(module, FUSED, True)


def enable(vae: torch.nn.Module, mode: str) -> tuple[int, str]:
    """Fuse the decoder's norm → SiLU pairs when ``mode`` asks for it; returns (pairs fused, why) for the log.

    ``on``: an error when the decoder has no supported pair; ``auto``: the supported pairs, on every device (the
    memory saved is the same on CPU and GPU; on the CPU the op is the plain-torch chunked one); ``off``: nothing.
    Call after vae_memory's checkpointing levers (:func:`fnf.train.vae_memory.apply` does)."""
    if mode not in MODES:
        raise ValueError(f"memory.fused_norm must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "off":
        return 0, "off (memory.fused_norm=off)"
    decoder = getattr(vae, "decoder", None)
    found = pairs(decoder) if isinstance(decoder, torch.nn.Module) else []
    if not found:
        if mode == "on":
            raise ValueError(f"memory.fused_norm=on: {type(vae).__name__}'s decoder has no GroupNorm/RMSNorm → SiLU "
                             "pair of a supported layout (use memory.fused_norm=auto or off)")
        return 0, f"off (memory.fused_norm=auto: no supported norm → SiLU pair in {type(vae).__name__})"
    for norm, act in found:
        _patch(norm, _fused_forward)
        _patch(act, _silu_forward)
    return len(found), f"on (memory.fused_norm={mode}): {len(found)} norm → SiLU pairs of the VAE decoder fused"


def disable(vae: torch.nn.Module) -> None:
    """Undo :func:`enable` (no-op when not fused)."""
    for module in vae.modules():
        if module.__dict__.pop(FUSED, False):
            forward = module.__dict__.get("forward")
            if getattr(forward, "__func__", None) in (_fused_forward, _silu_forward):
                del module.__dict__["forward"]


def tail_norm_act(norm: torch.nn.Module, act: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``act(norm(x))`` by the class forwards, or the fused op when :func:`enable` fused this pair (vae_memory's
    checkpointed decoder tail, which bypasses the instance forwards)."""
    if norm.__dict__.get(FUSED, False):
        return _tagged(_group_norm_silu(norm, x))
    return type(act).forward(act, type(norm).forward(norm, x))
