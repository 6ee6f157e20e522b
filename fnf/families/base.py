"""The model-family seam: what differs between SD 1.x/2.x, SDXL, SD3/3.5, FLUX.1 and FLUX.2.

A family turns a local diffusers folder into a :class:`fnf.models.DiffusionModel` and knows, for that model,
how to encode prompts, draw x_T, build the sampling schedule, run one guided denoiser call, take one sampler
step, re-noise for DRaFT-LV, decode latents and save/load LoRA in the format its diffusers pipeline's
``load_lora_weights`` reads. The samplers (``fnf.sampling``) and the trainer are written once over this
interface; nothing outside ``fnf/families/`` branches on the family.

Conventions every family follows (the contract the tests check):

* ``model.unet`` holds the denoiser (a UNet or a transformer; ``model.denoiser`` is the same object) and
  ``model.family`` the family instance; LoRA lives on the denoiser (peft, adapter ``fnf.models.ADAPTER``),
  the frozen model is the same denoiser with adapters disabled.
* Steps are indexed: ``timesteps = family.schedule(model, steps, h, w, device)`` configures
  ``model.scheduler`` and returns the T timesteps; step ``i`` goes from noise level i to i + 1 with
  ``x = family.step(model, family.predict(model, denoiser, x, i, t, cond, uncond, g), i, t, x, eta=, generator=)``.
  ``step`` must be a pure function of its arguments (no scheduler step counter), so a trajectory can be split
  into a no-grad part and a grad part, or continued from any ``i``.
* ``predict`` returns the guided model output in float32 (float64 for a float64 denoiser); it applies CFG when
  ``family.uses_cfg(model, uncond, g)`` (with the batch order ``[uncond rows, cond rows]``), or a guidance
  embedding (guidance-distilled FLUX: no batch doubling).
* x_T is drawn on the CPU from the caller's generator in float32, with the shape and scaling the family's
  diffusers pipeline uses when given a CPU generator, so a sample equals the pipeline's image for the same seed.
* ``decode`` returns float32 images in [0, 1], (B, 3, H, W), with gradient whenever grad is enabled.
"""
from __future__ import annotations

import torch


class ModelFamily:
    """Base class: one instance per family, registered in :data:`fnf.families.FAMILIES` by name."""

    name: str = ""
    pipeline_classes: tuple[str, ...] = ()   # model_index.json "_class_name" values this family loads
    components: tuple[str, ...] = ()         # subfolders a folder must hold (preflight checks them)
    lora_targets: tuple[str, ...] = ()       # default LoRA target module names on the denoiser
    supports_sepen: bool = False             # Separate-and-Enhance needs separate cross-attention keys
    native_size: int = 512                   # default image side when the config gives none
    title: str = ""                          # the name errors and messages use (default: ``name``)

    # -------------------------------------------------------------------------------- loading
    def load(self, path: str, index: dict, *, weight_dtype: torch.dtype, device="cpu"):
        """All components from the local folder (``local_files_only``), frozen, eval, on ``device``."""
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

    def schedule(self, model, steps: int, height: int, width: int, device) -> torch.Tensor:
        """Configure ``model.scheduler`` for ``steps`` steps at this image size; return the timesteps."""
        raise NotImplementedError

    def predict(self, model, denoiser, x: torch.Tensor, i: int, t, cond, uncond, guidance_scale: float):
        """One denoiser call at step ``i`` (timestep ``t``) and the guided output."""
        raise NotImplementedError

    def step(self, model, out: torch.Tensor, i: int, t, x: torch.Tensor, *, eta: float = 0.0,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """x at noise level i -> x at level i + 1, given the guided output (pure)."""
        raise NotImplementedError

    def renoise(self, model, x0: torch.Tensor, noise: torch.Tensor, i: int, t) -> torch.Tensor:
        """DRaFT-LV: clean latents x0 put back at step i's noise level with ``noise``."""
        raise NotImplementedError

    def decode(self, model, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # -------------------------------------------------------------------------------- LoRA
    @staticmethod
    def lora_export(model) -> tuple[dict, dict]:
        """The trained adapter's peft state (float32, CPU, contiguous) and the peft-config metadata that every
        family's ``save_lora_weights`` writes beside it (rank_pattern / alpha_pattern: diffusers 0.34 reads them
        unconditionally)."""
        from peft.utils import get_peft_model_state_dict

        from ..models import ADAPTER

        state = get_peft_model_state_dict(model.unet, adapter_name=ADAPTER)
        state = {k: v.detach().float().cpu().contiguous() for k, v in state.items()}
        cfg = model.unet.peft_config[ADAPTER]
        metadata = {"r": cfg.r, "lora_alpha": cfg.lora_alpha, "target_modules": sorted(cfg.target_modules),
                    "lora_dropout": cfg.lora_dropout, "init_lora_weights": True,
                    "rank_pattern": dict(cfg.rank_pattern or {}), "alpha_pattern": dict(cfg.alpha_pattern or {})}
        return state, metadata

    def save_lora(self, model, directory: str) -> None:
        """The trained adapter in the format ``pipeline.load_lora_weights(directory)`` reads."""
        raise NotImplementedError

    def load_lora(self, model, directory: str, adapter_name: str) -> None:
        """A LoRA folder written by :meth:`save_lora` (or by diffusers) into ``model.unet``."""
        raise NotImplementedError


def load_component(component: str, path: str, loader, pipeline: str, needs: str, note: str = ""):
    """``loader(path/component)``; a missing subfolder or a failing loader is a ModelLoadError that names the
    component, the folder and what a ``pipeline`` folder needs (``note`` is added after the missing name)."""
    import os

    from ..models import ModelLoadError

    folder = os.path.join(path, component)
    if not os.path.isdir(folder):
        raise ModelLoadError(f"model folder {path!r} has no '{component}' subfolder{note}; a {pipeline} folder "
                             f"needs {needs}")
    try:
        return loader(folder)
    except Exception as e:
        raise ModelLoadError(f"could not load '{component}' from {folder!r}: {type(e).__name__}: {e}") from e


def check_lora_folder(directory: str) -> None:
    """FileNotFoundError naming what is missing when ``directory`` is not a LoRA folder fnf can read."""
    import os

    from ..models import LORA_WEIGHTS

    if not os.path.isdir(directory):
        raise FileNotFoundError(f"LoRA folder does not exist: {directory!r}")
    if not os.path.isfile(os.path.join(directory, LORA_WEIGHTS)):
        raise FileNotFoundError(f"LoRA folder {directory!r} has no {LORA_WEIGHTS}")


class FlowMatchingEuler:
    """The flow families' sampler step and DRaFT-LV re-noise (``fnf.families.flow``): the folder's
    FlowMatchEulerDiscreteScheduler step from sigma_i to sigma_{i+1}, deterministic (``eta`` must be 0)."""

    def step(self, model, out: torch.Tensor, i: int, t, x: torch.Tensor, *, eta: float = 0.0,
             generator: torch.Generator | None = None) -> torch.Tensor:
        from . import flow

        if eta:
            raise ValueError(f"sampling.eta: the {self.title} flow-matching Euler sampler is deterministic; "
                             f"expected 0, got {eta!r}")
        return flow.euler_step(model.scheduler, out, i, x, generator=generator)

    def renoise(self, model, x0: torch.Tensor, noise: torch.Tensor, i: int, t) -> torch.Tensor:
        from . import flow

        return flow.renoise(model.scheduler, x0, noise, i)


def resolve_dtype(weight_dtype) -> torch.dtype:
    """A torch dtype, or a name of ``fnf.models.DTYPES`` ("fp32", "bf16", ...), as a torch dtype."""
    from ..models import DTYPES

    if isinstance(weight_dtype, torch.dtype):
        return weight_dtype
    if weight_dtype in DTYPES:
        return DTYPES[weight_dtype]
    raise ValueError(f"weight_dtype: expected a torch dtype or one of {sorted(DTYPES)}, got {weight_dtype!r}")


class TransformerLoRA:
    """LoRA export / load of the transformer families (SD3, FLUX.1, FLUX.2): ``save_lora_weights(
    transformer_lora_layers=...)`` in peft key format with the adapter's metadata (what diffusers' LoRA training
    scripts write), and the loader ``pipe.load_lora_weights`` uses (``lora_state_dict`` +
    ``load_lora_into_transformer``). ``lora_network_alphas``: the pipeline's loader returns and takes alphas."""

    lora_network_alphas = False

    def save_lora(self, model, directory: str) -> None:
        from ..models import LORA_WEIGHTS

        state, metadata = self.lora_export(model)
        self.pipeline_class().save_lora_weights(directory, transformer_lora_layers=state, safe_serialization=True,
                                                weight_name=LORA_WEIGHTS, transformer_lora_adapter_metadata=metadata)

    def load_lora(self, model, directory: str, adapter_name: str) -> None:
        from ..models import LORA_WEIGHTS, lora_dropout_layers

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
        cls.load_lora_into_transformer(state, transformer=model.unet, adapter_name=adapter_name, metadata=metadata,
                                       **kw)
        for layer in lora_dropout_layers(model.unet):   # a LoRA saved with dropout must not drop out while sampling
            layer.eval()
