"""The components of a pipeline made from config.json values alone, for ``fnf estimate-memory``.

A spec lists the components as model_index.json does, ``{"components": {name: [class, config]}}`` (the config.json
values of a folder, or of a named architecture in :mod:`fnf.memory.archs`); :class:`ConfigComponents` is the
source the family's own ``build`` reads them from (random, under FakeTensorMode fake, weights in the training
dtype), so the estimator's model is the loader's, and the trainer runs its own code on it.
"""
from __future__ import annotations

import importlib
import json
import os

import torch

from ..families.base import Components, tokenizer_class
from .archs import TOY_TOKENIZER

# a chat template for the toy tokenizer of named architectures whose pipeline encodes through one (FLUX.2)
_TOY_CHAT_TEMPLATE = ("{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}"
                      "{% endif %}{% endfor %}{% endfor %}")
_DROP = ("architectures", "torch_dtype", "dtype", "transformers_version")
# model_index.json's pipeline flags a family's build reads from ``src.index`` (SDXL; FLUX.2 [klein]'s step distillation)
PIPELINE_FLAGS = ("force_zeros_for_empty_prompt", "is_distilled")


def _read_config(folder: str, component: str) -> dict | None:
    for name in ("config.json", "scheduler_config.json"):
        path = os.path.join(folder, component, name)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                return {k: v for k, v in json.load(f).items() if not k.startswith("_")}
    return None


def folder_components(folder: str, index: dict, required: tuple[str, ...]) -> dict:
    """The spec of a diffusers folder: the ``required`` components (the family's) and every other model /
    scheduler component model_index.json names, with their config.json values, and the tokenizer folders."""
    def entry_class(name):
        entry = index.get(name)
        ok = isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1]
        return entry[1] if ok else None

    components, tokenizers = {}, {}
    names = list(required) + [n for n in index if not n.startswith("_") and n not in required]
    for name in names:
        if name.startswith("tokenizer"):
            tokenizers[name] = os.path.join(folder, name)
            continue
        if name not in required and entry_class(name) is None:
            continue
        cfg = _read_config(folder, name)
        if cfg is None:
            if name in required:
                raise ValueError(f"model folder {folder!r}: {name}/config.json is missing (estimate-memory builds "
                                 "each component from its config.json)")
            continue
        components[name] = [entry_class(name), cfg]
    flags = {k: v for k, v in index.items() if k in PIPELINE_FLAGS}
    return {"name": os.path.basename(os.path.normpath(folder)), "components": components, "tokenizers": tokenizers,
            **flags}


def native_size(spec: dict, family) -> int:
    """The family's default image side: the denoiser's sample_size x the VAE factor, else the family's."""
    comps = spec["components"]
    sample = comps[family.denoiser_component][1].get("sample_size")
    factor = 2 ** (len(comps["vae"][1].get("block_out_channels", [0] * 4)) - 1)
    return int(sample) * factor if isinstance(sample, int) else int(family.native_size)


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


class ConfigComponents(Components):
    """Components from a spec's config values (see the module docstring); the tokenizer is the folder's, or for a
    named architecture a toy CLIP BPE tokenizer padded to the encoder's length (only the token count matters)."""

    def __init__(self, spec: dict):
        self.spec = spec
        self.path = f"<{spec['name']}>"
        self.index = {name: ["config", cls or "?"] for name, (cls, _) in spec["components"].items()}
        for flag in PIPELINE_FLAGS:
            if flag in spec:
                self.index[flag] = spec[flag]

    def _config(self, name: str) -> dict:
        if name not in self.spec["components"]:
            raise ValueError(f"{self.spec['name']}: the spec has no {name!r} component")
        return self.spec["components"][name][1]

    def _make(self, name: str, cls):
        cfg = self._config(name)
        named = self.spec["components"][name][0]
        if named and named != cls.__name__:
            library = cls.__module__.split(".")[0]
            lib = importlib.import_module(library)
            if not hasattr(lib, named):   # e.g. FLUX.2 on a diffusers older than its Flux2Pipeline
                raise ValueError(f"{self.spec['name']}: the installed {library} {lib.__version__} has no {named}; "
                                 f"upgrade {library} to estimate this model")
            raise ValueError(f"{self.spec['name']}: component {name!r} is a {named}; the "
                             f"{self.spec['kind']} family builds a {cls.__name__}")
        if hasattr(cls, "config_class") and not hasattr(cls, "from_config"):   # a transformers model
            return cls(cls.config_class(**{k: v for k, v in cfg.items() if k not in _DROP}))
        return cls.from_config(cfg)

    def denoiser(self, name: str, cls, *, dtype: torch.dtype, quantize: str = "none"):
        """Unquantized: the estimator adjusts for ``model.quantize`` itself (fnf/memory/quantized.py)."""
        return self.module(name, cls, dtype=dtype)

    def module(self, name: str, cls, *, dtype: torch.dtype):
        module = self._make(name, cls)
        _cast_floating(module, dtype)
        if dtype == torch.float16:  # transformers keeps these in float32 when loading in float16 (T5's "wo")
            keep = getattr(module, "_keep_in_fp32_modules", None) or []
            for sub_name, sub in module.named_modules():
                if sub_name.split(".")[-1] in keep:
                    _cast_floating(sub, torch.float32)
        return module

    def scheduler(self, name: str, cls):
        """Built in the caller's mode (fake under the estimator); a scheduler whose ``__init__`` reads tensor values
        (the flow schedulers' sigmas, ``.item()``) with real tensors."""
        from torch._subclasses.fake_tensor import DataDependentOutputException, unset_fake_temporarily

        try:
            return cls.from_config(self._config(name))
        except DataDependentOutputException:
            with unset_fake_temporarily():
                return cls.from_config(self._config(name))

    def tokenizer(self, name: str, cls, *, encoder=None, chat: bool = False):
        from transformers import AutoTokenizer, CLIPTokenizer

        folder = (self.spec.get("tokenizers") or {}).get(name)
        if folder and os.path.isdir(folder):
            if chat:   # the folder's fast tokenizer (FLUX.2-dev's PixtralProcessor holds one)
                tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
                if tok.chat_template is None:   # only the padded token count matters for memory
                    tok.chat_template = _TOY_CHAT_TEMPLATE
                return tok
            return cls.from_pretrained(folder, local_files_only=True)
        length = 512 if chat else getattr(getattr(encoder, "config", None), "max_position_embeddings", 512)
        tok = tokenizer_class(CLIPTokenizer, TOY_TOKENIZER).from_pretrained(TOY_TOKENIZER, model_max_length=length,
                                                                        local_files_only=True)
        if chat:
            tok.chat_template = _TOY_CHAT_TEMPLATE
        return tok
