"""``hpsv2``: Human Preference Score v2 / v2.1 (an open_clip ViT-H-14 fine-tuned on human preferences).

Score = cos(image features, text features), both L2-normalised, no logit scale (the official ``hpsv2.score``).
The checkpoint is the official ``torch.save({'state_dict': ...})`` file in open_clip's key names. When
``open_clip`` imports, the model is ``open_clip.create_model(arch, pretrained=None)`` with that state dict;
otherwise the state dict is converted to a transformers ``CLIPModel`` (the same architecture), its shapes read
from the tensors. Text is tokenised with a local CLIP tokenizer folder (an SD 1.x ``tokenizer/`` holds the same BPE).
Images go through HPS's eval transform (long side to 224, zero-padded to a square; square images: a plain resize).
"""
from __future__ import annotations

import os

import torch
from torch import nn

from ..core import SpecError
from .preprocess import CLIP_MEAN, CLIP_STD, center_crop_window, clip_preprocess

# open_clip architectures -> vision head width (text heads are width // 64 in all of them).
VISION_HEAD_WIDTH = {"ViT-H-14": 80, "ViT-L-14": 64, "ViT-B-16": 64, "ViT-B-32": 64, "ViT-g-14": 88,
                     "ViT-bigG-14": 104}
BACKENDS = ("auto", "open_clip", "transformers")
_TOWERS = (("visual.transformer", "vision_model"), ("transformer", "text_model"))


def _open_clip_available() -> bool:
    """Whether ``open_clip`` imports (it may be installed and still fail, e.g. on a torchvision mismatch)."""
    try:
        import open_clip  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means: use the transformers path
        return False
    return True


def _use_open_clip(backend: str) -> bool:
    if backend == "open_clip" and not _open_clip_available():
        raise SpecError("hpsv2: backend 'open_clip' needs the open-clip-torch package to import "
                        "(pip install open-clip-torch), or use backend 'transformers'")
    return backend == "open_clip" or (backend == "auto" and _open_clip_available())


def check_hpsv2(*, checkpoint: str = "", tokenizer: str = "", arch: str = "ViT-H-14",
                vision_head_width: int | None = None, text_head_width: int = 64, hidden_act: str = "gelu",
                backend: str = "auto", resize: str = "longest") -> None:
    """Cheap checks (no weights read): the checkpoint file, the tokenizer folder, the argument values."""
    if resize not in RESIZE_MODES:
        raise SpecError(f"hpsv2: resize must be 'longest' (official: pad to square) or 'shortest' (center crop), "
                        f"got {resize!r}")
    if backend not in BACKENDS:
        raise SpecError(f"hpsv2: backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if not checkpoint:
        raise SpecError("hpsv2 needs reward.kwargs.checkpoint = a local HPS v2 / v2.1 checkpoint "
                        "(e.g. HPS_v2.1_compressed.pt, a torch.save dict with a 'state_dict' entry)")
    if not os.path.isfile(checkpoint):
        raise SpecError(f"hpsv2: checkpoint {checkpoint!r} does not exist (expected an HPS v2 / v2.1 .pt file: "
                        "a torch.save dict with a 'state_dict' entry in open_clip key names)")
    if hidden_act not in ("gelu", "quick_gelu"):
        raise SpecError(f"hpsv2: hidden_act must be 'gelu' (LAION ViTs, HPS) or 'quick_gelu', got {hidden_act!r}")
    if tokenizer:
        _check_tokenizer_folder(tokenizer)
    if _use_open_clip(backend):   # open_clip builds the model and has its own tokenizer
        return
    if not tokenizer:
        raise SpecError("hpsv2 needs reward.kwargs.tokenizer = a local CLIP tokenizer folder (vocab.json + "
                        "merges.txt; the tokenizer/ folder of any SD 1.x model) when open_clip is not installed")
    if vision_head_width is None and arch not in VISION_HEAD_WIDTH:
        raise SpecError(f"hpsv2: unknown arch {arch!r} (known: {', '.join(VISION_HEAD_WIDTH)}); give "
                        "vision_head_width for another open_clip ViT")


def _check_tokenizer_folder(folder: str) -> None:
    if not os.path.isdir(folder):
        raise SpecError(f"hpsv2: tokenizer {folder!r} is not a folder (expected a CLIP tokenizer folder with "
                        "vocab.json and merges.txt, e.g. an SD 1.x model's tokenizer/)")
    missing = [f for f in ("vocab.json", "merges.txt") if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise SpecError(f"hpsv2: tokenizer folder {folder!r} lacks {', '.join(missing)} (expected a CLIP BPE "
                        "tokenizer folder, e.g. an SD 1.x model's tokenizer/)")


def hpsv2(*, checkpoint: str = "", tokenizer: str = "", arch: str = "ViT-H-14",
          vision_head_width: int | None = None, text_head_width: int = 64, hidden_act: str = "gelu",
          backend: str = "auto", resize: str = "longest") -> HPSv2Reward:
    """kwargs: checkpoint (HPS_v2*.pt), tokenizer (CLIP tokenizer folder), arch (open_clip name),
    vision_head_width / text_head_width (for other widths), hidden_act, backend (auto | open_clip | transformers),
    resize (longest: the official pad-to-square | shortest: center crop)."""
    check_hpsv2(checkpoint=checkpoint, tokenizer=tokenizer, arch=arch, vision_head_width=vision_head_width,
                text_head_width=text_head_width, hidden_act=hidden_act, backend=backend, resize=resize)
    state = read_open_clip_state(checkpoint)
    if _use_open_clip(backend):
        return _open_clip_reward(state, checkpoint, arch, tokenizer, resize)
    tok = _hf_tokenizer(tokenizer)
    if vision_head_width is None and arch not in VISION_HEAD_WIDTH:
        raise SpecError(f"hpsv2: unknown arch {arch!r} (known: {', '.join(VISION_HEAD_WIDTH)}); give "
                        "vision_head_width for another open_clip ViT")
    vhw = int(vision_head_width or VISION_HEAD_WIDTH[arch])
    clip = open_clip_to_transformers(state, checkpoint, vhw, int(text_head_width), hidden_act, tok)
    return HPSv2Reward(clip, tok, image_size=clip.config.vision_config.image_size,
                       context_length=clip.config.text_config.max_position_embeddings, resize=resize)


hpsv2.check = check_hpsv2


# ------------------------------------------------------------------------------------------ checkpoint
def read_open_clip_state(path: str) -> dict[str, torch.Tensor]:
    """The open_clip state dict of an HPS checkpoint (``state_dict`` entry unwrapped, ``module.`` stripped)."""
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # not a zip-format file: mmap is impossible
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - rewrapped with the path
        raise SpecError(f"hpsv2: checkpoint {path!r} could not be read as a torch state dict "
                        f"(weights_only): {type(e).__name__}: {e}") from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SpecError(f"hpsv2: checkpoint {path!r} holds no tensor state dict (expected the official "
                        "{'state_dict': {...}} of an open_clip model)")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _need(state: dict, key: str, path: str, ndim: int) -> torch.Tensor:
    if key not in state:
        raise SpecError(f"hpsv2: checkpoint {path!r} has no {key!r} (expected an open_clip CLIP state dict, "
                        "e.g. HPS v2 / v2.1 ViT-H-14)")
    if state[key].dim() != ndim:
        raise SpecError(f"hpsv2: checkpoint {path!r}: {key!r} has shape {tuple(state[key].shape)}, expected "
                        f"{ndim} dimensions")
    return state[key]


def _count_blocks(state: dict, prefix: str, path: str) -> int:
    ids = {int(k[len(prefix):].split(".")[0]) for k in state if k.startswith(prefix)}
    if not ids:
        raise SpecError(f"hpsv2: checkpoint {path!r} has no {prefix}N.* blocks (expected an open_clip CLIP "
                        "state dict)")
    if ids != set(range(len(ids))):
        raise SpecError(f"hpsv2: checkpoint {path!r}: blocks {prefix}N are not numbered 0..{len(ids) - 1}")
    return len(ids)


def infer_config(state: dict, path: str, vision_head_width: int, text_head_width: int, hidden_act: str,
                 tokenizer=None):
    """A transformers CLIPConfig from the tensor shapes of an open_clip state dict."""
    from transformers import CLIPConfig

    conv = _need(state, "visual.conv1.weight", path, 4)
    vpos = _need(state, "visual.positional_embedding", path, 2)
    proj = _need(state, "visual.proj", path, 2)
    tok_emb = _need(state, "token_embedding.weight", path, 2)
    tpos = _need(state, "positional_embedding", path, 2)
    tproj = _need(state, "text_projection", path, 2)
    vwidth, patch = conv.shape[0], conv.shape[-1]
    grid = round((vpos.shape[0] - 1) ** 0.5)
    if grid * grid != vpos.shape[0] - 1:
        raise SpecError(f"hpsv2: checkpoint {path!r}: visual.positional_embedding has {vpos.shape[0]} rows, "
                        "expected 1 + a square number of patches")
    twidth = tok_emb.shape[1]
    for width, hw, what in ((vwidth, vision_head_width, "vision_head_width"), (twidth, text_head_width,
                                                                                "text_head_width")):
        if hw <= 0 or width % hw:
            raise SpecError(f"hpsv2: {what}={hw} does not divide the checkpoint's width {width} ({path!r})")
    if proj.shape[1] != tproj.shape[1]:
        raise SpecError(f"hpsv2: checkpoint {path!r}: visual.proj {tuple(proj.shape)} and text_projection "
                        f"{tuple(tproj.shape)} project to different sizes")
    vmlp = _need(state, "visual.transformer.resblocks.0.mlp.c_fc.weight", path, 2).shape[0]
    tmlp = _need(state, "transformer.resblocks.0.mlp.c_fc.weight", path, 2).shape[0]
    ids = {}
    if tokenizer is not None:
        ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
    text = dict(vocab_size=tok_emb.shape[0], hidden_size=twidth, intermediate_size=tmlp,
                num_hidden_layers=_count_blocks(state, "transformer.resblocks.", path),
                num_attention_heads=twidth // text_head_width, max_position_embeddings=tpos.shape[0],
                hidden_act=hidden_act, layer_norm_eps=1e-5, projection_dim=tproj.shape[1], **ids)
    vision = dict(hidden_size=vwidth, intermediate_size=vmlp,
                  num_hidden_layers=_count_blocks(state, "visual.transformer.resblocks.", path),
                  num_attention_heads=vwidth // vision_head_width, image_size=grid * patch, patch_size=patch,
                  hidden_act=hidden_act, layer_norm_eps=1e-5, projection_dim=proj.shape[1])
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=proj.shape[1])


def _key_map(config) -> list[tuple[str, str, str]]:
    """(open_clip key, transformers key, how): how is '' (copy), 'T' (transpose), 'q'/'k'/'v' (a third of the
    fused in_proj)."""
    rows = [("visual.conv1.weight", "vision_model.embeddings.patch_embedding.weight", ""),
            ("visual.class_embedding", "vision_model.embeddings.class_embedding", ""),
            ("visual.positional_embedding", "vision_model.embeddings.position_embedding.weight", ""),
            ("visual.proj", "visual_projection.weight", "T"),
            ("token_embedding.weight", "text_model.embeddings.token_embedding.weight", ""),
            ("positional_embedding", "text_model.embeddings.position_embedding.weight", ""),
            ("text_projection", "text_projection.weight", "T"),
            ("logit_scale", "logit_scale", "")]
    for oc, hf in (("visual.ln_pre", "vision_model.pre_layrnorm"), ("visual.ln_post", "vision_model.post_layernorm"),
                   ("ln_final", "text_model.final_layer_norm")):
        rows += [(f"{oc}.{p}", f"{hf}.{p}", "") for p in ("weight", "bias")]
    for (oc_tower, hf_tower), cfg in zip(_TOWERS, (config.vision_config, config.text_config)):
        for i in range(cfg.num_hidden_layers):
            oc, hf = f"{oc_tower}.resblocks.{i}", f"{hf_tower}.encoder.layers.{i}"
            for p in ("weight", "bias"):
                rows += [(f"{oc}.attn.in_proj_{p}", f"{hf}.self_attn.{q}_proj.{p}", q) for q in "qkv"]
                rows += [(f"{oc}.{a}.{p}", f"{hf}.{b}.{p}", "") for a, b in
                         (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("attn.out_proj", "self_attn.out_proj"),
                          ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2"))]
    return rows


def open_clip_to_transformers(state: dict, path: str, vision_head_width: int = 80, text_head_width: int = 64,
                              hidden_act: str = "gelu", tokenizer=None):
    """An open_clip CLIP state dict -> a frozen transformers ``CLIPModel`` holding the same weights (float32)."""
    from transformers import CLIPModel

    config = infer_config(state, path, vision_head_width, text_head_width, hidden_act, tokenizer)
    with torch.device("meta"):  # no random init of ~1B parameters: the checkpoint's tensors are assigned below
        model = CLIPModel(config)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    rows = _key_map(config)
    known = {oc for oc, _, _ in rows}
    # attn_mask: the causal mask, a buffer some open_clip versions saved with the weights (rebuilt here)
    unexpected = sorted(k for k in state if k not in known and not k.endswith("attn_mask"))
    if unexpected:
        raise SpecError(f"hpsv2: checkpoint {path!r} has keys this architecture does not use: {unexpected[:4]} "
                        f"(expected a plain open_clip ViT CLIP such as HPS v2's ViT-H-14)")
    converted = {}
    for oc, hf, how in rows:
        if oc not in state:
            if oc == "logit_scale":
                continue
            raise SpecError(f"hpsv2: checkpoint {path!r} has no {oc!r} (an open_clip ViT CLIP state dict with "
                            f"{config.vision_config.num_hidden_layers} vision / {config.text_config.num_hidden_layers} "
                            "text blocks was expected)")
        t = state[oc].float()
        if how == "T":
            t = t.t()
        elif how:
            if t.shape[0] % 3:
                raise SpecError(f"hpsv2: checkpoint {path!r}: {oc!r} has shape {tuple(t.shape)}, expected "
                                "3 x width rows (fused q, k, v)")
            t = t.chunk(3, dim=0)["qkv".index(how)]
        if t.shape != shapes[hf]:
            want = tuple(shapes[hf])
            want = want[::-1] if how == "T" else (3 * want[0],) + want[1:] if how else want
            raise SpecError(f"hpsv2: checkpoint {path!r}: {oc!r} has shape {tuple(state[oc].shape)}, expected "
                            f"{want} for the architecture read from the other tensors")
        converted[hf] = t.contiguous()
    if "logit_scale" not in converted:
        converted["logit_scale"] = torch.tensor(float(config.logit_scale_init_value))
    missing, unused = model.load_state_dict(converted, strict=False, assign=True)
    for module in model.modules():
        if "position_ids" in module._buffers and module.position_ids.is_meta:
            module.position_ids = torch.arange(module.position_ids.shape[-1]).expand((1, -1))
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if missing != [k for k in missing if k.endswith("position_ids")] or unused or left:
        # the key map and transformers disagree: a transformers version we do not know
        raise SpecError(f"hpsv2: converting {path!r} to a transformers CLIPModel left {(left or missing)[:3]} "
                        f"unset and {unused[:3]} unused (unsupported transformers version?)")
    return model.eval().requires_grad_(False)


def _hf_tokenizer(folder: str):
    from transformers import CLIPTokenizer

    try:
        return CLIPTokenizer.from_pretrained(folder)
    except Exception as e:  # noqa: BLE001 - rewrapped with the path
        raise SpecError(f"hpsv2: tokenizer folder {folder!r} could not be loaded as a CLIP tokenizer: "
                        f"{type(e).__name__}: {e}") from e


def _tokenize(tokenizer, prompts, context_length: int, device) -> torch.Tensor:
    ids = tokenizer(list(prompts), padding="max_length", max_length=context_length, truncation=True,
                    return_tensors="pt").input_ids
    return ids.to(device)


def _prompt_list(prompts, batch: int) -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts or [])
    if len(prompts) == 1 and batch > 1:
        prompts = prompts * batch
    if len(prompts) != batch or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts: expected {batch} strings (one per image), got {prompts!r}")
    return prompts


# ------------------------------------------------------------------------------------------ rewards
RESIZE_MODES = ("longest", "shortest")


def hps_preprocess(images: torch.Tensor, size: int, resize: str = "longest") -> torch.Tensor:
    """HPS v2's evaluation transform, differentiable: ``longest`` (official: open_clip ResizeMaxSize, i.e. the
    long side bicubic-resized to ``size``, then zero-padded to a centred square) or ``shortest`` (short side
    resized, center crop). Then CLIP mean/std. Square images give the same input either way."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images: expected a (B, 3, H, W) tensor, got "
                         f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
    h, w = images.shape[-2:]
    if resize == "longest" and h != w:
        scale = size / max(h, w)
        new_h, new_w = round(h * scale), round(w * scale)
        x = images.float()
        if (new_h, new_w) != (h, w):
            x = nn.functional.interpolate(x, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)
        pad_h, pad_w = size - new_h, size - new_w
        images = nn.functional.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
    return clip_preprocess(images, size=size, mean=CLIP_MEAN, std=CLIP_STD)


def hps_window(height: int, width: int, size: int, resize: str = "longest"):
    """``gradcam_crop`` of :func:`hps_preprocess`: the window (top, left, h, w), in image pixels, that the model
    input covers. Pad-to-square covers more than the image (negative top or left: the padding)."""
    if resize == "shortest" or height == width:

        return center_crop_window(size)(height, width)
    scale = max(height, width) / size
    new_h, new_w = round(height / scale), round(width / scale)
    return (-((size - new_h) // 2) * scale, -((size - new_w) // 2) * scale, size * scale, size * scale)


class _HPSBase(nn.Module):
    gradcam_prefix_tokens = 1

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        return hps_preprocess(images, self.image_size, self.resize)

    def gradcam_crop(self, height: int, width: int):
        return hps_window(height, width, self.image_size, self.resize)


class HPSv2Reward(_HPSBase):
    """HPS v2 on a transformers CLIPModel: cos(image, text) of (images in [0, 1], prompts) -> (B,)."""

    def __init__(self, clip, tokenizer, image_size: int = 224, context_length: int = 77, resize: str = "longest"):
        super().__init__()
        self.clip, self.tokenizer = clip, tokenizer
        self.image_size, self.context_length, self.resize = int(image_size), int(context_length), resize
        self.gradcam_layer = f"clip.vision_model.encoder.layers.{clip.config.vision_config.num_hidden_layers - 1}" \
                             ".layer_norm1"
        self.eval().requires_grad_(False)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        dtype = self.clip.visual_projection.weight.dtype
        x = self.preprocess(images).to(dtype)
        return self.clip.visual_projection(self.clip.vision_model(pixel_values=x).pooler_output)

    @torch.no_grad()
    def text_features(self, prompts: list[str]) -> torch.Tensor:
        device = self.clip.text_projection.weight.device
        ids = _tokenize(self.tokenizer, prompts, self.context_length, device)
        hidden = self.clip.text_model(input_ids=ids).last_hidden_state  # after ln_final
        eot = (ids == self.tokenizer.eos_token_id).int().argmax(dim=-1)  # first end-of-text token
        return self.clip.text_projection(hidden[torch.arange(ids.shape[0], device=device), eot])

    def forward(self, images: torch.Tensor, prompts=None) -> torch.Tensor:
        text = self.text_features(_prompt_list(prompts, images.shape[0]))
        img = self.image_features(images)
        return (nn.functional.normalize(img.float(), dim=-1) * nn.functional.normalize(text.float(), dim=-1)).sum(-1)


class OpenCLIPHPSv2Reward(_HPSBase):
    """HPS v2 on an open_clip model (``model.encode_image`` / ``encode_text``); same score."""

    def __init__(self, model, tokenize, image_size: int = 224, context_length: int = 77, resize: str = "longest"):
        super().__init__()
        self.model, self.tokenize = model, tokenize
        self.image_size, self.context_length, self.resize = int(image_size), int(context_length), resize
        # A batch-first open_clip (>= 2.24) feeds (B, 1 + N, C) through ln_1 of the last vision block.
        self.gradcam_layer = f"model.visual.transformer.resblocks.{len(model.visual.transformer.resblocks) - 1}.ln_1"
        self.eval().requires_grad_(False)

    def forward(self, images: torch.Tensor, prompts=None) -> torch.Tensor:
        device = next(self.model.parameters()).device
        with torch.no_grad():
            text = self.model.encode_text(self.tokenize(_prompt_list(prompts, images.shape[0])).to(device))
        dtype = next(self.model.parameters()).dtype
        x = self.preprocess(images).to(dtype)
        img = self.model.encode_image(x)
        return (nn.functional.normalize(img.float(), dim=-1) * nn.functional.normalize(text.float(), dim=-1)).sum(-1)


def _open_clip_reward(state: dict, path: str, arch: str, tokenizer: str, resize: str) -> OpenCLIPHPSv2Reward:
    import open_clip

    model = open_clip.create_model(arch, pretrained=None)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise SpecError(f"hpsv2: checkpoint {path!r} does not fit open_clip {arch!r}: {e}") from e
    ctx = int(state["positional_embedding"].shape[0]) if "positional_embedding" in state else 77
    if tokenizer:
        tok = _hf_tokenizer(tokenizer)

        def tokenize(prompts):
            return _tokenize(tok, prompts, ctx, "cpu")
    else:
        tokenize = open_clip.get_tokenizer(arch)
    grid = state["visual.positional_embedding"].shape[0] - 1
    size = round(grid ** 0.5) * state["visual.conv1.weight"].shape[-1]
    return OpenCLIPHPSv2Reward(model, tokenize, image_size=size, context_length=ctx, resize=resize)
