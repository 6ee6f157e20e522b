"""Named architectures for ``fnf estimate-memory --arch`` (the public config.json values of the released models)
and a stand-in reward of realistic size (a CLIP ViT-L/14 vision tower with an MLP head)."""
from __future__ import annotations

import os

import torch

_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
            block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4, norm_num_groups=32, act_fn="silu")
_CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
               num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                  set_alpha_to_one=False, steps_offset=1, num_train_timesteps=1000)

ARCHS = {
    # runwayml/stable-diffusion-v1-5 (UNet 859.5M, CLIP ViT-L/14 text encoder)
    "sd15": {"kind": "sd", "vae": {**_VAE, "sample_size": 512, "scaling_factor": 0.18215},
             "unet": dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                          block_out_channels=[320, 640, 1280, 1280],
                          down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                          up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
                          cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32),
             "text": [("CLIPTextModel", _CLIP_L)], "scheduler": _SCHEDULER},
    # stabilityai/stable-diffusion-2-1 (768^2, v-prediction, OpenCLIP ViT-H/14 text encoder)
    "sd21": {"kind": "sd", "vae": {**_VAE, "sample_size": 768, "scaling_factor": 0.18215},
             "unet": dict(sample_size=96, in_channels=4, out_channels=4, layers_per_block=2,
                          block_out_channels=[320, 640, 1280, 1280],
                          down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                          up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, cross_attention_dim=1024,
                          attention_head_dim=[5, 10, 20, 20], use_linear_projection=True, upcast_attention=True,
                          norm_num_groups=32),
             "text": [("CLIPTextModel", dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096,
                                             num_hidden_layers=23, num_attention_heads=16,
                                             max_position_embeddings=77, hidden_act="gelu", projection_dim=512))],
             "scheduler": {**_SCHEDULER, "prediction_type": "v_prediction"}},
    # stabilityai/stable-diffusion-xl-base-1.0 (UNet 2567.5M, CLIP ViT-L + OpenCLIP ViT-bigG)
    "sdxl": {"kind": "sdxl", "vae": {**_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True},
             "unet": dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                          block_out_channels=[320, 640, 1280],
                          down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                          up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                          transformer_layers_per_block=[1, 2, 10], attention_head_dim=[5, 10, 20],
                          cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
                          addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
                          norm_num_groups=32),
             "text": [("CLIPTextModel", _CLIP_L),
                      ("CLIPTextModelWithProjection",
                       dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                            num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu",
                            projection_dim=1280))],
             "scheduler": _SCHEDULER, "force_zeros_for_empty_prompt": True},
}

TOY_TOKENIZER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "toy", "sd",
                             "tokenizer")

VIT_L14 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
               image_size=224, patch_size=14, hidden_act="quick_gelu")


class ClipL14Reward(torch.nn.Module):
    """A CLIP ViT-L/14 vision tower with an MLP head (random weights): images in [0, 1] -> one score each.
    The stand-in reward of ``--reward-model clip-l14`` (the size of CLIP, HPS or PickScore image towers)."""

    MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)

    def __init__(self, vision: dict | None = None):
        super().__init__()
        from transformers import CLIPVisionConfig, CLIPVisionModel

        cfg = CLIPVisionConfig(**(vision or VIT_L14))
        self.size = cfg.image_size
        self.vision = CLIPVisionModel(cfg)
        self.head = torch.nn.Sequential(torch.nn.Linear(cfg.hidden_size, cfg.hidden_size), torch.nn.GELU(),
                                        torch.nn.Linear(cfg.hidden_size, 1))
        self.register_buffer("mean", torch.tensor(self.MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(self.STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images, prompts=None):
        x = torch.nn.functional.interpolate(images, size=(self.size, self.size), mode="bilinear", align_corners=False)
        dtype = self.head[0].weight.dtype
        x = ((x - self.mean.to(x.dtype)) / self.std.to(x.dtype)).to(dtype)
        return self.head(self.vision(pixel_values=x).pooler_output).squeeze(-1).float()


def clip_l14_reward(dtype: str = "bf16", vision: dict | None = None) -> ClipL14Reward:
    """Reward factory (``fnf.memory.archs:clip_l14_reward``): built in float32 on the host, then cast."""
    from ..models import DTYPES

    return ClipL14Reward(vision).to(DTYPES[dtype])
