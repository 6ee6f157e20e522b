"""Public reward and localizer models loaded from local files (no hub access), registered as built-in specs.

Each submodule registers its specs with :func:`fnf.rewards.register_reward` / ``register_heatmap`` when imported;
heavy dependencies (transformers, open_clip, onnxruntime) are imported only when a spec is built.
"""
from . import clip, hps, sd_safety, heatmaps  # noqa: F401  (registration)
