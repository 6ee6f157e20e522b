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
from ..encoding import encode_negative, encode_prompts, offload_text_encoders
from ..localize import localizer_from_config
from ..lora import adapters_disabled, add_lora
from ..reference_pool import ReferencePool
from ..rewards import build_reward, evaluate, prepare_reward
from ..sampling import decode, denoise, denoise_batched, grad_start, initial_latents
from .base import Objective
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

    def draw(self, obj: "FocusNFix", session, gen: torch.Generator, b: int):
        idx = torch.randint(len(obj.prompts), (b,), generator=gen)
        return idx, initial_latents(session.model, b, session.height, session.width, gen, session.device), None


class PoolDraws:
    """Entries of the fixed (prompt, seed) pool."""

    def __init__(self, pool):
        self.pool = pool

    def draw(self, obj: "FocusNFix", session, gen: torch.Generator, b: int):
        entries = torch.randint(self.pool.size, (b,), generator=gen)
        return self.pool.prompt_index[entries], self.pool.latents(entries, session.device), entries


# ------------------------------------------------------------------------------------------ where I0 comes from
class ReferenceSource:
    """Gives I0 and its mask for a batch, and turns rewards and images into the loss (Focus-N-Fix)."""

    def reference(self, obj: "FocusNFix", session, batch: Batch) -> Reference:
        raise NotImplementedError

    def _localize(self, obj: "FocusNFix", session, batch: Batch, image: torch.Tensor, x_ft, start: int):
        # Before the grad-carrying steps: the localizer's backward peaks alone.
        with session.probe.phase("localizer"):
            heat, mask = obj.localizer(image, batch.prompts, batch.idx)
        return Reference(image, heat, mask, x_ft, start)

    def terms(self, obj: "FocusNFix", rewards: torch.Tensor, images: torch.Tensor, ref: Reference, b: int):
        """(loss, stats, grid images)."""
        cfg, copies = obj.cfg, max(1, obj.cfg.sampling.lv_copies)
        loss, stats = focus_n_fix_loss(rewards.float(), images.float(), ref.image.repeat(copies, 1, 1, 1),
                                       ref.mask.repeat(copies, 1, 1, 1), beta=cfg.objective.beta,
                                       reward_weight=cfg.reward.weight, squared=cfg.objective.squared)
        return loss, stats, {"ref": ref.image, "mask": ref.mask, "heat": ref.heat, "images": images[:b]}


class NoReference(ReferenceSource):
    """Plain DRaFT-K (beta = 0, no localizer): no pretrained trajectory I0, no mask, no penalty."""

    def reference(self, obj, session, batch):
        return Reference(None, None, None, batch.x_T, 0)

    def terms(self, obj, rewards, images, ref, b):
        loss = -obj.cfg.reward.weight * rewards.float().mean()
        stats = {"reward": rewards.detach().float().mean().item(), "loss": loss.detach().item()}
        return loss, stats, {"images": images[:b]}


class PoolReference(ReferenceSource):
    """I0 and its mask were computed before training (fnf/reference_pool.py)."""

    def __init__(self, pool):
        self.pool = pool

    def reference(self, obj, session, batch):
        image, heat, mask = self.pool.lookup(batch.entries, session.device)
        return Reference(image, heat, mask, batch.x_T, 0)


class SampledReference(ReferenceSource):
    """I0 sampled separately: the same denoiser with its adapters off, no grad."""

    def reference(self, obj, session, batch):
        m, phase = session.model, session.probe.phase
        with torch.no_grad(), adapters_disabled(m.denoiser), session.autocast():
            with phase("no-grad sampling"):
                z_ref = denoise(m, batch.x_T, batch.cond, batch.uncond, grad_steps=0, generator=batch.gen_ref,
                                **obj.sampling_kwargs(session))
            with phase("I0 decode"):
                image = decode(m, z_ref).float()
        return self._localize(obj, session, batch, image, batch.x_T, 0)


class BatchedReference(ReferenceSource):
    """I0 and I's no-grad steps in one denoiser batch (fused LoRA path); I continues from its first grad step."""

    def reference(self, obj, session, batch):
        m, phase, s = session.model, session.probe.phase, obj.cfg.sampling
        with torch.no_grad(), session.autocast():
            with phase("no-grad sampling"):
                z_ref, x_ft = denoise_batched(m, batch.x_T, batch.cond, batch.uncond, grad_steps=s.truncation_k,
                                              lv_copies=s.lv_copies, generators=(batch.gen_ref, batch.gen_ft),
                                              **obj.sampling_kwargs(session))
            with phase("I0 decode"):
                image = decode(m, z_ref).float()
        return self._localize(obj, session, batch, image, x_ft, grad_start(s.steps, s.truncation_k, s.lv_copies))


# ------------------------------------------------------------------------------------------ the objective
class FocusNFix(Objective):
    """DRaFT-K / DRaFT-LV + LoRA with the Focus-N-Fix penalty (``objective.name: fnf``; beta = 0 is DRaFT)."""

    progress_keys = ("reward", "penalty")
    encodes_prompts_once = True   # cfg.all_prompts() and the negative prompt, in setup

    def __init__(self, session):
        cfg = self.cfg = session.cfg
        with session.probe.phase("LoRA params"):
            self.params = add_lora(session.model, rank=cfg.lora.rank, alpha=cfg.lora.alpha,
                                   target_modules=cfg.lora.target_modules, dropout=cfg.lora.dropout)
        # beta = 0 with no localizer is plain DRaFT-K: the pretrained trajectory I0 is not needed at all.
        self.plain_draft = cfg.objective.beta == 0 and cfg.localize.spec == "none"
        self.pool = None

    def setup(self, session) -> None:
        """Reward, localizer, prompt embeddings, and the sample and reference sources."""
        cfg, m, probe = self.cfg, session.model, session.probe
        with probe.phase("reward build", host=True):  # built on the host, then moved
            reward = build_reward(cfg.reward.spec, **cfg.reward.kwargs)
        self.reward = prepare_reward(reward, session.device)
        if isinstance(self.reward, torch.nn.Module):
            probe.placed([self.reward], on_device=True)
        with probe.phase("localizer build"):
            self.localizer = localizer_from_config(cfg, self.reward)
        self.prompts = cfg.all_prompts()
        if not self.prompts:
            raise ValueError("no prompts: set train.prompts or train.prompts_file")
        h, w = session.height, session.width
        with probe.phase("prompt encoding"):
            cache = session.prompt_cache
            self.embeds = encode_prompts(m, self.prompts, height=h, width=w, cache=cache)
            self.negative = encode_negative(m, cfg.sampling.negative_prompt, 1, height=h, width=w, cache=cache)
        self.draws = RandomDraws()                    # _reference_source replaces it with the pool's
        self.references = self._reference_source(session)
        if cfg.memory.offload_text_encoder:
            offload_text_encoders(m)
            probe.placed(m.text_encoders, on_device=False)

    def _reference_source(self, session) -> ReferenceSource:
        cfg = self.cfg
        if cfg.train.seeds_per_prompt > 0:
            with session.probe.phase("reference pool"):
                self.pool = ReferencePool(
                    session.model, self.embeds, self.negative, self.localizer, self.prompts,
                    seeds_per_prompt=cfg.train.seeds_per_prompt, seed=cfg.train.seed, height=session.height,
                    width=session.width, steps=cfg.sampling.steps, guidance_scale=cfg.sampling.guidance_scale,
                    batch_size=cfg.train.batch_size, device=session.device, autocast=session.autocast,
                    references=not self.plain_draft,
                    progress=cfg.train.progress and session.acc.is_main_process,
                    reward=self.reward, reward_below=cfg.train.pool_reward_below)
            self.draws = PoolDraws(self.pool)
        if self.plain_draft:
            return NoReference()
        if self.pool is not None:
            return PoolReference(self.pool)
        return BatchedReference() if session.fused_lora else SampledReference()

    def sampling_kwargs(self, session) -> dict:
        s = self.cfg.sampling
        return dict(steps=s.steps, guidance_scale=s.guidance_scale, eta=s.eta, height=session.height,
                    width=session.width)

    def batch(self, session, gen: torch.Generator) -> Batch:
        b = self.cfg.train.batch_size
        idx, x_T, entries = self.draws.draw(self, session, gen, b)
        noise_seed = int(torch.randint(2**62, (1,), generator=gen))
        # I0 and I draw the same DDIM noise (eta > 0): one generator each, seeded alike.
        gen_ref, gen_ft = torch.Generator().manual_seed(noise_seed), torch.Generator().manual_seed(noise_seed)
        return Batch(idx, x_T, [self.prompts[i] for i in idx.tolist()],
                     self.embeds.index(idx.to(self.embeds.hidden.device)), self.negative.repeat(b), gen_ref, gen_ft,
                     entries)

    def loss(self, session, gen: torch.Generator):
        m, phase, s = session.model, session.probe.phase, self.cfg.sampling
        batch = self.batch(session, gen)
        ref = self.references.reference(self, session, batch)
        with session.autocast():
            with phase("denoiser (grad steps)"):  # the fine-tuned trajectory; its last K steps carry grad
                z = denoise(m, ref.x_ft, batch.cond, batch.uncond, grad_steps=s.truncation_k, lv_copies=s.lv_copies,
                            generator=batch.gen_ft, start=ref.start, **self.sampling_kwargs(session))
            with phase("VAE decode"):
                images = decode(m, z)
        with session.autocast(), phase("reward"):
            rewards = evaluate(self.reward, images, batch.prompts * max(1, s.lv_copies),
                               checkpoint=self.cfg.memory.reward_checkpointing)
        return self.references.terms(self, rewards, images, ref, len(batch.prompts))
