"""What the no-grad commands (sample, localize, eval) share: load a model for inference, seeded sampling, LoRA-folder
checks (is it a LoRA folder, does it belong to this model), output folders that never lose an earlier run."""
from __future__ import annotations

import json
import os
import re
import struct
import time

import torch

from . import precision
from .core import LORA_WEIGHTS, resolve_device
from .encoding import encode_negative, encode_prompts
from .families import registry
from .lora import check_lora_folder
from .sampling import initial_latents, sample_images
from .train.run_dir import move_aside

MANIFEST = "manifest.json"


def weight_dtype(cfg, device) -> str:
    """model.weight_dtype with 'auto' resolved for ``device`` (fnf/precision.py)."""
    return precision.resolve_values(cfg.model.weight_dtype, cfg.memory.mixed_precision,
                                    precision.device_capability(device))[0]


def load_for_inference(cfg):
    """(model, device, height, width) of ``cfg``: the model on train.device, the size sampling.height/width or
    the model's native one."""
    device = resolve_device(cfg.train.device)
    model = registry.load_model(cfg.model.path, kind=cfg.model.kind, weight_dtype=weight_dtype(cfg, device),
                                device=device, **registry.model_options(cfg))
    h = cfg.sampling.height or model.native_size
    w = cfg.sampling.width or model.native_size
    return model, device, h, w


def sample_seeded(model, cfg, prompts: list[str], seeds: list[int], h: int, w: int, device) -> torch.Tensor:
    """Images of ``prompts[i]`` from the noise of ``seeds[i]``: the same x_T for a seed in every command, with or
    without a LoRA. The sampler's own noise (eta > 0) is seeded with ``seeds[0]``."""
    cond = encode_prompts(model, prompts, height=h, width=w)
    uncond = encode_negative(model, cfg.sampling.negative_prompt, len(prompts), height=h, width=w)
    x_T = torch.cat([initial_latents(model, 1, h, w, torch.Generator().manual_seed(s), device) for s in seeds])
    return sample_images(model, x_T, cond, uncond, steps=cfg.sampling.steps,
                         guidance_scale=cfg.sampling.guidance_scale, eta=cfg.sampling.eta, seed=seeds[0],
                         height=h, width=w)


def sampling_settings(cfg, model, device, h: int, w: int) -> dict:
    """The settings that make an image, as a manifest records them."""
    s = cfg.sampling
    return {"model": cfg.model.path, "family": model.family.name, "steps": s.steps,
            "guidance_scale": s.guidance_scale, "eta": s.eta, "negative_prompt": s.negative_prompt,
            "height": h, "width": w, "weight_dtype": weight_dtype(cfg, device), "device": str(device)}


# ------------------------------------------------------------------------------------------ output folders
def check_out(out: str, outputs, overwrite: bool, what: str, flag: str = "--out") -> None:
    """Refuse an ``out`` that is a file, or that holds ``outputs`` of an earlier ``what`` without ``overwrite``
    (FileExistsError, one line; an empty folder of that name is no earlier run). Read-only: call it before any
    model loads."""
    check_out_path(out, flag)

    def used(path):
        return os.path.lexists(path) and not (os.path.isdir(path) and not os.listdir(path))

    found = [n for n in outputs if used(os.path.join(out, n))]
    if found and not overwrite:
        raise FileExistsError(f"{flag} {out} holds an earlier {what} ({', '.join(found)}); pass --overwrite to "
                              f"move it to {out}/previous-<time>/, or choose another {flag}")


def check_out_path(out: str, flag: str = "--out") -> None:
    """FileExistsError when ``out`` (or a folder above it) is a file: it cannot be an output folder."""
    path = os.path.abspath(out)
    while path and not os.path.lexists(path):
        parent = os.path.dirname(path)
        if parent == path:
            return
        path = parent
    if not os.path.isdir(path):
        where = "" if path == os.path.abspath(out) else f" ({path} is a file)"
        raise FileExistsError(f"{flag} {out!r}: expected a folder, found a file{where}")


def claim_out(out: str, outputs, command: str) -> str | None:
    """Make ``out`` and move what ``outputs`` an earlier run left there into ``out/previous-<UTC time>/``
    (:func:`fnf.train.run_dir.move_aside`; nothing is deleted); returns where they went, after saying so."""
    os.makedirs(out, exist_ok=True)
    moved = move_aside(out, outputs)
    if moved:
        print(f"fnf {command}: --overwrite: moved the earlier files of {out} to {moved}", flush=True)
    return moved


def write_manifest(folder: str, manifest: dict) -> str:
    """``folder/manifest.json`` (which prompt, seed and settings made each file), written before the pictures."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, MANIFEST)
    manifest = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **manifest}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
    return path


def file_stem(prompt_index: int, seed: int) -> str:
    """The name every picture of (prompt ``prompt_index``, noise seed ``seed``) starts with."""
    return f"p{prompt_index:03d}_s{seed}"


# ------------------------------------------------------------------------------------------ LoRA folders
def lora_name(folder: str) -> str:
    """A LoRA's short name, safe in a file name: runs/fix/lora -> 'fix', runs/x/my_lora -> 'my_lora'."""
    parts = os.path.normpath(os.path.abspath(folder)).split(os.sep)
    name = parts[-2] if parts[-1] == "lora" and len(parts) > 1 else parts[-1]
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", name) or "lora"


def check_lora_arg(folder: str, flag: str = "--lora") -> None:
    """FileNotFoundError naming ``flag`` when ``folder`` is not a LoRA folder `fnf train` wrote."""
    try:
        check_lora_folder(folder)
    except FileNotFoundError:
        raise FileNotFoundError(f"{flag} {folder!r}: expected a LoRA folder written by `fnf train` "
                                f"(<out>/lora with {LORA_WEIGHTS})") from None


class LoraMismatch(ValueError):
    """A LoRA folder that does not belong to the model (another family, size or rank layout)."""


# The pipeline components a diffusers-format LoRA file names its keys after.
_COMPONENTS = {"unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "prior"}
_SUFFIX = re.compile(r"\.(lora\.down|lora\.up|lora_A|lora_B)(\.[A-Za-z0-9_]+)?\.weight$")


def lora_header(folder: str) -> tuple[dict, dict]:
    """({tensor key: shape}, metadata) of the folder's safetensors file, read from its header only."""
    path = os.path.join(folder, LORA_WEIGHTS)
    try:
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            if n > 100_000_000:
                raise ValueError("header too large")
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    meta = header.pop("__metadata__", None) or {}
    return {k: tuple(v.get("shape", ())) for k, v in header.items() if isinstance(v, dict)}, meta


def _adapter_config(meta: dict, prefix: str) -> dict:
    """The peft config diffusers stored beside the weights ({} when there is none)."""
    try:
        raw = json.loads(meta.get("lora_adapter_metadata", "{}"))
    except ValueError:
        return {}
    return {k[len(prefix) + 1:]: v for k, v in raw.items() if k.startswith(prefix + ".")}


def describe_lora(shapes: dict) -> str:
    """What the LoRA's keys say it is for, in words: the family and the width of its attention."""
    keys = list(shapes)
    width = next((shapes[k][1] for k in keys if re.search(r"\.(to_q|to_k)\.(lora\.down|lora_A)", k)
                  and len(shapes[k]) >= 2), None)
    size = f", attention width {width}" if width else ""
    if any(k.startswith("unet.") for k in keys):
        sdxl = not any(".down_blocks.0.attentions." in k for k in keys) and any("down_blocks." in k for k in keys)
        cross = next((shapes[k][1] for k in keys if ".attn2.to_k.lora" in k and "down" in k.rsplit(".", 2)[-2]),
                     None)
        which = "SDXL" if sdxl else "Stable Diffusion 1.x/2.x"
        return f"a {which} UNet{size}" + (f", cross-attention dim {cross}" if cross else "")
    if any(k.startswith("transformer.") for k in keys):
        if any("to_qkv_mlp_proj" in k for k in keys):
            which = "FLUX.2"
        elif any(".single_transformer_blocks." in k for k in keys):
            which = "FLUX.1"
        elif any(k.startswith("transformer.transformer_blocks.") for k in keys):
            which = "SD3/FLUX"
        else:
            which = "a diffusion transformer"
        return f"a {which} transformer{size}"
    if any(k.startswith(("lora_unet_", "lora_te")) for k in keys):
        return "a kohya-format UNet LoRA"
    if any(k.startswith(("text_encoder", "lora_te")) for k in keys):
        return "text encoders only"
    return f"an unknown model (keys like {keys[0]!r})" if keys else "nothing (no tensors)"


def describe_model(family, path: str, denoiser=None) -> str:
    """The model in the same words as :func:`describe_lora`."""
    width = None
    if denoiser is not None:
        for name, module in denoiser.named_modules():
            if name.endswith((".to_q", ".to_k")) and hasattr(module, "in_features"):
                width = module.in_features
                break
    return f"{family.title} ({family.denoiser_component}{f', attention width {width}' if width else ''}) {path!r}"


def _rank_for(module: str, config: dict) -> int | None:
    for pattern, rank in (config.get("rank_pattern") or {}).items():
        if module == pattern or module.endswith("." + pattern) or re.fullmatch(pattern, module):
            return int(rank)
    return int(config["r"]) if "r" in config else None


def check_lora_fits(folder: str, family, model_path: str, denoiser=None, flag: str = "--lora") -> None:
    """LoraMismatch (one line naming what the LoRA is for and what the model is) when the LoRA in ``folder`` does
    not belong to the model: another family (its keys name another denoiser), and, given the loaded
    ``denoiser``, another size (a module it lacks, or other in/out features) or another rank layout (shapes
    that disagree with the rank the LoRA's metadata declares). Reads only the safetensors header."""
    shapes, meta = lora_header(folder)
    prefix = family.denoiser_component
    ours = {k[len(prefix) + 1:]: s for k, s in shapes.items() if k.startswith(prefix + ".")}

    def fail(detail: str):
        raise LoraMismatch(f"{flag} {folder!r} does not belong to --model: the LoRA is for {describe_lora(shapes)}, "
                           f"the model is {describe_model(family, model_path, denoiser)}; {detail}")

    if not ours:
        other = sorted({k.split(".", 1)[0] for k in shapes} & _COMPONENTS)
        if other or not shapes:
            fail(f"it holds no {prefix} LoRA weights (its keys start with "
                 f"{', '.join(repr(o + '.') for o in other) or 'nothing'})")
        return   # another key format (kohya, ...): the family's loader converts it or says why not
    if denoiser is None:
        return
    modules = dict(denoiser.named_modules())
    config = _adapter_config(meta, prefix)
    ranks = {}
    for key, shape in ours.items():
        m = _SUFFIX.search("." + key)
        if m is None:
            continue
        name = ("." + key)[1:m.start()] if m.start() > 0 else ""
        module = modules.get(name)
        base = getattr(module, "base_layer", module)
        if module is None:
            fail(f"the model has no module {name!r}")
        down = m.group(1) in ("lora.down", "lora_A")
        if isinstance(base, torch.nn.Linear):
            want = base.in_features if down else base.out_features
        elif isinstance(base, torch.nn.Conv2d):
            want = base.in_channels if down else base.out_channels
        else:
            continue
        got = shape[1] if down else shape[0]
        if len(shape) < 2 or got != want:
            fail(f"{name}: the LoRA's {'input' if down else 'output'} size is {got}, the model's is {want} "
                 f"(a model of another size)")
        ranks.setdefault(name, set()).add(shape[0] if down else shape[1])
    for name, rs in ranks.items():
        expected = _rank_for(name, config)
        if len(rs) > 1 or (expected is not None and rs != {expected}):
            fail(f"{name}: rank {'/'.join(map(str, sorted(rs)))} in the weights, rank {expected} in the LoRA's "
                 f"metadata (another rank layout)")


def check_lora_for_folder(folder: str, model_path: str, kind: str = "auto", flag: str = "--lora") -> None:
    """:func:`check_lora_fits` against the family of the model folder, before the model loads."""
    index = registry.read_index(model_path)
    family = registry.family_by_name(kind) if kind != "auto" else registry.family_of(model_path, index)
    check_lora_fits(folder, family, model_path, flag=flag)
