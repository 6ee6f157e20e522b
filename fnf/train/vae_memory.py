"""Memory levers for the VAE decode that carries the reward's gradient (memory.vae_checkpointing, memory.vae_tile).

``blocks``: diffusers' ``enable_gradient_checkpointing`` (a checkpoint per mid / up block: backward recomputes
a whole up-block at once, at full resolution for the last one). ``resnet`` (the default): a checkpoint per ResNet,
upsampler and mid-block attention of the decoder, and one for its tail (norm, SiLU, conv_out); the same numbers
as the plain decode (the same ops run again in backward), the same recompute cost as ``blocks``, less held memory.
Parameter names are unchanged (instance ``forward`` attributes, no wrapper modules).

``memory.vae_tile`` > 0: diffusers' tiled decode (``AutoencoderKL.tiled_decode``: overlapping tiles of that many
pixels, a quarter of a tile blended linearly) with a checkpoint per tile, so backward holds one tile's decoder
at a time. Differentiable, but not the same image: group norms and the mid-block attention see one tile at a
time. I and I0 both go through ``vae.decode`` and so are decoded the same way.

``memory.fused_norm`` (fnf/train/fused_norm.py): the decoder's GroupNorm/RMSNorm → SiLU pairs as one op that keeps
only its input; set last, inside whatever checkpointing and tiling chose (the tail checkpoint asks it).
"""
from __future__ import annotations

import types

import torch
from torch.utils.checkpoint import checkpoint

from . import fused_norm

MODES = ("off", "blocks", "resnet")
_PATCHED = "_fnf_checkpointed"


def _class_forward(module, *args, **kwargs):
    return type(module).forward(module, *args, **kwargs)


def _checkpointed_call(owner, run, *args, **kwargs):
    """``run(owner, ...)``, under non-reentrant activation checkpointing whenever grad is enabled."""
    if torch.is_grad_enabled():
        return checkpoint(run, owner, *args, use_reentrant=False, **kwargs)
    return run(owner, *args, **kwargs)


def _checkpointed(module: torch.nn.Module) -> None:
    """Make ``module(...)`` run its class forward under checkpointing (a bound method: deepcopy rebinds it)."""
    if not getattr(module, _PATCHED, False):
        module.forward = types.MethodType(_patched_forward, module)
        setattr(module, _PATCHED, True)


def _patched_forward(self, *args, **kwargs):
    return _checkpointed_call(self, _class_forward, *args, **kwargs)


def _tail(decoder, x):
    return _class_forward(decoder.conv_out, fused_norm.tail_norm_act(decoder.conv_norm_out, decoder.conv_act, x))


def _tail_forward(decoder, x):
    """conv_norm_out's forward when the tail is checkpointed: norm, SiLU and conv_out in one checkpoint."""
    return _checkpointed_call(decoder, _tail, x)


def _identity(x, *args, **kwargs):
    return x


def reset(vae) -> None:
    """Undo every lever of this module and diffusers' checkpointing and tiling: the plain full decode."""
    fused_norm.disable(vae)
    for module in vae.modules():
        if getattr(module, _PATCHED, False) or module.__dict__.get("forward") is _identity:
            module.__dict__.pop("forward", None)
            module.__dict__.pop(_PATCHED, None)
    if hasattr(vae, "disable_gradient_checkpointing"):
        vae.disable_gradient_checkpointing()
    if hasattr(vae, "use_tiling"):
        vae.use_tiling = False


def checkpoint_decoder_parts(decoder: torch.nn.Module) -> int:
    """Checkpoint each ResNet, upsampler and mid-block attention of ``decoder`` on its own, and its tail
    (conv_norm_out + conv_act + conv_out as one unit; conv_act and conv_out then pass their input through).
    Returns the number of checkpointed units."""
    units = 0
    blocks = [getattr(decoder, "mid_block", None), *getattr(decoder, "up_blocks", [])]
    for block in [b for b in blocks if b is not None]:
        for name in ("resnets", "attentions", "upsamplers"):
            for module in getattr(block, name, None) or []:
                if module is not None:
                    _checkpointed(module)
                    units += 1
    norm = getattr(decoder, "conv_norm_out", None)  # Qwen-Image's decoder has another tail (norm_out): not checkpointed
    if isinstance(norm, torch.nn.GroupNorm) and not getattr(norm, _PATCHED, False):
        norm.forward = types.MethodType(_tail_forward, decoder)
        decoder.conv_act.forward = decoder.conv_out.forward = _identity
        setattr(norm, _PATCHED, True)
        units += 1
    return units


def checkpoint_whole_decoder(decoder: torch.nn.Module) -> None:
    """One checkpoint around each ``decoder(...)`` call (each tile of a tiled decode), parts nested inside."""
    _checkpointed(decoder)


def enable_tiling(vae, tile: int) -> None:
    """diffusers' tiled decode with ``tile``-pixel tiles (a multiple of the VAE's downscale factor)."""
    channels = getattr(vae.config, "block_out_channels", None)
    if not hasattr(vae, "tiled_decode") or channels is None:
        raise ValueError(f"memory.vae_tile: {type(vae).__name__} has no 2D tiled decode (set memory.vae_tile to 0)")
    factor = 2 ** (len(channels) - 1)
    if tile <= 0 or tile % factor:
        raise ValueError(f"memory.vae_tile: expected a positive multiple of {factor} pixels, got {tile}")
    vae.use_tiling = True
    vae.tile_sample_min_size = tile
    vae.tile_latent_min_size = tile // factor


def apply(vae, checkpointing: str, tile: int = 0, fused: str = "off") -> str:
    """Set the decoder's memory levers: ``checkpointing`` in MODES (True: resnet, False: off, as the config
    reads them); ``tile`` pixels (0: one full decode); ``fused`` (memory.fused_norm: auto | on | off). Returns
    fused_norm's line for the log."""
    if isinstance(checkpointing, bool):
        checkpointing = "resnet" if checkpointing else "off"
    if checkpointing not in MODES:
        raise ValueError(f"memory.vae_checkpointing: expected one of {', '.join(MODES)}, got {checkpointing!r}")
    reset(vae)
    if tile:
        enable_tiling(vae, tile)
    if checkpointing == "blocks":
        vae.enable_gradient_checkpointing()
    elif checkpointing == "resnet":
        checkpoint_decoder_parts(vae.decoder)
    if tile and checkpointing != "off":
        checkpoint_whole_decoder(vae.decoder)
    return fused_norm.enable(vae, fused)[1]
