"""The peft glue: attach the trained LoRA to a denoiser, switch its dropout and adapters, read and write it.

The frozen pretrained model is the same denoiser with its adapters disabled (:func:`adapters_disabled`): there is
no second copy of the weights. Folder formats (what ``pipe.load_lora_weights`` reads) belong to the model family
(``model.family.save_lora`` / ``load_lora``); :func:`save_lora` and :func:`load_lora` go through it.
"""
from __future__ import annotations

import contextlib
import os

import torch

from .core import ADAPTER, LORA_WEIGHTS, DiffusionModel


def add_lora(model: DiffusionModel, *, rank: int, alpha: float, target_modules, dropout: float = 0.0) -> list:
    """Attach a peft LoRA adapter to the denoiser through diffusers' add_adapter; LoRA params are fp32 and the
    only trainable parameters. Returns them."""
    from peft import LoraConfig

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                        init_lora_weights=True)
    try:
        model.denoiser.add_adapter(config, adapter_name=ADAPTER)
    except ValueError as e:
        raise ValueError(f"could not attach LoRA (lora.target_modules={list(target_modules)}): {e}") from e
    params = []
    for name, p in model.denoiser.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
            p.requires_grad_(True)
            params.append(p)
        else:
            p.requires_grad_(False)
    if not params:
        raise ValueError(f"lora.target_modules={list(target_modules)} matched no denoiser module")
    dropout_off(model.denoiser)
    return params


def dropout_off(denoiser) -> None:
    """LoRA dropout layers to eval mode: new peft layers start in training mode, and a LoRA loaded for sampling
    must not drop out. The trainer switches dropout on only inside :func:`lora_dropout_active`."""
    for layer in lora_dropout_layers(denoiser):
        layer.eval()


def lora_dropout_layers(denoiser) -> list[torch.nn.Module]:
    """peft's lora_dropout layers (nn.Dropout, or nn.Identity for p = 0) of every LoRA module in ``denoiser``."""
    layers = []
    for module in denoiser.modules():
        dropout = getattr(module, "lora_dropout", None)
        if isinstance(dropout, torch.nn.ModuleDict):
            layers.extend(dropout.values())
    return layers


@contextlib.contextmanager
def lora_dropout_active(denoiser, active: bool = True):
    """LoRA dropout on (``active``) inside the block, whatever the denoiser's train/eval mode; restored after.

    The trainer keeps the denoiser in eval mode and switches LoRA dropout on only for the calls that carry
    gradient: the no-grad steps of the fine-tuned trajectory then match a no-dropout run, and I0 never sees it."""
    layers = lora_dropout_layers(denoiser) if active else []
    before = [layer.training for layer in layers]
    for layer in layers:
        layer.train(True)
    try:
        yield denoiser
    finally:
        for layer, mode in zip(layers, before):
            layer.train(mode)


@contextlib.contextmanager
def adapters_disabled(denoiser):
    """The frozen pretrained model: the same denoiser with its LoRA adapters switched off."""
    denoiser.disable_adapters()
    try:
        yield denoiser
    finally:
        denoiser.enable_adapters()


def lora_state_dict(denoiser) -> dict[str, torch.Tensor]:
    """Trainable LoRA tensors by parameter name (used by checkpoints)."""
    return {n: p.detach().clone() for n, p in denoiser.named_parameters() if p.requires_grad}


def load_lora_state_dict(denoiser, state: dict[str, torch.Tensor]) -> None:
    """Copy :func:`lora_state_dict` tensors back into ``denoiser``'s parameters."""
    params = dict(denoiser.named_parameters())
    missing = [n for n in state if n not in params]
    if missing:
        raise ValueError(f"checkpoint LoRA tensors not in this denoiser (different lora settings?): {missing[:3]}")
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t)


def export_state(denoiser) -> tuple[dict, dict]:
    """The trained adapter's peft state (float32, CPU, contiguous) and the peft-config metadata that every
    family's ``save_lora_weights`` writes beside it (rank_pattern / alpha_pattern: diffusers 0.34 reads them
    unconditionally)."""
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(denoiser, adapter_name=ADAPTER)
    state = {k: v.detach().float().cpu().contiguous() for k, v in state.items()}
    cfg = denoiser.peft_config[ADAPTER]
    metadata = {"r": cfg.r, "lora_alpha": cfg.lora_alpha, "target_modules": sorted(cfg.target_modules),
                "lora_dropout": cfg.lora_dropout, "init_lora_weights": True,
                "rank_pattern": dict(cfg.rank_pattern or {}), "alpha_pattern": dict(cfg.alpha_pattern or {})}
    return state, metadata


def save_lora(model: DiffusionModel, directory: str) -> None:
    """Write the LoRA so that the family's ``pipe.load_lora_weights(directory)`` loads it."""
    model.family.save_lora(model, directory)


def load_lora(model: DiffusionModel, directory: str, adapter_name: str = ADAPTER) -> None:
    """Load a LoRA folder (written by :func:`save_lora` or diffusers) into the model's denoiser, with the loader
    the family's ``pipe.load_lora_weights`` uses."""
    check_lora_folder(directory)
    model.family.load_lora(model, directory, adapter_name)
    dropout_off(model.denoiser)  # a LoRA saved with lora_dropout > 0 must not drop out while sampling


def check_lora_folder(directory: str) -> None:
    """FileNotFoundError naming what is missing when ``directory`` is not a LoRA folder fnf can read."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"LoRA folder does not exist: {directory!r}")
    if not os.path.isfile(os.path.join(directory, LORA_WEIGHTS)):
        raise FileNotFoundError(f"LoRA folder {directory!r} has no {LORA_WEIGHTS}")
