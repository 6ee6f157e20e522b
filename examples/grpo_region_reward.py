"""The Focus-N-Fix region term as reward shaping for an external GRPO / DDPO trainer (Flow-GRPO, DanceGRPO, TRL's
DDPO...): those trainers call a reward function ``reward_fn(images, prompts, metadata) -> (scores, info)`` on each
group of samples; wrap yours so that every sample's score becomes

    R = r(I, c) - beta * ||(1 - M(I0)) * (I0 - I)||_F          (fnf.region_reward)

where I0 is the frozen model's image from the same initial noise and the same per-step noise (the sample's seed:
put it in the metadata) and M(I0) its problem mask; both are computed once per (prompt, seed) and cached. No
gradient is needed anywhere: the task reward may be a black box (a VLM judge, OCR, a served model).

    python examples/grpo_region_reward.py --model DIR        # a local StableDiffusionPipeline folder

The demo here samples a group of G images per prompt with stochastic DDIM (eta = 1) from a LoRA model (random LoRA
weights stand in for a policy a few updates in), scores them through the wrapped reward function and prints the
group-normalised advantages a GRPO trainer would use. The task reward and the heatmap are stand-ins.
"""
from __future__ import annotations

import argparse

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from peft import LoraConfig

import fnf
import fnf_kernels


def task_reward(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Stand-in black-box reward (B,): mean brightness. Any scorer works: nothing here needs its gradient."""
    return images.mean(dim=(1, 2, 3))


def heatmap_fn(images: torch.Tensor) -> torch.Tensor:
    """Stand-in artifact heatmap (B, H, W): per-pixel redness."""
    return images[:, 0] - 0.5 * (images[:, 1] + images[:, 2])


class RegionShapedReward:
    """``reward_fn(images, prompts, metadata) -> (scores, info)``: ``task(images, prompts)`` plus
    ``fnf.region_reward(images, I0, M(I0), beta)``. ``reference_fn(prompts, seeds)`` gives I0 (the frozen model from
    the same seeds); ``mask_fn(I0)`` its (B, H, W) mask; each (prompt, seed) is sampled and localized once."""

    def __init__(self, task, reference_fn, mask_fn, beta: float = 1.0):
        self.task, self.reference_fn, self.mask_fn, self.beta = task, reference_fn, mask_fn, beta
        self.cache: dict = {}

    def references(self, prompts, seeds):
        missing = [(p, s) for p, s in dict.fromkeys(zip(prompts, seeds)) if (p, s) not in self.cache]
        if missing:
            with torch.no_grad():
                ref = self.reference_fn([p for p, _ in missing], [s for _, s in missing])
                mask = self.mask_fn(ref)
            self.cache.update({key: (ref[i], mask[i]) for i, key in enumerate(missing)})
        pairs = [self.cache[key] for key in zip(prompts, seeds)]
        return torch.stack([r for r, _ in pairs]), torch.stack([m for _, m in pairs])

    def __call__(self, images, prompts, metadata):
        reference, mask = self.references(list(prompts), [m["seed"] for m in metadata])
        with torch.no_grad():
            task = torch.as_tensor(self.task(images, prompts), dtype=torch.float32)
            region = fnf.region_reward(images.float(), reference.to(images.device), mask.to(images.device),
                                       self.beta)
        return task + region, {"task": task, "region": region}


def sample(pipe, prompts, seeds, steps: int, guidance: float, size: int) -> torch.Tensor:
    """Images (B, 3, H, W) in [0, 1]: stochastic DDIM (eta = 1), sample i's noise (x_T and every step's) from
    ``seeds[i]``."""
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    return pipe(list(prompts), num_inference_steps=steps, guidance_scale=guidance, eta=1.0, generator=gens,
                height=size, width=size, output_type="pt").images


def group_advantages(scores: torch.Tensor, group: int) -> torch.Tensor:
    """GRPO's advantages: each score minus its group's mean, over its group's std (groups are consecutive)."""
    g = scores.view(-1, group)
    return ((g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + 1e-6)).view(-1)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, metavar="DIR", help="local StableDiffusionPipeline folder")
    p.add_argument("--prompts", nargs="+", default=["a red car", "a photo of a cat"])
    p.add_argument("--group", type=int, default=4, help="samples per prompt (G)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--beta", type=float, default=1.0)
    p.add_argument("--lora-std", type=float, default=0.05, help="random LoRA B weights (0: the frozen model)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    pipe = StableDiffusionPipeline.from_pretrained(args.model, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    gen = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        for name, w in pipe.unet.named_parameters():
            if "lora_B" in name:
                w.copy_(torch.randn(w.shape, generator=gen) * args.lora_std)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    kw = dict(steps=args.steps, guidance=args.guidance, size=size)

    def reference_fn(prompts, seeds):
        pipe.unet.disable_adapters()            # the frozen model: the same UNet with LoRA off
        try:
            return sample(pipe, prompts, seeds, **kw)
        finally:
            pipe.unet.enable_adapters()

    def mask_fn(reference):
        heat = heatmap_fn(reference)
        return fnf_kernels.threshold_dilate(heat, torch.quantile(heat.flatten(1), 0.8, dim=1), 1)

    reward_fn = RegionShapedReward(task_reward, reference_fn, mask_fn, args.beta)
    # What the GRPO trainer does each step: G samples per prompt, each with a seed of its own in the metadata.
    prompts = [pr for pr in args.prompts for _ in range(args.group)]
    seeds = [args.seed * 100_000 + i for i in range(len(prompts))]
    with torch.no_grad():
        images = sample(pipe, prompts, seeds, **kw)
    scores, info = reward_fn(images, prompts, [{"seed": s} for s in seeds])
    adv = group_advantages(scores, args.group)
    for i, (pr, s) in enumerate(zip(prompts, seeds)):
        print(f"{pr!r:24} seed {s:6d}: task {info['task'][i]:.4f}  region {info['region'][i]:+.4f}  "
              f"R {scores[i]:.4f}  advantage {adv[i]:+.3f}", flush=True)
    return {"images": images, "prompts": prompts, "seeds": seeds, "scores": scores, "info": info,
            "advantages": adv, "reward_fn": reward_fn, "reference_fn": reference_fn, "mask_fn": mask_fn}


if __name__ == "__main__":
    main()
