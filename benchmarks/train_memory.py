"""Peak GPU memory and step time of real Focus-N-Fix training steps at full size, memory features one by one.

    python benchmarks/train_memory.py --model sd15                       # SD-1.5 architecture at 512^2
    python benchmarks/train_memory.py --model sdxl                       # SDXL architecture at 1024^2
    python benchmarks/train_memory.py --model tiny --steps 2             # CPU smoke run (no GPU needed; tiny_xl
                                                                         # for the SDXL code path)
    python benchmarks/train_memory.py --model sd15 --variants naive,full,draft_k --json out.json

Models are built in memory from architecture configs with random weights (nothing is downloaded): the UNet, VAE
and CLIP text encoder(s) of SD-1.5 (UNet ~860M) or SDXL (UNet ~2.6B, CLIP-L + OpenCLIP-bigG), and a reward
model of realistic size (a CLIP ViT-L/14 vision tower with an MLP head). Each variant runs ``fnf.train.train``
(the trainer's own code path, in a fresh model) for ``--steps`` optimizer steps at T = 50 DDIM steps, K = 2,
CFG 7.5, LoRA rank 64, batch 1, bf16 weights and autocast, the mask from the reward's input saliency; the first
step is warm-up, ``step_s`` is the median of the rest and ``peak_gib`` is torch.cuda.max_memory_allocated over
the whole run (model weights included).

Variants (cumulative: each adds one memory feature to the one before):
  naive                   no checkpointing, text encoders stay on the device, no fused LoRA
  +unet_checkpointing     UNet gradient checkpointing on the K grad-carrying steps
  +vae_checkpointing      VAE decoder checkpointing
  +reward_checkpointing   reward model checkpointing
  +offload_text_encoder   text encoders leave the device after encoding (= fnf's default memory settings)
  full                    + memory.fused_lora on (fused LoRA attention; I0 and I share the no-grad steps)
  full+reference_pool     full with train.seeds_per_prompt 1: I0 and masks computed once before training
  draft_k                 plain DRaFT-K at the full settings: beta 0, no localizer, no I0 trajectory
Goals (issue 7): SD-1.5 at 512^2 full <= 8 GiB; SDXL at 1024^2 full <= 16 GiB; full step <= 1.25x draft_k step.
Records go to --json as a list of {"benchmark", "device", "commit", "date", "command", "model", "resolution",
"variant", "peak_gib", "step_s", ...}; peak_gib is null on CPU.
On a GPU (or with --estimate) each record also holds ``fnf estimate-memory``'s prediction for the same variant
(``estimate_gib``, ``estimate_peak_phase``, and ``measured_over_estimate`` on a GPU): the first GPU run calibrates
the estimator's margin.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import sys
import tempfile
import time

import torch

from fnf.families.base import tokenizer_class
from fnf.memory.archs import ClipL14Reward

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TOY_TOKENIZER = os.path.join(ROOT, "fnf", "assets", "toy", "sd", "tokenizer")
PROMPTS = ["a red circle and a blue square", "a green triangle", "a yellow circle and a red triangle"]

# ------------------------------------------------------------------------------------------ architectures
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280),
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                 cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)
SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816, norm_num_groups=32)
SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
              block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
CLIP_BIGG = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                 num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
VIT_L14 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
               image_size=224, patch_size=14, hidden_act="quick_gelu")

TINY_UNET = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=4,
                 norm_num_groups=8)
TINY_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, block_out_channels=(16, 32),
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                norm_num_groups=8)
TINY_CLIP = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=77, projection_dim=32)
TINY_XL_UNET = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64, attention_head_dim=4,
                    norm_num_groups=8, addition_embed_type="text_time", addition_time_embed_dim=8,
                    projection_class_embeddings_input_dim=32 + 6 * 8, use_linear_projection=True)
TINY_VIT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                patch_size=8)

ARCHS = {
    "sd15": {"kind": "sd", "unet": SD15_UNET, "vae": SD_VAE, "scaling": 0.18215, "text": [CLIP_L],
             "reward": VIT_L14, "resolution": 512},
    "sdxl": {"kind": "sdxl", "unet": SDXL_UNET, "vae": SD_VAE, "scaling": 0.13025, "text": [CLIP_L, CLIP_BIGG],
             "reward": VIT_L14, "resolution": 1024},
    "tiny": {"kind": "sd", "unet": TINY_UNET, "vae": TINY_VAE, "scaling": 0.18215, "text": [TINY_CLIP],
             "reward": TINY_VIT, "resolution": 32},
    "tiny_xl": {"kind": "sdxl", "unet": TINY_XL_UNET, "vae": TINY_VAE, "scaling": 0.13025,
                "text": [TINY_CLIP, TINY_CLIP], "reward": TINY_VIT, "resolution": 32},
}

VARIANTS = {
    "naive": {"memory": {"denoiser_checkpointing": False, "vae_checkpointing": False, "reward_checkpointing": False,
                         "offload_text_encoder": False, "fused_lora": "off"}},
    "+unet_checkpointing": {"memory": {"denoiser_checkpointing": True}},
    "+vae_checkpointing": {"memory": {"vae_checkpointing": True}},
    "+reward_checkpointing": {"memory": {"reward_checkpointing": True}},
    "+offload_text_encoder": {"memory": {"offload_text_encoder": True}},
    "full": {"memory": {"fused_lora": "on"}},
}
ON_FULL = {  # each of these is the full configuration plus its own overrides
    "full+reference_pool": {"train": {"seeds_per_prompt": 1}},
    "draft_k": {"objective": {"beta": 0.0}, "localize": {"spec": "none"}},
}
ALL_VARIANTS = (*VARIANTS, *ON_FULL)


def variant_settings(name: str) -> dict:
    """The config overrides of a variant: the ladder up to it (each adds its feature), or full plus its own."""
    if name not in ALL_VARIANTS:
        raise ValueError(f"--variants: unknown variant {name!r}; expected some of {', '.join(ALL_VARIANTS)}")
    chain = list(VARIANTS.items()) + ([(name, ON_FULL[name])] if name in ON_FULL else [])
    out: dict = {}
    for key, extra in chain:
        for section, values in extra.items():
            out.setdefault(section, {}).update(values)
        if key == name:
            return out
    raise AssertionError


# ------------------------------------------------------------------------------------------ reward model
def clip_reward(*, arch: str = "sd15") -> ClipL14Reward:
    """Reward factory for the trainer: ``benchmarks/train_memory.py:clip_reward`` with kwargs {arch}: the
    estimator's stand-in CLIP reward (:class:`fnf.memory.archs.ClipL14Reward`) with this arch's vision tower, bf16
    weights like the diffusion model's."""
    return ClipL14Reward(ARCHS[arch]["reward"]).to(torch.bfloat16)


# ------------------------------------------------------------------------------------------ models
@contextlib.contextmanager
def _default(device, dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(old)


def build_model(arch: str, device, dtype=torch.bfloat16):
    """A DiffusionModel with random weights built directly on ``device`` in ``dtype``."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from fnf.core import DiffusionModel
    from fnf.families import family_by_name

    a = ARCHS[arch]
    with _default(device, dtype):
        unet = UNet2DConditionModel(**a["unet"])
        vae = AutoencoderKL(**a["vae"], sample_size=a["resolution"], scaling_factor=a["scaling"])
        encoders = [CLIPTextModel(CLIPTextConfig(**a["text"][0]))]
        if a["kind"] == "sdxl":
            encoders.append(CLIPTextModelWithProjection(CLIPTextConfig(**a["text"][1])))
    tokenizer_cls = tokenizer_class(CLIPTokenizer, TOY_TOKENIZER)
    tokenizer = tokenizer_cls.from_pretrained(TOY_TOKENIZER, model_max_length=77, local_files_only=True)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    return DiffusionModel(path=f"<random {arch}>", family=family_by_name(a["kind"]), denoiser=unet, vae=vae, scheduler=scheduler,
                          text_encoders=encoders, tokenizers=[tokenizer] * len(encoders),
                          force_zeros_for_empty_prompt=a["kind"] == "sdxl")


def make_config(arch: str, variant: str, steps: int, out: str, device: str, sampling_steps: int):
    from fnf.config import from_dict

    res = ARCHS[arch]["resolution"]
    data = {
        "model": {"path": f"<random {arch}>", "weight_dtype": "bf16"},
        "lora": {"rank": 64, "alpha": 64},
        "sampling": {"steps": sampling_steps, "truncation_k": 2, "guidance_scale": 7.5, "height": res,
                     "width": res},
        "reward": {"spec": f"{os.path.join(HERE, 'train_memory.py')}:clip_reward", "kwargs": {"arch": arch}},
        "localize": {"spec": "saliency", "threshold": 0.5, "radius": max(1, res // 64)},
        "objective": {"beta": 1.0},
        "memory": {"mixed_precision": "bf16"},
        "train": {"steps": steps, "batch_size": 1, "lr": 1e-4, "out": out, "checkpoint_every": 0,
                  "sample_every": 0, "progress": False, "tensorboard": False, "device": device,
                  "prompts": PROMPTS},
    }
    for section, values in variant_settings(variant).items():
        data.setdefault(section, {}).update(values)
    return from_dict(data)


# ------------------------------------------------------------------------------------------ running
def _free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_variant(arch: str, variant: str, steps: int, device: str, sampling_steps: int) -> dict:
    from fnf.train import train

    cuda = device == "cuda"
    _free()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    record = {"variant": variant, "oom": False, "skipped_steps": 0}
    with tempfile.TemporaryDirectory() as out:
        cfg = make_config(arch, variant, steps, out, device, sampling_steps)
        began = time.time()
        try:
            model = build_model(arch, device)
            result = train(cfg, model=model)
        except torch.cuda.OutOfMemoryError as e:
            record.update(oom=True, error=str(e).splitlines()[0])
            result = None
        record["wall_s"] = round(time.time() - began, 2)
        if result is not None:
            secs = [h["seconds"] for h in result.history]
            measured = secs[1:] or secs
            record.update(step_s=round(statistics.median(measured), 4), steps_measured=len(measured),
                          skipped_steps=sum(bool(h["skipped"]) for h in result.history),
                          first_step_s=round(secs[0], 4))
        else:
            record["step_s"] = None
        record["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None
        del result
    _free()
    return record


def estimator_spec(arch: str) -> dict:
    """This script's architecture as an ``fnf.memory.estimate`` model spec (same configs, nothing loaded)."""
    from transformers import CLIPTextConfig  # noqa: F401  (the estimator builds the encoders from these dicts)

    a = ARCHS[arch]
    classes = ["CLIPTextModel", "CLIPTextModelWithProjection"]
    return {"name": arch, "kind": a["kind"], "unet": dict(a["unet"]),
            "vae": {**a["vae"], "sample_size": a["resolution"], "scaling_factor": a["scaling"]},
            "text": [(classes[i], dict(t)) for i, t in enumerate(a["text"])],
            "scheduler": dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1),
            "tokenizers": None, "force_zeros_for_empty_prompt": a["kind"] == "sdxl"}


def estimate_variant(arch: str, variant: str, sampling_steps: int) -> dict:
    """fnf estimate-memory's prediction of peak_gib for one variant (fake tensors, on the CPU)."""
    from fnf.memory.estimate import run_trace, trace_config

    try:
        with tempfile.TemporaryDirectory() as out:
            cfg = make_config(arch, variant, 1, out, "cpu", sampling_steps)
            est = run_trace(trace_config(cfg), estimator_spec(arch))
    except Exception as e:  # noqa: BLE001 - the measurement still counts; the record says why
        return {"estimate_gib": None, "estimate_error": f"{type(e).__name__}: {e}"[:300]}
    return {"estimate_gib": round(est.peak_bytes / 2**30, 3), "estimate_peak_phase": est.peak_phase,
            "estimate_s": round(est.trace_seconds, 1)}


def print_table(records: list[dict]) -> None:
    print(f"\n{'variant':<24}{'peak GiB':>10}{'estimate':>10}{'step s':>10}{'skipped':>9}")
    for r in records:
        peak = "oom" if r["oom"] else ("-" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}")
        est = "-" if r.get("estimate_gib") is None else f"{r['estimate_gib']:.2f}"
        step = "-" if r["step_s"] is None else f"{r['step_s']:.3f}"
        print(f"{r['variant']:<24}{peak:>10}{est:>10}{step:>10}{r['skipped_steps']:>9}")
    by = {r["variant"]: r for r in records}
    for name in ("full", "full+reference_pool"):
        if by.get(name, {}).get("step_s") and by.get("draft_k", {}).get("step_s"):
            print(f"Focus-N-Fix step ({name}) / plain DRaFT-K step: "
                  f"{by[name]['step_s'] / by['draft_k']['step_s']:.2f}x (goal <= 1.25x)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(ARCHS), default="sd15", help="architecture (default sd15)")
    p.add_argument("--variants", default="all", help="comma-separated variants or 'all' (default)")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per variant, the first is warm-up")
    p.add_argument("--sampling-steps", type=int, default=50, help="DDIM steps T (default 50)")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--json", default="", help="write the records here (a JSON list)")
    p.add_argument("--estimate", choices=("auto", "on", "off"), default="auto",
                   help="record fnf estimate-memory's prediction next to the measurement (auto: on a GPU)")
    args = p.parse_args(argv)
    names = list(ALL_VARIANTS) if args.variants == "all" else [v.strip() for v in args.variants.split(",") if v.strip()]
    for n in names:
        variant_settings(n)  # validates
    if args.steps < 1:
        raise SystemExit("--steps must be >= 1")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA device is visible")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    import provenance  # beside this script; imported here so the reward spec can load this file on its own

    meta = {"benchmark": "train_memory", "device": name, **provenance.stamp(argv), "model": args.model,
            "resolution": ARCHS[args.model]["resolution"], "sampling_steps": args.sampling_steps,
            "truncation_k": 2, "guidance_scale": 7.5, "lora_rank": 64, "batch_size": 1, "dtype": "bf16"}
    records = []
    for n in names:
        r = {**meta, **run_variant(args.model, n, args.steps, device, args.sampling_steps)}
        if args.estimate == "on" or (args.estimate == "auto" and device == "cuda"):
            r.update(estimate_variant(args.model, n, args.sampling_steps))
            if r.get("estimate_gib") and r["peak_gib"]:
                r["measured_over_estimate"] = round(r["peak_gib"] / r["estimate_gib"], 4)
        records.append(r)
        print(json.dumps(r), flush=True)
    print_table(records)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    raise SystemExit(main())
