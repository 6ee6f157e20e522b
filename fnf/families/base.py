"""The model-family seam: what differs between SD 1.x/2.x, SDXL, SD3/3.5, FLUX.1 and FLUX.2.

A family builds a :class:`fnf.core.DiffusionModel` from its components (``build``: from a local diffusers folder
for ``load``, from config.json values alone for the memory estimator) and knows, for that model, how to encode
prompts, draw x_T, build the sampling schedule, run one guided denoiser call, take one sampler step, re-noise for
DRaFT-LV, decode latents, which blocks are its FSDP units, and how to save/load LoRA in the format its diffusers
pipeline's ``load_lora_weights`` reads. The samplers (``fnf.sampling``), the trainer, FSDP and the estimator are
written once over this interface; nothing outside ``fnf/families/`` branches on the family.

Conventions every family follows (the contract the tests check):

* ``model.denoiser`` holds the denoiser (a UNet or a transformer), ``model.family`` the family instance and
  ``model.settings`` its load-time settings (read-only); LoRA lives on the denoiser (peft, adapter
  ``fnf.core.ADAPTER``), the frozen model is the same denoiser with adapters disabled.
* The schedule is a value: ``schedule = family.schedule(model, steps, h, w, device)`` (a :class:`Schedule`;
  ``model.scheduler`` is never configured per call, it holds only the folder's fixed config). Step ``i`` goes
  from noise level i to i + 1 with ``out = family.predict(model, denoiser, x, schedule.timesteps[i], cond,
  uncond, g, schedule)`` and ``x = family.step(model, schedule, i, out, x, eta=, generator=)``. ``step`` is a pure
  function of its arguments, so a trajectory can be split into a no-grad part and a grad part, or continued
  from any ``i``.
* ``predict`` returns the guided model output in float32 (float64 for a float64 denoiser); it applies CFG when
  ``family.uses_cfg(model, uncond, g)`` (with the batch order ``[uncond rows, cond rows]``), or a guidance
  embedding (guidance-distilled FLUX: no batch doubling).
* x_T is drawn on the CPU from the caller's generator in float32, with the shape and scaling the family's
  diffusers pipeline uses when given a CPU generator, so a sample equals the pipeline's image for the same seed.
* ``decode`` returns float32 images in [0, 1], (B, 3, H, W), with gradient whenever grad is enabled.
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import quantize as quant
from ..core import LORA_WEIGHTS, ModelLoadError, PromptEmbeds, resolve_dtype
from ..lora import check_lora_folder, dropout_off, export_state
from . import flow

__all__ = ["Components", "FlowMatchingEuler", "FolderComponents", "ModelFamily", "PackedLatents", "Schedule",
           "TransformerLoRA", "cfg_combine", "cfg_inputs", "check_lora_folder", "decode_vae", "freeze",
           "gaussian_log_prob", "load_component", "resolve_dtype", "sde_transition", "set_vae_precision",
           "unscale_latents"]


@dataclass(frozen=True, eq=False)
class Schedule:
    """One sampling schedule (a value; :meth:`ModelFamily.schedule` builds it): the T ``timesteps`` the denoiser
    sees (on the sampling device), the T + 1 noise levels ``sigmas`` of the flow families (the last is 0; None for
    DDIM) and the image size the latents decode to."""

    timesteps: torch.Tensor
    height: int
    width: int
    sigmas: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.timesteps)

    @property
    def steps(self) -> int:
        return len(self.timesteps)


class ModelFamily:
    """Base class: one instance per family, registered in :data:`fnf.families.FAMILIES` by name."""

    name: str = ""
    pipeline_classes: tuple[str, ...] = ()   # model_index.json "_class_name" values this family loads
    components: tuple[str, ...] = ()         # subfolders a folder must hold (preflight checks them)
    lora_targets: tuple[str, ...] = ()       # default LoRA target module names on the denoiser
    supports_sepen: bool = False             # Separate-and-Enhance needs separate cross-attention keys
    native_size: int = 512                   # default image side when the config gives none
    title: str = ""                          # the name errors and messages use (default: ``name``)
    # the FSDP units of the denoiser (class names; fnf.fsdp shards each instance); () falls back to the
    # denoiser's ``_no_split_modules``
    fsdp_units: tuple[str, ...] = ()
    denoiser_component: str = "transformer"  # the denoiser's subfolder / model_index.json entry
    fused_lora: bool = False                 # fnf_kernels' fused-LoRA path can patch the denoiser's attention

    # -------------------------------------------------------------------------------- loading
    def load(self, path: str, index: dict, *, weight_dtype: torch.dtype, device="cpu", **options):
        """All components from the local folder (``local_files_only``), frozen, eval, on ``device``:
        :meth:`build` from :class:`FolderComponents`."""
        raise NotImplementedError

    def build(self, src: "Components", *, weight_dtype: torch.dtype, device="cpu", fp16_autocast: bool = False,
              **options):
        """The DiffusionModel of ``src``'s components, wrapped as this family uses them (frozen, eval, on ``device``
        (None: where they are), load-time ``settings``, the VAE's precision); ``load`` and the memory estimator
        both call it. ``options``: the family's load options (:data:`fnf.families.registry.LOAD_OPTIONS`)."""
        raise NotImplementedError

    def pipeline_class(self):
        """The diffusers pipeline class (its ``save_lora_weights`` / ``lora_state_dict`` / loaders)."""
        raise NotImplementedError

    # -------------------------------------------------------------------------------- conditioning
    def encode(self, model, prompts: list[str], *, height: int, width: int, zero: bool = False):
        """Text conditioning (:class:`fnf.models.PromptEmbeds`) as the pipeline computes it; ``zero``: the
        all-zero negative conditioning of pipelines that use it for an empty negative prompt."""
        raise NotImplementedError

    def uses_cfg(self, model, uncond, guidance_scale: float) -> bool:
        """Whether :meth:`predict` doubles the batch for classifier-free guidance."""
        return uncond is not None and guidance_scale > 1.0

    # -------------------------------------------------------------------------------- sampling
    def initial_latents(self, model, batch: int, height: int, width: int, generator: torch.Generator,
                        device) -> torch.Tensor:
        raise NotImplementedError

    def image_size(self, model, latents: torch.Tensor) -> tuple[int, int]:
        """(height, width) of the images ``latents`` decode to, for callers that pass only latents to the
        samplers. Default: unpacked (B, C, h, w) latents times ``model.vae_scale_factor``; families with
        packed latents override it (or their callers pass height/width)."""
        f = model.vae_scale_factor
        return int(latents.shape[-2]) * f, int(latents.shape[-1]) * f

    def schedule(self, model, steps: int, height: int, width: int, device) -> Schedule:
        """The :class:`Schedule` of ``steps`` steps at this image size (``model.scheduler`` is left as it is)."""
        raise NotImplementedError

    def predict(self, model, denoiser, x: torch.Tensor, t, cond, uncond, guidance_scale: float,
                schedule: Schedule | None = None):
        """One denoiser call at timestep ``t`` (one, or one per row) and the guided output; ``schedule`` gives the
        image size of packed latents (families with unpacked latents ignore it)."""
        raise NotImplementedError

    def step(self, model, schedule: Schedule, i: int, out: torch.Tensor, x: torch.Tensor, *, eta: float = 0.0,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """x at noise level i -> x at level i + 1, given the guided output (pure)."""
        raise NotImplementedError

    def renoise(self, model, schedule: Schedule, i: int, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """DRaFT-LV: clean latents x0 put back at step i's noise level with ``noise``."""
        raise NotImplementedError

    sde_noise_level: float = 1.0   # the default noise level of sde_step (grpo.noise_level 0)

    def sde_step(self, model, schedule: Schedule, i: int, out: torch.Tensor, x: torch.Tensor, *, noise_level: float,
                 generator: torch.Generator | None = None, noise: torch.Tensor | None = None,
                 prev: torch.Tensor | None = None):
        """Step i of the family's stochastic sampler as a Gaussian N(mean, std^2) (policy-gradient objectives):
        returns ``(x_next, log_prob, mean, std)``, ``x_next = prev`` when given, else ``mean + std * noise``
        (noise given, or drawn from ``generator``); ``log_prob`` (B,) as :func:`gaussian_log_prob`. Pure."""
        raise NotImplementedError

    def decode(self, model, latents: torch.Tensor, schedule: Schedule | None = None) -> torch.Tensor:
        """Float32 images in [0, 1]; ``schedule`` gives the image size of packed latents."""
        raise NotImplementedError

    def latent_region(self, model, mask: torch.Tensor, latents: torch.Tensor,
                      schedule: Schedule | None = None) -> torch.Tensor:
        """An image-space mask (B, H, W) or (B, 1, H, W) on the latent grid of ``latents`` (B, C, h, w): 1.0 where
        any pixel of the latent cell is in the mask, shaped to broadcast against ``latents`` (B, 1, h, w)."""
        mask = _plane_mask(mask)
        if latents.dim() != 4 or mask.dim() != 3 or mask.shape[0] != latents.shape[0]:
            raise ValueError(f"latent_region: expected mask (B, H, W) and latents (B, C, h, w), got "
                             f"{tuple(mask.shape)} and {tuple(latents.shape)}")
        return F.adaptive_max_pool2d(mask.float()[:, None], latents.shape[-2:]).to(latents.dtype)

    # -------------------------------------------------------------------------------- LoRA
    def save_lora(self, model, directory: str) -> None:
        """The trained adapter in the format ``pipeline.load_lora_weights(directory)`` reads."""
        raise NotImplementedError

    def load_lora(self, model, directory: str, adapter_name: str) -> None:
        """A LoRA folder written by :meth:`save_lora` (or by diffusers) into ``model.denoiser``."""
        raise NotImplementedError


class Components:
    """Where :meth:`ModelFamily.build` gets a pipeline's components: :class:`FolderComponents` reads a folder's
    weights (the family's ``load``); the memory estimator's ``ConfigComponents`` makes them from config.json values
    alone. ``index``: model_index.json's ``{component: [library, class]}`` (and its flags)."""

    path: str = ""
    index: dict = {}

    def has(self, name: str) -> bool:
        """Whether the pipeline lists component ``name`` (optional components: SD3's T5)."""
        entry = self.index.get(name)
        return isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[0] is not None and entry[1] is not None

    def denoiser(self, name: str, cls, *, dtype: torch.dtype, quantize: str = "none"):
        raise NotImplementedError

    def module(self, name: str, cls, *, dtype: torch.dtype):
        """A diffusers or transformers model in ``dtype`` (transformers' fp32-kept modules stay float32)."""
        raise NotImplementedError

    def scheduler(self, name: str, cls):
        raise NotImplementedError

    def tokenizer(self, name: str, cls, *, encoder=None, chat: bool = False):
        """The tokenizer (``chat``: one that encodes through a chat template) of text encoder ``encoder``."""
        raise NotImplementedError


class FolderComponents(Components):
    """The components of a local diffusers folder (``local_files_only``); a missing subfolder or a failing loader
    is a ModelLoadError naming the component and what a ``pipeline`` folder needs (``notes``: per component)."""

    def __init__(self, path: str, index: dict, pipeline: str, needs: str, notes: dict | None = None):
        self.path, self.index, self.pipeline, self.needs, self.notes = path, index, pipeline, needs, notes or {}

    def _load(self, name: str, loader):
        return load_component(name, self.path, loader, self.pipeline, self.needs, self.notes.get(name, ""))

    def denoiser(self, name: str, cls, *, dtype: torch.dtype, quantize: str = "none"):
        return self._load(name, lambda f: quant.load_denoiser(cls, f, dtype=dtype, method=quantize,
                                                              local_files_only=True))

    def module(self, name: str, cls, *, dtype: torch.dtype):
        return self._load(name, lambda f: cls.from_pretrained(f, torch_dtype=dtype, local_files_only=True))

    def scheduler(self, name: str, cls):
        return self._load(name, lambda f: cls.from_config(cls.load_config(f, local_files_only=True)))

    def tokenizer(self, name: str, cls, *, encoder=None, chat: bool = False):
        return self._load(name, lambda f: tokenizer_class(cls, f).from_pretrained(f, local_files_only=True))


def tokenizer_class(cls, folder: str):
    """``cls``, or its fast twin for a folder that holds only ``tokenizer.json`` (the shipped toy model): transformers 5
    reads that file with any tokenizer class, transformers 4 only with the fast one (same token ids)."""
    if os.path.isfile(os.path.join(folder, "vocab.json")) or not os.path.isfile(os.path.join(folder, "tokenizer.json")):
        return cls
    import transformers

    return getattr(transformers, f"{cls.__name__}Fast", cls) if not cls.__name__.endswith("Fast") else cls


def freeze(modules, device) -> None:
    """Frozen (no grad), eval, on ``device`` (None: where they are)."""
    for module in modules:
        module.requires_grad_(False)
        module.eval()
        if device is not None:
            quant.move(module, device)


def load_component(component: str, path: str, loader, pipeline: str, needs: str, note: str = ""):
    """``loader(path/component)``; a missing subfolder or a failing loader is a ModelLoadError that names the
    component, the folder and what a ``pipeline`` folder needs (``note`` is added after the missing name)."""
    folder = os.path.join(path, component)
    if not os.path.isdir(folder):
        raise ModelLoadError(f"model folder {path!r} has no '{component}' subfolder{note}; a {pipeline} folder "
                             f"needs {needs}")
    try:
        return loader(folder)
    except Exception as e:
        raise ModelLoadError(f"could not load '{component}' from {folder!r}: {type(e).__name__}: {e}") from e


def cfg_inputs(family, model, x: torch.Tensor, cond, uncond, guidance_scale: float):
    """(cfg, conditioning, denoiser input): with classifier-free guidance the batch is ``[uncond rows of x, cond
    rows of x]``."""
    cfg = family.uses_cfg(model, uncond, guidance_scale)
    if not cfg:
        return False, cond, x
    return True, PromptEmbeds.cat(uncond, cond), torch.cat([x, x])


def cfg_combine(out: torch.Tensor, cfg: bool, guidance_scale: float) -> torch.Tensor:
    """The denoiser output in float32 (float64 stays float64), guided as the pipelines guide it when ``cfg``."""
    out = out.to(torch.promote_types(out.dtype, torch.float32))
    if cfg:
        out_uncond, out_cond = out.chunk(2)
        out = out_uncond + guidance_scale * (out_cond - out_uncond)
    return out


def unscale_latents(model, latents: torch.Tensor) -> torch.Tensor:
    """``latents / scaling_factor (+ shift_factor)`` in the VAE's latent space (float32 with ``model.vae_upcast``)."""
    vae = model.vae
    z = (latents.float() if model.vae_upcast else latents) / vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None)
    if shift:
        z = z + shift
    return z


def decode_vae(model, z: torch.Tensor) -> torch.Tensor:
    """VAE decode of VAE-space latents to float32 images in [0, 1]. With ``model.vae_upcast`` (force_upcast with
    fp16 in play) the float32 VAE runs with autocast off: an fp16 decode of SD/SDXL VAEs overflows to NaN images."""
    vae = model.vae
    with torch.autocast(z.device.type, enabled=False) if model.vae_upcast else contextlib.nullcontext():
        x = vae.decode(z.to(vae.dtype), return_dict=False)[0]
    return (x.to(torch.promote_types(x.dtype, torch.float32)) / 2 + 0.5).clamp(0, 1)


def gaussian_log_prob(value: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Per-sample log N(value; mean, std^2), averaged over the non-batch elements (as DDPO and Flow-GRPO average
    it: a per-element log-density, so policy ratios stay O(1) at any latent size); ``value`` is detached."""
    var = std ** 2
    lp = -((value.detach() - mean) ** 2) / (2 * var) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return lp.mean(dim=tuple(range(1, lp.dim())))


def sde_transition(mean: torch.Tensor, std: torch.Tensor, *, generator: torch.Generator | None = None,
                   noise: torch.Tensor | None = None, prev: torch.Tensor | None = None):
    """The Gaussian step N(mean, std^2) of a stochastic sampler: ``x_next`` is ``prev`` when given (the log-prob
    of a recorded step), else ``mean + std * noise`` (``noise``: given, or drawn on the CPU in float32 from
    ``generator``). Returns ``(x_next, log_prob, mean, std)``; ``log_prob`` (B,) is :func:`gaussian_log_prob`,
    zeros where ``std`` is 0 (a deterministic step has no policy)."""
    std = torch.as_tensor(std, dtype=mean.dtype, device=mean.device)
    if prev is None:
        if noise is None:
            noise = torch.randn(mean.shape, generator=generator, dtype=torch.float32)
        prev = mean + std * noise.to(device=mean.device, dtype=mean.dtype)
    stochastic = std > 0   # no data-dependent branch: the memory estimator traces this with fake tensors
    log_prob = gaussian_log_prob(prev, mean, torch.where(stochastic, std, torch.ones_like(std)))
    return prev, torch.where(stochastic, log_prob, torch.zeros_like(log_prob)), mean, std


class FlowMatchingEuler:
    """The flow families' sampler step and DRaFT-LV re-noise (``fnf.families.flow``): the folder's
    FlowMatchEulerDiscreteScheduler step from ``schedule.sigmas[i]`` to ``[i + 1]``, deterministic (``eta`` must
    be 0) unless the scheduler config sets ``stochastic_sampling``."""

    def flow_schedule(self, model, steps, height: int, width: int, device, *, mu=None, sigmas=None) -> Schedule:
        timesteps, levels = flow.flow_schedule(model.scheduler, steps, device, mu=mu, sigmas=sigmas)
        return Schedule(timesteps, int(height), int(width), levels)

    def step(self, model, schedule: Schedule, i: int, out: torch.Tensor, x: torch.Tensor, *, eta: float = 0.0,
             generator: torch.Generator | None = None) -> torch.Tensor:
        if eta:
            raise ValueError(f"sampling.eta: the {self.title} flow-matching Euler sampler is deterministic; "
                             f"expected 0, got {eta!r}")
        stochastic = bool(model.scheduler.config.get("stochastic_sampling", False))
        return flow.euler_step(schedule.sigmas, out, i, x, stochastic=stochastic, generator=generator)

    def renoise(self, model, schedule: Schedule, i: int, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return flow.renoise(schedule.sigmas, x0, noise, i)

    sde_noise_level = 0.7   # Flow-GRPO's default noise level a

    def sde_step(self, model, schedule: Schedule, i: int, out: torch.Tensor, x: torch.Tensor, *, noise_level: float,
                 generator: torch.Generator | None = None, noise: torch.Tensor | None = None,
                 prev: torch.Tensor | None = None):
        """One step of the SDE sampler Flow-GRPO uses (``flow.sde_mean_std``: same marginals as the Euler ODE,
        noise level ``a = noise_level``) as a Gaussian; returns ``(x_next, log_prob, mean, std)`` (see
        :func:`sde_transition`)."""
        mean, std = flow.sde_mean_std(schedule.sigmas, out, i, x, noise_level)
        return sde_transition(mean, std, generator=generator, noise=noise, prev=prev)


def _plane_mask(mask: torch.Tensor) -> torch.Tensor:
    """A (B, 1, H, W) mask as (B, H, W); anything else unchanged."""
    return mask[:, 0] if mask.dim() == 4 and mask.shape[1] == 1 else mask


class PackedLatents:
    """FLUX.1 / FLUX.2: latents packed into (B, (h/2)*(w/2), C') tokens of 2x2 latent patches; the image size comes
    from the schedule (or, without one, a square token grid)."""

    def latent_factor(self, model) -> int:
        """How many pixels one latent spans per side (Qwen-Image's video VAE states it differently)."""
        return model.vae_scale_factor

    def token_grid(self, model, height: int, width: int) -> tuple[int, int]:
        """The packed token grid (h/2, w/2) as the pipelines' prepare_latents round the size."""
        f = self.latent_factor(model)
        for name, side in (("height", height), ("width", width)):
            if isinstance(side, bool) or not isinstance(side, int) or side < 2 * f:
                raise ValueError(f"{name}: expected an int >= {2 * f} ({self.title} packs 2x2 latent patches of the "
                                 f"{f}x-downsampled image), got {side!r}")
        return height // (f * 2), width // (f * 2)

    def image_size(self, model, latents: torch.Tensor) -> tuple[int, int]:
        n = int(latents.shape[1])
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"latents: {n} packed tokens are not a square grid; pass the schedule (or height and "
                             "width)")
        f = self.latent_factor(model)
        return 2 * side * f, 2 * side * f

    def latent_region(self, model, mask: torch.Tensor, latents: torch.Tensor,
                      schedule: Schedule | None = None) -> torch.Tensor:
        """The image-space mask (B, H, W) or (B, 1, H, W) on the packed token grid: (B, tokens, 1), 1.0 where any
        pixel of the token's 2x2 latent patch is in the mask."""
        mask = _plane_mask(mask)
        if latents.dim() != 3 or mask.dim() != 3 or mask.shape[0] != latents.shape[0]:
            raise ValueError(f"latent_region: expected mask (B, H, W) and packed latents (B, tokens, C), got "
                             f"{tuple(mask.shape)} and {tuple(latents.shape)}")
        h2, w2 = self.packed_grid(model, latents, schedule)
        cells = F.adaptive_max_pool2d(mask.float()[:, None], (h2, w2))
        return cells.reshape(mask.shape[0], h2 * w2, 1).to(latents.dtype)

    def packed_grid(self, model, latents: torch.Tensor, schedule: Schedule | None) -> tuple[int, int]:
        """The token grid of ``latents``: the schedule's image size, checked against the token count."""
        size = (schedule.height, schedule.width) if schedule is not None else self.image_size(model, latents)
        h2, w2 = self.token_grid(model, *size)
        if h2 * w2 != int(latents.shape[1]):
            raise ValueError(f"latents: expected {h2 * w2} packed tokens for a {size[0]}x{size[1]} image, got "
                             f"{int(latents.shape[1])}")
        return h2, w2


class TransformerLoRA:
    """LoRA export / load of the transformer families (SD3, FLUX.1, FLUX.2): ``save_lora_weights(
    transformer_lora_layers=...)`` in peft key format with the adapter's metadata (what diffusers' LoRA training
    scripts write), and the loader ``pipe.load_lora_weights`` uses (``lora_state_dict`` +
    ``load_lora_into_transformer``). ``lora_network_alphas``: the pipeline's loader returns and takes alphas."""

    lora_network_alphas = False

    def save_lora(self, model, directory: str) -> None:
        state, metadata = export_state(model.denoiser)
        self.pipeline_class().save_lora_weights(directory, transformer_lora_layers=state, safe_serialization=True,
                                                weight_name=LORA_WEIGHTS, transformer_lora_adapter_metadata=metadata)

    def load_lora(self, model, directory: str, adapter_name: str) -> None:
        check_lora_folder(directory)
        cls = self.pipeline_class()
        # weight_name explicitly: diffusers < 0.40 refuses a folder without it when HF_HUB_OFFLINE is set.
        kw = {"return_alphas": True} if self.lora_network_alphas else {}
        out = cls.lora_state_dict(directory, weight_name=LORA_WEIGHTS, return_lora_metadata=True, **kw)
        state, metadata = out[0], out[-1]
        prefix = f"{cls.transformer_name}."
        if not any(k.startswith(prefix) for k in state):
            raise ValueError(f"LoRA folder {directory!r} holds no transformer LoRA weights (keys like "
                             f"'{prefix}transformer_blocks.0.attn.to_q.lora_A.weight')")
        state = {k: v for k, v in state.items() if k.startswith(prefix)}
        if self.lora_network_alphas:
            kw = {"network_alphas": out[1]}
        cls.load_lora_into_transformer(state, transformer=model.denoiser, adapter_name=adapter_name, metadata=metadata,
                                       **kw)
        dropout_off(model.denoiser)   # a LoRA saved with dropout must not drop out while sampling


def set_vae_precision(model, weight_dtype: torch.dtype, fp16_autocast: bool = False) -> bool:
    """Cast the VAE to ``weight_dtype``, except when its config sets ``force_upcast`` (SD and SDXL VAEs overflow
    in float16) and float16 is in play (fp16 weights or fp16 autocast): then the VAE is kept in float32 and the
    family's ``decode`` runs it with autocast off, as the diffusers pipelines do. Sets and returns
    ``model.vae_upcast``."""
    if model.vae is None:
        return False
    fp16 = weight_dtype == torch.float16 or fp16_autocast
    model.vae_upcast = bool(fp16 and getattr(model.vae.config, "force_upcast", False))
    target = torch.float32 if model.vae_upcast else weight_dtype
    if model.vae_dtype != target:
        model.vae.to(target)
    return model.vae_upcast
