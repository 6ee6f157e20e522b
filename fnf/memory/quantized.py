"""``model.quantize`` in the memory estimate: arithmetic on the traced model's own Linear layers, not a trace.

The trace runs the denoiser in ``model.weight_dtype`` (the quantized kernels do not run under FakeTensorMode).
A quantized frozen denoiser differs from it in one way that matters for the peak: its Linear weights are stored
in fewer bytes for the whole run. So the estimate with quantization is the traced peak, minus what the stored
Linear weights save, plus one Linear weight dequantized to the compute dtype (bitsandbytes' 4-bit matmul
dequantizes a layer's weight for each forward and backward; counting the largest one bounds that transient).
Bytes per element of a quantized weight, with its scales (diffusers' configs as fnf/quantize.py builds them):

* ``bnb-8bit`` (LLM.int8): 1 byte, plus one float32 scale per output row;
* ``bnb-4bit`` (NF4, no double quantization): 0.5 byte, plus one float32 absmax per block of 64;
* ``torchao-int8`` (int8 weight-only): 1 byte, plus one scale per output row in the weight dtype.

Every ``nn.Linear`` of the denoiser is counted as quantized (diffusers may keep a few small ones, e.g. the final
projection, in full precision: the saving is an upper bound by those few layers).
"""
from __future__ import annotations

import torch

NF4_BLOCK = 64


def stored_bytes(method: str, out_features: int, in_features: int, weight_dtype: torch.dtype) -> float:
    """Bytes a quantized (out, in) Linear weight takes with its scales."""
    n = out_features * in_features
    if method == "bnb-8bit":
        return n + 4 * out_features
    if method == "bnb-4bit":
        return n / 2 + 4 * -(-n // NF4_BLOCK)
    if method == "torchao-int8":
        return n + torch.empty((), dtype=weight_dtype).element_size() * out_features
    raise ValueError(f"model.quantize: expected bnb-8bit, bnb-4bit or torchao-int8, got {method!r}")


def adjustment(denoiser: torch.nn.Module, method: str, compute_dtype: torch.dtype) -> dict:
    """What quantizing ``denoiser``'s Linear weights changes: {"method", "linear_layers", "linear_weight_bytes"
    (as traced), "stored_bytes" (quantized, with scales), "saved_bytes", "transient_bytes" (the largest layer
    dequantized to ``compute_dtype``)}."""
    linears = [m for m in denoiser.modules() if isinstance(m, torch.nn.Linear)]
    traced = sum(m.weight.numel() * m.weight.element_size() for m in linears)
    stored = sum(stored_bytes(method, m.out_features, m.in_features, m.weight.dtype) for m in linears)
    size = torch.empty((), dtype=compute_dtype).element_size()
    transient = max((m.weight.numel() * size for m in linears), default=0)
    return {"method": method, "linear_layers": len(linears), "linear_weight_bytes": int(traced),
            "stored_bytes": int(stored), "saved_bytes": int(traced - stored), "transient_bytes": int(transient)}


def quantized_peak(traced_peak: int, adj: dict) -> int:
    """The estimate with the quantized denoiser: the traced peak - the saving + one dequantized layer."""
    return int(traced_peak - adj["saved_bytes"] + adj["transient_bytes"])
