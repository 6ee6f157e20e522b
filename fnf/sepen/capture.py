"""Cross-attention probability capture for Separate-and-Enhance.

:func:`install_capture` wraps the processor of every cross-attention module (``attn2``) of a diffusers UNet in a
:class:`CaptureAttnProcessor`. The wrapped processor still computes the layer's output, so the UNet's function
is unchanged whatever it is (diffusers' ``AttnProcessor2_0``/SDPA, or ``fnf_kernels.FusedLoRAAttnProcessor``
with its per-sample LoRA scale). Only while a :func:`capture` block is open, and only at the layers whose query
grid is the chosen resolution (default latent/4: the 16x16 layers of SD-1.x at 512^2), the wrapper also
recomputes Q and K through the same projections (the fused processor's own, so LoRA and its scale apply) and
takes P = softmax(Q K^T * scale) over all text tokens, in float32, for the first ``B_cap`` batch rows; it keeps
only the object maps ``P @ W^T`` (W: :func:`fnf.sepen.tokens.token_weights`, the mean of each word's token
maps), indexed by batch item and head explicitly. Gradients flow through them to to_q / to_k. Maps are averaged
over the captured layers: ``store.maps()`` is (B_cap, heads, k, h, w).

Install after ``fnf_kernels.patch_lora`` and remove (``remove_capture``) before ``unpatch_lora``.
"""
from __future__ import annotations

import contextlib

import torch

from fnf_kernels import FusedLoRAAttnProcessor


def map_size(latent_hw: tuple[int, int], downsample: int) -> tuple[int, int]:
    """(h, w) of the UNet level ``downsample`` times below the latent (stride-2 convs round up)."""
    if downsample < 1 or downsample & (downsample - 1):
        raise ValueError(f"downsample must be a power of two >= 1, got {downsample}")
    h, w = latent_hw
    while downsample > 1:
        h, w, downsample = (h + 1) // 2, (w + 1) // 2, downsample // 2
    return h, w


class AttentionStore:
    """What the capture processors write into: the running sum of object maps over the captured layers."""

    def __init__(self) -> None:
        self.weights = None
        self.size = None
        self._sum = None
        self.layers: list[str] = []

    @property
    def active(self) -> bool:
        return self.weights is not None

    def add(self, name: str, maps: torch.Tensor) -> None:
        if self._sum is not None and self._sum.shape != maps.shape:
            raise ValueError(f"capture: layer {name} gives maps of shape {tuple(maps.shape)} but earlier layers "
                             f"{self.layers} gave {tuple(self._sum.shape)}; capture layers with one head count")
        self._sum = maps if self._sum is None else self._sum + maps
        self.layers.append(name)

    def maps(self) -> torch.Tensor:
        """(B_cap, heads, k, h, w): the object maps averaged over the captured layers."""
        if self._sum is None:
            raise RuntimeError(f"capture: no cross-attention layer ran at resolution {self.size}; check "
                               "downsample against the UNet's levels and the latent size")
        b, heads, k, _ = self._sum.shape
        return (self._sum / len(self.layers)).reshape(b, heads, k, *self.size)


class CaptureAttnProcessor:
    """Runs ``inner`` unchanged; records the object maps at the chosen resolution while the store is armed."""

    def __init__(self, inner, store: AttentionStore, name: str) -> None:
        self.inner, self.store, self.name = inner, store, name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        if temb is not None:  # passed on only when given: not every processor takes temb
            kwargs["temb"] = temb
        out = self.inner(attn, hidden_states, *args, encoder_hidden_states=encoder_hidden_states,
                         attention_mask=attention_mask, **kwargs)
        store = self.store
        if store.active and encoder_hidden_states is not None:
            n = hidden_states.shape[2] * hidden_states.shape[3] if hidden_states.ndim == 4 else hidden_states.shape[1]
            if n == store.size[0] * store.size[1]:
                store.add(self.name, self.object_maps(attn, hidden_states, encoder_hidden_states, attention_mask,
                                                      temb, store.weights))
        return out

    def _project(self, attn, hidden_states, encoder_hidden_states):
        inner = self.inner
        if isinstance(inner, FusedLoRAAttnProcessor):  # its projections: LoRA through lora_linear, per-sample scale
            name = getattr(attn, "_fnf_name", "attention")
            (query,) = inner._project((attn.to_q,), f"{name}.q", hidden_states, f"{name}.to_q")
            (key,) = inner._project((attn.to_k,), f"{name}.k", encoder_hidden_states, f"{name}.to_k")
            return query, key
        return attn.to_q(hidden_states), attn.to_k(encoder_hidden_states)

    def object_maps(self, attn, hidden_states, encoder_hidden_states, attention_mask, temb, weights):
        """(B_cap, heads, k, Q): P[b, h] = softmax(Q_bh K_bh^T * scale) over tokens, times weights[b]^T."""
        # The same input preparation as AttnProcessor2_0 (and FusedLoRAAttnProcessor).
        if getattr(attn, "spatial_norm", None) is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        if hidden_states.ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        if getattr(attn, "group_norm", None) is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if getattr(attn, "norm_cross", None):
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        n_cap = weights.shape[0]
        if hidden_states.shape[0] < n_cap:
            raise ValueError(f"capture: {n_cap} rows to capture but the UNet batch has {hidden_states.shape[0]}")
        # Only the captured rows are projected again.
        query, key = self._project(attn, hidden_states[:n_cap], encoder_hidden_states[:n_cap])
        heads = attn.heads
        head_dim = key.shape[-1] // heads
        q = query.reshape(n_cap, -1, heads, head_dim).transpose(1, 2)       # (b, heads, Q, d)
        k = key.reshape(n_cap, -1, heads, head_dim).transpose(1, 2)         # (b, heads, T, d)
        if getattr(attn, "norm_q", None) is not None:
            q = attn.norm_q(q)
        if getattr(attn, "norm_k", None) is not None:
            k = attn.norm_k(k)
        logits = torch.einsum("bhqd,bhtd->bhqt", q.float(), k.float()) * attn.scale
        if attention_mask is not None:
            mask = attn.prepare_attention_mask(attention_mask, k.shape[2], hidden_states.shape[0])
            logits = logits + mask.view(hidden_states.shape[0], heads, -1, mask.shape[-1])[:n_cap].float()
        if weights.shape[-1] != logits.shape[-1]:
            raise ValueError(f"capture: token weights cover {weights.shape[-1]} tokens but the text has "
                             f"{logits.shape[-1]}")
        probs = logits.softmax(dim=-1)
        return torch.einsum("bhqt,bkt->bhkq", probs, weights.to(probs.dtype))


def _cross_attentions(unet):
    for name, module in unet.named_modules():
        if name.endswith("attn2") and hasattr(module, "processor") and hasattr(module, "to_k"):
            yield name, module


def install_capture(unet) -> AttentionStore:
    """Wrap every attn2 processor of ``unet``; returns the shared store (idempotent)."""
    store = getattr(unet, "_fnf_capture_store", None) or AttentionStore()
    count = 0
    for name, attn in _cross_attentions(unet):
        if not isinstance(attn.processor, CaptureAttnProcessor):
            attn.processor = CaptureAttnProcessor(attn.processor, store, name)
        count += 1
    if count == 0:
        raise ValueError("install_capture: the UNet has no cross-attention (attn2) modules")
    unet._fnf_capture_store = store
    return store


def remove_capture(unet) -> int:
    """Restore the wrapped processors; returns how many."""
    restored = 0
    for _, attn in _cross_attentions(unet):
        if isinstance(attn.processor, CaptureAttnProcessor):
            attn.processor = attn.processor.inner
            restored += 1
    if hasattr(unet, "_fnf_capture_store"):
        del unet._fnf_capture_store
    return restored


@contextlib.contextmanager
def capture(unet, weights: torch.Tensor, latent_hw: tuple[int, int], downsample: int = 4):
    """Arm the capture for one UNet call: the first ``weights.shape[0]`` rows of the batch, objects per
    ``weights`` (B_cap, k, T), at the layers of resolution ``map_size(latent_hw, downsample)``. Yields the store;
    read ``store.maps()`` after the call."""
    store = getattr(unet, "_fnf_capture_store", None)
    if store is None:
        raise RuntimeError("capture: call install_capture(unet) first")
    if weights.dim() != 3:
        raise ValueError(f"capture: weights must be (B, k, T), got shape {tuple(weights.shape)}")
    store.weights, store.size, store._sum, store.layers = weights, map_size(latent_hw, downsample), None, []
    try:
        yield store
    finally:
        store.weights = None
