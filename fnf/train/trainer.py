"""The trainer: an objective's loss on a model family, LoRA, on accelerate. Build once, then the loop.

One process, CPU, or several processes (``accelerate launch`` / ``torchrun``; NCCL or gloo). :class:`Session` is
built in named steps, in this order: the accelerator, the precision (:func:`resolve_precision`), the model placed
(:func:`place_model`), the trainable parameters (:func:`trainable_params`), sharded and shared
(:func:`share_params`), the memory levers (:func:`set_memory_levers`), the objective's
:class:`~fnf.objectives.base.Context`, the objective, the optimizer.
Per optimizer step and per micro-batch, on every process: a generator seeded by (seed, step, micro-step, rank),
the objective's loss (fnf/objectives/: Focus-N-Fix / DRaFT-K, Separate-and-Enhance), ``accelerator.backward``.
Then the trained gradients are averaged across processes, clipped, and AdamW steps (what accelerate does and
what stays here: fnf/train/distributed.py). A step whose loss or gradient is NaN/Inf on any process is skipped
on all of them and logged. :func:`train` is the loop: resume, steps, log, samples, checkpoints, export.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, is_tensorboard_available
from tqdm.auto import tqdm

from .. import fsdp, lora_formats, precision, preflight
from ..config import Config
from ..core import DTYPES, DiffusionModel, resolve_device
from ..encoding import PromptCache
from ..families.base import set_vae_precision
from ..families.registry import load_model, model_options
from ..images import grid, save_png
from ..localize import overlay
from ..lora import load_lora_state_dict, lora_dropout_active, lora_state_dict
from ..objectives import objective_class
from ..objectives.base import Context, NoProbe, StepOutput
from . import checkpoint as ckpt
from . import fused_lora, run_dir, vae_memory
from .distributed import autocast_dtype, average_gradients, broadcast_params, grad_scaler
from .placement import encode_before_denoiser, text_encoders_first


@dataclass
class TrainResult:
    out: str
    steps_done: int
    lora_dir: str
    history: list = field(default_factory=list)
    model: DiffusionModel | None = None


def step_seed(seed: int, step: int, micro: int, rank: int) -> int:
    """Independent, reproducible seeds per (seed, step, micro-step, rank)."""
    return int(np.random.SeedSequence([seed, step, micro, rank]).generate_state(1, dtype=np.uint64)[0]) >> 1


# ---------------------------------------------------------------------------------------------- build steps
def make_accelerator(cfg: Config) -> Accelerator:
    """The device, the processes, accumulation and the trackers (tensorboard when installed and asked)."""
    cpu = resolve_device(cfg.train.device) == "cpu"
    tensorboard = cfg.train.tensorboard and is_tensorboard_available()
    return Accelerator(cpu=cpu, gradient_accumulation_steps=cfg.train.grad_accum,
                       log_with="tensorboard" if tensorboard else None,
                       project_config=ProjectConfiguration(project_dir=cfg.train.out, logging_dir=cfg.train.out))


def resolve_precision(cfg: Config, acc) -> Config:
    """model.weight_dtype / memory.mixed_precision 'auto' resolved on the accelerator's device (fnf/precision.py),
    said once; the returned config is the run's."""
    capability = precision.device_capability(acc.device)
    resolved = precision.resolve(cfg, capability)
    acc.print(f"fnf: {precision.describe(cfg, resolved, capability)}")
    return resolved


def image_size(cfg: Config, model: DiffusionModel) -> tuple[int, int]:
    return cfg.sampling.height or model.native_size, cfg.sampling.width or model.native_size


def place_model(cfg: Config, model: DiffusionModel | None, acc, sharded: bool, probe,
                dtype: torch.dtype | None) -> tuple[DiffusionModel, PromptCache | None]:
    """Load the model (or freeze the given one) where the placement policy puts it: on the host while FSDP will
    shard it or the text encoders go first (the prompts are then encoded before the denoiser reaches the device:
    the returned cache); the VAE's precision set."""
    early = text_encoders_first(cfg)
    load_device = "cpu" if sharded or early else acc.device
    if model is None:
        model = load_model(cfg.model.path, kind=cfg.model.kind, weight_dtype=cfg.model.weight_dtype,
                           device=load_device, **model_options(cfg))
    else:  # built in memory by the caller (e.g. benchmarks/train_memory.py): frozen, on the device
        weights = DTYPES[cfg.model.weight_dtype]
        for module in [model.denoiser, model.vae, *model.text_encoders]:
            module.requires_grad_(False).eval().to(load_device)
            if module is not model.vae and next(module.parameters()).dtype != weights:
                module.to(weights)
    if early and not sharded:
        model.vae.to(acc.device)
    # fp16 weights or autocast with a force_upcast VAE config: VAE in fp32, decoded with autocast off.
    if set_vae_precision(model, DTYPES[cfg.model.weight_dtype], fp16_autocast=dtype == torch.float16):
        acc.print("fnf: VAE kept in fp32, decode with autocast off (its config sets force_upcast)")
    cache = None
    if early:
        height, width = image_size(cfg, model)
        cache = encode_before_denoiser(model, cfg.all_prompts(), cfg.sampling.negative_prompt, height=height,
                                       width=width, device=acc.device, probe=probe, move_denoiser=not sharded)
    return model, cache


def trainable_params(cfg: Config, model: DiffusionModel, probe) -> list[torch.Tensor]:
    """The objective's trainable parameters (LoRA, or sepen's to_k), initialised alike on every process."""
    torch.manual_seed(cfg.train.seed)
    return objective_class(cfg.objective.name).add_params(cfg, model, probe)


def share_params(cfg: Config, model: DiffusionModel, params, fsdp_settings, acc) -> None:
    """Under FSDP the frozen denoiser is sharded and the trained parameters replicated; rank 0's values everywhere."""
    if fsdp_settings:
        fsdp.shard_model(model, params, fsdp_settings, acc.device, log=acc.print,
                         move_text_encoders=not text_encoders_first(cfg))
    broadcast_params(params, acc.num_processes)


def set_memory_levers(cfg: Config, model: DiffusionModel, fsdp_settings, acc) -> bool:
    """Denoiser and VAE checkpointing, VAE tiles and fused norms, the fused LoRA path; returns whether the fused
    LoRA path is on.

    The denoiser stays in eval mode: LoRA dropout acts only in its grad-carrying calls (sampling.draft_k, draft_lv)."""
    checkpointing = cfg.memory.denoiser_checkpointing or (fsdp_settings and fsdp_settings.activation_checkpointing)
    if checkpointing and objective_class(cfg.objective.name).denoiser_checkpointing:
        model.denoiser.enable_gradient_checkpointing()
    fused = vae_memory.apply(model.vae, cfg.memory.vae_checkpointing, cfg.memory.vae_tile, cfg.memory.fused_norm)
    if cfg.memory.fused_norm != "off":
        acc.print(f"fnf: fused VAE norm {fused}")
    mode = fsdp.fused_lora_mode(cfg.memory.fused_lora) if fsdp_settings else cfg.memory.fused_lora
    with lora_dropout_active(model.denoiser):  # patch_lora refuses LoRA dropout in training mode: auto falls back
        on, why = fused_lora.enable(model.denoiser, mode, acc.device)
    if cfg.memory.fused_lora != "off":
        acc.print(f"fnf: fused LoRA path {why}")
    return on


def make_optimizer(cfg: Config, params) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    t = cfg.train
    optimizer = torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.adam_betas), eps=t.adam_eps,
                                  weight_decay=t.weight_decay)
    warm = t.warmup_steps
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warm) if warm > 0 else 1.0)
    return optimizer, schedule


class Session:
    """The trainer's state, built once from a Config in the order of the steps above; then one
    :meth:`optimizer_step` per training step."""

    def __init__(self, cfg: Config, accelerator=None, model: DiffusionModel | None = None, probe=None):
        self.probe = probe or NoProbe()
        self.acc = acc = accelerator or make_accelerator(cfg)
        self.cfg = cfg = resolve_precision(cfg, acc)
        acc.gradient_accumulation_steps = cfg.train.grad_accum  # accelerator.backward divides the loss by it
        self.device, self.rank, self.world = acc.device, acc.process_index, acc.num_processes
        self.fsdp = fsdp.settings(acc, cfg)  # FSDP (fnf/fsdp.py): the model stays on the host until sharded
        dtype = autocast_dtype(cfg)
        self.model, prompt_cache = place_model(cfg, model, acc, bool(self.fsdp), self.probe, dtype)
        self.params = trainable_params(cfg, self.model, self.probe)
        share_params(cfg, self.model, self.params, self.fsdp, acc)
        fused = set_memory_levers(cfg, self.model, self.fsdp, acc)
        height, width = image_size(cfg, self.model)
        self.ctx = Context(model=self.model, device=self.device, autocast_dtype=dtype, probe=self.probe,
                           height=height, width=width, is_main=acc.is_main_process, prompt_cache=prompt_cache,
                           fused_lora=fused)
        self.objective = objective_class(cfg.objective.name)(cfg, self.ctx)
        self.optimizer, self.lr_schedule = make_optimizer(cfg, self.params)
        self.scaler = grad_scaler(acc, dtype)

    # ------------------------------------------------------------------ across processes
    def any_process(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any process (accelerate's trigger; every process must call this alike)."""
        if flag:
            self.acc.set_trigger()
        return self.acc.check_trigger()

    def mean_over_processes(self, stats: dict) -> dict:
        keys = sorted(stats)
        if not keys:
            return stats
        vec = torch.tensor([stats[k] for k in keys], dtype=torch.float64, device=self.device)
        if self.world > 1:
            vec = self.acc.reduce(vec, reduction="mean")
        return dict(zip(keys, vec.tolist()))

    def sync_grads(self) -> None:
        average_gradients(self.acc, self.params, self.world)

    # ------------------------------------------------------------------ one micro-batch
    def micro_batch(self, step: int, micro: int) -> StepOutput:
        """The objective's loss for one micro-batch, from its own (seed, step, micro-step, rank) generator."""
        gen = torch.Generator().manual_seed(step_seed(self.cfg.train.seed, step, micro, self.rank))
        return self.objective.loss(gen)

    # ------------------------------------------------------------------ one optimizer step
    def optimizer_step(self, step: int) -> tuple[dict, dict]:
        """Accumulate, sync, clip, step; returns (the log record, the last micro-batch's images)."""
        accum = self.cfg.train.grad_accum
        self.optimizer.zero_grad(set_to_none=True)
        self.objective.start_step(step)
        totals: dict[str, float] = {}
        skipped, reason, last = False, "", {}
        for micro in range(accum):
            out = self.micro_batch(step, micro)
            last = out.images
            if self.any_process(not bool(torch.isfinite(out.loss).item())):
                skipped, reason = True, "non-finite loss or reward"
                break
            with self.probe.phase("backward"):
                self.acc.backward(self.scaler.scale(out.loss))  # divided by grad_accum
            for k, v in out.stats.items():
                totals[k] = totals.get(k, 0.0) + v / accum
        grad_norm = float("nan")
        overflow = False
        with self.probe.phase("optimizer"):
            if not skipped:
                skipped, reason, overflow, grad_norm = self._apply_gradients(step)
            self.optimizer.zero_grad(set_to_none=True)
        totals = self.mean_over_processes(totals)
        record = {"step": step + 1, **totals, "grad_norm": grad_norm, "lr": self.optimizer.param_groups[0]["lr"],
                  "skipped": skipped, "scaler_overflow": overflow}
        if self.scaler.is_enabled():
            record["grad_scale"] = float(self.scaler.get_scale())
        if skipped:
            record["skip_reason"] = reason
        return record, last

    def _apply_gradients(self, step: int) -> tuple[bool, str, bool, float]:
        """Sync, unscale, clip and step; returns (skipped, reason, scaler_overflow, grad_norm).

        Non-finite gradients are the fp16 grad scaler's own overflow when it is on (its scale was too high: no
        optimizer step, scaler.update lowers the scale; not a data problem, logged with ``scaler_overflow: true``),
        else a "non-finite gradient" skip. The decision is taken on all processes alike; the parameters after a
        step are checked finite (a non-finite one raises before any checkpoint holds it)."""
        self.sync_grads()
        self.scaler.unscale_(self.optimizer)
        clip = self.cfg.train.grad_clip if self.cfg.train.grad_clip > 0 else float("inf")
        grad_norm = float(self.acc.clip_grad_norm_(self.params, clip))
        if not self.any_process(not math.isfinite(grad_norm)):
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.lr_schedule.step()
            if self.any_process(not bool(torch.stack([torch.isfinite(p).all() for p in self.params]).all())):
                raise FloatingPointError(f"step {step + 1}: the trained parameters became non-finite after a "
                                         "finite-gradient step; lower train.lr or set train.grad_clip")
            return False, "", False, grad_norm
        if self.scaler.is_enabled():  # no optimizer step; update() backs the scale off (unscale_ saw the inf)
            before = self.scaler.get_scale()
            self.scaler.update()
            after = self.scaler.get_scale()
            how = f"scale lowered to {after:g}" if after < before else f"scale {after:g}"
            return True, f"fp16 grad-scaler overflow ({how})", True, grad_norm
        return True, "non-finite gradient", False, grad_norm

    # ------------------------------------------------------------------ state
    def training_state(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "lr_schedule": self.lr_schedule.state_dict(),
                "scaler": self.scaler.state_dict()}

    def restore(self, folder: str) -> int:
        # safetensors refuses "cpu:0", the device accelerate gives CPU processes of a multi-process run
        step, lora, state = ckpt.load(folder, rank=self.rank,
                                      device="cpu" if self.device.type == "cpu" else self.device)
        load_lora_state_dict(self.model.denoiser, lora)
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        self.scaler.load_state_dict(state["scaler"])
        return step


# ---------------------------------------------------------------------------------------------- the loop's outputs
def save_grid(path: str, last: dict) -> None:
    if "ref" not in last:  # plain DRaFT: no I0, no mask
        save_png(grid([[img.float() for img in last["images"]]]), path)
        return
    rows = []
    for i in range(last["ref"].shape[0]):
        rows.append([last["ref"][i], overlay(last["ref"][i:i + 1], last["mask"][i:i + 1])[0],
                     last["images"][i].float()])
    save_png(grid(rows), path)


class RunLog:
    """``log.jsonl`` (the run's record, main process) and the accelerator's trackers (``log_with``: tensorboard
    under ``<out>/tensorboard``), which get the numeric fields."""

    def __init__(self, out: str, acc):
        self.acc = acc
        self.file = open(os.path.join(out, "log.jsonl"), "a", encoding="utf-8") if acc.is_main_process else None
        acc.init_trackers("tensorboard")

    def log(self, record: dict) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        self.acc.log({k: v for k, v in record.items()
                      if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}, step=record["step"])

    def close(self) -> None:
        if self.file:
            self.file.close()
        for tracker in self.acc.trackers:  # not accelerator.end_training(): that also ends the process group
            tracker.finish()
        self.acc.trackers = []             # a later run on the same accelerator starts its own


def resumed_precision(cfg: Config) -> dict | None:
    """The precision recorded in the checkpoint a resume starts from (None: no resume, or none recorded)."""
    if not cfg.train.resume:
        return None
    try:
        folder = run_dir.resolve(cfg.train.resume, cfg.train.out)
    except (OSError, ValueError):
        return None
    meta = ckpt.read_meta(folder) if folder else None
    return (meta or {}).get("precision")


def train(cfg: Config, accelerator=None, model: DiffusionModel | None = None) -> TrainResult:
    """Run training as configured; returns where things were written and the in-memory model.

    ``model``: an already built :class:`fnf.core.DiffusionModel` to train instead of loading ``model.path``
    (it is frozen, cast to ``model.weight_dtype`` and moved to the device; the LoRA is added to it)."""
    preflight.check(cfg, model=model is None)  # the whole config, before any model is loaded
    run_dir.check(cfg.train.out, cfg.train.resume, cfg.train.overwrite)  # refuse to clobber, before loading
    started = resumed_precision(cfg)
    session = Session(precision.keep_recorded(cfg, started), accelerator, model)
    cfg = session.cfg  # precision resolved: saved in config.yaml and every checkpoint
    lora_formats.check_formats(session.model.family.name, cfg.train.export_formats)  # before any step
    acc, t = session.acc, cfg.train
    if started and started != precision.recorded(cfg):
        acc.print(f"fnf: the resumed run started with {started}; now {precision.recorded(cfg)} (set explicitly)")
    out = t.out
    is_main = acc.is_main_process
    if is_main:
        run_dir.begin(out, t.resume, t.overwrite)  # run.json; on overwrite the earlier run moves aside
        run_dir.write_config(cfg, out)
    acc.wait_for_everyone()
    run = run_dir.read_run(out)
    ckpt_root = run_dir.checkpoint_root(out)
    start = 0
    folder = run_dir.resolve(t.resume, out, run)
    if folder is not None:
        start = session.restore(folder)
        acc.print(f"fnf: resumed from {folder} at step {start}")
    elif t.resume:
        acc.print(f"fnf: --resume latest: no checkpoint of this run under {ckpt_root}; starting at step 0")
    log = RunLog(out, acc)
    history = []
    progress = None
    if is_main and t.progress:
        progress = tqdm(total=t.steps, initial=start, desc="fnf train", dynamic_ncols=True)
    try:
        for step in range(start, t.steps):
            began = time.time()
            record, last = session.optimizer_step(step)
            record["seconds"] = round(time.time() - began, 3)
            done = step + 1
            history.append(record)
            if record["skipped"]:
                acc.print(f"fnf: step {done} skipped ({record['skip_reason']})")
            if done % t.log_every == 0 or record["skipped"] or done == t.steps:
                log.log(record)
            if progress is not None:
                progress.update(1)
                keys = session.objective.progress_keys
                progress.set_postfix({k: f"{record.get(k, float('nan')):.4f}" for k in keys})
            if is_main and t.sample_every and (done % t.sample_every == 0 or done == t.steps) and last:
                save_grid(os.path.join(out, "samples", f"step-{done:07d}.png"), last)
            if t.checkpoint_every and (done % t.checkpoint_every == 0 or done == t.steps):
                ckpt.save(ckpt_root, done, lora_state_dict(session.model.denoiser), session.training_state(),
                          rank=session.rank, is_main=is_main, keep=t.keep_checkpoints, run_id=run.get("run_id"),
                          world_size=session.world, precision=precision.recorded(cfg))
    finally:
        if progress is not None:
            progress.close()
        log.close()
    session.objective.finish()
    fused_lora.disable(session.model.denoiser)  # back to diffusers' processors: the returned model is plain peft
    vae_memory.reset(session.model.vae)     # and its VAE decodes plainly (no training checkpoints, no tiles)
    lora_dir = session.objective.export(out) if is_main else os.path.join(out, "lora")
    if is_main and cfg.train.export_formats:   # <out>/lora-<format>.safetensors beside the LoRA folder
        for fmt in cfg.train.export_formats:
            lora_formats.export(lora_dir, fmt, os.path.join(out, f"lora-{fmt}.safetensors"),
                                family=session.model.family.name, overwrite=True)
    acc.wait_for_everyone()
    return TrainResult(out=out, steps_done=t.steps, lora_dir=lora_dir, history=history, model=session.model)
