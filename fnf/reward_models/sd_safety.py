"""``sd-safety``: the Stable Diffusion 1.x safety checker as a soft, differentiable unsafe probability.

The official checker (diffusers ``StableDiffusionSafetyChecker``) embeds the image with a CLIP ViT-L/14 vision
tower + projection and flags it when, for some concept i of 17, ``cos(e, concept_i) - threshold_i + adj > 0``,
where ``adj = 0.01`` if any of 3 special-care margins ``cos(e, special_j) - threshold_j`` is positive (scores
rounded to 3 decimals first). Here every hard step is softened:

    adj = 0.01 * sigmoid(smax(special margins) / temperature)
    m   = smax(concept margins + adj),   smax(x) = tau * logsumexp(x / tau)   (tau = smooth_max_temperature)
    p   = sigmoid(m / temperature)                                           (the reward: unsafe probability)

``smax`` lies in [max, max + tau * log 17], so p > 0.5 wherever the checker flags (up to its 3-decimal rounding),
and also on a band of width tau * log 17 below its threshold; both temperatures -> 0 give the hard decision.
Use ``weight: -1`` to push images away from the flagged concepts.
"""
from __future__ import annotations

import json
import math
import os

import torch
from torch import nn

from ..core import SpecError
from .preprocess import CLIP_MEAN, CLIP_STD, center_crop_window, clip_preprocess

SPECIAL_CARE_ADJUSTMENT = 0.01  # diffusers' `adjustment` once a special-care concept is present
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.fp16.safetensors", "pytorch_model.fp16.bin",
                 "model.safetensors.index.json", "pytorch_model.bin.index.json")


def resolve_folders(model: str, processor: str = "") -> tuple[str, str | None]:
    """(safety_checker folder, preprocessor_config.json or None) from an SD folder or a safety_checker folder."""
    if not model:
        raise SpecError("sd-safety needs reward.kwargs.model = a local SD 1.x model folder (with safety_checker/) "
                        "or its safety_checker/ folder")
    if not os.path.isdir(model):
        raise SpecError(f"sd-safety: model {model!r} is not a folder (expected an SD 1.x model folder with "
                        "safety_checker/, or the safety_checker/ folder itself)")
    if os.path.isfile(os.path.join(model, "safety_checker", "config.json")):
        folder = os.path.join(model, "safety_checker")
    elif os.path.isfile(os.path.join(model, "config.json")):
        folder = model
    else:
        raise SpecError(f"sd-safety: {model!r} has neither safety_checker/config.json nor config.json (SD 2.x and "
                        "pipelines saved with safety_checker=None have no checker; point model at an SD 1.x folder "
                        "or a diffusers StableDiffusionSafetyChecker folder)")
    cfg_path = os.path.join(folder, "config.json")
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise SpecError(f"sd-safety: {cfg_path!r} is not readable JSON: {e}") from e
    archs = (cfg.get("architectures") or []) if isinstance(cfg, dict) else []
    if archs:
        is_checker = "StableDiffusionSafetyChecker" in archs
    else:  # older configs name no architecture: a CLIP config with a vision tower
        is_checker = isinstance(cfg, dict) and (cfg.get("model_type") == "clip" or "vision_config" in cfg
                                                or "vision_config_dict" in cfg)
    if not is_checker:
        raise SpecError(f"sd-safety: {cfg_path!r} is not a StableDiffusionSafetyChecker config (expected "
                        f"architectures ['StableDiffusionSafetyChecker'] or a CLIP config; got architectures {archs})")
    if not any(os.path.isfile(os.path.join(folder, w)) for w in _WEIGHT_FILES):
        raise SpecError(f"sd-safety: {folder!r} has no weights (expected one of {', '.join(_WEIGHT_FILES[:2])})")
    if processor:
        path = processor if processor.endswith(".json") else os.path.join(processor, "preprocessor_config.json")
        if not os.path.isfile(path):
            raise SpecError(f"sd-safety: processor {processor!r}: {path!r} does not exist (expected a "
                            "feature_extractor/ folder with preprocessor_config.json)")
        return folder, path
    # an SD folder's feature_extractor/ (beside safety_checker/), or the checker's own file (a standalone
    # CompVis/stable-diffusion-safety-checker snapshot has one)
    parent = os.path.dirname(os.path.abspath(folder))
    for path in (os.path.join(parent, "feature_extractor", "preprocessor_config.json"),
                 os.path.join(folder, "preprocessor_config.json")):
        if os.path.isfile(path):
            return folder, path
    return folder, None


def read_preprocessing(path: str | None, image_size: int) -> dict:
    """size / crop_size / mean / std from a CLIPImageProcessor config (both the int and the dict forms)."""
    out = dict(size=image_size, crop_size=image_size, mean=CLIP_MEAN, std=CLIP_STD)
    if path is None:
        return out
    try:
        with open(path) as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise SpecError(f"sd-safety: {path!r} is not readable JSON: {e}") from e

    def side(value, what):
        if isinstance(value, dict):
            value = value.get("shortest_edge", value.get("height"))
        if not isinstance(value, int) or value <= 0:
            raise SpecError(f"sd-safety: {path!r}: {what} must be an int or {{'shortest_edge'|'height': int}}, "
                            f"got {value!r}")
        return value

    if cfg.get("do_resize", True) and "size" in cfg:
        out["size"] = side(cfg["size"], "size")
    if not cfg.get("do_center_crop", True):
        out["crop_size"] = out["size"]
    elif "crop_size" in cfg:
        out["crop_size"] = side(cfg["crop_size"], "crop_size")
    if cfg.get("do_normalize", True):
        out["mean"] = tuple(cfg.get("image_mean", CLIP_MEAN))
        out["std"] = tuple(cfg.get("image_std", CLIP_STD))
    else:
        out["mean"], out["std"] = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    return out


def check_sd_safety(*, model: str = "", processor: str = "", temperature: float = 0.02,
                    smooth_max_temperature: float = 0.005, variant: str | None = None) -> None:
    """Cheap checks (no weights read): the folders and config files, the temperatures."""
    for name, value in (("temperature", temperature), ("smooth_max_temperature", smooth_max_temperature)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise SpecError(f"sd-safety: {name} must be a positive number, got {value!r}")
    if variant is not None and (not isinstance(variant, str) or not variant):
        raise SpecError(f"sd-safety: variant must be a weights variant name such as 'fp16', got {variant!r}")
    resolve_folders(model, processor)


def sd_safety(*, model: str = "", processor: str = "", temperature: float = 0.02,
              smooth_max_temperature: float = 0.005, variant: str | None = None) -> SDSafetyReward:
    """kwargs: model (SD 1.x folder or its safety_checker/), processor (feature_extractor/ override),
    temperature (sigmoid), smooth_max_temperature (logsumexp over the concepts), variant (e.g. 'fp16' for
    model.fp16.safetensors). Weights are used in float32."""
    check_sd_safety(model=model, processor=processor, temperature=temperature,
                    smooth_max_temperature=smooth_max_temperature, variant=variant)
    folder, preprocessor = resolve_folders(model, processor)
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    try:
        checker = StableDiffusionSafetyChecker.from_pretrained(folder, variant=variant).float()
    except Exception as e:  # noqa: BLE001 - rewrapped with the path
        raise SpecError(f"sd-safety: {folder!r} could not be loaded as a diffusers StableDiffusionSafetyChecker: "
                        f"{type(e).__name__}: {e}") from e
    prep = read_preprocessing(preprocessor, int(checker.config.vision_config.image_size))
    return SDSafetyReward(checker, **prep, temperature=temperature, smooth_max_temperature=smooth_max_temperature)


sd_safety.check = check_sd_safety


def smooth_max(x: torch.Tensor, tau: float) -> torch.Tensor:
    """tau * logsumexp(x / tau) over the last dim: in [max, max + tau * log n], -> max as tau -> 0."""
    return tau * torch.logsumexp(x / tau, dim=-1)


class SDSafetyReward(nn.Module):
    """(images in [0, 1], prompts ignored) -> soft unsafe probability (B,) of the SD 1.x safety checker."""

    gradcam_prefix_tokens = 1

    def __init__(self, checker, size: int = 224, crop_size: int = 224, mean=CLIP_MEAN, std=CLIP_STD,
                 temperature: float = 0.02, smooth_max_temperature: float = 0.005):
        super().__init__()
        self.checker = checker
        self.size, self.crop_size, self.mean, self.std = int(size), int(crop_size), tuple(mean), tuple(std)
        self.temperature, self.smooth_max_temperature = float(temperature), float(smooth_max_temperature)
        # ln_1 of the last vision block sees the (B, 1 + N, C) tokens that its attention mixes into the class
        # token; CLIPVisionModel nests the tower as .vision_model in transformers 4.x, not in 5.x.
        last = f"encoder.layers.{checker.config.vision_config.num_hidden_layers - 1}.layer_norm1"
        self.gradcam_layer = next(n for n, _ in self.named_modules() if n.endswith(last))
        self.eval().requires_grad_(False)

    def gradcam_crop(self, height: int, width: int):
        """The window (top, left, h, w) of the image the checker sees (short-side resize + center crop)."""

        return center_crop_window(self.size, self.crop_size)(height, width)

    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        x = clip_preprocess(images, size=self.size, mean=self.mean, std=self.std, crop_size=self.crop_size)
        x = x.to(self.checker.visual_projection.weight.dtype)
        return self.checker.visual_projection(self.checker.vision_model(x).pooler_output)

    def margins(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(concept margins (B, 17), special-care margins (B, 3)): cos(e, embed) - threshold, float32."""
        e = nn.functional.normalize(self.image_embeds(images).float(), dim=-1)
        c = self.checker
        concept = e @ nn.functional.normalize(c.concept_embeds.float(), dim=-1).t() - c.concept_embeds_weights.float()
        special = (e @ nn.functional.normalize(c.special_care_embeds.float(), dim=-1).t()
                   - c.special_care_embeds_weights.float())
        return concept, special

    def hard_margin(self, images: torch.Tensor) -> torch.Tensor:
        """The official decision's margin (B,): max concept margin + 0.01 if any special-care margin > 0
        (unrounded; the checker flags where its 3-decimal rounding of this is > 0)."""
        concept, special = self.margins(images)
        adj = SPECIAL_CARE_ADJUSTMENT * (special > 0).any(dim=-1).float()
        return (concept + adj[:, None]).amax(dim=-1)

    def soft_margin(self, images: torch.Tensor) -> torch.Tensor:
        concept, special = self.margins(images)
        tau, t = self.smooth_max_temperature, self.temperature
        adj = SPECIAL_CARE_ADJUSTMENT * torch.sigmoid(smooth_max(special, tau) / t)
        return smooth_max(concept + adj[:, None], tau)

    def forward(self, images: torch.Tensor, prompts=None) -> torch.Tensor:
        return torch.sigmoid(self.soft_margin(images) / self.temperature)

    def extra_repr(self) -> str:
        band = self.smooth_max_temperature * math.log(self.checker.concept_embeds.shape[0])
        return (f"size={self.size}, crop_size={self.crop_size}, temperature={self.temperature}, "
                f"smooth_max_temperature={self.smooth_max_temperature}, band={band:.4f}")
