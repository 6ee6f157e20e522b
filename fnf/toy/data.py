"""Procedural 64x64 shapes dataset with captions, attribute labels and an optional local defect.

Each image shows one or two shapes (circle / square / triangle x red / green / blue / yellow) on a plain or
lightly textured background, captioned "a red circle" or "a blue square and a yellow triangle". About 30% of
images get a defect: a near-black scratch (a 2-3 px stroke of 10-18 px with a shorter branch) just beside an
object, the kind of local artifact a reader sees at a glance and that no caption asks for. Nothing else in the
world is dark (every object colour and background has a channel above 0.55), so a pixel rule can judge it too
(:func:`dark_pixels`). The ground-truth mask is the scratch dilated by one pixel. Everything is deterministic
from (seed, index).
"""
from __future__ import annotations

import numpy as np

SIZE = 64
SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (0.90, 0.15, 0.15), "green": (0.15, 0.72, 0.20), "blue": (0.15, 0.30, 0.90),
           "yellow": (0.95, 0.85, 0.10)}
COLOUR_NAMES = tuple(COLOURS)
PAIRS = tuple((s, c) for s in SHAPES for c in COLOUR_NAMES)   # attribute index = PAIRS.index((shape, colour))
N_ATTRS = len(PAIRS)
DEFECT_RATE = 0.3
SCRATCH = (0.06, 0.06, 0.07)   # near-black; darker than anything else in the world
DARK = 0.35                     # a pixel whose brightest channel is below this is scratch-dark
WORDS = ("a", "and") + SHAPES + COLOUR_NAMES


def caption_for(objects) -> str:
    """[(shape, colour), ...] -> 'a red circle' / 'a red circle and a blue square'."""
    return " and ".join(f"a {c} {s}" for s, c in objects)


def parse_caption(caption: str) -> list[tuple[str, str]]:
    """Inverse of :func:`caption_for`: the (shape, colour) pairs a caption asks for."""
    out = []
    for part in caption.strip().split(" and "):
        words = part.split()
        colour = next(w for w in words if w in COLOURS)
        shape = next(w for w in words if w in SHAPES)
        out.append((shape, colour))
    return out


def attrs_for(objects) -> np.ndarray:
    """Multi-hot (N_ATTRS,) float32 vector of the (shape, colour) pairs present."""
    v = np.zeros(N_ATTRS, np.float32)
    for pair in objects:
        v[PAIRS.index(tuple(pair))] = 1.0
    return v


def all_pair_captions() -> list[str]:
    """Every two-object caption (ordered, two different (shape, colour) pairs)."""
    return [caption_for([a, b]) for a in PAIRS for b in PAIRS if a != b]


def heldout_prompts() -> list[str]:
    """Two-object captions that training never sees (a fixed 1-in-6 subset, same for every seed)."""
    caps = all_pair_captions()
    rng = np.random.default_rng(1234)
    idx = sorted(rng.choice(len(caps), size=len(caps) // 6, replace=False).tolist())
    return [caps[i] for i in idx]


def train_prompts() -> list[str]:
    """All single-object captions and the two-object captions not held out."""
    held = set(heldout_prompts())
    return [caption_for([p]) for p in PAIRS] + [c for c in all_pair_captions() if c not in held]


# ------------------------------------------------------------------------------------------ drawing
_YY, _XX = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5


def shape_mask(shape: str, cx: float, cy: float, r: float) -> np.ndarray:
    """Boolean (SIZE, SIZE) mask of a shape centred at (cx, cy) with 'radius' r."""
    if shape == "circle":
        return (_XX - cx) ** 2 + (_YY - cy) ** 2 <= r * r
    if shape == "square":
        h = r * 0.85
        return (np.abs(_XX - cx) <= h) & (np.abs(_YY - cy) <= h)
    if shape == "triangle":  # apex up; base at cy + r*0.8, apex at cy - r
        top, bottom = cy - r, cy + 0.8 * r
        t = (_YY - top) / (bottom - top)
        return (t >= 0) & (t <= 1) & (np.abs(_XX - cx) <= t * r)
    raise ValueError(f"unknown shape {shape!r}")


def background(rng: np.random.Generator) -> np.ndarray:
    """A pale, near-neutral background: plain (half of the time) or lightly textured."""
    base = rng.uniform(0.72, 0.92) + rng.uniform(-0.03, 0.03, size=3)
    img = np.broadcast_to(base.astype(np.float32), (SIZE, SIZE, 3)).copy()
    if rng.random() < 0.5:
        kind = rng.integers(3)
        if kind == 0:    # soft gradient
            a = rng.uniform(0, 2 * np.pi)
            g = (np.cos(a) * _XX + np.sin(a) * _YY) / SIZE - 0.5
            img += (0.08 * g)[..., None]
        elif kind == 1:  # gentle stripes
            period = rng.uniform(10, 20)
            img += (0.025 * np.sin(2 * np.pi * (_XX + _YY * rng.uniform(-1, 1)) / period))[..., None]
        else:            # low-frequency blotches (8x8 noise upsampled)
            n = rng.normal(0, 0.025, size=(8, 8)).astype(np.float32)
            img += np.kron(n, np.ones((8, 8), np.float32))[..., None]
    return img


def segment_mask(x0: float, y0: float, x1: float, y1: float, width: float) -> np.ndarray:
    """Boolean (SIZE, SIZE) mask of the pixels within width/2 of the segment (x0, y0)-(x1, y1)."""
    dx, dy = x1 - x0, y1 - y0
    t = np.clip(((_XX - x0) * dx + (_YY - y0) * dy) / max(dx * dx + dy * dy, 1e-6), 0, 1)
    return (_XX - x0 - t * dx) ** 2 + (_YY - y0 - t * dy) ** 2 <= (width / 2) ** 2


def scratch_mask(rng: np.random.Generator, cx: float, cy: float) -> np.ndarray:
    """A scratch centred near (cx, cy): a main stroke and a shorter branch off it (boolean mask)."""
    length, ang, width = rng.uniform(10, 18), rng.uniform(0, np.pi), float(rng.choice([2.0, 2.6, 3.2]))
    ux, uy = np.cos(ang), np.sin(ang)
    m = segment_mask(cx - ux * length / 2, cy - uy * length / 2, cx + ux * length / 2, cy + uy * length / 2, width)
    at = rng.uniform(-0.3, 0.3) * length
    bx, by = cx + ux * at, cy + uy * at
    bang = ang + rng.choice([-1, 1]) * rng.uniform(0.5, 1.2)
    blen = rng.uniform(0.35, 0.6) * length
    return m | segment_mask(bx, by, bx + np.cos(bang) * blen, by + np.sin(bang) * blen, width)


def dilate(mask: np.ndarray, radius: int = 1) -> np.ndarray:
    """Binary dilation with a (2r+1)^2 square."""
    out = mask.copy()
    h, w = mask.shape
    p = np.pad(mask, radius)
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            out |= p[dy:dy + h, dx:dx + w]
    return out


def dark_pixels(images: np.ndarray) -> np.ndarray:
    """Per image, the number of scratch-dark pixels (brightest channel < DARK); images (..., H, W, 3)."""
    return (images.max(axis=-1) < DARK).sum(axis=(-2, -1))


def render(seed: int, index: int, prompts: list[str] | None = None, defect: bool | None = None) -> dict:
    """One sample, deterministic from (seed, index).

    prompts: captions to draw from (default :func:`train_prompts`); defect: force the defect on/off.
    Returns image (64,64,3) float32 in [0,1], mask (64,64) bool, defect bool, caption, objects, attrs."""
    rng = np.random.default_rng([seed, index])
    prompts = prompts if prompts is not None else train_prompts()
    caption = prompts[int(rng.integers(len(prompts)))]
    objects = parse_caption(caption)
    img = background(rng)
    n = len(objects)
    placed = []
    occupied = np.zeros((SIZE, SIZE), bool)
    for shape, colour in objects:
        for _attempt in range(50):
            r = rng.uniform(9, 15) if n == 1 else rng.uniform(7, 11)
            cx, cy = rng.uniform(r + 2, SIZE - r - 2, size=2)
            if all((cx - px) ** 2 + (cy - py) ** 2 > (r + pr + 3) ** 2 for px, py, pr in placed):
                break
        m = shape_mask(shape, cx, cy, r)
        shade = rng.uniform(0.9, 1.05)
        img[m] = np.clip(np.float32(COLOURS[colour]) * shade, 0, 1)
        occupied |= m
        placed.append((cx, cy, r))
    has_defect = bool(rng.random() < DEFECT_RATE) if defect is None else bool(defect)
    mask = np.zeros((SIZE, SIZE), bool)
    if has_defect:
        px, py, pr = placed[int(rng.integers(len(placed)))]
        ang = rng.uniform(0, 2 * np.pi)
        dist = pr + rng.uniform(3, 7)            # centre just beyond the object's edge
        sx = float(np.clip(px + dist * np.cos(ang), 8, SIZE - 8))
        sy = float(np.clip(py + dist * np.sin(ang), 8, SIZE - 8))
        stroke = scratch_mask(rng, sx, sy)
        img[stroke] = np.float32(SCRATCH) * rng.uniform(0.8, 1.2)
        mask = dilate(stroke, 1)
    return {"image": np.clip(img, 0, 1).astype(np.float32), "mask": mask, "defect": has_defect,
            "caption": caption, "objects": objects, "attrs": attrs_for(objects)}


def make_dataset(n: int, seed: int = 0, prompts: list[str] | None = None, start: int = 0) -> dict:
    """n samples (indices start..start+n-1) stacked: images (n,64,64,3) float32, masks (n,64,64) bool,
    defect (n,) bool, attrs (n,12) float32, captions list[str]."""
    prompts = prompts if prompts is not None else train_prompts()
    items = [render(seed, start + i, prompts) for i in range(n)]
    return {"images": np.stack([it["image"] for it in items]), "masks": np.stack([it["mask"] for it in items]),
            "defect": np.array([it["defect"] for it in items]), "attrs": np.stack([it["attrs"] for it in items]),
            "captions": [it["caption"] for it in items]}


def to_tensor(images: np.ndarray):
    """(n,H,W,3) float numpy -> (n,3,H,W) float32 torch tensor."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).float()
