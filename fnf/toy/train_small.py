"""Train the toy world's small models on the procedural data and evaluate them on held-out prompts and seeds.

    HF_HUB_OFFLINE=1 python -m fnf.toy.train_small            # all three, into fnf/assets/toy/

Training images come from fnf.toy.data with the training prompts and ``--data-seed``; evaluation images from
the held-out two-object prompts and single-object prompts with ``--eval-seed`` (never trained on). Images are
augmented (random blur / down-up sampling, noise, brightness) so the models also judge the softer images a
small diffusion model draws.
"""
from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F

from . import ASSETS
from . import data as toydata
from .models_small import CLASSES, save

DEFAULTS = dict(data_seed=200, eval_seed=999, n_train=8000, n_eval=1000, steps=0, batch=32, lr=2e-3, seed=0,
                threads=1)


STEPS = {"defect_classifier": 800, "defect_heatmap": 800, "attribute_classifier": 2500}   # used when --steps 0


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def eval_prompts() -> list[str]:
    """Held-out two-object prompts plus every single-object prompt (with seeds never trained on)."""
    return toydata.heldout_prompts() + [toydata.caption_for([p]) for p in toydata.PAIRS]


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random softening (down/up sampling), pixel noise and brightness/contrast jitter, per image."""
    b = x.shape[0]
    out = x.clone()
    kind = torch.randint(0, 3, (b,), generator=gen)
    for k, size in ((1, 32), (2, 24)):
        sel = kind == k
        if sel.any():
            small = F.interpolate(x[sel], size=(size, size), mode="bilinear", antialias=True, align_corners=False)
            out[sel] = F.interpolate(small, size=x.shape[-2:], mode="bilinear", align_corners=False)
    scale = 1 + 0.15 * (torch.rand(b, 1, 1, 1, generator=gen) - 0.5)
    shift = 0.08 * (torch.rand(b, 1, 1, 1, generator=gen) - 0.5)
    noise = torch.randn(x.shape, generator=gen) * 0.03 * torch.rand(b, 1, 1, 1, generator=gen)
    return (out * scale + shift + noise).clamp(0, 1)


def loss_fn(name, model, x, masks, defect, attrs):
    if name == "defect_classifier":
        return F.binary_cross_entropy_with_logits(model(x), defect.float())
    if name == "defect_heatmap":
        return F.binary_cross_entropy_with_logits(model(x), masks.float(), pos_weight=torch.tensor(5.0))
    return F.binary_cross_entropy_with_logits(model(x), attrs)


@torch.no_grad()
def evaluate(name, model, ds, soften: bool = False) -> dict:
    x = toydata.to_tensor(ds["images"])
    if soften:
        x = F.interpolate(F.interpolate(x, size=(32, 32), mode="bilinear", antialias=True, align_corners=False),
                          size=(64, 64), mode="bilinear", align_corners=False)
    outs = torch.cat([model(x[i:i + 200]) for i in range(0, x.shape[0], 200)])
    if name == "defect_classifier":
        pred = outs > 0
        y = torch.from_numpy(ds["defect"])
        return {"accuracy": float((pred == y).float().mean()), "recall": float(pred[y].float().mean()),
                "false_positive_rate": float(pred[~y].float().mean()), "base_rate": float(y.float().mean())}
    if name == "defect_heatmap":
        pred = torch.sigmoid(outs) > 0.5
        m = torch.from_numpy(ds["masks"])
        has = m.any(dim=(1, 2))
        inter = (pred & m).sum(dim=(1, 2)).float()
        union = (pred | m).sum(dim=(1, 2)).float()
        return {"iou_mean_defect_images": float((inter[has] / union[has]).mean()),
                "iou_pooled": float(inter.sum() / union.sum()),
                "clean_images_with_false_pixels": float(pred[~has].any(dim=(1, 2)).float().mean())}
    pred = outs > 0
    y = torch.from_numpy(ds["attrs"]) > 0.5
    return {"label_accuracy": float((pred == y).float().mean()),
            "exact_set_accuracy": float((pred == y).all(1).float().mean()),
            "recall": float(pred[y].float().mean())}


def train_one(name, train, args, gen) -> torch.nn.Module:
    torch.manual_seed(args.seed)
    model = CLASSES[name]()
    steps = args.steps or STEPS[name]
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    x_all = toydata.to_tensor(train["images"])
    m_all, d_all = torch.from_numpy(train["masks"]), torch.from_numpy(train["defect"])
    a_all = torch.from_numpy(train["attrs"])
    t0 = time.time()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = args.lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        idx = torch.randint(0, x_all.shape[0], (args.batch,), generator=gen)
        loss = loss_fn(name, model, augment(x_all[idx], gen), m_all[idx], d_all[idx], a_all[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0:
            log(f"{name} step {step}/{steps} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
    return model.eval().requires_grad_(False)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=ASSETS)
    p.add_argument("--models", nargs="+", default=list(CLASSES))
    for k, v in DEFAULTS.items():
        p.add_argument("--" + k.replace("_", "-"), type=type(v), default=v)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(args.seed)
    train = toydata.make_dataset(args.n_train, args.data_seed)
    held = toydata.make_dataset(args.n_eval, args.eval_seed, prompts=eval_prompts())
    for name in args.models:
        model = train_one(name, train, args, gen)
        metrics = {"clean": evaluate(name, model, held), "softened_32px": evaluate(name, model, held, soften=True)}
        log(f"{name}: {json.dumps(metrics)}")
        train_args = {**{k: getattr(args, k) for k in DEFAULTS}, "steps": args.steps or STEPS[name]}
        save(model, name, args.out, {"metrics_heldout": metrics, "train": train_args,
                                     "eval_prompts": "heldout two-object + all single-object"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
