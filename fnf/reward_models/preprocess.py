"""Differentiable image preprocessing shared by the CLIP/BLIP-style rewards.

Images in [0, 1] -> the model's input: bicubic antialiased resize of the short side, center crop, mean/std
normalisation. No hard clamp, so gradients reach every pixel.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def resize_short_side(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize (B, C, H, W) so that the short side is ``size`` (the long side ``int(size * long / short)``, as
    the CLIP processors compute it), bicubic with antialiasing."""
    h, w = images.shape[-2:]
    if h <= w:
        new_h, new_w = size, int(size * w / h)
    else:
        new_h, new_w = int(size * h / w), size
    if (new_h, new_w) == (h, w):
        return images
    return F.interpolate(images, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)


def center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """The central ``size`` x ``size`` window (top-left offset ``(H - size) // 2``, as transformers crops)."""
    h, w = images.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    return images[..., top:top + size, left:left + size]


def clip_preprocess(images: torch.Tensor, size: int = 224, mean=CLIP_MEAN, std=CLIP_STD,
                    crop_size: int | None = None) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> normalised (B, 3, crop, crop) model input, differentiable."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images: expected a (B, 3, H, W) tensor, got "
                         f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
    crop = size if crop_size is None else crop_size
    x = center_crop(resize_short_side(images.float(), size), crop)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s
