"""Separate-and-Enhance (Bao et al. 2024): compositional fine-tuning of the cross-attention key projections.

The trainer objective is :class:`fnf.objectives.sepen.SeparateAndEnhance`; this package holds its parts:

* :mod:`fnf.sepen.tokens`: object words -> token positions (tokenizer-based, multi-token words) -> weights
* :mod:`fnf.sepen.capture`: cross-attention probabilities softmax(QK^T * scale) at one resolution, per sample,
  head and object, through an attention processor wrapping the installed one (SDPA or fnf_kernels' fused LoRA)
* :mod:`fnf.sepen.evaluate`: success rate of two-object prompts given an attribute classifier
The losses themselves are ``fnf_kernels.separate_loss`` / ``enhance_loss`` / ``separate_enhance_losses``.
"""
