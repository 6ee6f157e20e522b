"""Training objectives (:class:`~fnf.objectives.base.Objective`): what a micro-batch's loss is and what a run exports.

* :class:`~fnf.objectives.focus_n_fix.FocusNFix`: DRaFT-K with the Focus-N-Fix region penalty (beta = 0: DRaFT);
* :class:`~fnf.objectives.sepen.SeparateAndEnhance`: Separate-and-Enhance on the cross-attention keys (fnf/sepen/);
* :class:`~fnf.objectives.grpo.GRPO`: group-relative policy optimisation with the Focus-N-Fix region term (any
  reward, no gradient needed).

``objective.name`` in the config picks one (:func:`objective_class`). The trainer (fnf/train/) creates the
trainable parameters with ``cls.add_params(cfg, model, probe)``, builds the objective once as ``cls(cfg, ctx)``
with a frozen :class:`~fnf.objectives.base.Context`, and calls ``loss(generator)`` (a
:class:`~fnf.objectives.base.StepOutput`) per micro-batch.
"""
from __future__ import annotations

from .base import Context, Objective, StepOutput
from .focus_n_fix import FocusNFix
from .grpo import GRPO
from .penalty import focus_n_fix_loss, region_penalty
from .sepen import SeparateAndEnhance

__all__ = ["Context", "Objective", "StepOutput", "focus_n_fix_loss", "objective_class", "region_penalty"]


def objective_class(name: str) -> type:
    """The Objective class of ``objective.name``."""

    classes = {"fnf": FocusNFix, "sepen": SeparateAndEnhance, "grpo": GRPO}
    if name not in classes:
        raise ValueError(f"objective.name must be one of {', '.join(classes)}, got {name!r}")
    return classes[name]
