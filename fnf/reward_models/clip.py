"""CLIP-based rewards loaded from local transformers folders: ``aesthetic``, ``pickscore``, ``clipscore``.

All are frozen nn.Modules ``(images (B, 3, H, W) in [0, 1], prompts) -> (B,)``, differentiable in the images,
preprocessed by :func:`~fnf.reward_models.preprocess.clip_preprocess` with the folder's
``preprocessor_config.json`` (CLIP's defaults without one). Image features are
``visual_projection(vision_model(x).pooler_output)`` (= OpenAI CLIP's ``encode_image``), text features
``text_projection(text_model(ids).pooler_output)``; text features are cached per prompt.

``gradcam_layer`` names the ``layer_norm1`` of the last vision block: its output is the token sequence
(B, 1 + N, C) that the last attention reads, so the CLS token's score has a gradient at every patch token
(the last block's own output reaches the score through its CLS token only).
"""
from __future__ import annotations

import json
import os

import torch
from torch import nn

from ..core import SpecError
from .preprocess import clip_preprocess, crop_window, read_processor_config

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"))
CLIP_TYPES = {"clip": "CLIPModel", "clip_vision_model": "CLIPVisionModelWithProjection"}
HEAD_LINEARS = (0, 2, 4, 6, 7)  # the official MLP's nn.Sequential: Linear, Dropout, ..., Linear, Linear
HEAD_DROPOUTS = {1: 0.2, 3: 0.2, 5: 0.1}
MAX_CACHED_PROMPTS = 4096


# ------------------------------------------------------------------------------------------ checks (cheap)
def check_clip_folder(path, arg: str, reward: str, types=("clip",)) -> dict:
    """``path`` is a local transformers CLIP folder of one of ``types``; returns its config.json."""
    kinds = " or ".join(f"{CLIP_TYPES[t]} (model_type {t!r})" for t in types)
    expected = (f"expected a local transformers {kinds} folder with config.json and "
                f"{' or '.join(WEIGHT_FILES[:2])}, as written by save_pretrained or a hub snapshot")
    if not isinstance(path, str) or not path:
        raise SpecError(f"reward {reward!r} needs reward.kwargs.{arg}: {expected}")
    if not os.path.isdir(path):
        raise SpecError(f"reward {reward!r}: {arg}={path!r} is not a folder; {expected}")
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise SpecError(f"reward {reward!r}: {arg}={path!r} has no config.json; {expected}")
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise SpecError(f"reward {reward!r}: {cfg_path!r} is not readable JSON ({e}); {expected}") from None
    model_type = cfg.get("model_type") if isinstance(cfg, dict) else None
    if model_type not in types:
        raise SpecError(f"reward {reward!r}: {arg}={path!r} is a {model_type!r} model, not CLIP; {expected}")
    if not any(os.path.isfile(os.path.join(path, w)) for w in WEIGHT_FILES):
        raise SpecError(f"reward {reward!r}: {arg}={path!r} has no weights ({', '.join(WEIGHT_FILES)}); {expected}")
    return cfg


def check_processor_folder(path: str, arg: str, reward: str, tokenizer: bool) -> None:
    """``path`` holds a readable preprocessor_config.json (optional) and, if ``tokenizer``, a CLIP tokenizer."""
    if not os.path.isdir(path):
        raise SpecError(f"reward {reward!r}: {arg}={path!r} is not a folder (expected the processor folder: "
                        "tokenizer files and preprocessor_config.json)")
    try:
        read_processor_config(path)
    except ValueError as e:
        raise SpecError(f"reward {reward!r}: {e}") from None
    if tokenizer and not any(all(os.path.isfile(os.path.join(path, f)) for f in files) for files in TOKENIZER_FILES):
        raise SpecError(f"reward {reward!r}: no CLIP tokenizer in {path!r} (expected tokenizer.json or vocab.json + "
                        "merges.txt); pass reward.kwargs.processor = the folder that has it (for PickScore: a local "
                        "copy of laion/CLIP-ViT-H-14-laion2B-s32B-b79K)")


def projection_dim(cfg: dict) -> int:
    """The image embedding width of a CLIP config.json (transformers' default 512 when absent)."""
    return int(cfg.get("projection_dim", 512))


def read_head(path, reward: str = "aesthetic") -> dict[str, torch.Tensor]:
    """The LAION aesthetic MLP state dict (``layers.{0,2,4,6,7}.weight/bias``) from a .pth, checked: the
    widths chain and end in 1 output."""
    expected = ("expected the LAION improved-aesthetic-predictor state dict (e.g. sac+logos+ava1-l14-linearMSE.pth): "
                f"an nn.Sequential 'layers' with Linear weights/biases at {', '.join(map(str, HEAD_LINEARS))}")
    if not isinstance(path, str) or not path:
        raise SpecError(f"reward {reward!r} needs reward.kwargs.head: {expected}")
    if not os.path.isfile(path):
        raise SpecError(f"reward {reward!r}: head={path!r} does not exist; {expected}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - rewrapped with the path
        raise SpecError(f"reward {reward!r}: head={path!r} could not be read as a torch state dict "
                        f"({type(e).__name__}: {e}); {expected}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SpecError(f"reward {reward!r}: head={path!r} holds no tensor state dict; {expected}")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    want = {f"layers.{i}.{p}" for i in HEAD_LINEARS for p in ("weight", "bias")}
    if set(state) != want:
        raise SpecError(f"reward {reward!r}: head={path!r} has keys {sorted(state)[:6]}, missing "
                        f"{sorted(want - set(state))[:4]}, unexpected {sorted(set(state) - want)[:4]}; {expected}")
    prev = None
    for i in HEAD_LINEARS:
        w, b = state[f"layers.{i}.weight"], state[f"layers.{i}.bias"]
        if w.dim() != 2 or b.shape != (w.shape[0],) or (prev is not None and w.shape[1] != prev):
            raise SpecError(f"reward {reward!r}: head={path!r}: layers.{i} has weight {tuple(w.shape)} and bias "
                            f"{tuple(b.shape)}, which do not chain after width {prev}; {expected}")
        prev = w.shape[0]
    if prev != 1:
        raise SpecError(f"reward {reward!r}: head={path!r} ends in {prev} outputs, expected 1; {expected}")
    return state


def _check_head_fits(head: dict, path: str, clip_dim: int, clip_path: str) -> None:
    head_dim = head["layers.0.weight"].shape[1]
    if head_dim != clip_dim:
        raise SpecError(f"reward 'aesthetic': head={path!r} takes {head_dim}-dim embeddings but clip={clip_path!r} "
                        f"gives {clip_dim}-dim ones (the LAION v2 head needs CLIP ViT-L/14: 768)")


# ------------------------------------------------------------------------------------------ loading
def _load(cls_name: str, path: str, reward: str) -> nn.Module:
    import transformers

    try:
        model = getattr(transformers, cls_name).from_pretrained(path, local_files_only=True)
    except Exception as e:
        raise SpecError(f"reward {reward!r}: loading {path!r} as a transformers {cls_name} failed: "
                        f"{type(e).__name__}: {e}") from e
    return model.float().eval().requires_grad_(False)


def _load_tokenizer(path: str, reward: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:
        raise SpecError(f"reward {reward!r}: loading the CLIP tokenizer from {path!r} failed: "
                        f"{type(e).__name__}: {e}") from e


class VisionTower(nn.Module):
    """The vision half of a CLIP model (``vision_model`` + ``visual_projection``, transformers' names)."""

    def __init__(self, vision_model: nn.Module, visual_projection: nn.Module):
        super().__init__()
        self.vision_model, self.visual_projection = vision_model, visual_projection


class _CLIPReward(nn.Module):
    """Shared: preprocessing settings, image features, the Grad-CAM layer name."""

    gradcam_prefix_tokens = 1

    def __init__(self, clip: nn.Module, processor: dict):
        super().__init__()
        self.clip = clip
        self.processor = dict(processor)
        layers = len(clip.vision_model.encoder.layers)
        self.gradcam_layer = f"clip.vision_model.encoder.layers.{layers - 1}.layer_norm1"
        self.requires_grad_(False).eval()

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        dtype = self.clip.visual_projection.weight.dtype
        x = clip_preprocess(images, **self.processor).to(dtype)
        return self.clip.visual_projection(self.clip.vision_model(pixel_values=x).pooler_output)

    def gradcam_crop(self, height: int, width: int):
        """The window (top, left, h, w) of the image the CLIP tower sees (short-side resize + center crop)."""
        return crop_window(height, width, self.processor["size"], self.processor.get("crop_size"))

    def train(self, mode: bool = True):  # frozen: dropout stays off
        return super().train(False)

    @staticmethod
    def _check_batch(images, prompts):
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            raise ValueError(f"images: expected a (B, 3, H, W) float tensor in [0, 1], got "
                             f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
        if prompts is not None and (isinstance(prompts, str) or len(prompts) != images.shape[0]):
            raise ValueError(f"prompts: expected a list of {images.shape[0]} strings (one per image), got "
                             f"{prompts!r:.80}")


class AestheticReward(_CLIPReward):
    """LAION aesthetic predictor v2: ``MLP(e / |e|)`` with ``e`` the CLIP image embedding (prompts unused)."""

    def __init__(self, clip: nn.Module, head_state: dict, processor: dict):
        super().__init__(clip, processor)
        mods: list[nn.Module] = []
        for i in range(HEAD_LINEARS[-1] + 1):
            if i in HEAD_LINEARS:
                w = head_state[f"layers.{i}.weight"]
                mods.append(nn.Linear(w.shape[1], w.shape[0]))
            else:
                mods.append(nn.Dropout(HEAD_DROPOUTS[i]))
        self.head = nn.Module()
        self.head.layers = nn.Sequential(*mods)
        self.head.load_state_dict(head_state)
        self.requires_grad_(False).eval()

    def forward(self, images, prompts=None):
        self._check_batch(images, prompts)
        e = self.image_features(images)
        e = e.to(torch.promote_types(e.dtype, torch.float32))
        e = e / e.norm(dim=-1, keepdim=True)
        return self.head.layers(e.to(self.head.layers[0].weight.dtype))[:, 0]


class CLIPSimilarityReward(_CLIPReward):
    """``scale * cos(image, text of its prompt)``; ``scale=None`` uses the model's ``logit_scale.exp()``
    (PickScore). ``clamp_negative`` gives CLIPScore's ``max(cos, 0)`` (zero gradient below 0)."""

    def __init__(self, clip: nn.Module, tokenizer, processor: dict, scale: float | None = None,
                 clamp_negative: bool = False, prefix: str = ""):
        super().__init__(clip, processor)
        self.tokenizer, self.scale = tokenizer, scale
        self.clamp_negative, self.prefix = bool(clamp_negative), str(prefix)
        max_len = clip.config.text_config.max_position_embeddings
        self.max_length = min(int(getattr(tokenizer, "model_max_length", max_len) or max_len), max_len)
        self._text_cache: dict[str, torch.Tensor] = {}
        self._text_cache_key = None

    @torch.no_grad()
    def text_features(self, prompts: list[str]) -> torch.Tensor:
        """Unnormalised text embeddings (len(prompts), D), computed once per distinct prompt (the cache is
        dropped when the text tower moves to another device or dtype)."""
        weight = self.clip.text_projection.weight
        if self._text_cache_key != (weight.device, weight.dtype):
            self._text_cache, self._text_cache_key = {}, (weight.device, weight.dtype)
        new = sorted({p for p in prompts if p not in self._text_cache})
        if new:
            if len(self._text_cache) + len(new) > MAX_CACHED_PROMPTS:
                self._text_cache = {}
            device = weight.device
            for p in new:  # one at a time: no padding, exactly the official single-prompt call
                tok = self.tokenizer([self.prefix + p], truncation=True, max_length=self.max_length,
                                     return_tensors="pt")
                mask = tok.get("attention_mask")
                out = self.clip.text_model(input_ids=tok["input_ids"].to(device),
                                           attention_mask=None if mask is None else mask.to(device))
                self._text_cache[p] = self.clip.text_projection(out.pooler_output)[0]
        return torch.stack([self._text_cache[p] for p in prompts])

    def forward(self, images, prompts):
        self._check_batch(images, prompts)
        if prompts is None:
            raise ValueError("prompts: expected one prompt per image, got None")
        img = self.image_features(images)
        img = img.to(torch.promote_types(img.dtype, torch.float32))  # bf16/fp16 autocast: the cosine in float32
        txt = self.text_features(list(prompts)).to(img.dtype)
        cos = (img / img.norm(dim=-1, keepdim=True) * (txt / txt.norm(dim=-1, keepdim=True))).sum(-1)
        if self.clamp_negative:
            cos = cos.clamp(min=0)
        scale = self.clip.logit_scale.exp() if self.scale is None else self.scale
        return scale * cos


# ------------------------------------------------------------------------------------------ specs
def check_aesthetic(clip: str = "", head: str = "", processor: str | None = None) -> None:
    """Paths and formats of the ``aesthetic`` spec (config.json files and the small head .pth are read)."""
    cfg = check_clip_folder(clip, "clip", "aesthetic", types=("clip", "clip_vision_model"))
    check_processor_folder(processor or clip, "processor", "aesthetic", tokenizer=False)
    _check_head_fits(read_head(head), head, projection_dim(cfg), clip)


def aesthetic(clip: str = "", head: str = "", processor: str | None = None) -> AestheticReward:
    """LAION aesthetic predictor v2. kwargs: clip = local CLIP ViT-L/14 folder (CLIPModel or
    CLIPVisionModelWithProjection), head = the predictor's .pth, processor = folder of preprocessor_config.json
    (default: clip)."""
    cfg = check_clip_folder(clip, "clip", "aesthetic", types=("clip", "clip_vision_model"))
    check_processor_folder(processor or clip, "processor", "aesthetic", tokenizer=False)
    state = read_head(head)
    model = _load(CLIP_TYPES[cfg["model_type"]], clip, "aesthetic")
    tower = VisionTower(model.vision_model, model.visual_projection)
    _check_head_fits(state, head, tower.visual_projection.out_features, clip)
    return AestheticReward(tower, state, read_processor_config(processor or clip))


aesthetic.check = check_aesthetic


def _similarity(reward: str, model: str, processor: str | None, **kw) -> CLIPSimilarityReward:
    check_clip_folder(model, "model", reward)
    check_processor_folder(processor or model, "processor", reward, tokenizer=True)
    clip = _load("CLIPModel", model, reward)
    tokenizer = _load_tokenizer(processor or model, reward)
    return CLIPSimilarityReward(clip, tokenizer, read_processor_config(processor or model), **kw)


def check_pickscore(model: str = "", processor: str | None = None) -> None:
    check_clip_folder(model, "model", "pickscore")
    check_processor_folder(processor or model, "processor", "pickscore", tokenizer=True)


def pickscore(model: str = "", processor: str | None = None) -> CLIPSimilarityReward:
    """PickScore: ``logit_scale.exp() * cos``. kwargs: model = local PickScore_v1 CLIPModel folder,
    processor = folder with the tokenizer and preprocessor_config.json (default: model)."""
    return _similarity("pickscore", model, processor, scale=None)


pickscore.check = check_pickscore


def check_clipscore(model: str = "", processor: str | None = None, scale: float = 100.0,
                    clamp_negative: bool = False, prefix: str = "") -> None:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise SpecError(f"reward 'clipscore': scale must be a number, got {scale!r}")
    if not isinstance(prefix, str):
        raise SpecError(f"reward 'clipscore': prefix must be a string, got {prefix!r}")
    check_clip_folder(model, "model", "clipscore")
    check_processor_folder(processor or model, "processor", "clipscore", tokenizer=True)


def clipscore(model: str = "", processor: str | None = None, scale: float = 100.0, clamp_negative: bool = False,
              prefix: str = "") -> CLIPSimilarityReward:
    """CLIP score ``scale * cos(image, prompt)`` (default 100 * cos, differentiable everywhere). The CLIPScore
    paper's CLIP-S is ``scale=2.5, clamp_negative=True, prefix="A photo depicts "``; torchmetrics' is
    ``clamp_negative=True``."""
    check_clipscore(model, processor, scale, clamp_negative, prefix)
    return _similarity("clipscore", model, processor, scale=float(scale), clamp_negative=clamp_negative,
                       prefix=prefix)


clipscore.check = check_clipscore
