"""The training loop: an objective's loss on a model family, LoRA, on accelerate.

One process, CPU, or several processes (``accelerate launch`` / ``torchrun``; NCCL or gloo). Per optimizer
step and per micro-batch, on every process: a generator seeded by (seed, step, micro-step, rank), the
objective's loss (fnf/objectives/: Focus-N-Fix / DRaFT-K, Separate-and-Enhance), backward. Then the trained
gradients are averaged across processes (one all-reduce of a flat buffer: DDP's wrapper does not fit K
denoiser calls per backward nor the adapters-off pass), clipped, and AdamW steps. A step whose loss or
gradient is NaN/Inf on any process is skipped on all of them and logged. What differs between models lives in
the model family (fnf/families/, ``model.family``), what differs between objectives in the objective.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from . import checkpoint as ckpt
from . import fsdp, fused_lora, preflight, run_dir, vae_memory
from .config import Config
from .core import DTYPES, DiffusionModel
from .families.base import set_vae_precision
from .families.registry import load_model, model_options
from .images import grid, save_png
from .localize import overlay
from .lora import load_lora_state_dict, lora_dropout_active, lora_state_dict
from .objectives import objective_class
from .placement import NoProbe as Probe
from .placement import encode_before_denoiser, text_encoders_first

AUTOCAST = {"fp16": torch.float16, "bf16": torch.bfloat16}


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


def make_accelerator(cfg: Config):
    from accelerate import Accelerator

    cpu = cfg.train.device == "cpu" or (cfg.train.device == "auto" and not torch.cuda.is_available())
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is visible")
    return Accelerator(cpu=cpu)


class Session:
    """Everything the loop needs, built once from a Config: the model (its family), the objective (its
    parameters, reward, prompts, ...), the optimizer and schedules."""

    def __init__(self, cfg: Config, accelerator=None, model: DiffusionModel | None = None, probe: Probe | None = None):
        self.cfg = cfg
        self.probe = probe = probe or Probe()
        self.acc = accelerator or make_accelerator(cfg)
        self.device = self.acc.device
        self.rank, self.world = self.acc.process_index, self.acc.num_processes
        mp = cfg.memory.mixed_precision
        if mp == "no" and cfg.model.weight_dtype != "fp32":
            mp = cfg.model.weight_dtype  # half-precision weights need autocast
        self.autocast_dtype = AUTOCAST.get(mp)
        objective_cls = objective_class(cfg.objective.name)
        self.fsdp = fsdp.settings(self.acc, cfg)  # FSDP (fnf/fsdp.py): the model stays on the host until sharded
        # Text encoders off the device before the denoiser arrives: the model waits on the host until the prompts
        # are encoded (fnf.placement.encode_before_denoiser, below).
        early = text_encoders_first(cfg)
        load_device = "cpu" if self.fsdp or early else self.device
        if model is None:
            model = load_model(cfg.model.path, kind=cfg.model.kind, weight_dtype=cfg.model.weight_dtype,
                               device=load_device, **model_options(cfg))
        else:  # built in memory by the caller (e.g. benchmarks/train_memory.py): frozen, on the device
            dtype = DTYPES[cfg.model.weight_dtype]
            for module in [model.denoiser, model.vae, *model.text_encoders]:
                module.requires_grad_(False).eval().to(load_device)
                if module is not model.vae and next(module.parameters()).dtype != dtype:
                    module.to(dtype)
        if early and not self.fsdp:
            model.vae.to(self.device)
        self.model = m = model
        # fp16 weights or autocast with a force_upcast VAE config: VAE in fp32, decoded with autocast off.
        if set_vae_precision(m, DTYPES[cfg.model.weight_dtype], fp16_autocast=self.autocast_dtype == torch.float16):
            self.acc.print("fnf: VAE kept in fp32, decode with autocast off (its config sets force_upcast)")
        self.height = cfg.sampling.height or m.native_size
        self.width = cfg.sampling.width or m.native_size
        self.prompt_cache = None   # embeddings encoded before the denoiser reached the device
        if early:
            self.prompt_cache = encode_before_denoiser(
                m, cfg.all_prompts(), cfg.sampling.negative_prompt, height=self.height, width=self.width,
                device=self.device, probe=probe, move_denoiser=not self.fsdp)
        torch.manual_seed(cfg.train.seed)  # identical LoRA init on every process
        self.objective = objective_cls(self)
        self.params = self.objective.params
        fused_mode = cfg.memory.fused_lora
        if self.fsdp:  # the frozen denoiser sharded, the trained parameters replicated on the device
            fused_mode = fsdp.fused_lora_mode(fused_mode)
            fsdp.shard_model(m, self.params, self.fsdp, self.device, log=self.acc.print, move_text_encoders=not early)
        self._broadcast_params()
        # The denoiser stays in eval mode: LoRA dropout acts only in its grad-carrying calls (sampling.denoise).
        checkpointing = cfg.memory.unet_checkpointing or (self.fsdp and self.fsdp.activation_checkpointing)
        if checkpointing and self.objective.denoiser_checkpointing:
            m.denoiser.enable_gradient_checkpointing()
        vae_memory.apply(m.vae, cfg.memory.vae_checkpointing, cfg.memory.vae_tile)
        with lora_dropout_active(m.denoiser):  # patch_lora refuses LoRA dropout in training mode: auto falls back
            self.fused_lora, why = fused_lora.enable(m.denoiser, fused_mode, self.device)
        if cfg.memory.fused_lora != "off":
            self.acc.print(f"fnf: fused LoRA path {why}")
        self.objective.setup(self)
        t = cfg.train
        self.optimizer = torch.optim.AdamW(self.params, lr=t.lr, betas=tuple(t.adam_betas), eps=t.adam_eps,
                                           weight_decay=t.weight_decay)
        warm = t.warmup_steps
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warm) if warm > 0 else 1.0)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.autocast_dtype == torch.float16)

    def __getattr__(self, name: str):
        """The objective's own state (reward, prompts, embeds, pool, ...) reads through the session."""
        objective = self.__dict__.get("objective")
        if objective is None or name.startswith("__"):
            raise AttributeError(name)
        try:
            return getattr(objective, name)
        except AttributeError:
            raise AttributeError(f"{type(self).__name__!r} object (objective {type(objective).__name__}) has no "
                                 f"attribute {name!r}") from None

    @property
    def reward(self):
        return self.objective.reward

    @reward.setter
    def reward(self, fn) -> None:  # e.g. a test's stand-in reward
        self.objective.reward = fn

    # ------------------------------------------------------------------ distributed helpers
    def _dist(self):
        import torch.distributed as dist
        return dist if self.world > 1 and dist.is_initialized() else None

    def _broadcast_params(self):
        dist = self._dist()
        if dist is not None:
            with torch.no_grad():
                for p in self.params:
                    dist.broadcast(p.data, src=0)

    def all_reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        dist = self._dist()
        if dist is not None:
            dist.all_reduce(t)
            t /= self.world
        return t

    def any_process(self, flag: bool) -> bool:
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist = self._dist()
        if dist is not None:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def sync_grads(self) -> None:
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if self._dist() is None:
            return
        flat = torch.cat([p.grad.flatten() for p in self.params])
        self.all_reduce_mean(flat)
        offset = 0
        for p in self.params:
            n = p.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p))
            offset += n

    # ------------------------------------------------------------------ one micro-batch
    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)

    def micro_batch(self, step: int, micro: int):
        """The objective's loss for one micro-batch; returns (loss, stats, finite, images for the grid)."""
        gen = torch.Generator().manual_seed(step_seed(self.cfg.train.seed, step, micro, self.rank))
        loss, stats, images = self.objective.loss(self, gen)
        return loss, stats, bool(torch.isfinite(loss).item()), images

    # ------------------------------------------------------------------ one optimizer step
    def optimizer_step(self, step: int) -> tuple[dict, dict]:
        cfg = self.cfg
        accum = cfg.train.grad_accum
        self.optimizer.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        skipped, reason, last = False, "", {}
        for micro in range(accum):
            loss, stats, finite, last = self.micro_batch(step, micro)
            if self.any_process(not finite):
                skipped, reason = True, "non-finite loss or reward"
                break
            with self.probe.phase("backward"):
                self.scaler.scale(loss / accum).backward()
            for k, v in stats.items():
                totals[k] = totals.get(k, 0.0) + v / accum
        grad_norm = float("nan")
        overflow = False
        with self.probe.phase("optimizer"):
            if not skipped:
                skipped, reason, overflow, grad_norm = self._apply_gradients(step)
            self.optimizer.zero_grad(set_to_none=True)
        keys = sorted(totals)
        if keys:
            vec = self.all_reduce_mean(torch.tensor([totals[k] for k in keys], dtype=torch.float64,
                                                    device=self.device))
            totals = dict(zip(keys, vec.tolist()))
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
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, clip))
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


def save_grid(path: str, last: dict) -> None:
    if "ref" not in last:  # plain DRaFT: no I0, no mask
        save_png(grid([[img.float() for img in last["images"]]]), path)
        return
    rows = []
    for i in range(last["ref"].shape[0]):
        rows.append([last["ref"][i], overlay(last["ref"][i:i + 1], last["mask"][i:i + 1])[0],
                     last["images"][i].float()])
    save_png(grid(rows), path)


class _Logger:
    """JSONL (always) and tensorboard (when installed and asked) on the main process."""

    def __init__(self, out: str, enabled: bool, tensorboard: bool):
        self.enabled = enabled
        self.file = open(os.path.join(out, "log.jsonl"), "a", encoding="utf-8") if enabled else None
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(os.path.join(out, "tensorboard"))
            except Exception:  # noqa: BLE001 - tensorboard is optional
                self.tb = None

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


def train(cfg: Config, accelerator=None, model: DiffusionModel | None = None) -> TrainResult:
    """Run training as configured; returns where things were written and the in-memory model.

    ``model``: an already built :class:`fnf.models.DiffusionModel` to train instead of loading ``model.path``
    (it is frozen, cast to ``model.weight_dtype`` and moved to the device; the LoRA is added to it)."""
    preflight.check(cfg, model=model is None)  # the whole config, before any model is loaded
    run_dir.check(cfg.train.out, cfg.train.resume, cfg.train.overwrite)  # refuse to clobber, before loading
    session = Session(cfg, accelerator, model)
    acc, t = session.acc, cfg.train
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
    logger = _Logger(out, is_main, t.tensorboard)
    history = []
    progress = None
    if is_main and t.progress:
        from tqdm.auto import tqdm
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
                logger.log(record)
            if progress is not None:
                progress.update(1)
                keys = session.objective.progress_keys
                progress.set_postfix({k: f"{record.get(k, float('nan')):.4f}" for k in keys})
            if is_main and t.sample_every and (done % t.sample_every == 0 or done == t.steps) and last:
                save_grid(os.path.join(out, "samples", f"step-{done:07d}.png"), last)
            if t.checkpoint_every and (done % t.checkpoint_every == 0 or done == t.steps):
                ckpt.save(ckpt_root, done, lora_state_dict(session.model.denoiser), session.training_state(),
                          rank=session.rank, is_main=is_main, keep=t.keep_checkpoints, run_id=run.get("run_id"),
                          world_size=session.world)
    finally:
        if progress is not None:
            progress.close()
        logger.close()
    session.objective.finish(session)
    fused_lora.disable(session.model.denoiser)  # back to diffusers' processors: the returned model is plain peft
    vae_memory.reset(session.model.vae)     # and its VAE decodes plainly (no training checkpoints, no tiles)
    lora_dir = session.objective.export(session, out) if is_main else os.path.join(out, "lora")
    acc.wait_for_everyone()
    return TrainResult(out=out, steps_done=t.steps, lora_dir=lora_dir, history=history, model=session.model)
