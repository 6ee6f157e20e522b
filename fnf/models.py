"""Load a local Stable Diffusion folder (SD 1.x/2.x or SDXL), encode prompts, attach and export LoRA.

Only local diffusers folders are read (``local_files_only=True``); nothing is ever fetched from a hub.
The frozen pretrained model is the same UNet with its adapters disabled (:func:`adapters_disabled`):
there is no second copy of the weights.
"""
from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"   # the file save_lora_weights writes into the LoRA folder
ADAPTER = "default"


class ModelLoadError(RuntimeError):
    """The model folder is missing, is not a diffusers pipeline folder, or a component fails to load."""


@dataclass
class PromptEmbeds:
    """Text conditioning for a batch: cross-attention states, plus SDXL's pooled embeds and time ids."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None

    def index(self, idx: torch.Tensor) -> "PromptEmbeds":
        pick = lambda t: None if t is None else t[idx]  # noqa: E731
        return PromptEmbeds(self.hidden[idx], pick(self.pooled), pick(self.time_ids))

    def to(self, device) -> "PromptEmbeds":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return PromptEmbeds(self.hidden.to(device), move(self.pooled), move(self.time_ids))

    def repeat(self, n: int) -> "PromptEmbeds":
        rep = lambda t: None if t is None else t.repeat(n, *([1] * (t.dim() - 1)))  # noqa: E731
        return PromptEmbeds(rep(self.hidden), rep(self.pooled), rep(self.time_ids))

    @staticmethod
    def cat(a: "PromptEmbeds", b: "PromptEmbeds") -> "PromptEmbeds":
        join = lambda x, y: None if x is None else torch.cat([x, y])  # noqa: E731
        return PromptEmbeds(torch.cat([a.hidden, b.hidden]), join(a.pooled, b.pooled), join(a.time_ids, b.time_ids))


@dataclass
class DiffusionModel:
    """The components of one pipeline folder, loaded for training and sampling."""

    path: str
    kind: str                      # "sd" or "sdxl"
    unet: torch.nn.Module
    vae: torch.nn.Module
    scheduler: object
    text_encoders: list = field(default_factory=list)
    tokenizers: list = field(default_factory=list)
    force_zeros_for_empty_prompt: bool = False
    vae_upcast: bool = False       # VAE kept in float32, decoded with autocast off (see set_vae_precision)

    @property
    def vae_dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def native_size(self) -> int:
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    @property
    def pipeline_class(self):
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        return StableDiffusionXLPipeline if self.kind == "sdxl" else StableDiffusionPipeline

    def lora_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in self.unet.named_parameters() if p.requires_grad]


def _read_index(path: str) -> dict:
    if not path:
        raise ModelLoadError("no model folder given: set model.path (or --model DIR) to a local diffusers folder")
    if not os.path.exists(path):
        raise ModelLoadError(f"model folder does not exist: {path!r} (fnf loads local diffusers folders only; "
                             "download the model yourself and point model.path at it)")
    if not os.path.isdir(path):
        raise ModelLoadError(f"model path is not a folder: {path!r}")
    index_file = os.path.join(path, "model_index.json")
    if not os.path.isfile(index_file):
        raise ModelLoadError(f"{path!r} is not a diffusers pipeline folder: model_index.json is missing")
    try:
        with open(index_file, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{index_file} is not valid JSON: {e}") from None


def detect_kind(path: str, index: dict | None = None) -> str:
    """"sdxl" when the folder holds a second text encoder (StableDiffusionXLPipeline), else "sd"."""
    index = index if index is not None else _read_index(path)
    if "text_encoder_2" in index or "XL" in str(index.get("_class_name", "")):
        return "sdxl"
    return "sd"


def _load(component: str, path: str, loader):
    folder = os.path.join(path, component)
    if not os.path.isdir(folder):
        raise ModelLoadError(f"model folder {path!r} has no '{component}' subfolder; a Stable Diffusion "
                             "pipeline folder needs unet, vae, text_encoder, tokenizer and scheduler")
    try:
        return loader(folder)
    except Exception as e:  # noqa: BLE001 - rewrapped with the component name
        raise ModelLoadError(f"could not load '{component}' from {folder!r}: {type(e).__name__}: {e}") from e


def load_model(path: str, *, kind: str = "auto", weight_dtype: str = "fp32", device="cpu") -> DiffusionModel:
    """Load UNet, VAE, text encoder(s), tokenizer(s) and a DDIM scheduler from a local folder, all frozen."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    index = _read_index(path)
    found = detect_kind(path, index)
    if kind == "auto":
        kind = found
    elif kind != found:
        raise ModelLoadError(f"model.kind is {kind!r} but {path!r} looks like {found!r}")
    dtype = DTYPES[weight_dtype]
    kw = dict(local_files_only=True)
    unet = _load("unet", path, lambda f: UNet2DConditionModel.from_pretrained(f, torch_dtype=dtype, **kw))
    # fp16: read the VAE in float32 (set_vae_precision casts it down unless its config sets force_upcast).
    vae_read = torch.float32 if dtype == torch.float16 else dtype
    vae = _load("vae", path, lambda f: AutoencoderKL.from_pretrained(f, torch_dtype=vae_read, **kw))
    scheduler = _load("scheduler", path, lambda f: DDIMScheduler.from_config(DDIMScheduler.load_config(f, **kw)))
    encoders = [_load("text_encoder", path, lambda f: CLIPTextModel.from_pretrained(f, torch_dtype=dtype, **kw))]
    tokenizers = [_load("tokenizer", path, lambda f: CLIPTokenizer.from_pretrained(f, **kw))]
    if kind == "sdxl":
        encoders.append(_load("text_encoder_2", path,
                              lambda f: CLIPTextModelWithProjection.from_pretrained(f, torch_dtype=dtype, **kw)))
        tokenizers.append(_load("tokenizer_2", path, lambda f: CLIPTokenizer.from_pretrained(f, **kw)))
    for module in [unet, vae, *encoders]:
        module.requires_grad_(False)
        module.eval()
        module.to(device)
    model = DiffusionModel(path=path, kind=kind, unet=unet, vae=vae, scheduler=scheduler, text_encoders=encoders,
                           tokenizers=tokenizers,
                           force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", kind == "sdxl")))
    set_vae_precision(model, dtype)
    return model


def set_vae_precision(model: DiffusionModel, weight_dtype: torch.dtype, fp16_autocast: bool = False) -> bool:
    """Cast the VAE to ``weight_dtype``, except when its config sets ``force_upcast`` (SD and SDXL VAEs overflow
    in float16) and float16 is in play (fp16 weights or fp16 autocast): then the VAE is kept in float32 and
    :func:`fnf.sampling.decode` runs it with autocast off, as the diffusers pipelines do. Sets and returns
    ``model.vae_upcast``."""
    if model.vae is None:
        return False
    fp16 = weight_dtype == torch.float16 or fp16_autocast
    model.vae_upcast = bool(fp16 and getattr(model.vae.config, "force_upcast", False))
    target = torch.float32 if model.vae_upcast else weight_dtype
    if model.vae_dtype != target:
        model.vae.to(target)
    return model.vae_upcast


# ----------------------------------------------------------------------------------------------- prompts
def _tokenize(tokenizer, prompts: list[str], device) -> torch.Tensor:
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return ids.to(device)


@torch.no_grad()
def encode_prompts(model: DiffusionModel, prompts: list[str], *, height: int, width: int,
                   zero: bool = False) -> PromptEmbeds:
    """Text conditioning as the diffusers pipelines compute it (SD: last hidden state; SDXL: penultimate
    hidden states of both encoders concatenated, pooled output of the second, time ids).

    ``zero`` gives SDXL's all-zero negative conditioning (force_zeros_for_empty_prompt)."""
    device = model.unet.device
    if model.kind == "sd":
        enc = model.text_encoders[0]
        hidden = enc(_tokenize(model.tokenizers[0], prompts, enc.device))[0]
        return PromptEmbeds(hidden.to(device))
    hiddens, pooled = [], None
    for tok, enc in zip(model.tokenizers, model.text_encoders):
        out = enc(_tokenize(tok, prompts, enc.device), output_hidden_states=True)
        hiddens.append(out.hidden_states[-2])
        pooled = out.text_embeds if hasattr(out, "text_embeds") else out[0]
    hidden = torch.cat(hiddens, dim=-1).to(device)
    pooled = pooled.to(device)
    if zero:
        hidden, pooled = torch.zeros_like(hidden), torch.zeros_like(pooled)
    time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=hidden.dtype, device=device)
    return PromptEmbeds(hidden, pooled, time_ids.repeat(len(prompts), 1))


def offload_text_encoders(model: DiffusionModel) -> None:
    """Move the text encoders to CPU once all embeddings exist (frees their device memory)."""
    for enc in model.text_encoders:
        enc.to("cpu")


# ----------------------------------------------------------------------------------------------- LoRA
def add_lora(model: DiffusionModel, *, rank: int, alpha: float, target_modules, dropout: float = 0.0) -> list:
    """Attach a peft LoRA adapter to the UNet through diffusers' add_adapter; LoRA params are fp32 and the
    only trainable parameters. Returns them."""
    from peft import LoraConfig

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                        init_lora_weights=True)
    try:
        model.unet.add_adapter(config, adapter_name=ADAPTER)
    except ValueError as e:
        raise ValueError(f"could not attach LoRA (lora.target_modules={list(target_modules)}): {e}") from e
    params = []
    for name, p in model.unet.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
            p.requires_grad_(True)
            params.append(p)
        else:
            p.requires_grad_(False)
    if not params:
        raise ValueError(f"lora.target_modules={list(target_modules)} matched no UNet module")
    _dropout_off(model.unet)
    return params


def _dropout_off(unet) -> None:
    """New peft layers start in training mode: LoRA dropout stays off outside lora_dropout_active."""
    for layer in lora_dropout_layers(unet):
        layer.eval()


def lora_dropout_layers(unet) -> list[torch.nn.Module]:
    """peft's lora_dropout layers (nn.Dropout, or nn.Identity for p = 0) of every LoRA module in ``unet``."""
    layers = []
    for module in unet.modules():
        dropout = getattr(module, "lora_dropout", None)
        if isinstance(dropout, torch.nn.ModuleDict):
            layers.extend(dropout.values())
    return layers


@contextlib.contextmanager
def lora_dropout_active(unet, active: bool = True):
    """LoRA dropout on (``active``) inside the block, whatever the UNet's train/eval mode; restored after.

    The trainer keeps the UNet in eval mode and switches LoRA dropout on only for the UNet calls that carry
    gradient: the no-grad steps of the fine-tuned trajectory then match a no-dropout run, and I0 never sees it."""
    layers = lora_dropout_layers(unet) if active else []
    before = [layer.training for layer in layers]
    for layer in layers:
        layer.train(True)
    try:
        yield unet
    finally:
        for layer, mode in zip(layers, before):
            layer.train(mode)


@contextlib.contextmanager
def adapters_disabled(unet):
    """The frozen pretrained model: the same UNet with its LoRA adapters switched off."""
    unet.disable_adapters()
    try:
        yield unet
    finally:
        unet.enable_adapters()


def lora_state_dict(unet) -> dict[str, torch.Tensor]:
    """Trainable LoRA tensors by parameter name (used by checkpoints)."""
    return {n: p.detach().clone() for n, p in unet.named_parameters() if p.requires_grad}


def load_lora_state_dict(unet, state: dict[str, torch.Tensor]) -> None:
    params = dict(unet.named_parameters())
    missing = [n for n in state if n not in params]
    if missing:
        raise ValueError(f"checkpoint LoRA tensors not in this UNet (different lora settings?): {missing[:3]}")
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t)


def save_lora_diffusers(model: DiffusionModel, directory: str) -> None:
    """Write the LoRA in diffusers format so that ``pipe.load_lora_weights(directory)`` loads it."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(model.unet, adapter_name=ADAPTER)
    state = {k: v.detach().float().cpu().contiguous() for k, v in convert_state_dict_to_diffusers(state).items()}
    cfg = model.unet.peft_config[ADAPTER]
    # rank_pattern / alpha_pattern: diffusers 0.34 reads them from the metadata unconditionally.
    metadata = {"r": cfg.r, "lora_alpha": cfg.lora_alpha, "target_modules": sorted(cfg.target_modules),
                "lora_dropout": cfg.lora_dropout, "init_lora_weights": True,
                "rank_pattern": dict(cfg.rank_pattern or {}), "alpha_pattern": dict(cfg.alpha_pattern or {})}
    model.pipeline_class.save_lora_weights(directory, unet_lora_layers=state, safe_serialization=True,
                                           weight_name=LORA_WEIGHTS, unet_lora_adapter_metadata=metadata)


def load_lora_for_sampling(model: DiffusionModel, directory: str, adapter_name: str = ADAPTER) -> None:
    """Load a diffusers-format LoRA folder into the model's UNet (the same loader pipe.load_lora_weights uses)."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"LoRA folder does not exist: {directory!r}")
    cls = model.pipeline_class
    # weight_name explicitly: diffusers < 0.40 refuses a folder without it when HF_HUB_OFFLINE is set.
    state, alphas, metadata = cls.lora_state_dict(directory, weight_name=LORA_WEIGHTS, return_lora_metadata=True)
    cls.load_lora_into_unet(state, network_alphas=alphas, unet=model.unet, adapter_name=adapter_name,
                            metadata=metadata)
    _dropout_off(model.unet)  # a LoRA saved with lora_dropout > 0 must not drop out while sampling
