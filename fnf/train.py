"""The training loop: DRaFT-K + LoRA with the Focus-N-Fix region penalty, on accelerate.

One process, CPU, or several processes (``accelerate launch`` / ``torchrun``; NCCL or gloo). Per optimizer
step and per micro-batch, on every process:

1. draw prompts and x_T from a generator seeded by (seed, step, micro-step, rank);
2. I0 = pretrained sample (same UNet, adapters off, no grad);
3. M(I0) = localizer mask (no grad);
4. I = fine-tuned sample, DRaFT-K (last K steps and the VAE decode with grad);
5. loss = -w r(I, c) + beta ||(1 - M) (I0 - I)||_F, backward.

With ``memory.fused_lora`` on (fnf/fused_lora.py) steps 2 and 4 share their no-grad denoising steps: one UNet
batch per step holds the I0 rows (LoRA scale 0) and the fine-tuned rows (scale 1), see
``sampling.denoise_batched``; I0 then finishes alone and the fine-tuned trajectory runs its grad steps as before.

Then the LoRA gradients are averaged across processes (one all-reduce of a flat buffer: DDP's wrapper
does not fit K UNet calls per backward nor the adapters-off pass), clipped, and AdamW steps. A step whose
loss, reward or gradient is NaN/Inf on any process is skipped on all of them and logged.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from . import checkpoint as ckpt
from . import fused_lora, preflight, run_dir
from .config import Config
from .images import grid, save_png
from .localize import localizer_from_config, overlay
from .models import (DTYPES, DiffusionModel, adapters_disabled, add_lora, encode_prompts, load_lora_state_dict,
                     load_model, lora_dropout_active, lora_state_dict, offload_text_encoders, save_lora_diffusers,
                     set_vae_precision)
from .objectives import focus_n_fix_loss
from .rewards import build_reward, evaluate, prepare_reward
from .sampling import decode, denoise, denoise_batched, grad_start, initial_latents

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


class Probe:
    """The trainer's estimation hook (``fnf estimate-memory``, fnf/memory/): the Session labels its phases and says
    where models live. This default does nothing; the estimator's probe counts device memory by phase."""

    def phase(self, name: str, host: bool = False):
        """Context for one phase of a step (``host``: what is allocated inside stays on the host)."""
        return contextlib.nullcontext()

    def placed(self, modules, on_device: bool) -> None:
        """``modules`` (a list of nn.Modules) now live on the device (True) or on the host (False)."""


def make_accelerator(cfg: Config):
    from accelerate import Accelerator

    cpu = cfg.train.device == "cpu" or (cfg.train.device == "auto" and not torch.cuda.is_available())
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is visible")
    return Accelerator(cpu=cpu)


class Session:
    """Everything the loop needs, built once from a Config: model with LoRA, reward, localizer, prompt
    embeddings, optimizer and schedules."""

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
        if model is None:
            model = load_model(cfg.model.path, kind=cfg.model.kind, weight_dtype=cfg.model.weight_dtype,
                               device=self.device)
        else:  # built in memory by the caller (e.g. benchmarks/train_memory.py): frozen, on the device
            dtype = DTYPES[cfg.model.weight_dtype]
            for module in [model.unet, model.vae, *model.text_encoders]:
                module.requires_grad_(False).eval().to(self.device)
                if module is not model.vae and next(module.parameters()).dtype != dtype:
                    module.to(dtype)
        self.model = model
        m = self.model
        # fp16 weights or autocast with a force_upcast VAE config: VAE in fp32, decoded with autocast off.
        if set_vae_precision(m, DTYPES[cfg.model.weight_dtype], fp16_autocast=self.autocast_dtype == torch.float16):
            self.acc.print("fnf: VAE kept in fp32, decode with autocast off (its config sets force_upcast)")
        self.height = cfg.sampling.height or m.native_size
        self.width = cfg.sampling.width or m.native_size
        torch.manual_seed(cfg.train.seed)  # identical LoRA init on every process
        self.sepen = None
        self.plain_draft = False   # set by _setup_fnf
        if cfg.objective.name == "sepen":  # Separate-and-Enhance: only attn2.to_k trains (fnf/sepen/)
            from .sepen.train_step import SepenObjective
            self.sepen = SepenObjective(cfg, m)
            self.params = self.sepen.params
        else:
            with probe.phase("LoRA params"):
                self.params = add_lora(m, rank=cfg.lora.rank, alpha=cfg.lora.alpha,
                                       target_modules=cfg.lora.target_modules, dropout=cfg.lora.dropout)
        self._broadcast_params()
        # The UNet stays in eval mode: LoRA dropout acts only in the grad-carrying UNet calls (sampling.denoise).
        if cfg.memory.unet_checkpointing and self.sepen is None:  # sepen: see fnf/sepen/train_step.py
            m.unet.enable_gradient_checkpointing()
        if cfg.memory.vae_checkpointing:
            m.vae.enable_gradient_checkpointing()
        with lora_dropout_active(m.unet):  # patch_lora refuses LoRA dropout in training mode: auto falls back
            self.fused_lora, why = fused_lora.enable(m.unet, cfg.memory.fused_lora, self.device)
        if cfg.memory.fused_lora != "off":
            self.acc.print(f"fnf: fused LoRA path {why}")
        if self.sepen is not None:
            self.sepen.install(m.unet)
        else:
            self._setup_fnf(cfg, m)
        t = cfg.train
        self.optimizer = torch.optim.AdamW(self.params, lr=t.lr, betas=tuple(t.adam_betas), eps=t.adam_eps,
                                           weight_decay=t.weight_decay)
        warm = t.warmup_steps
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warm) if warm > 0 else 1.0)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.autocast_dtype == torch.float16)

    def _setup_fnf(self, cfg: Config, m: DiffusionModel) -> None:
        """Reward, localizer and prompt embeddings of the Focus-N-Fix / DRaFT objective."""
        # beta = 0 with no localizer is plain DRaFT-K: the pretrained trajectory I0 is not needed at all.
        self.plain_draft = cfg.objective.beta == 0 and cfg.localize.spec == "none"
        with self.probe.phase("reward build", host=True):  # built on the host, then moved
            reward = build_reward(cfg.reward.spec, **cfg.reward.kwargs)
        self.reward = prepare_reward(reward, self.device)
        if isinstance(self.reward, torch.nn.Module):
            self.probe.placed([self.reward], on_device=True)
        with self.probe.phase("localizer build"):
            self.localizer = localizer_from_config(cfg, self.reward)
        self.prompts = cfg.all_prompts()
        if not self.prompts:
            raise ValueError("no prompts: set train.prompts or train.prompts_file")
        with self.probe.phase("prompt encoding"):
            self.embeds = encode_prompts(m, self.prompts, height=self.height, width=self.width)
            neg = cfg.sampling.negative_prompt
            self.negative = encode_prompts(m, [neg], height=self.height, width=self.width,
                                           zero=(m.kind == "sdxl" and not neg and m.force_zeros_for_empty_prompt))
        self.pool = None
        if cfg.train.seeds_per_prompt > 0:
            from .reference_pool import ReferencePool
            with self.probe.phase("reference pool"):
                self.pool = ReferencePool(
                    m, self.embeds, self.negative, self.localizer, self.prompts,
                    seeds_per_prompt=cfg.train.seeds_per_prompt, seed=cfg.train.seed, height=self.height,
                    width=self.width, steps=cfg.sampling.steps, guidance_scale=cfg.sampling.guidance_scale,
                    batch_size=cfg.train.batch_size, device=self.device, autocast=self.autocast,
                    references=not self.plain_draft, progress=cfg.train.progress and self.acc.is_main_process)
        if cfg.memory.offload_text_encoder:
            offload_text_encoders(m)
            self.probe.placed(m.text_encoders, on_device=False)

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
        """Sample I0, M(I0) and I for one micro-batch; return (loss, stats, images dict)."""
        cfg, m, phase = self.cfg, self.model, self.probe.phase
        s = cfg.sampling
        seed = step_seed(cfg.train.seed, step, micro, self.rank)
        gen = torch.Generator().manual_seed(seed)
        if self.sepen is not None:  # its LoRA-on UNet call is the grad-carrying one (I0 runs adapters off)
            with lora_dropout_active(m.unet):
                return self.sepen.micro_batch(self, gen)
        b = cfg.train.batch_size
        if self.pool is not None:  # entries of the fixed (prompt, seed) pool
            entries = torch.randint(self.pool.size, (b,), generator=gen)
            idx = self.pool.prompt_index[entries]
            x_T = self.pool.latents(entries, self.device)
        else:
            idx = torch.randint(len(self.prompts), (b,), generator=gen)
            x_T = initial_latents(m, b, self.height, self.width, gen, self.device)
        prompts = [self.prompts[i] for i in idx.tolist()]
        cond = self.embeds.index(idx.to(self.embeds.hidden.device))
        uncond = self.negative.repeat(b)
        noise_seed = int(torch.randint(2**62, (1,), generator=gen))
        # I0 and I draw the same DDIM noise (eta > 0): one generator each, seeded alike.
        gen_ref, gen_ft = torch.Generator().manual_seed(noise_seed), torch.Generator().manual_seed(noise_seed)
        kw = dict(steps=s.steps, guidance_scale=s.guidance_scale, eta=s.eta)
        if self.plain_draft:  # plain DRaFT-K: no pretrained trajectory I0, no mask, no penalty
            x_ft, start = x_T, 0
        elif self.pool is not None:  # I0 and its mask were computed before training
            ref, heat, mask = self.pool.lookup(entries, self.device)
            x_ft, start = x_T, 0
        elif self.fused_lora:  # shared no-grad steps in one batch; x_ft is I's latent at its first grad step
            with torch.no_grad(), self.autocast():
                with phase("no-grad sampling"):
                    z_ref, x_ft = denoise_batched(m, x_T, cond, uncond, grad_steps=s.truncation_k,
                                                  lv_copies=s.lv_copies, generators=(gen_ref, gen_ft), **kw)
                with phase("I0 decode"):
                    ref = decode(m, z_ref).float()
            start = grad_start(s.steps, s.truncation_k, s.lv_copies)
        else:
            with torch.no_grad(), adapters_disabled(m.unet), self.autocast():
                with phase("no-grad sampling"):
                    z_ref = denoise(m, x_T, cond, uncond, grad_steps=0, generator=gen_ref, **kw)
                with phase("I0 decode"):
                    ref = decode(m, z_ref).float()
            x_ft, start = x_T, 0
        if not self.plain_draft and self.pool is None:  # before the grad-carrying steps: its backward peaks alone
            with phase("localizer"):
                heat, mask = self.localizer(ref, prompts, idx)
        with self.autocast():
            with phase("denoiser (grad steps)"):  # the fine-tuned trajectory; its last K steps carry grad
                z = denoise(m, x_ft, cond, uncond, grad_steps=s.truncation_k, lv_copies=s.lv_copies,
                            generator=gen_ft, start=start, **kw)
            with phase("VAE decode"):
                images = decode(m, z)
        copies = max(1, s.lv_copies)
        with self.autocast(), phase("reward"):
            rewards = evaluate(self.reward, images, prompts * copies, checkpoint=cfg.memory.reward_checkpointing)
        if self.plain_draft:
            loss = -cfg.reward.weight * rewards.float().mean()
            stats = {"reward": rewards.detach().float().mean().item(), "loss": loss.detach().item()}
            last = {"images": images[:b]}
        else:
            loss, stats = focus_n_fix_loss(rewards.float(), images.float(), ref.repeat(copies, 1, 1, 1),
                                           mask.repeat(copies, 1, 1, 1), beta=cfg.objective.beta,
                                           reward_weight=cfg.reward.weight, squared=cfg.objective.squared)
            last = {"ref": ref, "mask": mask, "heat": heat, "images": images[:b]}
        finite = bool(torch.isfinite(loss).item() and torch.isfinite(rewards).all().item())
        return loss, stats, finite, last

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
        step, lora, state = ckpt.load(folder, rank=self.rank, device=self.device)
        load_lora_state_dict(self.model.unet, lora)
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
                keys = ("separate", "enhance") if session.sepen is not None else ("reward", "penalty")
                progress.set_postfix({k: f"{record.get(k, float('nan')):.4f}" for k in keys})
            if is_main and t.sample_every and (done % t.sample_every == 0 or done == t.steps) and last:
                save_grid(os.path.join(out, "samples", f"step-{done:07d}.png"), last)
            if t.checkpoint_every and (done % t.checkpoint_every == 0 or done == t.steps):
                ckpt.save(ckpt_root, done, lora_state_dict(session.model.unet), session.training_state(),
                          rank=session.rank, is_main=is_main, keep=t.keep_checkpoints, run_id=run.get("run_id"),
                          world_size=session.world)
    finally:
        if progress is not None:
            progress.close()
        logger.close()
    lora_dir = os.path.join(out, "lora")
    if session.sepen is not None:
        session.sepen.uninstall(session.model.unet)
    fused_lora.disable(session.model.unet)  # back to diffusers' processors: the returned model is plain peft
    if is_main and session.sepen is not None:
        lora_dir = session.sepen.export(session.model, out)  # LoRA folder or to_k.safetensors
    elif is_main:
        save_lora_diffusers(session.model, lora_dir)
    acc.wait_for_everyone()
    return TrainResult(out=out, steps_done=t.steps, lora_dir=lora_dir, history=history, model=session.model)
