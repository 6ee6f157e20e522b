"""The Focus-N-Fix objective: loss = -w * r(I, c) + beta * ||(1 - M(I0)) * (I0 - I)||_F (batch means).

beta = 0 is plain DRaFT (the baseline) from the same code.

Default beta = 1.0 (ours; the paper does not publish it). Why 1: with the plain (unsquared) norm, the
penalty's gradient with respect to the image has norm exactly beta for any nonzero change, whatever the
resolution. beta therefore reads as a threshold: a reward gradient whose part outside the mask is weaker
than beta (in pixel-space L2 norm) cannot move those pixels at all. Pixel-gradient norms of classifier
logits on [0, 1] images are typically O(0.1-10), so 1.0 is the natural middle; sweep 0.1-10 per reward.
With ``squared=True`` the gradient is 2*beta*||.||: a soft spring instead, weaker near I0.
"""
from __future__ import annotations

import math

import torch

import fnf_kernels


def region_penalty(images: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor, *,
                   squared: bool = False) -> torch.Tensor:
    """Per-sample ||(1 - M) * (I0 - I)||_F on images in [0, 1] (B,), via fnf_kernels; in float32 (float64 when
    ``images`` is float64)."""
    wide = torch.promote_types(images.dtype, torch.float32)
    return fnf_kernels.masked_frobenius_penalty(images.to(wide), reference.detach().to(wide), mask.detach().to(wide),
                                                squared=squared, reduction="none")


def region_reward(images: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor, beta: float = 1.0, *,
                  squared: bool = False) -> torch.Tensor:
    """The Focus-N-Fix term as reward shaping, per sample (B,): -beta * ||(1 - M) * (I0 - I)||_F, for any trainer's
    reward function (GRPO / DDPO: add it to the task reward r(I, c); its maximum, 0, is "nothing outside the mask
    changed"). Images in [0, 1], (B, C, H, W); mask (B, H, W), (B, 1, H, W) or (B, C, H, W), 1 = the problem region
    (free to change). Through :func:`region_penalty` (fnf_kernels): float32 (float64 for float64 images),
    differentiable in ``images``."""
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta < 0:
        raise ValueError(f"beta must be a finite number >= 0, got {beta!r}")
    return -float(beta) * region_penalty(images, reference, mask, squared=squared)


def focus_n_fix_loss(rewards: torch.Tensor, images: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor,
                     *, beta: float, reward_weight: float = 1.0, squared: bool = False):
    """Return (loss, stats). ``stats`` holds detached floats: reward, penalty, loss, and the mean absolute
    change of I from I0 inside and outside the mask (what the constraint is meant to keep small)."""
    penalty = region_penalty(images, reference, mask, squared=squared)
    loss = -reward_weight * rewards.mean()
    if beta > 0:
        loss = loss + beta * penalty.mean()
    with torch.no_grad():
        change = (images.float() - reference.float()).abs().mean(dim=1, keepdim=True)
        m = mask.float().expand_as(change)
        outside = ((1 - m) * change).sum() / (1 - m).sum().clamp_min(1)
        inside = (m * change).sum() / m.sum().clamp_min(1)
        stats = {
            "reward": rewards.detach().mean().item(),
            "penalty": penalty.detach().mean().item(),
            "loss": loss.detach().item(),
            "change_outside": outside.item(),
            "change_inside": inside.item(),
            "mask_fraction": m.mean().item(),
        }
    return loss, stats
