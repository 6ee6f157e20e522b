"""Which (device, backend) pairs the tests can run here."""
import importlib.util

import torch

from fnf_kernels.backends import availability

TRITON_MODULES = ("fnf_kernels.triton_kernels.penalty", "fnf_kernels.triton_kernels.dilation")


def _triton_ready() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in TRITON_MODULES)


def runnable() -> list[tuple[str, str]]:
    """(device, backend) pairs other than the reference that are usable on this machine."""
    pairs = []
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        for name, (ok, _) in availability(device).items():
            if not ok or name == "reference":
                continue
            if name == "triton" and not _triton_ready():
                continue
            pairs.append((device, name))
    return pairs


def ids(pairs):
    return [f"{d}-{b}" for d, b in pairs]
