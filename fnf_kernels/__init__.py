"""fnf_kernels: fused kernels for Focus-N-Fix.

Ops (each with CUDA C++, Triton, CPU C++ and pure-torch reference backends behind one dispatcher):

* :func:`masked_frobenius_penalty` and the loss module :class:`MaskedFrobeniusPenalty`
* :func:`threshold_dilate`
* :func:`lora_linear` (LoRA-fused linear, per-sample scale; Triton, plain torch and reference backends) and
  the diffusers LoRA attention: :class:`FusedLoRAAttnProcessor`, :func:`patch_lora`, :func:`unpatch_lora`,
  :func:`lora_scale`, :func:`trajectory_scale`
* the Separate-and-Enhance attention losses :func:`separate_loss`, :func:`enhance_loss` and both at once,
  :func:`separate_enhance_losses` (fused Triton kernel and torch reference)
* :func:`group_norm_silu` and :func:`rms_norm_silu`: a normalisation and its SiLU as one op whose backward keeps
  only the input and the statistics (CUDA C++, Triton and a chunked plain-torch op)

``python -m fnf_kernels info`` shows which backends are active here and ``python -m fnf_kernels selftest``
checks each of them against the float64 references on this machine; :func:`select_backend` (op, backend,
device, dtype, batch) is the one function every op uses to pick its backend. :mod:`fnf_kernels.references`
holds the reference (the spec) of every op (``fnf_kernels.reference`` is its old name).

Triton reads TRITON_INTERPRET when fnf_kernels is imported: set it before the import to run the Triton
kernels on CPU tensors.
"""
from . import reference, references
from .attention_losses import enhance_loss, separate_enhance_losses, separate_loss
from .backends import BACKENDS, info, select as select_backend
from .dilation import threshold_dilate
from .lora import lora_linear
from .lora_attention import FusedLoRAAttnProcessor, lora_scale, patch_lora, trajectory_scale, unpatch_lora
from .norm_silu import group_norm_silu, rms_norm_silu
from .penalty import MaskedFrobeniusPenalty, masked_frobenius_penalty

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "FusedLoRAAttnProcessor",
    "MaskedFrobeniusPenalty",
    "enhance_loss",
    "group_norm_silu",
    "info",
    "lora_linear",
    "lora_scale",
    "masked_frobenius_penalty",
    "patch_lora",
    "reference",
    "references",
    "rms_norm_silu",
    "separate_enhance_losses",
    "select_backend",
    "separate_loss",
    "threshold_dilate",
    "trajectory_scale",
    "unpatch_lora",
]
