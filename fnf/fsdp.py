"""The frozen base sharded with FSDP (torch's ``fully_shard``, FSDP2), turned on the accelerate way.

``accelerate launch --config_file configs/accelerate/fsdp.yaml -m fnf train ...`` sets accelerate's FSDP
environment (``ACCELERATE_USE_FSDP``, ``FSDP_*``); :func:`settings` reads it through accelerate's
``FullyShardedDataParallelPlugin`` (the Accelerator's own on GPUs; one built from the same environment on CPU
processes, where accelerate itself ignores FSDP). The Session then loads the model on the host and
:func:`shard_model` shards the denoiser: every instance of the wrap classes (the transformer blocks) is one
FSDP unit, the root takes what is left, and the frozen weights live 1/world on each device, all-gathered per
unit for each forward (and again for backward). The trainable parameters (the LoRA) are FSDP's
``ignored_params``: replicated, full tensors on every process, so gradient sync (the trainer's mean over
processes), clipping, checkpoints, resume and the LoRA export are those of plain multi-process training.

Why not ``accelerator.prepare``: the trainer runs K+ denoiser calls per backward, with the adapters off for
I0, and averages the LoRA gradient itself (fnf/train/distributed.py). FSDP2 shards in place (``model.denoiser``
stays the diffusers model the families call, peft's adapter switches included) and leaves single parameters out (the
LoRA). So fnf applies FSDP2 itself whatever ``fsdp_version`` the config names (accelerate 1.0 knows only FSDP1)
and reads from the plugin only: the wrap classes, resharding after forward, CPU offload and activation
checkpointing.

Every process must make the same denoiser calls in the same order (each is a collective); the trainer does.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass
class FsdpSettings:
    """What fnf takes from accelerate's FSDP plugin (normalised across accelerate versions)."""

    wrap_classes: tuple[str, ...] | None = None   # None: the family's (ModelFamily.fsdp_units)
    reshard_after_forward: bool = True            # FULL_SHARD (True) or SHARD_GRAD_OP (False)
    cpu_offload: bool = False
    activation_checkpointing: bool = False
    fsdp_version: int | None = 2                  # as configured (None: accelerate < 1.6); fnf uses FSDP2 anyway


def enabled_in_env() -> bool:
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def plugin_of(accelerator):
    """The accelerator's FSDP plugin, or one built from accelerate's FSDP environment; None when FSDP is off."""
    state = getattr(accelerator, "state", None)
    plugin = getattr(state, "fsdp_plugin", None)
    if plugin is None and enabled_in_env():  # CPU processes: accelerate leaves FSDP off, fnf does not
        from accelerate.utils import FullyShardedDataParallelPlugin

        plugin = FullyShardedDataParallelPlugin()
    return plugin


def _reshard(plugin) -> bool:
    value = getattr(plugin, "reshard_after_forward", None)
    if isinstance(value, bool):
        return value
    strategy = getattr(plugin, "sharding_strategy", None) or value
    name = getattr(strategy, "name", str(strategy)).upper() if strategy is not None else "FULL_SHARD"
    if name == "FULL_SHARD":
        return True
    if name == "SHARD_GRAD_OP":
        return False
    if name == "NO_SHARD":
        raise ValueError("fsdp_sharding_strategy NO_SHARD keeps a whole model per process: drop the FSDP config "
                         "and launch plain multi-process training (accelerate launch --num_processes N)")
    raise ValueError(f"fsdp sharding strategy {name}: expected FULL_SHARD or SHARD_GRAD_OP "
                     "(fsdp_reshard_after_forward: true|false)")


def _offload(plugin) -> bool:
    value = getattr(plugin, "cpu_offload", False)
    if isinstance(value, bool):
        return value
    if hasattr(value, "offload_params"):  # FSDP1's CPUOffload
        return bool(value.offload_params)
    from torch.distributed.fsdp import CPUOffloadPolicy

    return isinstance(value, CPUOffloadPolicy)


def settings_from_plugin(plugin) -> FsdpSettings:
    names = getattr(plugin, "transformer_cls_names_to_wrap", None)
    if isinstance(names, str):
        names = names.split(",")
    names = tuple(n.strip() for n in names if n.strip()) if names else None
    return FsdpSettings(wrap_classes=names or None, reshard_after_forward=_reshard(plugin),
                        cpu_offload=_offload(plugin),
                        activation_checkpointing=bool(getattr(plugin, "activation_checkpointing", False)),
                        fsdp_version=getattr(plugin, "fsdp_version", None))


def settings(accelerator, cfg=None) -> FsdpSettings | None:
    """The FSDP settings of this launch, or None when FSDP is off. Raises when FSDP is on but torch.distributed
    is not initialized (a plain ``python -m fnf train`` with FSDP variables left in the environment), and for
    config settings FSDP does not combine with (``cfg``, checked before any model is loaded)."""
    plugin = plugin_of(accelerator)
    if plugin is None:
        return None
    if cfg is not None:
        check_config(cfg)
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("FSDP is on (ACCELERATE_USE_FSDP=true) but torch.distributed is not initialized (one "
                           "plain process?): launch with `accelerate launch --config_file configs/accelerate/fsdp.yaml "
                           "--num_processes N -m fnf train ...`, or unset ACCELERATE_USE_FSDP")
    return settings_from_plugin(plugin)


# ----------------------------------------------------------------------------------------------- the plan
def wrap_class_names(model, wrap_classes=None) -> tuple[str, ...]:
    """The class names of the FSDP units: ``wrap_classes`` (fsdp_transformer_layer_cls_to_wrap) or the family's."""
    if wrap_classes:
        return tuple(wrap_classes)
    names = tuple(model.family.fsdp_units or getattr(model.denoiser, "_no_split_modules", None) or ())
    if not names:
        raise ValueError(f"FSDP: no wrap classes known for the {model.kind!r} denoiser "
                         f"({type(model.denoiser).__name__}); set fsdp_transformer_layer_cls_to_wrap in the accelerate "
                         "config")
    return names


def wrap_plan(denoiser: torch.nn.Module, class_names) -> list[str]:
    """Qualified names of the modules that become FSDP units, children before parents (the order
    ``fully_shard`` must be applied in); the root (``""``) comes last. Raises ValueError when a class name
    matches no module of ``denoiser``."""
    class_names = tuple(class_names)
    found = {type(m).__name__ for m in denoiser.modules()}
    unknown = [n for n in class_names if n not in found]
    if unknown:
        present = sorted(n for n in found if n.endswith(("Block", "Block2D", "Layer")))
        raise ValueError(f"fsdp_transformer_layer_cls_to_wrap: {unknown} matched no module of "
                         f"{type(denoiser).__name__}; block classes it has: {present}")
    units = [name for name, m in denoiser.named_modules() if name and type(m).__name__ in class_names]
    units.sort(key=lambda n: -n.count("."))  # deepest first: a nested unit is sharded before its parent
    return units + [""]


def unit_of(plan: list[str], param_name: str) -> str:
    """The FSDP unit that owns parameter ``param_name`` under ``plan``: the deepest unit prefix (root ``""``)."""
    best = ""
    for unit in plan:
        if unit and (param_name == unit or param_name.startswith(unit + ".")) and len(unit) > len(best):
            best = unit
    return best


def shard_model(model, trained, fsdp: FsdpSettings, device, log=print, move_text_encoders: bool = True) -> list[str]:
    """Shard ``model.denoiser`` with ``fully_shard`` per :func:`wrap_plan` on a 1-D mesh over all processes, the
    ``trained`` parameters ignored (replicated) and moved to ``device``; move the VAE (and the text encoders
    unless ``move_text_encoders`` is False: already encoded and offloaded) to ``device``. Returns the plan. The
    model must be on the host (or on ``device``)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    device = torch.device(device)
    denoiser = model.denoiser
    what = type(denoiser).__name__
    plan = wrap_plan(denoiser, wrap_class_names(model, fsdp.wrap_classes))
    trained = list(trained)
    trained_ids = {id(p) for p in trained}
    for p in trained:
        p.data = p.data.to(device)
    offload = fsdp.cpu_offload
    if offload and device.type == "cpu":
        log("fnf: FSDP cpu offload ignored: the processes already run on the CPU")
        offload = False
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    modules = dict(denoiser.named_modules())
    for name in plan:
        module = modules[name]
        ignored = {p for p in module.parameters() if id(p) in trained_ids}
        fully_shard(module, mesh=mesh, reshard_after_forward=fsdp.reshard_after_forward,
                    offload_policy=CPUOffloadPolicy() if offload else OffloadPolicy(),
                    ignored_params=ignored or None)
    for module in [model.vae, *(model.text_encoders if move_text_encoders else [])]:
        module.to(device)
    frozen = sum(p.numel() for p in denoiser.parameters() if id(p) not in trained_ids)
    if fsdp.fsdp_version == 1:
        log("fnf: FSDP: the accelerate config names fsdp_version 1; fnf shards with FSDP2 (fully_shard) either way")
    log(f"fnf: FSDP: {what} sharded over {dist.get_world_size()} processes in {len(plan) - 1} "
        f"units + root ({frozen / 1e6:.1f}M frozen parameters; {sum(p.numel() for p in trained) / 1e6:.2f}M "
        "trained, replicated)")
    return plan


def check_config(cfg) -> None:
    """ValueError for what FSDP does not combine with: a quantized frozen base (bitsandbytes / torchao weights are
    not sharded by ``fully_shard``, and they load onto the GPU, not the host) and ``memory.fused_lora: on``."""
    quantize = getattr(cfg.model, "quantize", "none")
    if quantize != "none":
        raise ValueError(f"model.quantize={quantize!r} with FSDP is not supported (quantized weights are not "
                         "sharded); use one of the two: model.quantize: none, or no FSDP accelerate config")
    fused_lora_mode(cfg.memory.fused_lora)


def fused_lora_mode(mode: str) -> str:
    """memory.fused_lora under FSDP: ``auto`` falls back to off; ``on`` is refused (the fused attention path is
    not tested with sharded weights)."""
    if mode == "on":
        raise ValueError("memory.fused_lora=on is not supported with FSDP (docs/fsdp.md); set memory.fused_lora: "
                         "off or auto")
    return "off"
