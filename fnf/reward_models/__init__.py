"""Public reward and localizer models loaded from local files (no hub access).

:data:`REWARDS` and :data:`HEATMAP_LOADERS` list the specs they provide; :mod:`fnf.rewards` registers them as
built-ins. Heavy dependencies (transformers, open_clip, onnxruntime) are imported only when a spec is built.
"""
from . import clip, heatmaps, hps, sd_safety

# spec name -> factory ``(**kwargs) -> reward`` (with its ``check(**kwargs)`` for preflight)
REWARDS = {"aesthetic": clip.aesthetic, "pickscore": clip.pickscore, "clipscore": clip.clipscore,
           "hpsv2": hps.hpsv2, "sd-safety": sd_safety.sd_safety}
# heatmap spec prefix -> (loader(path, **kwargs), check(path, **kwargs))
HEATMAP_LOADERS = {"torchscript": (heatmaps.torchscript_heatmap, heatmaps.check_torchscript)}
