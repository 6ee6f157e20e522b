"""Named architectures for ``fnf estimate-memory --arch`` (the public config.json values of the released models)
and a stand-in reward of realistic size (a CLIP ViT-L/14 vision tower with an MLP head)."""
from __future__ import annotations

import os

import torch

from ..core import DTYPES

_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
            block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4, norm_num_groups=32, act_fn="silu")
_CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
               num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                  set_alpha_to_one=False, steps_offset=1, num_train_timesteps=1000)



def _unet(kind: str, vae: dict, unet: dict, text: list, scheduler: dict, **flags) -> dict:
    """A UNet family's spec in model_index.json's shape ({component: [class, config]})."""
    names = ("text_encoder", "text_encoder_2")
    return {"kind": kind, "components": {
        "unet": ["UNet2DConditionModel", unet], "vae": ["AutoencoderKL", vae], "scheduler": ["DDIMScheduler", scheduler],
        **{name: [cls, cfg] for name, (cls, cfg) in zip(names, text)}}, **flags}


# Specs as model_index.json lists the components ({component: [class, config.json values]}); the family's build()
# makes them (fnf/memory/components.py). Values from the released folders' config.json files.
ARCHS = {
    # runwayml/stable-diffusion-v1-5 (UNet 859.5M, CLIP ViT-L/14 text encoder)
    "sd15": _unet("sd", {**_VAE, "sample_size": 512, "scaling_factor": 0.18215},
                  dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                       block_out_channels=[320, 640, 1280, 1280],
                       down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                       up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
                       cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32),
                  [("CLIPTextModel", _CLIP_L)], _SCHEDULER),
    # stabilityai/stable-diffusion-2-1 (768^2, v-prediction, OpenCLIP ViT-H/14 text encoder)
    "sd21": _unet("sd", {**_VAE, "sample_size": 768, "scaling_factor": 0.18215},
                  dict(sample_size=96, in_channels=4, out_channels=4, layers_per_block=2,
                       block_out_channels=[320, 640, 1280, 1280],
                       down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                       up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, cross_attention_dim=1024,
                       attention_head_dim=[5, 10, 20, 20], use_linear_projection=True, upcast_attention=True,
                       norm_num_groups=32),
                  [("CLIPTextModel", dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096,
                                          num_hidden_layers=23, num_attention_heads=16,
                                          max_position_embeddings=77, hidden_act="gelu", projection_dim=512))],
                  {**_SCHEDULER, "prediction_type": "v_prediction"}),
    # stabilityai/stable-diffusion-xl-base-1.0 (UNet 2567.5M, CLIP ViT-L + OpenCLIP ViT-bigG)
    "sdxl": _unet("sdxl", {**_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True},
                  dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                       block_out_channels=[320, 640, 1280],
                       down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                       up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                       transformer_layers_per_block=[1, 2, 10], attention_head_dim=[5, 10, 20],
                       cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
                       addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
                       norm_num_groups=32),
                  [("CLIPTextModel", _CLIP_L),
                   ("CLIPTextModelWithProjection",
                    dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                         num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu",
                         projection_dim=1280))],
                  _SCHEDULER, force_zeros_for_empty_prompt=True),
}

# ------------------------------------------------------------------ the transformer (flow-matching) families
_FLOW_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, layers_per_block=2,
                 block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
                 up_block_types=["UpDecoderBlock2D"] * 4, norm_num_groups=32, act_fn="silu", sample_size=1024,
                 force_upcast=True, use_quant_conv=False, use_post_quant_conv=False)
_CLIP_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
               num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
# google/t5-v1_1-xxl (the encoder half: 4762.3M parameters)
_T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
               relative_attention_num_buckets=32, relative_attention_max_distance=128, dropout_rate=0.1,
               layer_norm_epsilon=1e-6, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
               is_encoder_decoder=True, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
_SD3_TEXT = {"text_encoder": ["CLIPTextModelWithProjection", _CLIP_L],
             "text_encoder_2": ["CLIPTextModelWithProjection", _CLIP_G],
             "text_encoder_3": ["T5EncoderModel", _T5_XXL]}
_SD3_SCHEDULER = ["FlowMatchEulerDiscreteScheduler", dict(num_train_timesteps=1000, shift=3.0)]


def _sd3(layers: int, heads: int, caption_dim: int, pos_embed_max_size: int, dual: list) -> dict:
    transformer = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=layers,
                       attention_head_dim=64, num_attention_heads=heads, joint_attention_dim=4096,
                       caption_projection_dim=caption_dim, pooled_projection_dim=2048,
                       pos_embed_max_size=pos_embed_max_size, dual_attention_layers=dual, qk_norm="rms_norm")
    return {"kind": "sd3", "components": {
        "transformer": ["SD3Transformer2DModel", transformer],
        "vae": ["AutoencoderKL", {**_FLOW_VAE, "scaling_factor": 1.5305, "shift_factor": 0.0609}],
        "scheduler": _SD3_SCHEDULER, **_SD3_TEXT}}


def _flux(guidance: bool, scheduler: dict) -> dict:
    transformer = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                       num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                       guidance_embeds=guidance, axes_dims_rope=[16, 56, 56])
    return {"kind": "flux", "components": {
        "transformer": ["FluxTransformer2DModel", transformer],
        "vae": ["AutoencoderKL", {**_FLOW_VAE, "scaling_factor": 0.3611, "shift_factor": 0.1159}],
        "scheduler": ["FlowMatchEulerDiscreteScheduler", scheduler],
        "text_encoder": ["CLIPTextModel", _CLIP_L], "text_encoder_2": ["T5EncoderModel", _T5_XXL]}}


# black-forest-labs/FLUX.2-dev: the transformer config of diffusers' scripts/convert_flux2_to_diffusers.py
# ("flux2-dev"), the VAE of its AutoencoderKLFlux2() defaults, FLUX.1-dev's scheduler, the Mistral Small 3.x 24B
# text encoder (text tower from its config.json; vision tower: Pixtral-12B-sized, never run for text prompts)
_FLUX2_TRANSFORMER = dict(patch_size=1, in_channels=128, num_layers=8, num_single_layers=48, attention_head_dim=128,
                          num_attention_heads=48, joint_attention_dim=15360, timestep_guidance_channels=256,
                          mlp_ratio=3.0, axes_dims_rope=[32, 32, 32, 32], rope_theta=2000, eps=1e-6,
                          guidance_embeds=True)
_FLUX2_VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                  up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512],
                  layers_per_block=2, act_fn="silu", latent_channels=32, norm_num_groups=32, sample_size=1024,
                  use_quant_conv=True, use_post_quant_conv=True, mid_block_add_attention=True,
                  batch_norm_eps=1e-4, batch_norm_momentum=0.1, patch_size=[2, 2])
_MISTRAL_SMALL = dict(
    text_config=dict(model_type="mistral", vocab_size=131072, hidden_size=5120, intermediate_size=32768,
                     num_hidden_layers=40, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                     rms_norm_eps=1e-5, rope_theta=1e9, max_position_embeddings=131072, sliding_window=None,
                     tie_word_embeddings=False),
    vision_config=dict(model_type="pixtral", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                       num_attention_heads=16, head_dim=64, patch_size=14, image_size=1540, rope_theta=10000.0),
    spatial_merge_size=2, multimodal_projector_bias=False, projector_hidden_act="gelu", image_token_index=10,
    vision_feature_layer=-1, tie_word_embeddings=False)

ARCHS.update({
    # stabilityai/stable-diffusion-3.5-medium (MMDiT-X 2243.2M, dual attention in blocks 0-12; CLIP-L, CLIP-G, T5-XXL)
    "sd35-medium": _sd3(24, 24, 1536, 384, list(range(13))),
    # stabilityai/stable-diffusion-3.5-large (MMDiT 8056.7M)
    "sd35-large": _sd3(38, 38, 2432, 192, []),
    # black-forest-labs/FLUX.1-dev (11901.4M, guidance-distilled: no CFG batch; CLIP-L, T5-XXL, 512 tokens)
    "flux1-dev": _flux(True, dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                  max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)),
    # black-forest-labs/FLUX.1-schnell (no guidance embedding, shift 1, no dynamic shifting)
    "flux1-schnell": _flux(False, dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)),
    # black-forest-labs/FLUX.2-dev (guidance-distilled; one Mistral3 text encoder, hidden states 10/20/30 stacked)
    "flux2-dev": {"kind": "flux2", "components": {
        "transformer": ["Flux2Transformer2DModel", _FLUX2_TRANSFORMER],
        "vae": ["AutoencoderKLFlux2", _FLUX2_VAE],
        "scheduler": ["FlowMatchEulerDiscreteScheduler", dict(
            num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
            base_image_seq_len=256, max_image_seq_len=4096)],
        "text_encoder": ["Mistral3ForConditionalGeneration", _MISTRAL_SMALL]}},
})

# black-forest-labs/FLUX.2-klein-4B / -9B (Flux2KleinPipeline, step-distilled: model_index.json is_distilled true,
# no CFG batch): the transformer configs of diffusers' scripts/convert_flux2_to_diffusers.py ("klein-4b" / "klein-9b":
# no guidance embedding, joint_attention_dim = 3 x the text encoder's hidden size), FLUX.2-dev's VAE and scheduler
# (assumed: the klein folders ship the same AutoencoderKLFlux2), Qwen/Qwen3-4B and Qwen/Qwen3-8B config.json values.
_KLEIN_QWEN3 = dict(model_type="qwen3", vocab_size=151936, num_hidden_layers=36, num_attention_heads=32,
              num_key_value_heads=8, head_dim=128, hidden_act="silu", max_position_embeddings=40960,
              rms_norm_eps=1e-6, rope_theta=1000000, attention_bias=False)


def _flux2_klein(layers: int, single: int, heads: int, text_hidden: int, text_ff: int, tied: bool) -> dict:
    transformer = {**_FLUX2_TRANSFORMER, "num_layers": layers, "num_single_layers": single,
                   "num_attention_heads": heads, "joint_attention_dim": 3 * text_hidden, "guidance_embeds": False}
    text = {**_KLEIN_QWEN3, "hidden_size": text_hidden, "intermediate_size": text_ff, "tie_word_embeddings": tied}
    return {"kind": "flux2-klein", "is_distilled": True, "components": {
        "transformer": ["Flux2Transformer2DModel", transformer],
        "vae": ["AutoencoderKLFlux2", _FLUX2_VAE],
        "scheduler": ["FlowMatchEulerDiscreteScheduler", dict(
            num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
            base_image_seq_len=256, max_image_seq_len=4096)],
        "text_encoder": ["Qwen3ForCausalLM", text]}}


ARCHS.update({
    # FLUX.2-klein-4B: 5 double + 20 single blocks, 24 heads (3072 wide); Qwen3-4B (2560 wide, tied embeddings)
    "flux2-klein-4b": _flux2_klein(5, 20, 24, 2560, 9728, True),
    # FLUX.2-klein-9B: 8 double + 24 single blocks, 32 heads (4096 wide); Qwen3-8B (4096 wide)
    "flux2-klein-9b": _flux2_klein(8, 24, 32, 4096, 12288, False),
    # black-forest-labs/FLUX.2-klein-base-4B / -9B: the same shapes, not step-distilled (true CFG: two rows per image)
    "flux2-klein-base-4b": {**_flux2_klein(5, 20, 24, 2560, 9728, True), "is_distilled": False},
    "flux2-klein-base-9b": {**_flux2_klein(8, 24, 32, 4096, 12288, False), "is_distilled": False},
})

# Qwen/Qwen-Image (QwenImagePipeline, not guidance-distilled: true CFG, two transformer calls per step): its
# transformer/config.json (20.4B MMDiT, 60 dual-stream blocks, 24 x 128 heads), vae/config.json (the
# AutoencoderKLQwenImage defaults: base_dim 96, z_dim 16, one-frame causal 3D VAE), scheduler_config.json
# (exponential shift, base/max 0.5/0.9 over 256..8192 tokens, shift_terminal 0.02) and text_encoder/config.json
# (Qwen2.5-VL-7B-Instruct: 28 layers, 3584 wide; its 32-block vision tower is built but never run for text).
_QWEN25_VL_7B = dict(
    text_config=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                     num_attention_heads=28, num_key_value_heads=4, hidden_act="silu", max_position_embeddings=128000,
                     rms_norm_eps=1e-6, rope_theta=1000000.0, use_sliding_window=False, sliding_window=32768,
                     max_window_layers=28, rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
                     bos_token_id=151643, eos_token_id=151645, tie_word_embeddings=False),
    vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                       patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                       fullatt_block_indexes=[7, 15, 23, 31], hidden_act="silu", in_channels=3, tokens_per_second=2),
    image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
    tie_word_embeddings=False)
ARCHS["qwen-image"] = {"kind": "qwen-image", "components": {
    "transformer": ["QwenImageTransformer2DModel", dict(
        patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128, num_attention_heads=24,
        joint_attention_dim=3584, guidance_embeds=False, axes_dims_rope=[16, 56, 56])],
    "vae": ["AutoencoderKLQwenImage", dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                                           attn_scales=[], temperal_downsample=[False, True, True], dropout=0.0)],
    "scheduler": ["FlowMatchEulerDiscreteScheduler", dict(
        num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
        base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential")],
    "text_encoder": ["Qwen2_5_VLForConditionalGeneration", _QWEN25_VL_7B]}}

# Tongyi-MAI/Z-Image-Turbo (ZImagePipeline; distilled: 9 steps, no CFG): transformer/config.json (6.2B single-stream
# DiT, 30 layers + 2 noise / 2 context refiner layers, 3840 wide, 30 heads), the FLUX.1 VAE (scaling 0.3611, shift
# 0.1159), scheduler_config.json (shift 3, no dynamic shifting) and text_encoder/config.json (Qwen3Model, Qwen3-4B)
ARCHS["z-image"] = {"kind": "z-image", "components": {
    "transformer": ["ZImageTransformer2DModel", dict(
        all_patch_size=[2], all_f_patch_size=[1], in_channels=16, dim=3840, n_layers=30, n_refiner_layers=2,
        n_heads=30, n_kv_heads=30, norm_eps=1e-5, qk_norm=True, cap_feat_dim=2560, rope_theta=256.0, t_scale=1000.0,
        axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512])],
    "vae": ["AutoencoderKL", {**_FLOW_VAE, "scaling_factor": 0.3611, "shift_factor": 0.1159}],
    "scheduler": ["FlowMatchEulerDiscreteScheduler", dict(num_train_timesteps=1000, shift=3.0,
                                                          use_dynamic_shifting=False)],
    "text_encoder": ["Qwen3Model", dict(
        vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, hidden_act="silu", max_position_embeddings=40960, rms_norm_eps=1e-6,
        rope_theta=1000000.0, attention_bias=False, tie_word_embeddings=True)]}}

# Seconds one fake-tensor trace took at the native size on the 2-core CPU box (benchmarks/RESULTS.md; the ones
# not measured there are scaled by parameter count); `fnf estimate-memory` announces its time from these.
TRACE_SECONDS = {"sd15": 60, "sd21": 90, "sdxl": 180, "sd35-medium": 100, "sd35-large": 300, "flux1-dev": 360,
                 "flux1-schnell": 360, "flux2-dev": 900}
TRACE_SECONDS.update({"flux2-klein-4b": 50, "flux2-klein-9b": 115, "flux2-klein-base-4b": 70,
                      "flux2-klein-base-9b": 160})
KIND_TRACE_SECONDS = {"sd": 60, "sdxl": 180, "sd3": 100, "flux": 360, "flux2": 900}
KIND_TRACE_SECONDS["flux2-klein"] = 60
TRACE_SECONDS["z-image"], KIND_TRACE_SECONDS["z-image"] = 230, 230
TRACE_SECONDS["qwen-image"], KIND_TRACE_SECONDS["qwen-image"] = 470, 470   # 1328^2, K=1, CFG, one micro-batch
NATIVE = {"sd15": 512, "sd21": 768}   # every other named architecture: 1024


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

    return ClipL14Reward(vision).to(DTYPES[dtype])
