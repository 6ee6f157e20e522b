"""fnf: the Focus-N-Fix training system (models, sampling, localization, rewards, objectives, train loop, CLI).

It uses :mod:`fnf_kernels` only through its public API.
"""

__version__ = "0.1.0"
