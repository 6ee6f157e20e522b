"""Separate-and-Enhance (``objective.name: sepen``): fine-tuning of the cross-attention keys on two-object prompts.

Per micro-batch (prompts and noise from the trainer's per-(step, micro-step, rank) generator):

1. B two-object prompts ``template`` over distinct concepts A != B (pairs whose prompt is in
   ``exclude_prompts`` never drawn), and (when lambda_norm > 0) B single-object
   prompts ``single_template``; object token positions from the tokenizer (:mod:`fnf.sepen.tokens`);
2. random latents x0 ~ N(0, I) (the scale of SD's scaled VAE latents), one random timestep per sample (uniform
   over ``timestep_range`` of the training schedule),
   x_t = scheduler.add_noise(x0, noise, t);
3. ONE fine-tuned UNet call on [two-object rows; single-object rows], capturing the two-object rows' object maps
   at latent/``downsample`` (:mod:`fnf.sepen.capture`, rows indexed by batch item and head);
4. loss = lambda_sep * Separate + lambda_en * Enhance (fnf_kernels, batch means) + lambda_norm * MSE(fine-tuned,
   frozen noise prediction on the single-object rows).

Trainable: only ``attn2.to_k`` (its weights, kept in float32; or a LoRA on them with ``sepen.lora``). The frozen
model is the same UNet, no second copy: with LoRA, adapters switched off; without, a snapshot of the pretrained
to_k weights (taken when the objective is built, before any resume) substituted through
``torch.func.functional_call``. UNet gradient checkpointing is not used on this path (a recomputed block would
not re-run the capture).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import fnf_kernels

from ..config import sepen_concepts, sepen_pairs
from ..core import DTYPES, DiffusionModel, PromptEmbeds
from ..encoding import encode_prompts
from ..lora import adapters_disabled, add_lora, lora_dropout_active, save_lora
from ..preflight import sepen_unsupported
from ..sampling import predict_noise
from ..sepen.capture import capture, install_capture, remove_capture
from ..sepen.tokens import token_weights, word_positions
from .base import Context, Objective, StepOutput


def to_k_modules(unet) -> list[tuple[str, torch.nn.Module]]:
    return [(f"{n}.to_k", m.to_k) for n, m in unet.named_modules() if n.endswith("attn2") and hasattr(m, "to_k")]


class SeparateAndEnhance(Objective):
    """Trains the cross-attention keys (attn2.to_k, or a LoRA on them) with the Separate and Enhance losses.

    Needs separate cross-attention keys: a family with ``supports_sepen`` (the UNet families). UNet gradient
    checkpointing does not apply (a recomputed block would not re-run the attention capture)."""

    progress_keys = ("separate", "enhance")
    denoiser_checkpointing = False

    @classmethod
    def add_params(cls, cfg, model: DiffusionModel, probe) -> list:
        """The to_k weights (made float32 and trainable; autocast runs the matmuls), or a LoRA on them."""
        if not model.family.supports_sepen:
            raise ValueError(sepen_unsupported(model.family))
        unet = model.denoiser
        unet.requires_grad_(False)
        modules = to_k_modules(unet)
        if not modules:
            raise ValueError("objective.name=sepen: the UNet has no cross-attention (attn2.to_k) layers")
        if cfg.sepen.lora:
            return add_lora(model, rank=cfg.lora.rank, alpha=cfg.lora.alpha, target_modules=["attn2.to_k"],
                            dropout=cfg.lora.dropout)
        params = []
        for _, lin in modules:
            for p in lin.parameters():
                p.data = p.data.float()
                p.requires_grad_(True)
                params.append(p)
        return params

    def __init__(self, cfg, ctx: Context):
        super().__init__(cfg, ctx)
        self.sc = cfg.sepen
        unet = ctx.model.denoiser
        # The pretrained to_k weights for the frozen reference (in the model's weight dtype, as loaded).
        self.frozen: dict[str, torch.Tensor] = {}
        if not self.sc.lora:
            dtype = DTYPES[cfg.model.weight_dtype]
            for name, lin in to_k_modules(unet):
                for pname, p in lin.named_parameters():
                    self.frozen[f"{name}.{pname}"] = p.detach().to(dtype, copy=True)
        self.concepts = sepen_concepts(self.sc)
        self.pairs = sepen_pairs(self.sc)   # (A, B) concept pairs to draw from, held-out prompts removed
        install_capture(unet)               # after fnf_kernels.patch_lora when the fused path is on

    def finish(self) -> None:
        remove_capture(self.ctx.model.denoiser)

    # --------------------------------------------------------------------------------------------------
    def prompts(self, gen: torch.Generator, batch: int):
        """(two-object prompts, their object words, single-object prompts)."""
        concepts, allowed = self.concepts, self.pairs
        pairs, objects, singles = [], [], []
        for _ in range(batch):
            a, b = allowed[int(torch.randint(len(allowed), (1,), generator=gen))]
            pairs.append(self.sc.template.format(A=a, B=b))
            objects.append([a, b])
            singles.append(self.sc.single_template.format(A=concepts[int(torch.randint(len(concepts), (1,),
                                                                                       generator=gen))]))
        return pairs, objects, singles

    def frozen_prediction(self, model: DiffusionModel, x, t, cond):
        unet = model.denoiser
        with torch.no_grad():
            if self.sc.lora:
                with adapters_disabled(unet):
                    return predict_noise(model, unet, x, t, cond, None, 1.0)
            call = lambda *a, **kw: torch.func.functional_call(unet, self.frozen, a, kw, strict=False)  # noqa: E731
            return predict_noise(model, _Callable(call, unet), x, t, cond, None, 1.0)

    def loss(self, gen: torch.Generator) -> StepOutput:
        # Its LoRA-on UNet call is the grad-carrying one (the frozen reference runs adapters off, no grad).
        ctx, sc = self.ctx, self.sc
        model = ctx.model
        b = self.cfg.train.batch_size
        pairs, objects, singles = self.prompts(gen, b)
        use_norm = sc.lambda_norm > 0
        prompts = pairs + (singles if use_norm else [])
        with lora_dropout_active(model.denoiser):
            cond = encode_prompts(model, prompts, height=ctx.height, width=ctx.width)
            spans = [word_positions(model.tokenizers[0], p, o) for p, o in zip(pairs, objects)]
            weights = token_weights(spans, cond.hidden.shape[1], device=ctx.device)
            f = model.vae_scale_factor
            shape = (len(prompts), model.denoiser.config.in_channels, ctx.height // f, ctx.width // f)
            x0 = torch.randn(shape, generator=gen)
            noise = torch.randn(shape, generator=gen)
            n_t = model.scheduler.config.num_train_timesteps
            lo = min(n_t - 1, int(sc.timestep_range[0] * n_t))
            hi = max(lo + 1, min(n_t, int(sc.timestep_range[1] * n_t)))
            t = torch.randint(lo, hi, (len(prompts),), generator=gen)
            x_t = model.scheduler.add_noise(x0, noise, t).to(ctx.device)
            t = t.to(ctx.device)
            with ctx.autocast(), capture(model.denoiser, weights, shape[-2:], sc.downsample) as store:
                pred = predict_noise(model, model.denoiser, x_t, t, cond, None, 1.0)
            maps = store.maps().float()
            separate, enhance = fnf_kernels.separate_enhance_losses(maps, sc.eps, backend=sc.loss_backend)
            loss = sc.lambda_sep * separate.mean() + sc.lambda_en * enhance.mean()
            reg = torch.zeros((), device=ctx.device)
            if use_norm:
                single_cond = _rows(cond, slice(b, None))
                with ctx.autocast():
                    ref = self.frozen_prediction(model, x_t[b:], t[b:], single_cond)
                reg = F.mse_loss(pred[b:].float(), ref.float())
                loss = loss + sc.lambda_norm * reg
            stats = {"loss": loss.detach().item(), "separate": separate.detach().mean().item(),
                     "enhance": enhance.detach().mean().item(), "regulariser": reg.detach().item(),
                     "timestep": t.float().mean().item()}
        return StepOutput(loss, stats, {})

    # --------------------------------------------------------------------------------------------------
    def export(self, out: str) -> str:
        """Write the result: a diffusers LoRA folder (sepen.lora) or ``to_k.safetensors`` (the tuned to_k
        tensors by UNet parameter name, for ``unet.load_state_dict(..., strict=False)``). Returns the path."""
        model = self.ctx.model
        if self.sc.lora:
            path = os.path.join(out, "lora")
            save_lora(model, path)
            return path
        path = os.path.join(out, "to_k.safetensors")
        tuned = dict(model.denoiser.named_parameters())
        save_file({k: tuned[k].detach().cpu().contiguous() for k in self.frozen}, path)
        return path


class _Callable:
    """A UNet stand-in for predict_noise: calls ``fn`` and exposes the attributes predict_noise reads."""

    def __init__(self, fn, unet):
        self._fn, self.dtype = fn, unet.dtype

    def __call__(self, *args, **kwargs):
        return self._fn(*args, **kwargs)


def _rows(cond, rows: slice):
    pick = lambda x: None if x is None else x[rows]  # noqa: E731
    return PromptEmbeds(cond.hidden[rows], pick(cond.pooled), pick(cond.time_ids))
