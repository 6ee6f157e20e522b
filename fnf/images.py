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


def labelled_row(images: list[torch.Tensor], labels: list[str], min_width: int = 160, pad: int = 2) -> torch.Tensor:
    """(3, H, W) or (H, W) images side by side, each under its label, scaled up (nearest) to at least ``min_width``
    pixels so the label fits: one (3, H', W') image."""
    from PIL import ImageDraw, ImageFont

    tiles = []
    for img in images:
        img = img.detach().float().cpu()
        img = img.expand(3, *img.shape[-2:]) if img.dim() == 2 or img.shape[0] == 1 else img
        scale = max(1, -(-min_width // img.shape[-1]))
        if scale > 1:
            img = torch.nn.functional.interpolate(img[None], scale_factor=scale, mode="nearest")[0]
        tiles.append(img)
    h = max(t.shape[-2] for t in tiles)
    try:
        font, ellipsis = ImageFont.load_default(size=14), "…"
    except TypeError:   # Pillow < 10.1: one latin-1 bitmap font, no size
        font, ellipsis = ImageFont.load_default(), "..."
    head = 22
    row = torch.ones(3, head + h + pad, sum(t.shape[-1] for t in tiles) + pad * (len(tiles) + 1))
    x = pad
    for t in tiles:
        row[:, head:head + t.shape[-2], x:x + t.shape[-1]] = t
        x += t.shape[-1] + pad
    canvas = to_pil(row)
    draw = ImageDraw.Draw(canvas)
    x = pad
    for t, label in zip(tiles, labels):
        text = label
        while len(text) > 3 and draw.textlength(text, font=font) > t.shape[-1] - 4:
            text = text[:-1 - len(ellipsis)] + ellipsis
        draw.text((x + 2, 3), text, fill=(0, 0, 0), font=font)
        x += t.shape[-1] + pad
    return torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 255.0).permute(2, 0, 1)
