"""DRaFT-K with the Focus-N-Fix region penalty: loss = -w r(I, c) + beta ||(1 - M(I0)) (I0 - I)||_F.

Per micro-batch: draw prompts and x_T (:class:`RandomDraws` or the fixed pool, :class:`PoolDraws`); get I0 and
its mask from the :class:`ReferenceSource` chosen once at setup; run the fine-tuned trajectory (its last K steps
and the decode with grad); score it; the loss. The reference sources:

* :class:`NoReference`: beta = 0 with no localizer is plain DRaFT-K; no pretrained trajectory at all;
* :class:`PoolReference`: I0 and masks computed before training (``train.seeds_per_prompt > 0``);
* :class:`SampledReference`: I0 sampled separately with the adapters off;
* :class:`BatchedReference`: I0 sampled in one denoiser batch with I's no-grad steps (``memory.fused_lora``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core import PromptEmbeds
from ..families.base import Schedule
from ..encoding import encode_negative, encode_prompts, offload_text_encoders
from ..localize import localizer_from_config
from ..lora import adapters_disabled, add_lora
from ..reference_pool import ReferencePool
from ..rewards import build_reward, prepare_reward, score
from ..sampling import decode, denoise_batched, draft_k, draft_lv, grad_start, initial_latents, schedule
from .base import Context, Objective, StepOutput
from .penalty import focus_n_fix_loss


@dataclass
class Batch:
    """One micro-batch's samples: prompt indices, x_T, the conditioning and the two DDIM-noise generators."""

    idx: torch.Tensor
    x_T: torch.Tensor
    prompts: list
    cond: PromptEmbeds
    uncond: PromptEmbeds
    gen_ref: torch.Generator
    gen_ft: torch.Generator
    entries: torch.Tensor | None = None   # pool entries (PoolDraws)


@dataclass
class Reference:
    """I0, its heatmap and mask (None without a reference), and where the fine-tuned trajectory continues."""

    image: torch.Tensor | None
    heat: torch.Tensor | None
    mask: torch.Tensor | None
    x_ft: torch.Tensor
    start: int = 0


# ------------------------------------------------------------------------------------------ where samples come from
class RandomDraws:
    """Prompts uniformly from the prompt list, x_T from the micro-batch generator."""

    def draw(self, obj: "FocusNFix", ctx: Context, gen: torch.Generator, b: int):
        idx = torch.randint(len(obj.prompts), (b,), generator=gen)
        return idx, initial_latents(ctx.model, b, ctx.height, ctx.width, gen, ctx.device), None


class PoolDraws:
    """Entries of the fixed (prompt, seed) pool."""

    def __init__(self, pool):
        self.pool = pool

    def draw(self, obj: "FocusNFix", ctx: Context, gen: torch.Generator, b: int):
        entries = torch.randint(self.pool.size, (b,), generator=gen)
        return self.pool.prompt_index[entries], self.pool.latents(entries, ctx.device), entries


# ------------------------------------------------------------------------------------------ where I0 comes from
class ReferenceSource:
    """Gives I0 and its mask for a batch, and turns rewards and images into the loss (Focus-N-Fix)."""

    def reference(self, obj: "FocusNFix", ctx: Context, batch: Batch) -> Reference:
        raise NotImplementedError

    def _localize(self, obj: "FocusNFix", ctx: Context, batch: Batch, image: torch.Tensor, x_ft, start: int):
        # Before the grad-carrying steps: the localizer's backward peaks alone.
        with ctx.probe.phase("localizer"):
            heat, mask = obj.localizer(image, batch.prompts, batch.idx)
        return Reference(image, heat, mask, x_ft, start)

    def terms(self, obj: "FocusNFix", rewards: torch.Tensor, images: torch.Tensor, ref: Reference,
              b: int) -> StepOutput:
        cfg, copies = obj.cfg, max(1, obj.cfg.sampling.lv_copies)
        loss, stats = focus_n_fix_loss(rewards.float(), images.float(), ref.image.repeat(copies, 1, 1, 1),
                                       ref.mask.repeat(copies, 1, 1, 1), beta=cfg.objective.beta,
                                       reward_weight=cfg.reward.weight, squared=cfg.objective.squared)
        return StepOutput(loss, stats, {"ref": ref.image, "mask": ref.mask, "heat": ref.heat, "images": images[:b]})


class NoReference(ReferenceSource):
    """Plain DRaFT-K (beta = 0, no localizer): no pretrained trajectory I0, no mask, no penalty."""

    def reference(self, obj, ctx, batch):
        return Reference(None, None, None, batch.x_T, 0)

    def terms(self, obj, rewards, images, ref, b):
        loss = -obj.cfg.reward.weight * rewards.float().mean()
        stats = {"reward": rewards.detach().float().mean().item(), "loss": loss.detach().item()}
        return StepOutput(loss, stats, {"images": images[:b]})


class PoolReference(ReferenceSource):
    """I0 and its mask were computed before training (fnf/reference_pool.py)."""

    def __init__(self, pool):
        self.pool = pool

    def reference(self, obj, ctx, batch):
        image, heat, mask = self.pool.lookup(batch.entries, ctx.device)
        return Reference(image, heat, mask, batch.x_T, 0)


class SampledReference(ReferenceSource):
    """I0 sampled separately: the same denoiser with its adapters off, no grad."""

    def reference(self, obj, ctx, batch):
        m, phase = ctx.model, ctx.probe.phase
        with torch.no_grad(), adapters_disabled(m.denoiser), ctx.autocast():
            with phase("no-grad sampling"):
                plan = obj.schedule()
                z_ref = draft_k(m, batch.x_T, plan, batch.cond, batch.uncond, grad_steps=0,
                                guidance_scale=obj.cfg.sampling.guidance_scale, eta=obj.cfg.sampling.eta,
                                generator=batch.gen_ref)
            with phase("I0 decode"):
                image = decode(m, z_ref, plan).float()
        return self._localize(obj, ctx, batch, image, batch.x_T, 0)


class BatchedReference(ReferenceSource):
    """I0 and I's no-grad steps in one denoiser batch (fused LoRA path); I continues from its first grad step."""

    def reference(self, obj, ctx, batch):
        m, phase, s = ctx.model, ctx.probe.phase, obj.cfg.sampling
        with torch.no_grad(), ctx.autocast():
            with phase("no-grad sampling"):
                plan = obj.schedule()
                z_ref, x_ft = denoise_batched(m, batch.x_T, plan, batch.cond, batch.uncond,
                                              shared=grad_start(len(plan), s.truncation_k, s.lv_copies),
                                              guidance_scale=s.guidance_scale, eta=s.eta,
                                              generators=(batch.gen_ref, batch.gen_ft))
            with phase("I0 decode"):
                image = decode(m, z_ref, plan).float()
        return self._localize(obj, ctx, batch, image, x_ft, grad_start(s.steps, s.truncation_k, s.lv_copies))


# ------------------------------------------------------------------------------------------ the objective
class FocusNFix(Objective):
    """DRaFT-K / DRaFT-LV + LoRA with the Focus-N-Fix penalty (``objective.name: fnf``; beta = 0 is DRaFT)."""

    progress_keys = ("reward", "penalty")
    encodes_prompts_once = True   # cfg.all_prompts() and the negative prompt, in __init__

    @classmethod
    def add_params(cls, cfg, model, probe) -> list:
        with probe.phase("LoRA params"):
            return add_lora(model, rank=cfg.lora.rank, alpha=cfg.lora.alpha, target_modules=cfg.lora.target_modules,
                            dropout=cfg.lora.dropout)

    def __init__(self, cfg, ctx: Context):
        """Reward, localizer, prompt embeddings, and the sample and reference sources."""
        super().__init__(cfg, ctx)
        m, probe = ctx.model, ctx.probe
        # beta = 0 with no localizer is plain DRaFT-K: the pretrained trajectory I0 is not needed at all.
        self.plain_draft = cfg.objective.beta == 0 and cfg.localize.spec == "none"
        self.pool = None
        self._plan = None
        with probe.phase("reward build", host=True):  # built on the host, then moved
            reward = build_reward(cfg.reward.spec, **cfg.reward.kwargs)
        self.reward = prepare_reward(reward, ctx.device)
        if isinstance(self.reward, torch.nn.Module):
            probe.placed([self.reward], on_device=True)
        with probe.phase("localizer build"):
            self.localizer = localizer_from_config(cfg, self.reward)
        self.prompts = cfg.all_prompts()
        if not self.prompts:
            raise ValueError("no prompts: set train.prompts or train.prompts_file")
        h, w = ctx.height, ctx.width
        with probe.phase("prompt encoding"):
            cache = ctx.prompt_cache
            self.embeds = encode_prompts(m, self.prompts, height=h, width=w, cache=cache)
            self.negative = encode_negative(m, cfg.sampling.negative_prompt, 1, height=h, width=w, cache=cache)
        self.draws = RandomDraws()                    # _reference_source replaces it with the pool's
        self.references = self._reference_source()
        if cfg.memory.offload_text_encoder:
            offload_text_encoders(m)
            probe.placed(m.text_encoders, on_device=False)

    def _reference_source(self) -> ReferenceSource:
        cfg, ctx = self.cfg, self.ctx
        if cfg.train.seeds_per_prompt > 0:
            with ctx.probe.phase("reference pool"):
                self.pool = ReferencePool(
                    ctx.model, self.embeds, self.negative, self.localizer, self.prompts,
                    seeds_per_prompt=cfg.train.seeds_per_prompt, seed=cfg.train.seed, height=ctx.height,
                    width=ctx.width, plan=self.schedule(), guidance_scale=cfg.sampling.guidance_scale,
                    batch_size=cfg.train.batch_size, device=ctx.device, autocast=ctx.autocast,
                    references=not self.plain_draft, progress=cfg.train.progress and ctx.is_main,
                    reward=self.reward, reward_below=cfg.train.pool_reward_below)
            self.draws = PoolDraws(self.pool)
        if self.plain_draft:
            return NoReference()
        if self.pool is not None:
            return PoolReference(self.pool)
        return BatchedReference() if ctx.fused_lora else SampledReference()

    def schedule(self) -> Schedule:
        """The sampler's schedule (``sampling.steps`` at the training image size), built on first use and kept:
        steps, size and device never change in a run."""
        if self._plan is None:
            self._plan = schedule(self.ctx.model, self.cfg.sampling.steps, self.ctx.height, self.ctx.width,
                                  self.ctx.device)
        return self._plan

    def trajectory(self, x: torch.Tensor, plan, batch: Batch, start: int) -> torch.Tensor:
        """The fine-tuned trajectory from step ``start``: DRaFT-K (its last K steps carry grad) or DRaFT-LV."""
        s, m = self.cfg.sampling, self.ctx.model
        kw = dict(guidance_scale=s.guidance_scale, start=start, eta=s.eta, generator=batch.gen_ft)
        if s.lv_copies:
            return draft_lv(m, x, plan, batch.cond, batch.uncond, copies=s.lv_copies, **kw)
        return draft_k(m, x, plan, batch.cond, batch.uncond, grad_steps=s.truncation_k, **kw)

    def batch(self, gen: torch.Generator) -> Batch:
        b = self.cfg.train.batch_size
        idx, x_T, entries = self.draws.draw(self, self.ctx, gen, b)
        noise_seed = int(torch.randint(2**62, (1,), generator=gen))
        # I0 and I draw the same DDIM noise (eta > 0): one generator each, seeded alike.
        gen_ref, gen_ft = torch.Generator().manual_seed(noise_seed), torch.Generator().manual_seed(noise_seed)
        return Batch(idx, x_T, [self.prompts[i] for i in idx.tolist()],
                     self.embeds.index(idx.to(self.embeds.hidden.device)), self.negative.repeat(b), gen_ref, gen_ft,
                     entries)

    def loss(self, gen: torch.Generator) -> StepOutput:
        ctx, s = self.ctx, self.cfg.sampling
        m, phase = ctx.model, ctx.probe.phase
        batch = self.batch(gen)
        ref = self.references.reference(self, ctx, batch)
        with ctx.autocast():
            with phase("denoiser (grad steps)"):  # the fine-tuned trajectory; its last K steps carry grad
                plan = self.schedule()
                z = self.trajectory(ref.x_ft, plan, batch, ref.start)
            with phase("VAE decode"):
                images = decode(m, z, plan)
        with ctx.autocast(), phase("reward"):
            rewards = score(self.reward, images, batch.prompts * max(1, s.lv_copies),
                               checkpoint=self.cfg.memory.reward_checkpointing)
        return self.references.terms(self, rewards, images, ref, len(batch.prompts))
