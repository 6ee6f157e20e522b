"""Tiny random-weight diffusers models for the fnf tests, saved as real pipeline folders.

Images are 32x32 (latents 4x16x16, VAE factor 2); everything runs in seconds on 2 CPU cores.
Nothing is downloaded: the CLIP tokenizer is built from a vocab/merges pair written here.
"""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

IMAGE_SIZE = 32

_WORDS = ["a", "photo", "of", "cat", "dog", "red", "blue", "car", "tree", "house", "person", "sky", "the", "in"]


def write_tokenizer(folder: str) -> None:
    """A word-level CLIP BPE vocabulary: every letter, every word above, no merges beyond those words."""
    from transformers import CLIPTokenizer

    os.makedirs(folder, exist_ok=True)
    vocab: dict[str, int] = {}
    for token in ["<|startoftext|>", "<|endoftext|>", "!"]:
        vocab.setdefault(token, len(vocab))
    letters = sorted({c for w in _WORDS for c in w})
    for c in letters:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    merges: list[str] = []
    for w in _WORDS:
        # Merge left to right: ((a b) c) ... with the end-of-word marker on the last letter.
        parts = list(w[:-1]) + [w[-1] + "</w>"]
        while len(parts) > 1:
            merge = f"{parts[0]} {parts[1]}"
            if merge not in merges:
                merges.append(merge)
            parts = [parts[0] + parts[1]] + parts[2:]
            vocab.setdefault(parts[0], len(vocab))
    vocab_path, merges_path = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
    with open(vocab_path, "w") as f:
        json.dump(vocab, f)
    with open(merges_path, "w") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer(vocab_path, merges_path, model_max_length=16, pad_token="!")
    tok.save_pretrained(folder)


def _text_encoder(hidden: int, projection: bool, vocab_size: int, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=16,
                         projection_dim=hidden, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def _vae(seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         layers_per_block=1, norm_num_groups=4, sample_size=IMAGE_SIZE)


def _scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)


def make_sd(folder: str, seed: int = 0) -> str:
    """Save an SD-1.x-shaped StableDiffusionPipeline folder; returns the folder."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTokenizer

    tok_dir = os.path.join(folder, "_tok")
    write_tokenizer(tok_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 2, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=4,
        norm_num_groups=8)
    pipe = StableDiffusionPipeline(vae=_vae(seed + 1), text_encoder=_text_encoder(32, False, len(tokenizer), seed + 2),
                                   tokenizer=tokenizer, unet=unet, scheduler=_scheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    shutil.rmtree(tok_dir)
    return folder


def make_sdxl(folder: str, seed: int = 0) -> str:
    """Save an SDXL-shaped StableDiffusionXLPipeline folder (two text encoders, text_time embedding)."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTokenizer

    tok_dir = os.path.join(folder, "_tok")
    write_tokenizer(tok_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 2, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64, attention_head_dim=4,
        norm_num_groups=8, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8, transformer_layers_per_block=1,
        use_linear_projection=True)
    pipe = StableDiffusionXLPipeline(
        vae=_vae(seed + 1), text_encoder=_text_encoder(32, False, len(tokenizer), seed + 2),
        text_encoder_2=_text_encoder(32, True, len(tokenizer), seed + 3), tokenizer=tokenizer,
        tokenizer_2=tokenizer, unet=unet, scheduler=_scheduler(), force_zeros_for_empty_prompt=True)
    pipe.save_pretrained(folder)
    shutil.rmtree(tok_dir)
    return folder


class RedDetector(torch.nn.Module):
    """A planted reward for Grad-CAM tests: a 'features' conv layer that fires on red pixels, then a mean."""

    def __init__(self):
        super().__init__()
        self.features = torch.nn.Conv2d(3, 2, 1)
        with torch.no_grad():
            self.features.weight.zero_()
            self.features.weight[0, :, 0, 0] = torch.tensor([1.0, -0.5, -0.5])
            self.features.weight[1, :, 0, 0] = torch.tensor([-0.5, 1.0, -0.5])
            self.features.bias.zero_()
        self.head = torch.nn.Linear(2, 1)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[1.0, 0.0]]))
            self.head.bias.zero_()

    def forward(self, images, prompts=None):
        feats = torch.relu(self.features(images))
        return self.head(feats.mean(dim=(2, 3)))[:, 0]


def red_detector(**_):
    return RedDetector()


# ------------------------------------------------------------------------------------------ test helpers
_FOLDERS: dict[str, str] = {}


def cached_model(kind: str, root: str) -> str:
    """Build each tiny model folder once per test session under ``root``."""
    if kind not in _FOLDERS:
        folder = os.path.join(root, f"tiny_{kind}")
        if not os.path.isfile(os.path.join(folder, "model_index.json")):
            (make_sdxl if kind == "sdxl" else make_sd)(folder)
        _FOLDERS[kind] = folder
    return _FOLDERS[kind]


def tiny_config(model_path: str, out: str, **sections) -> "object":
    """A fast training config on a tiny model: T=4 DDIM steps, K=2, rank-4 LoRA, no checkpoints/grids."""
    from fnf import config

    data = {
        "model": {"path": model_path},
        "lora": {"rank": 4, "alpha": 8},
        "sampling": {"steps": 4, "truncation_k": 2, "guidance_scale": 3.0},
        "reward": {"spec": "brightness"},
        "localize": {"spec": "none", "radius": 0},
        "objective": {"beta": 1.0},
        "memory": {"denoiser_checkpointing": False, "vae_checkpointing": False},
        "train": {"steps": 2, "lr": 1e-2, "out": out, "checkpoint_every": 0, "sample_every": 0, "progress": False,
                  "tensorboard": False, "prompts": ["a photo of a cat", "a red car"]},
    }
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return config.from_dict(data)


class NanOnSecondCall(torch.nn.Module):
    """Mean brightness, except that the second call returns NaN (to test that bad steps are skipped)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, images, prompts=None):
        self.calls += 1
        r = images.mean(dim=(1, 2, 3))
        return r * float("nan") if self.calls == 2 else r


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny models run ~10x faster on one thread on a shared 2-core machine; restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------ float64 parity helpers
def to_float64(model) -> "object":
    """Cast a loaded DiffusionModel in place to float64: UNet (LoRA included), VAE and the DDIM schedule
    (``alphas_cumprod``, so that ``scheduler.step`` computes its coefficients in float64 too). The text encoders
    stay float32: their embeddings are constant inputs (cast to the UNet's dtype where used), and transformers
    4.x CLIP cannot run in float64 (its causal mask overflows).

    For parity tests whose tolerance is float64 rounding (unit roundoff 1.1e-16): two orderings of the same math
    then agree to ~1e-12 relative, where float32 orderings on different CPUs differ by ~1e-4."""
    for module in [model.denoiser, model.vae]:
        module.double()
    sched = model.scheduler
    sched.alphas_cumprod = sched.alphas_cumprod.double()
    sched.final_alpha_cumprod = torch.as_tensor(sched.final_alpha_cumprod).double()
    return model


def float64_session(cfg) -> "object":
    """A fnf.train.Session whose model is float64 (weight_dtype fp32 is loaded as float64 while it is built; the
    LoRA parameters and the DDIM schedule are cast after). The trainer still rounds the loss-level tensors to
    float32 (``.float()`` on I0, I and the rewards in fnf/objectives/, fnf/rewards.py:score), so two paths through
    a float64 session agree to a few float32 ulps of the loss inputs, not to float64 rounding."""
    from fnf import core as models
    from fnf.train import trainer

    load = trainer.load_model

    def load_float64(*args, **kwargs):  # text encoders back to float32 (see to_float64)
        model = load(*args, **kwargs)
        for encoder in model.text_encoders:
            encoder.float()
        return model

    before = models.DTYPES["fp32"]
    models.DTYPES["fp32"] = torch.float64
    trainer.load_model = load_float64
    try:
        session = trainer.Session(cfg)
    finally:
        models.DTYPES["fp32"] = before
        trainer.load_model = load
    for p in session.params:
        p.data = p.data.double()
    sched = session.model.scheduler
    if hasattr(sched, "alphas_cumprod"):   # DDIM; the flow families' Euler step upcasts to float32 and back
        sched.alphas_cumprod = sched.alphas_cumprod.double()
        sched.final_alpha_cumprod = torch.as_tensor(sched.final_alpha_cumprod).double()
    return session


def randomize_lora_B(unet, seed: int, std: float = 0.05) -> None:
    """Non-zero LoRA B (peft initialises it to 0, where I = I0 exactly and ||I0 - I|| has no gradient)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype) * std)


def ours_and_pipeline_images(model, folder: str, lora_dir: str, prompt: str = "a red car", seed: int = 7,
                             zero_uncond: bool = False) -> dict:
    """The same prompt and x_T through fnf's sampler (LoRA on and off) and through the diffusers pipeline of
    ``folder`` before and after ``pipe.load_lora_weights(lora_dir)``: {"ours", "ours_base", "base", "tuned"}.
    T = 4 DDIM steps, guidance 3.0, images in [0, 1]."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from fnf.core import LORA_WEIGHTS
    from fnf.lora import adapters_disabled
    from fnf.encoding import encode_prompts
    from fnf.sampling import initial_latents, sample_images

    cond = encode_prompts(model, [prompt], height=IMAGE_SIZE, width=IMAGE_SIZE)
    uncond = encode_prompts(model, [""], height=IMAGE_SIZE, width=IMAGE_SIZE, zero=zero_uncond)
    x_T = initial_latents(model, 1, IMAGE_SIZE, IMAGE_SIZE, torch.Generator().manual_seed(seed), "cpu")
    out = {"ours": sample_images(model, x_T, cond, uncond, steps=4, guidance_scale=3.0)}
    with adapters_disabled(model.denoiser):
        out["ours_base"] = sample_images(model, x_T, cond, uncond, steps=4, guidance_scale=3.0)
    cls = StableDiffusionXLPipeline if model.kind == "sdxl" else StableDiffusionPipeline
    pipe = cls.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(latents=x_T.clone(), num_inference_steps=4, guidance_scale=3.0, output_type="pt",
              height=IMAGE_SIZE, width=IMAGE_SIZE)
    with torch.no_grad():
        out["base"] = pipe(prompt, **kw).images
        pipe.load_lora_weights(lora_dir, weight_name=LORA_WEIGHTS)
        out["tuned"] = pipe(prompt, **kw).images
    return out
