"""``auto`` precision: what ``model.weight_dtype`` and ``memory.mixed_precision`` mean on a device.

* CPU (and any non-CUDA device): fp32 weights, no autocast (the tests, the toy demo and every CPU figure).
* CUDA with bf16 (compute capability >= 8.0: A100, H100, RTX 30xx/40xx): bf16 weights, bf16 autocast.
* Older CUDA (T4, V100): fp16 weights, fp16 autocast with the grad scaler (the VAE upcast rules of
  :func:`fnf.families.base.set_vae_precision` apply).

An explicit value is kept; ``auto`` next to an explicit one follows it (``weight_dtype auto`` with
``mixed_precision no`` is fp32; ``mixed_precision auto`` with half weights autocasts in their dtype).
"""
from __future__ import annotations

import copy

import torch

AUTO = "auto"
BF16_CAPABILITY = (8, 0)


def device_capability(device) -> tuple[int, int] | None:
    """The CUDA compute capability of ``device`` (None for a non-CUDA device)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return tuple(torch.cuda.get_device_capability(device))


def resolve_values(weight_dtype: str, mixed_precision: str, capability) -> tuple[str, str]:
    """(weight_dtype, mixed_precision) with ``auto`` resolved for a device of ``capability`` (None: CPU)."""
    if capability is None:
        return ("fp32" if weight_dtype == AUTO else weight_dtype,
                "no" if mixed_precision == AUTO else mixed_precision)
    half = "bf16" if tuple(capability) >= BF16_CAPABILITY else "fp16"
    if weight_dtype == AUTO:
        weight_dtype = {"no": "fp32", "fp16": "fp16", "bf16": "bf16"}.get(mixed_precision, half)
    if mixed_precision == AUTO:
        mixed_precision = weight_dtype if weight_dtype != "fp32" else half
    return weight_dtype, mixed_precision


def is_resolved(cfg) -> bool:
    return AUTO not in (cfg.model.weight_dtype, cfg.memory.mixed_precision)


def resolve(cfg, capability):
    """A copy of ``cfg`` with the precision keys resolved for ``capability`` (``cfg`` itself when nothing is
    ``auto``)."""
    if is_resolved(cfg):
        return cfg
    cfg = copy.deepcopy(cfg)
    cfg.model.weight_dtype, cfg.memory.mixed_precision = resolve_values(cfg.model.weight_dtype,
                                                                         cfg.memory.mixed_precision, capability)
    return cfg


def keep_recorded(cfg, recorded: dict | None):
    """A resumed run: each ``auto`` key takes the value the run started with (``recorded``, from its
    checkpoint); explicit keys stay as given."""
    if not recorded or is_resolved(cfg):
        return cfg
    cfg = copy.deepcopy(cfg)
    if cfg.model.weight_dtype == AUTO and recorded.get("weight_dtype"):
        cfg.model.weight_dtype = recorded["weight_dtype"]
    if cfg.memory.mixed_precision == AUTO and recorded.get("mixed_precision"):
        cfg.memory.mixed_precision = recorded["mixed_precision"]
    return cfg


def recorded(cfg) -> dict:
    """What a checkpoint records (a resolved cfg)."""
    return {"weight_dtype": cfg.model.weight_dtype, "mixed_precision": cfg.memory.mixed_precision}


def where(capability) -> str:
    if capability is None:
        return "CPU"
    return f"CUDA sm_{capability[0]}{capability[1]}" + (", bf16" if tuple(capability) >= BF16_CAPABILITY
                                                        else ", no bf16")


def describe(given, resolved, capability) -> str:
    """One line: the precision a run uses and where ``auto`` came from."""
    autos = [k for k, v in (("weights", given.model.weight_dtype), ("autocast", given.memory.mixed_precision))
             if v == AUTO]
    mp = resolved.memory.mixed_precision
    line = (f"precision: weights {resolved.model.weight_dtype}, autocast {'off' if mp == 'no' else mp}"
            + (" with the fp16 grad scaler" if mp == "fp16" or (mp == "no" and resolved.model.weight_dtype == "fp16")
               else ""))
    if autos:
        line += f" ({' and '.join(autos)} auto on {where(capability)})"
    return line
