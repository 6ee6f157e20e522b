"""What a CUDA run would do differently from the CPU trace, imitated above autograd.

* Autocast: CUDA's autocast runs a list of ops in float32 (``autocast_mode.cpp``, the ``fp32`` and
  ``fp32_set_opt_dtype`` policies) where CPU autocast keeps bfloat16/float16 (group_norm, layer_norm,
  softmax,
  upsampling, exp, pow, norms, ...). Inside an autocast region with a half-precision input these ops get
  float32 inputs (or ``dtype=float32``) and run with autocast off, as on CUDA: autograd then saves float32
  tensors, and backward and checkpoint recomputation (which restores the autocast state) see the same.
* Attention: ``scaled_dot_product_attention`` runs the backend the GPU would choose for the shapes and dtypes:
  flash (sm80+, half precision, head dim <= 256, no mask) or memory-efficient (float32, a mask, larger head dims,
  GPUs before sm80) save the output and a float32 logsumexp; the math backend (float64, head dims that are not
  multiples of 8) materialises B*H*L^2 scores. CPU's flash kernel saves the same as CUDA's; the math case
  is run as the math op.
* The GPU imitated (``GPUS``, ``fnf estimate-memory --gpu``): its compute capability decides the attention backend
  and what ``auto`` precision resolves to (fnf/precision.py: bf16 from sm80, else fp16).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class GPU:
    title: str
    capability: tuple[int, int]
    memory_gib: int     # the common (largest) memory size

    def describe(self, name: str) -> str:
        return f"{self.title} (sm_{self.capability[0]}{self.capability[1]}, {self.memory_gib} GB; --gpu {name})"


GPUS = {
    "h100": GPU("H100", (9, 0), 80), "a100": GPU("A100", (8, 0), 80), "4090": GPU("RTX 4090", (8, 9), 24),
    "3090": GPU("RTX 3090", (8, 6), 24), "t4": GPU("T4", (7, 5), 16), "v100": GPU("V100", (7, 0), 32),
}
DEFAULT_GPU = "h100"    # an 80 GB bf16 card: what `auto` precision resolves to there is fnf's default
FLASH_CAPABILITY = (8, 0)   # torch's flash SDPA kernel (FlashAttention-2) needs sm80+


def gpu(name: str) -> GPU:
    if name not in GPUS:
        raise ValueError(f"--gpu: unknown GPU {name!r}; expected one of {', '.join(GPUS)}")
    return GPUS[name]

# CUDA autocast fp32 policy (torch >= 2.1, autocast_mode.cpp, unchanged through 2.13 for these ops).
CUDA_FP32_OPS = frozenset({
    "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal", "rsqrt",
    "sinh", "tan", "pow", "__pow__", "__rpow__", "pow_", "softplus", "layer_norm", "group_norm", "norm",
    "nuclear_norm", "cosine_similarity", "poisson_nll_loss", "cosine_embedding_loss", "nll_loss",
    "hinge_embedding_loss", "kl_div", "l1_loss", "smooth_l1_loss", "huber_loss", "mse_loss",
    "margin_ranking_loss", "multilabel_margin_loss", "soft_margin_loss", "triplet_margin_loss",
    "multi_margin_loss", "binary_cross_entropy_with_logits", "dist", "pdist", "cdist", "renorm", "logsumexp",
    "interpolate", "upsample", "upsample_nearest", "upsample_bilinear",
})
# fp32_set_opt_dtype: run with dtype=float32 (the input is not copied; the output is float32).
CUDA_FP32_DTYPE_OPS = frozenset({"softmax", "log_softmax", "cumsum", "cumprod", "prod", "sum", "vector_norm"})
HALF = (torch.float16, torch.bfloat16)
MIN_TORCH = (2, 1)


def torch_supported(version: str = torch.__version__) -> bool:
    major, minor = (int(x) for x in version.split("+")[0].split(".")[:2])
    return (major, minor) >= MIN_TORCH


def _half_tensors(args, kwargs) -> bool:
    leaves = [*args, *kwargs.values()]
    return any(isinstance(a, torch.Tensor) and a.dtype in HALF for a in leaves)


def _to_fp32(x):
    if isinstance(x, torch.Tensor) and x.dtype in HALF:
        return x.float()
    if isinstance(x, (list, tuple)):
        return type(x)(_to_fp32(v) for v in x)
    return x


def gpu_attention_backend(q: torch.Tensor, k: torch.Tensor, attn_mask, capability=(9, 0)) -> str:
    """flash | efficient | math: the SDPA backend torch picks on a GPU of ``capability`` (torch 2.x priority
    order: flash on sm80+ for half precision, head dim <= 256 and no mask; else memory-efficient for head dims
    that are multiples of 8 in float32/half; else math)."""
    head = q.shape[-1]
    if (tuple(capability) >= FLASH_CAPABILITY and q.dtype in HALF and attn_mask is None and head <= 256
            and head % 8 == 0 and k.shape[-1] == head):
        return "flash"
    if q.dtype != torch.float64 and head % 8 == 0:
        return "efficient"
    return "math"


def _targets() -> list[tuple[object, str, str]]:
    """(namespace, attribute, policy) of the callables to imitate; policy fp32 | dtype | attention."""
    out = []
    for ns in (F, torch, torch.Tensor, torch.linalg, torch.special):
        for name in CUDA_FP32_OPS:
            if hasattr(ns, name):
                out.append((ns, name, "fp32"))
        for name in CUDA_FP32_DTYPE_OPS:
            if hasattr(ns, name):
                out.append((ns, name, "dtype"))
    out.append((F, "scaled_dot_product_attention", "attention"))
    return out


def _autocast_half() -> bool:
    return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") in HALF


class CudaRules:
    """Imitate CUDA autocast's float32 ops and the GPU's attention backend in a CPU trace (a context).

    The callables are replaced in their namespaces (torch, torch.nn.functional, torch.Tensor, torch.linalg)
    for the duration: a TorchFunctionMode would not see the forward recomputed by activation checkpointing,
    which runs inside ``backward`` (a torch function that pops the mode). Restored on exit."""

    def __init__(self, capability=(9, 0)):
        self.capability = tuple(capability)
        self.backends: dict[str, int] = {}
        self._saved: list[tuple[object, str, object]] = []

    def __enter__(self):
        for ns, name, policy in _targets():
            original = getattr(ns, name)
            self._saved.append((ns, name, original))
            setattr(ns, name, self._wrap(original, policy))
        return self

    def __exit__(self, *exc):
        for ns, name, original in reversed(self._saved):
            setattr(ns, name, original)
        self._saved.clear()
        return False

    def _wrap(self, fn, policy: str):
        if policy == "attention":
            def attention(*args, **kwargs):
                return self._attention(fn, args, kwargs)
            return attention

        def imitated(*args, **kwargs):
            if not _autocast_half() or not _half_tensors(args, kwargs):
                return fn(*args, **kwargs)
            if policy == "fp32":
                with torch.autocast("cpu", enabled=False):
                    return fn(*_to_fp32(args), **{k: _to_fp32(v) for k, v in kwargs.items()})
            if kwargs.get("dtype") is not None:
                return fn(*args, **kwargs)
            with torch.autocast("cpu", enabled=False):
                return fn(*args, **{**kwargs, "dtype": torch.float32})

        imitated.__name__ = getattr(fn, "__name__", "imitated")
        return imitated
    def _attention(self, func, args, kwargs):
        # positional or keyword (diffusers' attention dispatcher passes query=, key=, value=)
        extra = {**dict(zip(("query", "key", "value", "attn_mask", "dropout_p", "is_causal"), args)), **kwargs}
        q, k, v = extra["query"], extra["key"], extra["value"]
        backend = gpu_attention_backend(q, k, extra.get("attn_mask"), self.capability)
        self.backends[backend] = self.backends.get(backend, 0) + 1
        if backend != "math":
            return func(*args, **kwargs)
        if torch.is_autocast_enabled("cpu"):  # SDPA is a lower-precision autocast op
            dtype = torch.get_autocast_dtype("cpu")
            q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        with torch.autocast("cpu", enabled=False):
            return torch.ops.aten._scaled_dot_product_attention_math(
                q, k, v, extra.get("attn_mask"), extra.get("dropout_p", 0.0), extra.get("is_causal", False),
                scale=kwargs.get("scale"))[0]
