"""A fixed pool of (prompt, noise seed) training samples whose pretrained images I0 are computed once.

With ``train.seeds_per_prompt = N > 0`` every training sample is one of the P x N entries (prompt p, seed slot
k); entry j = p * N + k starts from the latent drawn from :func:`entry_seed` (train.seed, j). Before training,
the pool samples each entry's I0 with the LoRA off and localizes it (heatmap and mask), in fixed batches, and
keeps the results on the CPU (with ``reward_below`` finite, only the entries whose I0 scores a reward below it:
training on known-bad generations); a training step then runs only the fine-tuned trajectory, as DRaFT-K does. The
pool is rebuilt identically on resume, so resuming stays exact. The sampler must be deterministic (sampling.eta = 0):
with eta > 0, I's noise could not match the noise I0 drew.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .core import DiffusionModel, PromptEmbeds
from .families.base import Schedule
from .lora import adapters_disabled
from .rewards import score
from .sampling import decode, draft_k, initial_latents


def entry_seed(seed: int, entry: int) -> int:
    """The noise seed of pool entry ``entry`` (independent of step, rank and batch composition)."""
    return int(np.random.SeedSequence([seed, 0x9E3779B9, entry]).generate_state(1, dtype=np.uint64)[0]) >> 1


class ReferencePool:
    """I0, heatmap and mask of every (prompt, seed slot) entry, on the CPU."""

    def __init__(self, model: DiffusionModel, embeds: PromptEmbeds, negative: PromptEmbeds, localizer, prompts,
                 *, seeds_per_prompt: int, seed: int, height: int, width: int, plan: Schedule, guidance_scale: float,
                 batch_size: int, device, autocast, references: bool = True, progress: bool = False,
                 reward=None, reward_below: float = math.inf):
        self.model, self.seed, self.height, self.width = model, seed, height, width
        self.size = len(prompts) * seeds_per_prompt
        self.prompt_index = torch.arange(self.size) // seeds_per_prompt
        self.entry = torch.arange(self.size)    # pool index -> entry number (its noise seed); changes when filtered
        self.ref = self.heat = self.mask = self.reward0 = None
        filtered = reward_below != math.inf
        if filtered and reward is None:
            raise ValueError("ReferencePool: reward_below needs the reward (reward=...)")
        if references or filtered:  # plain DRaFT-K draws from the pool but needs no I0 (unless filtering)
            self._compute(embeds, negative, localizer, prompts, plan, guidance_scale, batch_size, device, autocast,
                          progress)
        if filtered:
            self._keep_below(reward, prompts, reward_below, batch_size, device, autocast)

    def _compute(self, embeds, negative, localizer, prompts, plan, guidance_scale, batch_size, device, autocast,
                 progress):
        model = self.model
        refs, heats, masks = [], [], []
        bar = None
        if progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=self.size, desc="fnf reference pool (I0)", dynamic_ncols=True)
        for start in range(0, self.size, batch_size):
            j = torch.arange(start, min(start + batch_size, self.size))
            idx = self.prompt_index[j]
            cond = embeds.index(idx.to(embeds.hidden.device))
            with torch.no_grad(), adapters_disabled(model.denoiser), autocast():
                z = draft_k(model, self.latents(j, device), plan, cond, negative.repeat(len(j)), grad_steps=0,
                            guidance_scale=guidance_scale)
                ref = decode(model, z, plan).float()
            heat, mask = localizer(ref, [prompts[i] for i in idx.tolist()], idx)
            refs.append(ref.cpu())
            heats.append(heat.detach().cpu())
            masks.append(mask.cpu())
            if bar is not None:
                bar.update(len(j))
        if bar is not None:
            bar.close()
        self.ref, self.heat, self.mask = torch.cat(refs), torch.cat(heats), torch.cat(masks)

    def _keep_below(self, reward, prompts, below: float, batch_size: int, device, autocast) -> None:
        scores = []
        for start in range(0, self.size, batch_size):
            j = torch.arange(start, min(start + batch_size, self.size))
            with torch.no_grad(), autocast():
                scores.append(score(reward, self.ref[j].to(device),
                                       [prompts[i] for i in self.prompt_index[j].tolist()]).float().cpu())
        self.reward0 = torch.cat(scores)
        keep = self.reward0 < below
        if not keep.any():
            raise ValueError(f"train.pool_reward_below={below}: no pool entry's I0 scores a reward below it "
                             f"(lowest {float(self.reward0.min()):.4g} of {self.size}); raise it or enlarge "
                             "train.seeds_per_prompt")
        self.entry, self.prompt_index = self.entry[keep], self.prompt_index[keep]
        self.ref, self.heat, self.mask = self.ref[keep], self.heat[keep], self.mask[keep]
        self.reward0, self.size = self.reward0[keep], int(keep.sum())

    def latents(self, entries: torch.Tensor, device) -> torch.Tensor:
        """x_T of the given pool indices (B, C, h, w)."""
        return torch.cat([initial_latents(self.model, 1, self.height, self.width,
                                          torch.Generator().manual_seed(entry_seed(self.seed, int(j))), device)
                          for j in self.entry[entries].tolist()])

    def lookup(self, entries: torch.Tensor, device):
        """(I0, heatmap, mask) of the given entries, on ``device``."""
        return self.ref[entries].to(device), self.heat[entries].to(device), self.mask[entries].to(device)
