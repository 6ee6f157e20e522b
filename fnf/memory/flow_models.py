"""The transformer (flow-matching) families for ``fnf estimate-memory``: SD3/SD3.5, FLUX.1 and FLUX.2.

A spec lists the pipeline's components as its model_index.json does (``{component: [library, class]}``) with
each one's config; :func:`build` makes them from the configs alone (random, under FakeTensorMode fake, weights
in the training dtype) and wraps them as the family's ``load`` does (denoiser as ``model.denoiser``, text encoders in
the pipeline's order, the family's extras), so the trainer runs its own code on them.
"""
from __future__ import annotations

import json
import os

import torch

from ..core import DTYPES, DiffusionModel
from ..families import family_by_name
from .archs import TOY_TOKENIZER

# pipeline class -> (family name, text encoder components in order, tokenizer components, extras defaults)
PIPELINES = {
    "StableDiffusion3Pipeline": ("sd3", ("text_encoder", "text_encoder_2", "text_encoder_3"),
                                 ("tokenizer", "tokenizer_2", "tokenizer_3"), {"max_sequence_length": 256}),
    "FluxPipeline": ("flux", ("text_encoder", "text_encoder_2"), ("tokenizer", "tokenizer_2"),
                     {"max_sequence_length": 512}),
    "Flux2Pipeline": ("flux2", ("text_encoder",), ("tokenizer",),
                      {"max_sequence_length": 512, "text_encoder_out_layers": (10, 20, 30)}),
}
FLOW_KINDS = {family for family, *_ in PIPELINES.values()}
_TEXT_CONFIGS = {"CLIPTextModel": "CLIPTextConfig", "CLIPTextModelWithProjection": "CLIPTextConfig",
                 "T5EncoderModel": "T5Config", "Mistral3ForConditionalGeneration": "Mistral3Config"}
# a chat template for the toy tokenizer of named FLUX.2 architectures (Flux2Pipeline encodes through one)
_TOY_CHAT_TEMPLATE = ("{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}"
                      "{% endif %}{% endfor %}{% endfor %}")
_DROP = ("architectures", "torch_dtype", "dtype", "transformers_version")


def _read_config(folder: str, component: str) -> dict:
    for name in ("config.json", "scheduler_config.json"):
        path = os.path.join(folder, component, name)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                return {k: v for k, v in json.load(f).items() if not k.startswith("_")}
    raise ValueError(f"model folder {folder!r}: {component}/config.json is missing (estimate-memory builds "
                     "each component from its config.json)")


def folder_spec(folder: str, index: dict) -> dict:
    """The spec of a StableDiffusion3Pipeline / FluxPipeline folder: its model_index.json and config.json files."""
    cls = str(index.get("_class_name", ""))
    if cls not in PIPELINES:
        raise ValueError(f"model folder {folder!r}: estimate-memory does not know pipeline {cls!r} yet "
                         f"(flow families: {', '.join(PIPELINES)})")
    _, encoders, tokenizers, _ = PIPELINES[cls]
    components = {}
    for name in ("transformer", "vae", "scheduler", *encoders):
        entry = index.get(name)
        if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1]):
            if name == "text_encoder_3":  # SD3 without T5 (saved with text_encoder_3=None)
                continue
            raise ValueError(f"model folder {folder!r}: model_index.json names no {name!r} component")
        components[name] = [entry[1], _read_config(folder, name)]
    toks = {t: os.path.join(folder, t) for t, e in zip(tokenizers, encoders) if e in components}
    return {"name": os.path.basename(os.path.normpath(folder)), "pipeline": cls, "components": components,
            "tokenizers": toks}


def _build_text_encoder(cls_name: str, cfg: dict):
    import transformers

    if cls_name not in _TEXT_CONFIGS:
        raise ValueError(f"text encoder class {cls_name!r}: expected one of {', '.join(_TEXT_CONFIGS)}")
    config = getattr(transformers, _TEXT_CONFIGS[cls_name])(**{k: v for k, v in cfg.items() if k not in _DROP})
    return getattr(transformers, cls_name)(config)


def _tokenizer(spec: dict, component: str, encoder_cls: str, encoder_cfg: dict):
    """The folder's tokenizer; for a named architecture the toy CLIP BPE tokenizer padded to the pipeline's
    length (only the token count matters for memory)."""
    from transformers import AutoTokenizer, CLIPTokenizer, T5TokenizerFast

    chat = encoder_cls == "Mistral3ForConditionalGeneration"   # FLUX.2: tokenized through a chat template
    folder = (spec.get("tokenizers") or {}).get(component)
    if folder and os.path.isdir(folder):
        if chat:   # the fast tokenizer of the folder (FLUX.2-dev's PixtralProcessor holds one)
            tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            if tok.chat_template is None:   # only the padded token count matters for memory
                tok.chat_template = _TOY_CHAT_TEMPLATE
            return tok
        cls = T5TokenizerFast if encoder_cls == "T5EncoderModel" else CLIPTokenizer
        return cls.from_pretrained(folder, local_files_only=True)
    length = 512 if chat else encoder_cfg.get("max_position_embeddings", 512)
    tok = CLIPTokenizer.from_pretrained(TOY_TOKENIZER, model_max_length=length, local_files_only=True)
    if chat:
        tok.chat_template = _TOY_CHAT_TEMPLATE
    return tok


def _cast_floating(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Parameters and buffers to ``dtype`` as ``from_pretrained(torch_dtype=...)`` leaves them (persistent
    buffers such as SD3's positional embedding included), without Module.to (fake tensors cannot be swapped)."""
    done = {}  # id -> the cast tensor: tied parameters (T5's shared / embed_tokens) stay one tensor
    with torch.no_grad():
        for sub in module.modules():
            for store in (sub._parameters, sub._buffers):
                for name, t in store.items():
                    if t is None or not t.is_floating_point() or t.dtype == dtype:
                        continue
                    if id(t) not in done:
                        cast = t.to(dtype)
                        done[id(t)] = torch.nn.Parameter(cast, requires_grad=False) \
                            if isinstance(t, torch.nn.Parameter) else cast
                    store[name] = done[id(t)]


def build(spec: dict, weight_dtype: str, fp16_autocast: bool = False):
    """A frozen DiffusionModel of the spec's flow family (random or fake weights), wrapped as its load() does."""
    import diffusers

    family_name, encoder_names, tokenizer_names, extras = PIPELINES[spec["pipeline"]]
    family = family_by_name(family_name)
    dtype = DTYPES[weight_dtype]
    comps = spec["components"]
    missing = [comps[c][0] for c in ("transformer", "vae") if not hasattr(diffusers, comps[c][0])]
    if missing:   # e.g. FLUX.2 on a diffusers older than its Flux2Pipeline
        raise ValueError(f"{spec['name']}: the installed diffusers {diffusers.__version__} has no "
                         f"{', '.join(missing)}; upgrade diffusers to estimate this model")
    transformer = getattr(diffusers, comps["transformer"][0]).from_config(comps["transformer"][1])
    vae = getattr(diffusers, comps["vae"][0]).from_config(comps["vae"][1])
    encoders, tokenizers = [], []
    for enc_name, tok_name in zip(encoder_names, tokenizer_names):
        if enc_name not in comps:
            continue
        cls_name, cfg = comps[enc_name]
        enc = _build_text_encoder(cls_name, cfg)
        _cast_floating(enc, dtype)
        if dtype == torch.float16:  # transformers keeps these in float32 when loading in float16 (T5's "wo")
            keep = getattr(enc, "_keep_in_fp32_modules", None) or []
            for name, sub in enc.named_modules():
                if name.split(".")[-1] in keep:
                    _cast_floating(sub, torch.float32)
        encoders.append(enc)
        tokenizers.append(_tokenizer(spec, tok_name, cls_name, cfg))
    _cast_floating(transformer, dtype)
    for module in [transformer, vae, *encoders]:
        module.requires_grad_(False).eval()
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():  # the scheduler's sigmas are real (its __init__ reads them with .item())
        scheduler = getattr(diffusers, comps["scheduler"][0]).from_config(comps["scheduler"][1])
    extras = {**extras, **spec.get("extras", {})}
    if family_name == "sd3":  # as SD3Family.load / FluxFamily.load set them
        extras["t5"] = "text_encoder_3" in comps
    else:
        extras["guidance_embeds"] = bool(transformer.config.get("guidance_embeds", False))
    model = DiffusionModel(path=f"<{spec['name']}>", family=family, denoiser=transformer, vae=vae,
                           scheduler=scheduler, text_encoders=encoders, tokenizers=tokenizers,
                           force_zeros_for_empty_prompt=False, settings=extras)
    # the VAE in the dtype set_vae_precision gives it (float32 when float16 is in play and force_upcast is set)
    fp16 = dtype == torch.float16 or fp16_autocast
    model.vae_upcast = bool(fp16 and vae.config.get("force_upcast", False))
    _cast_floating(vae, torch.float32 if model.vae_upcast else dtype)
    return model


def native_size(spec: dict) -> int:
    """The family's default image side (SD3: transformer sample_size x VAE factor; FLUX: 1024)."""
    comps = spec["components"]
    sample = comps["transformer"][1].get("sample_size")
    factor = 2 ** (len(comps["vae"][1].get("block_out_channels", [0] * 4)) - 1)
    return int(sample) * factor if isinstance(sample, int) else 1024
