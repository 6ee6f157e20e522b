"""The trainer: build once from a Config, then the loop (fnf/train/trainer.py reads top to bottom).

* :mod:`~fnf.train.trainer`: :class:`Session` (the build steps, one optimizer step) and :func:`train` (the loop);
* :mod:`~fnf.train.distributed`: what accelerate cannot do for this loop, and why;
* :mod:`~fnf.train.placement`: where the model parts go (the text encoders before the denoiser, or not);
* :mod:`~fnf.train.checkpoint`, :mod:`~fnf.train.run_dir`: crash-safe checkpoints, the run's output folder;
* :mod:`~fnf.train.fused_lora`, :mod:`~fnf.train.vae_memory`: memory levers (fused LoRA attention, VAE decode).

The objectives (what a micro-batch's loss is) live in fnf/objectives/, handed a frozen
:class:`~fnf.objectives.base.Context`.
"""
from .trainer import Session, TrainResult, make_accelerator, step_seed, train

__all__ = ["Session", "TrainResult", "make_accelerator", "step_seed", "train"]
