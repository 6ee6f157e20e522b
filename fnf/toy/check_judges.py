"""How well the toy world's judges see through the toy VAE: held-out images round-tripped through the shipped
VAE (encode mean -> decode), then the defect classifier, the heatmap model, the attribute classifier and the
pixel rule (``fnf.toy.data.dark_pixels``) scored against the ground truth the data knows.

    HF_HUB_OFFLINE=1 python -m fnf.toy.check_judges            # writes fnf/assets/toy/judges.json

The images a diffusion model draws are decoded by this VAE, so these numbers (not the ones on clean renders in
each model's config.json) say how far a judge can be trusted on generated images.
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch

from . import ASSETS
from . import data as toydata
from .models_small import load
from .train_small import eval_prompts

EVAL_SEED = 999          # the small models' held-out seed (train_small.DEFAULTS["eval_seed"])


@torch.no_grad()
def vae_roundtrip(sd_folder: str, images: torch.Tensor, batch: int = 100) -> torch.Tensor:
    """(N, 3, 64, 64) in [0, 1] -> the same images encoded (posterior mean) and decoded by the folder's VAE."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(sd_folder, subfolder="vae").eval()
    out = [vae.decode(vae.encode(images[i:i + batch] * 2 - 1).latent_dist.mean).sample for i in range(0, len(images), batch)]
    return (torch.cat(out).clamp(-1, 1) + 1) / 2


@torch.no_grad()
def judge_metrics(x: torch.Tensor, ds: dict) -> dict:
    """Every judge on images ``x`` against the ground truth of dataset ``ds``."""

    defect = torch.from_numpy(ds["defect"])
    logit = torch.cat([load("defect_classifier")(x[i:i + 200]) for i in range(0, len(x), 200)])
    pred = logit > 0
    heat = torch.cat([torch.sigmoid(load("defect_heatmap")(x[i:i + 200])) for i in range(0, len(x), 200)]) > 0.5
    m = torch.from_numpy(ds["masks"])
    inter, union = (heat & m).sum((1, 2)).float(), (heat | m).sum((1, 2)).float()
    attrs = torch.cat([load("attribute_classifier")(x[i:i + 200]) for i in range(0, len(x), 200)]) > 0
    want = torch.from_numpy(ds["attrs"]) > 0.5
    dark = toydata.dark_pixels(x.permute(0, 2, 3, 1).numpy())
    d = ds["defect"]
    return {
        "n_images": len(x), "base_rate": float(d.mean()),
        "defect_classifier": {"accuracy": float((pred == defect).float().mean()),
                              "recall": float(pred[defect].float().mean()),
                              "false_positive_rate": float(pred[~defect].float().mean())},
        "defect_heatmap": {"iou_mean_defect_images": float((inter[defect] / union[defect]).mean()),
                           "clean_images_with_false_pixels": float(heat[~defect].any(dim=(1, 2)).float().mean())},
        "attribute_classifier": {"exact_set_accuracy": float((attrs == want).all(1).float().mean()),
                                 "recall": float(attrs[want].float().mean())},
        "dark_pixels": {"defect_min": int(dark[d].min()), "defect_median": float(np.median(dark[d])),
                        "clean_max": int(dark[~d].max()),
                        "clean_with_any": float((dark[~d] > 0).mean())},
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sd", default=os.path.join(ASSETS, "sd"), help="toy pipeline folder whose VAE is used")
    p.add_argument("--n", type=int, default=1000, help="held-out images")
    p.add_argument("--out", default=os.path.join(ASSETS, "judges.json"))
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    ds = toydata.make_dataset(args.n, EVAL_SEED, prompts=eval_prompts())
    x = toydata.to_tensor(ds["images"])
    res = {"eval_seed": EVAL_SEED, "clean_renders": judge_metrics(x, ds),
           "vae_decoded": judge_metrics(vae_roundtrip(args.sd, x), ds)}
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
