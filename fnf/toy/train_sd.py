"""Train the toy Stable Diffusion pipeline (VAE, then text encoder + UNet) on the procedural shapes data.

    HF_HUB_OFFLINE=1 python -m fnf.toy.train_sd --out fnf/assets/toy/sd

Phase 1 trains a small AutoencoderKL (64x64 RGB <-> 4x16x16 latents; the scratch's pixels weigh more in
the reconstruction loss so the decoder keeps it sharp); ``--vae-from DIR`` loads one instead. Phase 2 freezes
it, encodes the data once, and trains a tiny CLIPTextModel (toy tokenizer) jointly with a small
UNet2DConditionModel on DDPM epsilon prediction (scaled-linear betas, the schedule of the DDIM scheduler shipped
with it), dropping 10% of captions for classifier-free guidance, with an EMA of the weights. Everything is
seeded; the EMA pipeline is saved with save_pretrained every ``--save-every`` steps, so a partial run is a usable
pipeline folder.

The text encoder has no transformer layers by default (``--text-layers 0``, toy v3): each token's state is its
word embedding plus its position, so the UNet has to read "red" and "circle" from those two tokens, and an
object's tokens own its region, as in SD's cross-attention. With causal layers (v2: 2) the later tokens, EOS
and the padding carry the whole prompt and the UNet read the objects from there; the object words then held
0.04-0.07 of the attention each.

Cost (the shipped model): VAE ~17 min (1000 steps, one thread, measured 1040 s under load); UNet 31 min (5000
steps, ``--threads 2`` on the 2 idle cores: 1850 s). The shipped v3 command (sd/training.json) reused the v2 VAE
with ``--vae-from``; phase 2 draws from a freshly seeded stream, so training that VAE first gives the same UNet.
The data, noise and initialisations come from seeded generators; results are bitwise reproducible on the same
torch build and thread count (the log of a rerun matched the VAE losses step for step).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time

import torch
import torch.nn.functional as F

from . import data as toydata
from .tokenizer import MAX_LENGTH, write_tokenizer

DEFAULTS = dict(seed=0, data_seed=100, n_images=10000, vae_steps=1000, vae_batch=16, vae_lr=2e-3,
                unet_steps=5000, unet_batch=32, unet_lr=1e-3, ema=0.998, cfg_drop=0.1, save_every=250,
                threads=1, defect_weight=8.0, attention_heads=2, text_layers=0, vae_from="")


def _cosine(step: int, total: int) -> float:
    """Cosine decay from 1 to 0.1 over ``total`` steps."""
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / total))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(16, 32, 32), in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                         layers_per_block=1, norm_num_groups=8, sample_size=64, mid_block_add_attention=False)


def build_text_encoder(vocab_size: int, layers: int = 2):
    """A tiny CLIPTextModel. ``layers`` = 0 keeps only the token + position embeddings and the final layer norm:
    each token's state is its own word at its place, so the UNet must read an object from that object's tokens
    (no token carries the whole prompt, as the causal layers' later tokens and EOS do)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, max_position_embeddings=MAX_LENGTH, projection_dim=64,
                         bos_token_id=0, eos_token_id=1, pad_token_id=2)
    return CLIPTextModel(cfg)


def build_unet(heads: int = 2):
    """UNet with ``heads`` attention heads per transformer block (64 channels: 2 heads of width 32), wide enough
    for an object's tokens to own its region. (diffusers' ``attention_head_dim`` is the head *count* here.)"""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=heads, norm_num_groups=8)


def build_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1, num_train_timesteps=1000)


def train_vae(vae, images, masks, args, gen):
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    n = images.shape[0]
    vae.train()
    t0 = time.time()
    for step in range(args.vae_steps):
        lr = args.vae_lr * min(1.0, (step + 1) / 50) * _cosine(step, args.vae_steps)
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(0, n, (args.vae_batch,), generator=gen)
        x = images[idx] * 2 - 1
        w = 1.0 + args.defect_weight * masks[idx].float()[:, None]
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        loss = ((rec - x).abs() * w).mean() + ((rec - x) ** 2 * w).mean() + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == args.vae_steps - 1:
            log(f"vae step {step}/{args.vae_steps} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
    vae.eval()


@torch.no_grad()
def encode_all(vae, images, batch=128):
    means, stds = [], []
    for i in range(0, images.shape[0], batch):
        post = vae.encode(images[i:i + batch] * 2 - 1).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    return torch.cat(means), torch.cat(stds)


def save_pipeline(folder, vae, text_encoder, tokenizer, unet, meta):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=build_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    tmp = folder.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    with open(os.path.join(tmp, "training.json"), "w") as f:
        json.dump(meta, f, indent=1)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join("fnf", "assets", "toy", "sd"))
    for k, v in DEFAULTS.items():
        p.add_argument("--" + k.replace("_", "-"), type=type(v), default=v)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    command = "python -m fnf.toy.train_sd " + " ".join(argv if argv is not None else sys.argv[1:])
    meta = {"command": command, "args": vars(args), "train_prompts": len(toydata.train_prompts()),
            "heldout_prompts": toydata.heldout_prompts()}

    log(f"data: {args.n_images} images, seed {args.data_seed}")
    ds = toydata.make_dataset(args.n_images, args.data_seed)
    images, masks = toydata.to_tensor(ds["images"]), torch.from_numpy(ds["masks"])
    meta["data_defect_rate"] = float(ds["defect"].mean())

    from transformers import CLIPTokenizer
    tok_dir = args.out.rstrip("/") + ".tok"
    write_tokenizer(tok_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    shutil.rmtree(tok_dir)

    torch.manual_seed(args.seed + 1)
    t0 = time.time()
    if args.vae_from:      # reuse a VAE trained on the same data (phase 1 skipped; the noise stream then differs)
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(args.vae_from)
        log(f"vae: loaded {args.vae_from} (phase 1 skipped)")
    else:
        vae = build_vae()
        train_vae(vae, images, masks, args, gen)
    vae.requires_grad_(False)
    mean, std = encode_all(vae, images)
    scale = float(1.0 / mean.std())
    vae.register_to_config(scaling_factor=scale)
    with torch.no_grad():
        rec = vae.decode(mean[:256]).sample.clamp(-1, 1) * 0.5 + 0.5
        meta["vae_rec_mae"] = float((rec - images[:256]).abs().mean())
        m = masks[:256, None].expand_as(rec)
        meta["vae_rec_mae_defect"] = float((rec - images[:256]).abs()[m].mean()) if m.any() else None
    meta["vae_seconds"] = time.time() - t0
    log(f"vae done: scale {scale:.3f} rec MAE {meta['vae_rec_mae']:.4f} defect-region MAE {meta['vae_rec_mae_defect']}")

    ids = tokenizer(ds["captions"], padding="max_length", max_length=MAX_LENGTH, truncation=True,
                    return_tensors="pt").input_ids
    empty = tokenizer([""], padding="max_length", max_length=MAX_LENGTH, return_tensors="pt").input_ids
    # Phase 2 draws from a fresh stream, so a run with --vae-from (phase 1 skipped) trains the same UNet as a run
    # that trains that VAE first.
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed + 2)
    text_encoder = build_text_encoder(len(tokenizer), args.text_layers)
    torch.manual_seed(args.seed + 3)
    unet = build_unet(args.attention_heads)
    ema_unet, ema_text = build_unet(args.attention_heads), build_text_encoder(len(tokenizer), args.text_layers)
    ema_unet.load_state_dict(unet.state_dict())
    ema_text.load_state_dict(text_encoder.state_dict())
    ema_unet.requires_grad_(False)
    ema_text.requires_grad_(False)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    log(f"unet {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M params, text encoder "
        f"{sum(p.numel() for p in text_encoder.parameters()) / 1e6:.2f}M")
    opt = torch.optim.AdamW(params, lr=args.unet_lr, weight_decay=0.01)
    sched = build_scheduler()
    acp = sched.alphas_cumprod.float()
    n = images.shape[0]
    t0 = time.time()
    unet.train()
    text_encoder.train()
    for step in range(args.unet_steps):
        lr = args.unet_lr * min(1.0, (step + 1) / 100) * _cosine(step, args.unet_steps)
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(0, n, (args.unet_batch,), generator=gen)
        z0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scale
        t = torch.randint(0, 1000, (args.unet_batch,), generator=gen)
        noise = torch.randn(z0.shape, generator=gen)
        a = acp[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        tok = ids[idx].clone()
        drop = torch.rand(args.unet_batch, generator=gen) < args.cfg_drop
        tok[drop] = empty
        cond = text_encoder(tok)[0]
        pred = unet(zt, t, cond).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, m_ in ((ema_unet, unet), (ema_text, text_encoder)):
                for pe, pm in zip(e.parameters(), m_.parameters()):
                    pe.lerp_(pm, 1 - decay)
        if step % 50 == 0:
            el = time.time() - t0
            log(f"unet step {step}/{args.unet_steps} loss {loss.item():.4f} lr {lr:.2e} ({el:.0f}s, "
                f"eta {el / (step + 1) * (args.unet_steps - step - 1) / 60:.1f} min)")
        if (step + 1) % args.save_every == 0 or step + 1 == args.unet_steps:
            meta.update(unet_steps_done=step + 1, unet_seconds=time.time() - t0, last_loss=loss.item())
            save_pipeline(args.out, vae, ema_text, tokenizer, ema_unet, meta)
            log(f"saved {args.out} at step {step + 1}")
    log("done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
