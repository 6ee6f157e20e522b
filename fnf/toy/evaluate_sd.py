"""Sample the toy SD pipeline on held-out prompts x seeds and measure its defect rate and prompt alignment.

    HF_HUB_OFFLINE=1 python -m fnf.toy.evaluate_sd [--model fnf/assets/toy/sd] [--seeds 8] [--seed-set 0] [--grid out.png]

Sampling goes through fnf.models / fnf.sampling (the trainer's own code path). Defect: the shipped defect
classifier (p > 0.5), and the pixel-rule judge (fnf.toy.judges) as judge_defect_rate. Alignment: the shipped
attribute classifier (see fnf.toy.rewards.alignment).
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch

from ..encoding import encode_prompts
from ..families.registry import load_model
from ..sampling import initial_latents, sample_images
from . import ASSETS
from . import data as toydata
from .judges import pixel_judge
from .rewards import alignment, defect_probability

STEPS, GUIDANCE = 20, 1.5   # guidance 1.5: the defect rate is closest to the training rate (see README)
EVAL_SEED0 = 10_000      # evaluation noise seeds start here; training never samples noise from these


def eval_seed(seed_set: int, prompt: int, k: int) -> int:
    """The noise seed of the ``k``-th image of held-out prompt number ``prompt`` (its place in eval_prompts()) in
    evaluation seed set ``seed_set`` (``fnf demo --seed``): a hash, so no two (prompt, k) share noise (shared
    seeds cluster the images: a noise that draws a scratch draws it for every prompt) and no set overlaps another
    or the small integer seeds that training and validation use."""
    return int(np.random.SeedSequence([EVAL_SEED0, seed_set, prompt, k]).generate_state(1, dtype=np.uint64)[0]) >> 1


def eval_prompts(n_pairs: int | None = None) -> list[str]:
    """Held-out two-object prompts (training never saw them) and the single-object prompts."""
    held = toydata.heldout_prompts()
    return (held[:n_pairs] if n_pairs else held) + [toydata.caption_for([p]) for p in toydata.PAIRS]


@torch.no_grad()
def sample(model, prompts: list[str], seeds: list[int], *, steps: int = STEPS, guidance: float = GUIDANCE,
           batch: int = 32, denoiser=None) -> torch.Tensor:
    """Images (len(prompts), 3, H, W) in [0, 1]; prompt i uses noise seed seeds[i]; ``denoiser`` as in
    fnf.sampling.sample_images."""

    size = model.native_size
    out = []
    for i in range(0, len(prompts), batch):
        ps, ss = prompts[i:i + batch], seeds[i:i + batch]
        cond = encode_prompts(model, ps, height=size, width=size)
        uncond = encode_prompts(model, [""] * len(ps), height=size, width=size)
        x_T = torch.cat([initial_latents(model, 1, size, size, torch.Generator().manual_seed(s), "cpu") for s in ss])
        out.append(sample_images(model, x_T, cond, uncond, steps=steps, guidance_scale=guidance, eta=0.0, seed=0,
                                 denoiser=denoiser))
    return torch.cat(out)


def per_image(images: torch.Tensor, prompts: list[str], root: str = "") -> dict:
    """Per-image (B,) tensors: ``p_defect`` (defect classifier, the training reward's model), ``judge`` (the pixel
    rule of fnf.toy.judges, which no training sees), ``recall`` and ``exact`` (attribute classifier alignment);
    ``root``: folder of the small models (default the shipped ones)."""

    al = alignment(images, prompts, root)
    return {"p_defect": defect_probability(images, root), "judge": pixel_judge(images).float(),
            "recall": al["recall"], "exact": al["exact"]}


def measure(images: torch.Tensor, prompts: list[str], root: str = "") -> dict:
    m = per_image(images, prompts, root)
    p = m["p_defect"]
    return {"n": len(prompts), "defect_rate": float((p > 0.5).float().mean()), "defect_score": float(p.mean()),
            "judge_defect_rate": float(m["judge"].mean()),
            "alignment": float(m["recall"].mean()), "alignment_exact": float(m["exact"].mean())}


def save_grid(images: torch.Tensor, path: str, ncol: int = 8) -> None:
    from PIL import Image

    imgs = (images.clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8)
    n = len(imgs)
    rows = [np.concatenate(list(imgs[r:r + ncol]) + [np.zeros_like(imgs[0])] * (ncol - len(imgs[r:r + ncol])), 1)
            for r in range(0, n, ncol)]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(np.concatenate(rows, 0)).save(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=os.path.join(ASSETS, "sd"))
    p.add_argument("--seeds", type=int, default=8, help="noise seeds per prompt")
    p.add_argument("--seed-set", type=int, default=0, help="evaluation seed set (eval_seed; fnf demo --seed)")
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--guidance", type=float, default=GUIDANCE)
    p.add_argument("--grid", default="")
    p.add_argument("--json", default="")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    model = load_model(args.model)
    prompts = eval_prompts()
    ps = [pr for pr in prompts for _ in range(args.seeds)]
    ss = [eval_seed(args.seed_set, i, k) for i in range(len(prompts)) for k in range(args.seeds)]
    images = sample(model, ps, ss, steps=args.steps, guidance=args.guidance)
    pairs = [i for i, pr in enumerate(ps) if " and " in pr]
    singles = [i for i, pr in enumerate(ps) if " and " not in pr]
    result = {"model": args.model, "steps": args.steps, "guidance": args.guidance, "seeds_per_prompt": args.seeds,
              "seed_set": args.seed_set, "all": measure(images, ps),
              "heldout_pairs": measure(images[pairs], [ps[i] for i in pairs]),
              "single_objects": measure(images[singles], [ps[i] for i in singles]),
              "training_data_defect_rate": toydata.DEFECT_RATE}
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if args.grid:
        save_grid(images[:: max(1, args.seeds // 2)][:64], args.grid)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
