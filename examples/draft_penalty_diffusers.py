"""The Focus-N-Fix penalty inside a plain diffusers DRaFT-K loop: no fnf trainer, only diffusers, peft and
fnf_kernels.

    python examples/draft_penalty_diffusers.py --model DIR     # a local StableDiffusionPipeline folder

Per training step: draw x_T; sample the frozen model (LoRA adapters off, no grad) to I0; threshold and dilate an
artifact heatmap of I0 to the mask M (fnf_kernels.threshold_dilate; here a stand-in heatmap, the redness of I0);
sample the LoRA model from the same x_T with grad through its last K DDIM steps and the VAE decode to I; then
    loss = -r(I) + beta * ||(1 - M) * (I0 - I)||_F            (fnf_kernels.masked_frobenius_penalty)
The reward is a stand-in too (mean brightness); swap in your own differentiable reward and heatmap model.
"""
from __future__ import annotations

import argparse

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from peft import LoraConfig

import fnf_kernels


def reward_fn(images: torch.Tensor) -> torch.Tensor:
    """Stand-in differentiable reward (B,): mean brightness of images in [0, 1]."""
    return images.mean(dim=(1, 2, 3))


def heatmap_fn(images: torch.Tensor) -> torch.Tensor:
    """Stand-in artifact heatmap (B, H, W): per-pixel redness R - (G + B) / 2."""
    return images[:, 0] - 0.5 * (images[:, 1] + images[:, 2])


def sample(pipe, x_T, cond, uncond, guidance: float, grad_steps: int) -> torch.Tensor:
    """DDIM (eta 0) with classifier-free guidance from x_T; the last ``grad_steps`` steps and the decode carry
    grad. Returns images in [0, 1]."""
    unet, sched = pipe.unet, pipe.scheduler
    timesteps = sched.timesteps
    x = x_T * sched.init_noise_sigma
    for i, t in enumerate(timesteps):
        with torch.set_grad_enabled(i >= len(timesteps) - grad_steps and torch.is_grad_enabled()):
            inp = sched.scale_model_input(torch.cat([x, x]), t)
            eps_u, eps_c = unet(inp, t, encoder_hidden_states=torch.cat([uncond, cond])).sample.chunk(2)
            x = sched.step(eps_u + guidance * (eps_c - eps_u), t, x).prev_sample
    images = pipe.vae.decode(x / pipe.vae.config.scaling_factor).sample
    return (images / 2 + 0.5).clamp(0, 1)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, metavar="DIR", help="local StableDiffusionPipeline folder")
    p.add_argument("--prompt", default="a red car")
    p.add_argument("--train-steps", type=int, default=3)
    p.add_argument("--sampling-steps", type=int, default=4)
    p.add_argument("--k", type=int, default=2, help="DDIM steps with grad (DRaFT-K)")
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--beta", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    pipe = StableDiffusionPipeline.from_pretrained(args.model, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.scheduler.set_timesteps(args.sampling_steps)
    for m in (pipe.unet, pipe.vae, pipe.text_encoder):
        m.requires_grad_(False)
    # LoRA on the attention projections; B starts at 0, so step 0's I equals I0 exactly.
    pipe.unet.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    params = [q for q in pipe.unet.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr)
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(args.prompt, "cpu", 1, True, negative_prompt="")
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    latent = (1, pipe.unet.config.in_channels, size // pipe.vae_scale_factor, size // pipe.vae_scale_factor)
    gen = torch.Generator().manual_seed(args.seed)
    history = []
    for step in range(args.train_steps):
        x_T = torch.randn(latent, generator=gen)
        with torch.no_grad():
            pipe.unet.disable_adapters()              # the frozen model: the same UNet with LoRA off
            reference = sample(pipe, x_T, cond, uncond, args.guidance, 0)
            pipe.unet.enable_adapters()
            heat = heatmap_fn(reference)
            threshold = torch.quantile(heat.flatten(1), 0.8, dim=1)   # the reddest 20% (per image), dilated
            mask = fnf_kernels.threshold_dilate(heat, threshold, 1)
        image = sample(pipe, x_T, cond, uncond, args.guidance, args.k)
        reward = reward_fn(image)
        penalty = fnf_kernels.masked_frobenius_penalty(image, reference, mask)   # batch mean of ||.||_F
        loss = -reward.mean() + args.beta * penalty
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append({"step": step, "reward": reward.mean().item(), "penalty": penalty.item(),
                        "loss": loss.item()})
        print(f"step {step}: reward {history[-1]['reward']:.4f}  penalty {history[-1]['penalty']:.4f}  "
              f"loss {history[-1]['loss']:.4f}", flush=True)
    return {"history": history, "image": image.detach(), "reference": reference, "mask": mask,
            "pipe": pipe, "params": params}


if __name__ == "__main__":
    main()
