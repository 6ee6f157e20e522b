"""Small image helpers: tensors <-> PNG files and labelled grids."""
from __future__ import annotations

import os

import numpy as np
import torch


def to_pil(image: torch.Tensor):
    """(3, H, W) or (H, W) float in [0, 1] -> PIL image."""
    from PIL import Image

    arr = (image.detach().float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
    if arr.ndim == 3:
        arr = arr.transpose(1, 2, 0)
    return Image.fromarray(arr)


def save_png(image: torch.Tensor, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    to_pil(image).save(path)


def grid(rows: list[list[torch.Tensor]], pad: int = 2) -> torch.Tensor:
    """Rows of (3, H, W) images -> one (3, H', W') image with white padding."""
    h, w = rows[0][0].shape[-2:]
    ncol = max(len(r) for r in rows)
    out = torch.ones(3, len(rows) * (h + pad) + pad, ncol * (w + pad) + pad)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            out[:, y:y + h, x:x + w] = img.detach().float().cpu()
    return out
