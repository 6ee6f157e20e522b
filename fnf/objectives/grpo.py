"""GRPO with the Focus-N-Fix region term (``objective.name: grpo``): policy-gradient fine-tuning for any reward,
differentiable or not, that changes only the problem region.

Per sample the reward is ``R = w r(I, c) - beta ||(1 - M(I0)) (I0 - I)||_F``, with I0 the frozen model's image
(adapters off) from the same initial noise and the same per-step noise as I, so I0 and its mask M are fixed per
(prompt, seed) (cached when the seeds come from the pool, ``train.seeds_per_prompt > 0``). ``beta = 0`` with no
localizer is plain GRPO. Rewards are called under no_grad.

A **rollout** (per process): ``grpo.prompts_per_rollout`` prompts x ``grpo.group_size`` seeds, sampled with the
family's stochastic sampler (``family.sde_step``: stochastic DDIM / the Flow-GRPO SDE; fnf/policy.py) by the current
LoRA, every step's log-probability kept; advantages ``(R - mean_g) / (std_g + eps)`` within each group (a group
never spans processes, so nothing is gathered), clamped to ``adv_clip_max``. The trained steps are all of them, a
sliding window or a random subset per rollout (``grpo.steps``).

**Micro-batches.** Each trainer micro-batch (``loss(generator)``) is ``train.batch_size`` rows of the rollout at one
trained step: one denoiser call with grad, so the peak is one step's backward. A rollout gives
``inner_epochs x samples / batch_size x trained_steps`` micro-batches (rows shuffled per epoch), i.e.
``that / train.grad_accum`` optimizer steps (:func:`fnf.config.grpo_layout`); the trainer's accumulation averages the
per-micro losses, so an optimizer step's gradient is the mean over its (row, step) terms, as Flow-GRPO accumulates.
The clipped loss per row: ``max(-A rho, -A clip(rho, 1 - eps, 1 + eps))``, ``rho = exp(log p - log p_old)``, plus
``kl_beta`` x the KL between the two Gaussians of the step under the LoRA and under the frozen model (adapters
off: the same denoiser, no second copy): ``||mean - mean_ref||^2 / (2 std^2)``, averaged over elements.

**Steps and resume.** The trainer calls :meth:`GRPO.start_step` before each optimizer step: rollout
``step // optimizer_steps_per_rollout`` is sampled when it is not the one held, from a generator seeded by
(train.seed, rollout, rank) alone. A run resumed from a checkpoint on a rollout boundary (``train.checkpoint_every`` a
multiple of the optimizer steps per rollout) is therefore exactly the uninterrupted run; from a checkpoint inside a
rollout it samples that rollout afresh with the resumed LoRA (said once).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..config import grpo_layout
from ..encoding import encode_negative, encode_prompts, offload_text_encoders
from ..families.base import Schedule
from ..localize import localizer_from_config
from ..lora import adapters_disabled, add_lora, lora_dropout_active
from ..policy import noise_level_of, sample_generators, sde_sample, step_log_prob
from ..reference_pool import entry_seed
from ..rewards import build_reward, prepare_reward, score
from ..sampling import decode, schedule
from .base import Context, Objective, StepOutput
from .penalty import region_penalty

ROLLOUT_TAG = 0x47525030   # "GRP0": the rollout generator's stream, apart from the trainer's micro-batch seeds


def rollout_seed(seed: int, rollout: int, rank: int) -> int:
    """The seed of rollout ``rollout``'s generator on process ``rank`` (prompts, seeds, trained steps, order)."""
    return int(np.random.SeedSequence([seed, ROLLOUT_TAG, rollout, rank]).generate_state(1, dtype=np.uint64)[0]) >> 1


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float) -> torch.Tensor:
    """``(R - mean) / (std + eps)`` within consecutive groups of ``group_size`` rows (population std), in float64:
    a group whose rewards differ little divides float rounding by a small std."""
    if rewards.dim() != 1 or rewards.shape[0] % group_size:
        raise ValueError(f"rewards: expected (groups * {group_size},), got shape {tuple(rewards.shape)}")
    g = rewards.double().reshape(-1, group_size)
    mean = g.mean(dim=1, keepdim=True)
    std = g.std(dim=1, unbiased=False, keepdim=True)
    return ((g - mean) / (std + eps)).reshape(-1)


def trained_steps(mode: str, size: int, steps: int, rollout: int, stride: int, gen: torch.Generator) -> list[int]:
    """The sampler steps trained in rollout ``rollout``: all, a window of ``size`` that moves ``stride`` steps per
    rollout (wrapping), or ``size`` steps drawn at random."""
    if mode == "all":
        return list(range(steps))
    if mode == "window":
        start = (rollout * stride) % (steps - size + 1)
        return list(range(start, start + size))
    if mode == "random":
        return sorted(torch.randperm(steps, generator=gen)[:size].tolist())
    raise ValueError(f"grpo.steps: expected all, window or random, got {mode!r}")


def policy_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, clip_range: float,
                adv_clip_max: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row clipped policy-ratio loss ``max(-A rho, -A clip(rho, 1 - c, 1 + c))`` and the ratio rho."""
    adv = advantages.clamp(-adv_clip_max, adv_clip_max)
    ratio = torch.exp(log_prob - old_log_prob)
    return torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip_range, 1 + clip_range)), ratio


@dataclass
class Rollout:
    """One sampled rollout: rows group-major (prompt p's G seeds together), the trained steps' (x_i, x_{i+1}) and
    their log-probabilities under the policy that sampled them, the rewards and advantages, and the micro-batch
    order ``(rows, j)`` (j: index into ``steps``)."""

    index: int
    prompt_idx: torch.Tensor
    seeds: list
    steps: list
    states: dict
    old_log_probs: torch.Tensor                 # (len(steps), N)
    advantages: torch.Tensor
    micro: list
    stats: dict
    images: torch.Tensor
    ref: torch.Tensor | None = None
    heat: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)


class GRPO(Objective):
    """Group-relative policy optimisation + LoRA with the Focus-N-Fix region term (``objective.name: grpo``)."""

    progress_keys = ("reward", "penalty")
    encodes_prompts_once = True

    @classmethod
    def add_params(cls, cfg, model, probe) -> list:
        with probe.phase("LoRA params"):
            return add_lora(model, rank=cfg.lora.rank, alpha=cfg.lora.alpha, target_modules=cfg.lora.target_modules,
                            dropout=cfg.lora.dropout)

    def __init__(self, cfg, ctx: Context):
        super().__init__(cfg, ctx)
        m, probe = ctx.model, ctx.probe
        self.plain = cfg.objective.beta == 0 and cfg.localize.spec == "none"   # no I0 needed at all
        with probe.phase("reward build", host=True):
            reward = build_reward(cfg.reward.spec, **cfg.reward.kwargs)
        self.reward = prepare_reward(reward, ctx.device)
        if isinstance(self.reward, torch.nn.Module):
            probe.placed([self.reward], on_device=True)
        with probe.phase("localizer build"):
            self.localizer = None if self.plain else localizer_from_config(cfg, self.reward)
        self.prompts = cfg.all_prompts()
        if not self.prompts:
            raise ValueError("no prompts: set train.prompts or train.prompts_file")
        h, w = ctx.height, ctx.width
        with probe.phase("prompt encoding"):
            self.embeds = encode_prompts(m, self.prompts, height=h, width=w, cache=ctx.prompt_cache)
            self.negative = encode_negative(m, cfg.sampling.negative_prompt, 1, height=h, width=w,
                                            cache=ctx.prompt_cache)
        if cfg.memory.offload_text_encoder:
            offload_text_encoders(m)
            probe.placed(m.text_encoders, on_device=False)
        self.noise_level = noise_level_of(m, cfg.grpo.noise_level)
        self.layout = grpo_layout(cfg)
        self.rank = _rank()
        self.rollout: Rollout | None = None
        self.position = 0                      # the next micro-batch of the rollout
        self.references: dict = {}             # (prompt index, seed) -> (I0, heat, mask) on the CPU (pool seeds)
        self._plan = None
        every, per = cfg.train.checkpoint_every, self.layout["optimizer_steps"]
        if every and every % per and ctx.is_main:
            print(f"fnf: grpo: train.checkpoint_every={every} is not a multiple of the {per} optimizer steps of a "
                  "rollout; a resume from a checkpoint inside a rollout samples it afresh (not exact)")

    def schedule(self) -> Schedule:
        if self._plan is None:
            self._plan = schedule(self.ctx.model, self.cfg.sampling.steps, self.ctx.height, self.ctx.width,
                                  self.ctx.device)
        return self._plan

    # ------------------------------------------------------------------ the trainer's hooks
    def start_step(self, step: int) -> None:
        per = self.layout["optimizer_steps"]
        index, within = divmod(step, per)
        if self.rollout is None or self.rollout.index != index:
            if within and self.rollout is None and self.ctx.is_main:
                print(f"fnf: grpo: step {step + 1} starts inside rollout {index}: sampling it afresh")
            self.rollout = self.sample_rollout(index)
        self.position = within * self.cfg.train.grad_accum

    def loss(self, gen: torch.Generator) -> StepOutput:
        if self.rollout is None:   # called without start_step (a bare micro-batch): rollout 0
            self.start_step(0)
        ro, ctx, cfg = self.rollout, self.ctx, self.cfg
        rows, j = ro.micro[self.position % len(ro.micro)]
        self.position += 1
        i = ro.steps[j]
        x, x_next = (s[rows] for s in ro.states[i])
        cond, uncond = self.embeds.index(ro.prompt_idx[rows].to(self.embeds.hidden.device)), \
            self.negative.repeat(len(rows))
        m, g, plan = ctx.model, cfg.sampling.guidance_scale, self.schedule()
        kw = dict(guidance_scale=g, noise_level=self.noise_level)
        with ctx.autocast(), ctx.probe.phase("denoiser (grad step)"), lora_dropout_active(m.denoiser):
            log_prob, mean, std = step_log_prob(m, plan, i, x, x_next, cond, uncond, **kw)
        per_row, ratio = policy_loss(log_prob, ro.old_log_probs[j, rows].to(log_prob), ro.advantages[rows].to(log_prob),
                                     cfg.grpo.clip_range, cfg.grpo.adv_clip_max)
        loss = per_row.mean()
        stats = dict(ro.stats)
        if cfg.grpo.kl_beta > 0 or cfg.grpo.region_kl_beta > 0:
            with torch.no_grad(), ctx.autocast(), ctx.probe.phase("frozen model (KL)"), adapters_disabled(m.denoiser):
                _, mean_ref, _ = step_log_prob(m, plan, i, x, x_next, cond, uncond, **kw)
            dims = tuple(range(1, mean.dim()))
            per_element = (mean - mean_ref) ** 2 / (2 * std.to(mean) ** 2).clamp_min(1e-20)
            if cfg.grpo.kl_beta > 0:
                kl = per_element.mean(dim=dims)
                loss = loss + cfg.grpo.kl_beta * kl.mean()
                stats["kl"] = kl.detach().mean().item()
            if cfg.grpo.region_kl_beta > 0:
                inside = m.family.latent_region(m, ro.mask[rows].to(mean.device), mean, plan)
                region_kl = (per_element * (1 - inside)).mean(dim=dims)
                loss = loss + cfg.grpo.region_kl_beta * region_kl.mean()
                stats["region_kl"] = region_kl.detach().mean().item()
        with torch.no_grad():
            delta = log_prob.detach() - ro.old_log_probs[j, rows].to(log_prob)
            stats.update(loss=loss.detach().item(), ratio=ratio.detach().mean().item(),
                         clip_fraction=((ratio.detach() - 1).abs() > cfg.grpo.clip_range).float().mean().item(),
                         approx_kl=(0.5 * delta ** 2).mean().item())
        images = {"images": ro.images[rows]}
        if ro.ref is not None:
            images.update(ref=ro.ref[rows], mask=ro.mask[rows], heat=ro.heat[rows])
        return StepOutput(loss, stats, images)

    # ------------------------------------------------------------------ rollouts
    def draw(self, gen: torch.Generator) -> tuple[torch.Tensor, list]:
        """Prompt index and seed per row, group-major: ``prompts_per_rollout`` prompts (distinct while there are
        enough), ``group_size`` seeds each (distinct pool slots with ``train.seeds_per_prompt > 0``)."""
        g, t = self.cfg.grpo, self.cfg.train
        n = len(self.prompts)
        prompts = (torch.randperm(n, generator=gen)[:g.prompts_per_rollout] if g.prompts_per_rollout <= n
                   else torch.randint(n, (g.prompts_per_rollout,), generator=gen))
        idx, seeds = [], []
        for p in prompts.tolist():
            if t.seeds_per_prompt > 0:
                slots = torch.randperm(t.seeds_per_prompt, generator=gen)[:g.group_size].tolist()
                seeds += [entry_seed(t.seed, p * t.seeds_per_prompt + k) for k in slots]
            else:
                seeds += torch.randint(2 ** 62, (g.group_size,), generator=gen).tolist()
            idx += [p] * g.group_size
        return torch.tensor(idx), seeds

    def _trajectories(self, idx: torch.Tensor, seeds: list, keep, *, reference: bool):
        """Sample the rows in batches of ``grpo.sample_batch_size`` (LoRA on, or off for ``reference``), no grad:
        (images, {i: (x_i, x_{i+1})}, log-probs (T, N))."""
        ctx, cfg = self.ctx, self.cfg
        m, plan = ctx.model, self.schedule()
        size = cfg.grpo.sample_batch_size or cfg.train.batch_size
        images, states, log_probs = [], {i: ([], []) for i in keep}, []
        for start in range(0, len(seeds), size):
            rows = slice(start, start + size)
            b = len(seeds[rows])
            cond = self.embeds.index(idx[rows].to(self.embeds.hidden.device))
            with torch.no_grad(), ctx.autocast():
                with ctx.probe.phase("I0 sampling" if reference else "rollout sampling"):
                    if reference:
                        with adapters_disabled(m.denoiser):
                            traj = sde_sample(m, plan, cond, self.negative.repeat(b),
                                              generators=sample_generators(seeds[rows]),
                                              guidance_scale=cfg.sampling.guidance_scale,
                                              noise_level=self.noise_level, device=ctx.device)
                    else:
                        traj = sde_sample(m, plan, cond, self.negative.repeat(b),
                                          generators=sample_generators(seeds[rows]),
                                          guidance_scale=cfg.sampling.guidance_scale, noise_level=self.noise_level,
                                          keep=keep, device=ctx.device)
                with ctx.probe.phase("I0 decode" if reference else "rollout decode"):
                    images.append(decode(m, traj.final, plan).float())
            for i in keep:
                states[i][0].append(traj.states[i][0])
                states[i][1].append(traj.states[i][1])
            log_probs.append(traj.log_probs)
        states = {i: (torch.cat(a), torch.cat(b)) for i, (a, b) in states.items()}
        return torch.cat(images), states, torch.cat(log_probs, dim=1)

    def _reference(self, idx: torch.Tensor, seeds: list):
        """(I0, heat, mask) of each row: from the cache (pool seeds) or sampled with the adapters off and
        localized; cached when the seeds come from the pool."""
        cache = self.cfg.train.seeds_per_prompt > 0
        keys = list(zip(idx.tolist(), seeds))
        todo = [r for r, k in enumerate(keys) if k not in self.references]
        fresh = {}
        if todo:
            sub = torch.tensor(todo)
            image, _, _ = self._trajectories(idx[sub], [seeds[r] for r in todo], (), reference=True)
            with self.ctx.probe.phase("localizer"):
                heat, mask = self.localizer(image, [self.prompts[p] for p in idx[sub].tolist()], idx[sub])
            for n, r in enumerate(todo):
                fresh[keys[r]] = (image[n:n + 1], heat[n:n + 1].detach(), mask[n:n + 1].detach())
            if cache:
                self.references.update({k: tuple(t.cpu() for t in v) for k, v in fresh.items()})
        device = self.ctx.device
        parts = [fresh.get(k) or self.references[k] for k in keys]
        return tuple(torch.cat([p[n].to(device) for p in parts]) for n in range(3))

    def sample_rollout(self, index: int) -> Rollout:
        """Rollout ``index`` on this process: samples, rewards (no grad), the region term, advantages, the
        micro-batch order."""
        cfg, g = self.cfg, self.cfg.grpo
        gen = torch.Generator().manual_seed(rollout_seed(cfg.train.seed, index, self.rank))
        idx, seeds = self.draw(gen)
        steps = trained_steps(g.steps, g.train_steps, cfg.sampling.steps, index, g.window_stride, gen)
        images, states, log_probs = self._trajectories(idx, seeds, steps, reference=False)
        prompts = [self.prompts[p] for p in idx.tolist()]
        with torch.no_grad(), self.ctx.autocast(), self.ctx.probe.phase("reward"):
            rewards = score(self.reward, images, prompts).float()
        stats = {"reward": rewards.mean().item()}
        ref = heat = mask = None
        total = cfg.reward.weight * rewards
        if not self.plain:
            ref, heat, mask = self._reference(idx, seeds)
            with torch.no_grad():
                penalty = region_penalty(images, ref, mask, squared=cfg.objective.squared).float()
                total = total - cfg.objective.beta * penalty
                change = (images - ref).abs().mean(dim=1, keepdim=True)
                mk = mask.float().expand_as(change)
            stats.update(penalty=penalty.mean().item(),
                         change_outside=(((1 - mk) * change).sum() / (1 - mk).sum().clamp_min(1)).item(),
                         change_inside=((mk * change).sum() / mk.sum().clamp_min(1)).item(),
                         mask_fraction=mk.mean().item())
        advantages = group_advantages(total, g.group_size, g.std_eps)
        stats.update(total_reward=total.mean().item(), reward_std=rewards.std(unbiased=False).item())
        n, b = len(seeds), cfg.train.batch_size
        micro = []
        for _ in range(g.inner_epochs):
            order = torch.randperm(n, generator=gen)
            for start in range(0, n, b):
                rows = order[start:start + b]
                micro += [(rows, j) for j in range(len(steps))]
        keep = lambda t: t if t is None else t.detach().cpu()  # noqa: E731  (the sample grid's copies)
        return Rollout(index, idx, seeds, steps, states, log_probs[steps].detach(), advantages.detach(), micro,
                       stats, keep(images), keep(ref), keep(heat), keep(mask),
                       extra={"rewards": rewards.detach().cpu(), "total": total.detach().cpu()})
