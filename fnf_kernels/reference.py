"""Old name of :mod:`fnf_kernels.references` (the references of every op), kept so existing imports work."""
from .references import *  # noqa: F401,F403
from .references import __all__  # noqa: F401
