"""Toy-world / detector evaluation of Separate-and-Enhance: success rate of two-object prompts.

The demo (fnf/toy) supplies the images and an attribute classifier; this module only counts. A prompt succeeds
when the classifier finds every requested (object, attribute) pair in its image -- for the toy world, both
shapes with their colours.

    classify(images: (N, 3, H, W) float in [0, 1]) -> list (length N) of sets of (object, attribute) pairs
    found in each image (attribute None when the classifier has no attribute for it; a requested attribute of
    None matches any attribute).
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch

Pair = tuple  # (object, attribute or None)


def success(found: Iterable[Pair], wanted: Sequence[Pair]) -> bool:
    """True when every wanted (object, attribute) is among ``found``."""
    found = set(found)
    objects_found = {o for o, _ in found}
    return all((o in objects_found) if a is None else ((o, a) in found) for o, a in wanted)


def success_rate(images: torch.Tensor, wanted: Sequence[Sequence[Pair]],
                 classify: Callable[[torch.Tensor], list], batch_size: int = 64) -> dict:
    """Success rate over images[i] generated for ``wanted[i]`` (e.g. [("circle", "red"), ("square", "blue")]).

    Returns {"success_rate", "n", "successes", "per_prompt": [bool]}; ``classify`` is called in batches."""
    if images.shape[0] != len(wanted):
        raise ValueError(f"{images.shape[0]} images but {len(wanted)} prompt specifications")
    per = []
    with torch.no_grad():
        for s in range(0, images.shape[0], batch_size):
            found = classify(images[s:s + batch_size])
            if len(found) != min(batch_size, images.shape[0] - s):
                raise ValueError("classify must return one set of (object, attribute) pairs per image")
            per += [success(f, w) for f, w in zip(found, wanted[s:s + batch_size])]
    n = len(per)
    return {"success_rate": sum(per) / n if n else float("nan"), "n": n, "successes": sum(per), "per_prompt": per}


def compare(base: dict, tuned: dict, base_single: dict | None = None, tuned_single: dict | None = None) -> dict:
    """Summary for the report: two-object success base vs tuned, and the single-object change (forgetting)."""
    out = {"base": base["success_rate"], "sepen": tuned["success_rate"],
           "gain": tuned["success_rate"] - base["success_rate"]}
    if base_single is not None and tuned_single is not None:
        out["single_base"] = base_single["success_rate"]
        out["single_sepen"] = tuned_single["success_rate"]
        out["single_change"] = tuned_single["success_rate"] - base_single["success_rate"]
    return out
