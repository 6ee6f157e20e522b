"""What accelerate does not do for this loop, and why. Everything else in the trainer is accelerate's own API:
``backward`` (the division by the accumulation steps; ``accumulate()`` would only skip DDP's gradient sync, and
there is no DDP model here), ``clip_grad_norm_``, ``reduce`` (the logged stats, the gradient mean below),
``set_trigger`` / ``check_trigger`` (a non-finite loss or gradient on any process), ``broadcast``,
``wait_for_everyone``, ``print`` and the trackers (``log_with``).

* The model wrapper. accelerate broadcasts the parameters and averages the gradients through DDP's wrapper
  (``prepare(model)``), which hooks one forward and one backward of the wrapped module. A step here runs K
  grad-carrying denoiser calls and an adapters-off pass through the same module, and under FSDP2 the LoRA is
  replicated beside the sharded base (``ignored_params``), outside any wrapper. So rank 0's trained parameters
  are broadcast once (accelerate's ``broadcast``), and the trained gradients go into one flat buffer that
  ``accelerator.reduce(..., "mean")`` averages (all-reduce SUM, then / processes) before clipping.
* Mixed precision and the fp16 grad scaler. accelerate makes neither an fp16 autocast nor a GradScaler on a CPU
  device (where the tests and the toy demo run), swaps in FSDP's ShardedGradScaler under FSDP, and takes its
  precision from ``accelerate launch`` rather than ``memory.mixed_precision`` (half weights need autocast,
  whatever the launch says). So the autocast dtype and the GradScaler are the trainer's, in every checkpoint,
  and an accelerate scaler set by the launch is dropped (it would scale the loss a second time).
* The skip decision: a step whose loss or gradient is non-finite on any process is skipped on all of them;
  with the fp16 scaler that is its own overflow (no step, the scale backed off; ``scaler_overflow``,
  ``grad_scale`` and ``skip_reason`` in the log), which accelerate's optimizer wrapper would not report.
"""
from __future__ import annotations

import torch
from accelerate.utils import broadcast

AUTOCAST = {"fp16": torch.float16, "bf16": torch.bfloat16}


def autocast_dtype(cfg) -> torch.dtype | None:
    """memory.mixed_precision of a resolved config (fnf/precision.py); half-precision weights need autocast in
    their dtype when it is 'no'."""
    mp = cfg.memory.mixed_precision
    if "auto" in (mp, cfg.model.weight_dtype):
        raise ValueError("precision 'auto' must be resolved for the device first (fnf.precision.resolve)")
    if mp == "no" and cfg.model.weight_dtype != "fp32":
        mp = cfg.model.weight_dtype
    return AUTOCAST.get(mp)


def grad_scaler(acc, dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """The trainer's GradScaler (on for fp16 autocast); an accelerate scaler from the launch is dropped."""
    if getattr(acc, "scaler", None) is not None:
        acc.scaler = None
    return torch.amp.GradScaler(acc.device.type, enabled=dtype == torch.float16)


def broadcast_params(params, world: int) -> None:
    """Every process starts from rank 0's trained parameters."""
    if world > 1:
        with torch.no_grad():
            broadcast([p.data for p in params], from_process=0)


def average_gradients(acc, params, world: int) -> None:
    """Give every trained parameter a gradient (zeros where none flowed) and average them over the processes."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if world == 1:
        return
    flat = acc.reduce(torch.cat([p.grad.flatten() for p in params]), reduction="mean")
    offset = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[offset:offset + n].view_as(p))
        offset += n
