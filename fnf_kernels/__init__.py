"""fnf_kernels: fused kernels for Focus-N-Fix.

Ops (each with CUDA C++, Triton, CPU C++ and pure-torch reference backends behind one dispatcher):

* :func:`masked_frobenius_penalty` and the loss module :class:`MaskedFrobeniusPenalty`
* :func:`threshold_dilate`

``python -m fnf_kernels info`` shows which backends are active here.
"""
from . import reference
from .backends import BACKENDS, info
from .dilation import threshold_dilate
from .penalty import MaskedFrobeniusPenalty, masked_frobenius_penalty

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "MaskedFrobeniusPenalty",
    "info",
    "masked_frobenius_penalty",
    "reference",
    "threshold_dilate",
]
