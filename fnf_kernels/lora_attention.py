"""FusedLoRAAttnProcessor: diffusers attention with peft-LoRA projections through :func:`fnf_kernels.lora_linear`.

Duck-typed against diffusers' ``Attention`` module (this package never imports diffusers) and against peft's
``lora.Linear`` layers (``base_layer``, ``lora_A``/``lora_B`` ModuleDicts, ``scaling``, ``lora_dropout``,
``active_adapters``): the processor reads peft's own parameters on every call, so training updates them in
place and ``save_lora_adapter`` / ``load_lora_adapter`` / ``get_peft_model_state_dict`` keep working unchanged.

* self-attention: q, k, v in one grouped lora_linear over the concatenated frozen weights (cached while frozen)
  and the concatenated LoRA pairs (``groups=3``); cross-attention: q alone, k and v in one call (``groups=2``);
  out projection: one lora_linear. Projections without a LoRA go through the same path with rank 0 (plain
  F.linear) and the fused form is used only when the grouped projections share rank, scaling and dtype.
* core: ``torch.nn.functional.scaled_dot_product_attention``, or xformers' ``memory_efficient_attention``
  (``attention="xformers"``, when installed; calls with an attention mask fall back to SDPA).
* per-sample scale: ``with lora_scale(unet, s):`` where s is a float or a (B,) tensor over the UNet batch; row b
  gets ``s[b] * peft_scaling``. s = 0 rows are exactly the pretrained model.

``patch_lora(unet)`` also routes every other peft ``lora.Linear`` of the UNet (feed-forward, proj_in/out when
targeted) through lora_linear so the per-sample scale applies to every LoRA layer; a UNet that holds other
peft LoRA layers (e.g. convolutions) accepts only a uniform float scale, set through peft's own scaling.
"""
from __future__ import annotations

import contextlib
import numbers
import warnings
from typing import Optional

import torch
import torch.nn.functional as F

from . import _validate, backends, lora as _lora

# Processors that compute exactly AttnProcessor2_0's math, so replacing them keeps the model's function.
_REPLACEABLE = ("AttnProcessor2_0", "AttnProcessor", "XFormersAttnProcessor", "FusedLoRAAttnProcessor",
                "AttnProcessorNPU")
_ATTENTIONS = ("sdpa", "xformers")


class LoRAScaleState:
    """The per-sample LoRA scale shared by every patched layer of one UNet (None = 1.0)."""

    def __init__(self) -> None:
        self.scale = None


def _is_peft_lora(module) -> bool:
    return all(hasattr(module, a) for a in ("base_layer", "lora_A", "lora_B", "scaling", "active_adapters"))


def _module_name(module) -> str:
    return getattr(module, "_fnf_name", type(module).__name__)


def _active_lora(module):
    """(base nn.Linear, adapter name or None) for a peft LoRA linear; raises on unsupported configurations."""
    name = _module_name(module)
    base = module.base_layer
    if not isinstance(base, torch.nn.Linear):
        raise ValueError(f"{name}: peft LoRA over {type(base).__name__} is not supported; expected nn.Linear")
    if getattr(module, "disable_adapters", False):
        return base, None
    active = [a for a in module.active_adapters if a in module.lora_A]
    if not active:
        return base, None
    if len(active) > 1:
        raise ValueError(f"{name}: {len(active)} active LoRA adapters {active}; FusedLoRAAttnProcessor runs the "
                         "active adapter only — call set_adapters() with one adapter (or merge them first)")
    adapter = active[0]
    if getattr(module, "merged", False):
        raise ValueError(f"{name}: adapter {adapter!r} is merged into the base weight; unmerge it "
                         "(unet.unmerge_adapter()/unfuse_lora()) before patch_lora")
    if getattr(module, "use_dora", {}).get(adapter, False) or adapter in getattr(module, "lora_variant", {}):
        raise ValueError(f"{name}: adapter {adapter!r} is a LoRA variant (DoRA etc.); only vanilla LoRA is fused")
    if getattr(module, "lora_bias", {}).get(adapter, False) or module.lora_B[adapter].bias is not None:
        raise ValueError(f"{name}: adapter {adapter!r} has lora_bias=True; only bias-free LoRA is fused")
    if getattr(module, "fan_in_fan_out", False):
        raise ValueError(f"{name}: fan_in_fan_out=True is not supported")
    dropout = module.lora_dropout[adapter]
    p = getattr(dropout, "p", 0.0)
    if isinstance(dropout, torch.nn.Dropout) and p > 0 and dropout.training:
        raise ValueError(f"{name}: adapter {adapter!r} has lora_dropout p={p} in training mode; the fused path "
                         "needs lora_dropout=0.0 (LoraConfig(lora_dropout=0.0)) or eval mode")
    return base, adapter


def _linear_parts(module, dtype):
    """(weight, bias, lora_A, lora_B, peft scaling) of a Linear or peft LoRA linear; A, B, scaling None without."""
    if _is_peft_lora(module):
        base, adapter = _active_lora(module)
        if adapter is None:
            return base.weight, base.bias, None, None, None
        a = module.lora_A[adapter].weight
        b = module.lora_B[adapter].weight
        # peft keeps LoRA weights in float32 under mixed precision (cast_training_params): run them in x's dtype.
        return base.weight, base.bias, a.to(dtype), b.to(dtype), float(module.scaling[adapter])
    if isinstance(module, torch.nn.Linear):
        return module.weight, module.bias, None, None, None
    raise ValueError(f"{_module_name(module)}: expected nn.Linear or a peft LoRA Linear, got {type(module).__name__}")


def _scale_args(scale, x: torch.Tensor, peft_scaling: float, where: str):
    """(scale tensor or None, scale value) for lora_linear from the user's per-sample scale."""
    if scale is None:
        return None, peft_scaling
    if isinstance(scale, torch.Tensor):
        if scale.dim() == 0:
            return scale.reshape(1).to(torch.float32), peft_scaling
        if scale.shape[0] != x.shape[0]:
            raise ValueError(f"lora_scale: the scale has {scale.shape[0]} entries but {where} runs a batch of "
                             f"{x.shape[0]}; expected one scale per sample of the UNet batch")
        return scale, peft_scaling
    return None, peft_scaling * float(scale)


def _apply(x: torch.Tensor, weight, bias, a, b, scaling, scale, groups: int, backend: str, where: str):
    """lora_linear on (..., in) x with peft scaling folded into the per-sample scale."""
    if a is None or (isinstance(scale, float) and scale == 0.0):
        return F.linear(x, weight, bias)  # no LoRA, or a uniform scale of 0: the pretrained projection
    s_t, s_v = _scale_args(scale, x, scaling, where)
    if s_t is not None:
        s_t = s_t.to(device=x.device)
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    chosen = backends.select("lora_linear", backend, x.device, x.dtype)
    rows = x2.shape[0] // (s_t.shape[0] if s_t is not None else 1)  # s_t is (1,) or (B,) with B = x.shape[0]
    if chosen == "reference":
        s_full = s_v if s_t is None else s_t.repeat_interleave(rows) * s_v
        out = _lora.lora_linear_reference(x2, weight, bias, a, b, s_full, groups=groups)
    else:
        _lora._lora_args(x2, weight, bias, a, b, 1.0, groups, backend)  # shape/dtype/device checks
        s_t = s_t.detach().to(torch.float64 if x.dtype == torch.float64 else torch.float32).contiguous() \
            if s_t is not None else None
        out = _lora._lora_linear(x2, weight, bias, a, b, s_t, s_v, rows, groups, chosen)
    return out.reshape(*shape[:-1], weight.shape[0])


class FusedLoRAAttnProcessor:
    """Attention processor running q, k, v and out through lora_linear (see the module docstring).

    Args:
        backend: lora_linear backend ("auto", "triton", "cpu", "reference").
        attention: "sdpa" (torch scaled_dot_product_attention) or "xformers" (memory_efficient_attention;
            needs xformers installed).
        state: the shared :class:`LoRAScaleState` (patch_lora passes the UNet's).
        original: the processor this one replaced (restored by unpatch_lora).
    """

    def __init__(self, *, backend: str = "auto", attention: str = "sdpa", state: Optional[LoRAScaleState] = None,
                 original=None) -> None:
        _validate.choice("backend", backend, _validate.BACKEND_NAMES)
        _validate.choice("attention", attention, _ATTENTIONS)
        if attention == "xformers":
            try:
                import xformers.ops  # noqa: F401
            except ImportError as exc:
                raise ImportError("attention='xformers' needs the xformers package; install it or use "
                                  "attention='sdpa'") from exc
        self.backend, self.attention = backend, attention
        self.state = state if state is not None else LoRAScaleState()
        self.original = original
        self._weight_cache: dict = {}

    # -- projections ---------------------------------------------------------------------------------------
    def _frozen(self, key: str, tensors, dtype: torch.dtype):
        """torch.cat(tensors).to(dtype) for frozen weights/biases, cached until one of them changes (storage,
        version counter). Trainable ones (or a single tensor already in ``dtype``) are never cached."""
        if len(tensors) == 1 and tensors[0].dtype == dtype:
            return tensors[0]
        if any(t.requires_grad for t in tensors) or torch.compiler.is_compiling():
            # under torch.compile the concat / cast of frozen inputs is traced instead
            return (torch.cat(tensors) if len(tensors) > 1 else tensors[0]).to(dtype)
        ident = tuple((t.data_ptr(), t._version, t.dtype, t.device, tuple(t.shape)) for t in tensors) + (dtype,)
        hit = self._weight_cache.get(key)
        if hit is not None and hit[0] == ident:
            return hit[1]
        value = (torch.cat(tensors) if len(tensors) > 1 else tensors[0]).to(dtype)
        self._weight_cache[key] = (ident, value)
        return value

    def _project(self, modules, names, x, where: str):
        """Outputs of the linear ``modules`` on the same x, fused into one grouped lora_linear when possible."""
        dtype = _lora.compute_dtype(x)  # x's dtype, or the autocast dtype (F.linear's rule)
        x = x.to(dtype)
        parts = [_linear_parts(m, dtype) for m in modules]
        scale = self.state.scale
        if len(parts) > 1:
            w0, _, a0, b0, s0 = parts[0]
            fusable = (a0 is not None
                       and all(p[2] is not None and p[2].shape == a0.shape and p[4] == s0
                               and p[0].shape == w0.shape and p[0].dtype == w0.dtype for p in parts))
            if fusable:
                weight = self._frozen(f"{names}.weight", [p[0] for p in parts], dtype)
                biases = [p[1] for p in parts]
                if all(b is None for b in biases):
                    bias = None
                else:
                    biases = [b if b is not None else w.new_zeros(w.shape[0]) for b, (w, *_) in zip(biases, parts)]
                    bias = self._frozen(f"{names}.bias", biases, dtype)
                a = torch.cat([p[2] for p in parts])
                b = torch.cat([p[3] for p in parts])
                out = _apply(x, weight, bias, a, b, s0, scale, len(parts), self.backend, where)
                return out.chunk(len(parts), dim=-1)
        outs = []
        for i, (w, bi, a, b, s) in enumerate(parts):
            w = self._frozen(f"{names}.{i}.weight", [w], dtype)
            bi = self._frozen(f"{names}.{i}.bias", [bi], dtype) if bi is not None else None
            outs.append(_apply(x, w, bi, a, b, s, scale, 1, self.backend, where))
        return outs

    # -- the processor -------------------------------------------------------------------------------------
    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None, temb: Optional[torch.Tensor] = None,
                 *args, **kwargs) -> torch.Tensor:
        residual = hidden_states
        if getattr(attn, "spatial_norm", None) is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (hidden_states.shape if encoder_hidden_states is None
                                          else encoder_hidden_states.shape)
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if getattr(attn, "group_norm", None) is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        name = getattr(attn, "_fnf_name", "attention")
        if encoder_hidden_states is None:
            query, key, value = self._project((attn.to_q, attn.to_k, attn.to_v), f"{name}.qkv", hidden_states,
                                              f"{name}.to_qkv")
        else:
            (query,) = self._project((attn.to_q,), f"{name}.q", hidden_states, f"{name}.to_q")
            if getattr(attn, "norm_cross", None):
                encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
            key, value = self._project((attn.to_k, attn.to_v), f"{name}.kv", encoder_hidden_states,
                                       f"{name}.to_kv")

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        if (self.attention == "xformers" and attention_mask is None and getattr(attn, "norm_q", None) is None
                and getattr(attn, "norm_k", None) is None):
            import xformers.ops as xops
            q = query.reshape(batch_size, -1, attn.heads, head_dim)
            k = key.reshape(batch_size, -1, attn.heads, head_dim)
            v = value.reshape(batch_size, -1, attn.heads, head_dim)
            hidden_states = xops.memory_efficient_attention(q, k, v, scale=attn.scale)
            hidden_states = hidden_states.reshape(batch_size, -1, attn.heads * head_dim)
        else:
            query = query.reshape(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            key = key.reshape(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            value = value.reshape(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            if getattr(attn, "norm_q", None) is not None:
                query = attn.norm_q(query)
            if getattr(attn, "norm_k", None) is not None:
                key = attn.norm_k(key)
            hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                           dropout_p=0.0, is_causal=False, scale=attn.scale)
            hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        (hidden_states,) = self._project((attn.to_out[0],), f"{name}.out", hidden_states, f"{name}.to_out.0")
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if getattr(attn, "residual_connection", False):
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


# --------------------------------------------------------------------------------------------------------
# patch / unpatch / scale
# --------------------------------------------------------------------------------------------------------

def _is_attention(module) -> bool:
    return all(hasattr(module, a) for a in ("to_q", "to_k", "to_v", "to_out", "heads", "processor"))


def _linear_forward(module, state: LoRAScaleState, backend: str):
    """A forward for a peft LoRA Linear outside attention: lora_linear with the shared per-sample scale."""
    def forward(x, *args, **kwargs):
        if args or kwargs:
            raise TypeError(f"{_module_name(module)}: the fused LoRA forward takes only x")
        dtype = _lora.compute_dtype(x)
        w, bi, a, b, s = _linear_parts(module, dtype)
        x, w, bi = _lora.autocast_inputs(x, w, bi)
        return _apply(x, w, bi, a, b, s, state.scale, 1, backend, _module_name(module))
    forward._fnf_lora = True
    return forward


def patch_lora(unet: torch.nn.Module, *, backend: str = "auto", attention: str = "sdpa") -> int:
    """Switch every peft-LoRA attention of ``unet`` (and every other peft LoRA Linear) to the fused path.

    Returns the number of attention modules patched. Raises ValueError when the UNet holds no peft LoRA
    attention, when an attention runs a processor other than diffusers' plain ones (IP-adapter, custom), or when
    a LoRA layer uses something the fused path does not run (several active adapters, DoRA, lora_bias, dropout
    > 0 in training mode, merged weights). Idempotent; ``unpatch_lora`` restores the original processors.
    """
    if not isinstance(unet, torch.nn.Module):
        raise TypeError(f"unet must be a torch.nn.Module, got {type(unet).__name__}")
    state = getattr(unet, "_fnf_lora_state", None) or LoRAScaleState()
    attentions, linears, others = [], [], []
    in_attention = set()
    for name, module in unet.named_modules():
        if _is_attention(module):
            projections = (module.to_q, module.to_k, module.to_v, module.to_out[0])
            if any(_is_peft_lora(p) for p in projections):
                attentions.append((name, module))
                in_attention.update(id(p) for p in projections)
    for name, module in unet.named_modules():
        if _is_peft_lora(module):
            module._fnf_name = name
            if id(module) in in_attention:
                _active_lora(module)
            elif isinstance(module.base_layer, torch.nn.Linear):
                _active_lora(module)
                linears.append(module)
            else:
                others.append(name)
    if not attentions:
        raise ValueError("patch_lora: unet has no attention module with a peft LoRA projection "
                         "(to_q/to_k/to_v/to_out.0); add one first, e.g. unet.add_adapter(LoraConfig(r=..., "
                         "target_modules=['to_q', 'to_k', 'to_v', 'to_out.0']))")
    for name, attn in attentions:
        kind = type(attn.processor).__name__
        if kind not in _REPLACEABLE:
            raise ValueError(f"patch_lora: {name} runs {kind}; only diffusers' plain attention processors "
                             f"({', '.join(_REPLACEABLE[:3])}) can be replaced")
    for name, attn in attentions:
        attn._fnf_name = name
        current = attn.processor
        original = current.original if isinstance(current, FusedLoRAAttnProcessor) else current
        proc = FusedLoRAAttnProcessor(backend=backend, attention=attention, state=state, original=original)
        if hasattr(attn, "set_processor"):
            attn.set_processor(proc)
        else:
            attn.processor = proc
    for module in linears:
        module.forward = _linear_forward(module, state, backend)
    unet._fnf_lora_state = state
    unet._fnf_lora_others = tuple(others)
    return len(attentions)


def unpatch_lora(unet: torch.nn.Module) -> int:
    """Restore the processors (and peft forwards) that patch_lora replaced; returns the number restored."""
    restored = 0
    for module in unet.modules():
        if _is_attention(module) and isinstance(module.processor, FusedLoRAAttnProcessor):
            original = module.processor.original
            if hasattr(module, "set_processor"):
                module.set_processor(original)
            else:
                module.processor = original
            restored += 1
        if getattr(module.__dict__.get("forward"), "_fnf_lora", False):
            del module.forward
    for attr in ("_fnf_lora_state", "_fnf_lora_others"):
        if hasattr(unet, attr):
            delattr(unet, attr)
    return restored


@contextlib.contextmanager
def lora_scale(unet: torch.nn.Module, scale):
    """Set the LoRA scale of a patched UNet inside the block: a float, or a (B,) tensor over the UNet batch.

    Row b of every LoRA layer gets ``scale[b] * peft_scaling``: 0 runs the pretrained model, 1 the fine-tuned
    one, so one batch can hold both trajectories. No gradient flows to ``scale``. Nesting restores the outer
    scale on exit.

    With gradient checkpointing, checkpointed blocks re-run their forward during backward and read the scale
    active *then*: call ``backward()`` inside the same block when the forward carried grad (a warning says
    so once). No-grad passes, such as the trainer's batched pretrained + fine-tuned steps, are unaffected.
    """
    state = getattr(unet, "_fnf_lora_state", None)
    if state is None:
        raise ValueError("lora_scale: unet is not patched; call fnf_kernels.patch_lora(unet) first")
    if isinstance(scale, torch.Tensor):
        if scale.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise TypeError(f"scale must be a float or a floating (B,) tensor, got dtype {scale.dtype}")
        if scale.dim() > 1:
            raise ValueError(f"scale must be a float or a (B,) tensor, got shape {tuple(scale.shape)}")
        scale = scale.detach()
        uniform = False
    elif isinstance(scale, numbers.Real) and not isinstance(scale, bool):
        scale = float(scale)
        uniform = True
    else:
        raise TypeError(f"scale must be a float or a (B,) tensor, got {type(scale).__name__}")
    others = getattr(unet, "_fnf_lora_others", ())
    if others and not (uniform and scale == 1.0):
        raise ValueError(f"lora_scale: unet has peft LoRA layers the fused path cannot scale per sample "
                         f"({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}); target only Linear "
                         "layers, or use peft's set_adapters(weights=...) for a uniform scale")
    default = uniform and scale == 1.0
    if not default and torch.is_grad_enabled() and getattr(unet, "is_gradient_checkpointing", False):
        warnings.warn("lora_scale with gradient checkpointing and grad enabled: run backward() inside the "
                      "lora_scale block, since checkpointed layers recompute with the scale active during "
                      "backward", RuntimeWarning, stacklevel=3)
    previous = state.scale
    state.scale = scale
    try:
        yield
    finally:
        state.scale = previous


def trajectory_scale(n_pretrained: int, n_finetuned: int, *, cfg_copies: int = 1,
                     device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The (B,) scale for a batch of ``n_pretrained`` scale-0 rows followed by ``n_finetuned`` scale-1 rows.

    With classifier-free guidance the UNet batch is ``cfg_copies`` (usually 2: uncond, cond) copies of that
    stacked batch, concatenated along dim 0; the scale repeats accordingly.
    """
    for name, v in (("n_pretrained", n_pretrained), ("n_finetuned", n_finetuned), ("cfg_copies", cfg_copies)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0:
            raise ValueError(f"{name} must be an int >= 0, got {v!r}")
    if cfg_copies < 1 or n_pretrained + n_finetuned < 1:
        raise ValueError("trajectory_scale needs cfg_copies >= 1 and at least one row")
    one = torch.cat([torch.zeros(n_pretrained, dtype=dtype, device=device),
                     torch.ones(n_finetuned, dtype=dtype, device=device)])
    return one.repeat(cfg_copies)
