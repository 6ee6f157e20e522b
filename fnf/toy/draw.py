"""Pictures of the toy demo: a mask drawn as an outline around (not over) the region it marks."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def outline(images: torch.Tensor, masks: torch.Tensor, color=(0.0, 1.0, 0.0), scale: int = 4) -> torch.Tensor:
    """Images (B, 3, H, W) upscaled ``scale`` times (nearest) with a 1-pixel ring in ``color`` drawn just outside
    each mask region (B, H, W); pixels inside the mask keep their values, so the defect stays visible."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images: expected (B, 3, H, W), got {tuple(images.shape)}")
    if masks.shape != (images.shape[0],) + tuple(images.shape[-2:]):
        raise ValueError(f"masks: expected (B, H, W) = {(images.shape[0],) + tuple(images.shape[-2:])}, "
                         f"got {tuple(masks.shape)}")
    if scale < 1:
        raise ValueError(f"scale: expected an integer >= 1, got {scale}")
    big = F.interpolate(images.float(), scale_factor=scale, mode="nearest")
    m = F.interpolate(masks.float()[:, None], scale_factor=scale, mode="nearest")
    ring = (F.max_pool2d(m, 3, stride=1, padding=1) > 0.5) & (m < 0.5)
    tint = torch.tensor(color, dtype=big.dtype).view(1, 3, 1, 1).expand_as(big)
    return torch.where(ring.expand_as(big), tint, big)
