"""A counter of live device-storage bytes: a TorchDispatchMode that sees every tensor an op returns.

Storages are tracked through weak references to their (preserved) Python objects, so a storage counts from
the op that first returned it until the last tensor viewing it dies -- what the CUDA caching allocator
reports as allocated, with its 512-byte rounding. It works the same on real and on fake tensors.

Storages can be marked host-resident (an offloaded text encoder, a model built on the host before it moves):
they are then not counted. Every storage carries the phase label that was current when it appeared, so the
bytes live at the peak split exactly by phase.
"""
from __future__ import annotations

import contextlib
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

ROUND = 512  # the CUDA caching allocator rounds every block up to a multiple of 512 bytes


def rounded(nbytes: int, to: int = ROUND) -> int:
    return -(-int(nbytes) // to) * to if nbytes > 0 else 0


class _Entry:
    __slots__ = ("nbytes", "phase", "host")

    def __init__(self, nbytes: int, phase: str, host: bool):
        self.nbytes, self.phase, self.host = nbytes, phase, host


class StorageCounter(TorchDispatchMode):
    """Live and peak bytes of device storages, by the phase that allocated them.

    ``phase(name)`` labels what is allocated inside; ``host()`` marks allocations inside as host-resident;
    ``register(tensors, phase)`` counts tensors that existed before the counter; ``place(tensors, on_device)``
    moves existing storages between device (counted) and host (not counted)."""

    def __init__(self, scalar_answers: bool = False, round_to: int = ROUND):
        super().__init__()
        self.round_to = round_to
        self._entries = WeakIdKeyDictionary()
        self.live = 0
        self.peak = 0
        self.by_phase: dict[str, int] = {}      # live bytes by allocating phase
        self.peak_by_phase: dict[str, int] = {}  # by_phase at the moment of the peak
        self.peak_phase = ""                     # the current phase when the peak was reached
        self.phase_name = "other"
        self.phase_stats: dict[str, dict] = {}   # name -> {"entry": live at first entry, "peak": max live inside}
        self._host_depth = 0
        self.scalar_answers = scalar_answers     # answer .item() on fake tensors (see _scalar)

    # ------------------------------------------------------------------ bookkeeping
    def _add(self, storage, phase: str, host: bool) -> None:
        if storage in self._entries:
            return
        entry = _Entry(rounded(storage.nbytes(), self.round_to), phase, host)
        self._entries[storage] = entry
        if not host:
            self._count(entry, +1)
        weakref.finalize(storage, self._freed, entry)

    def _freed(self, entry: _Entry) -> None:
        if not entry.host:
            self._count(entry, -1)

    def _count(self, entry: _Entry, sign: int) -> None:
        self.live += sign * entry.nbytes
        self.by_phase[entry.phase] = self.by_phase.get(entry.phase, 0) + sign * entry.nbytes
        if sign > 0:
            stats = self.phase_stats.setdefault(self.phase_name, {"entry": self.live - entry.nbytes, "peak": 0})
            stats["peak"] = max(stats["peak"], self.live)
            if self.live > self.peak:
                self.peak = self.live
                self.peak_phase = self.phase_name
                self.peak_by_phase = {k: v for k, v in self.by_phase.items() if v}

    @staticmethod
    def _storages(tensors):
        """Storages of the tensors among ``tensors`` (true meta tensors hold no memory; fake ones report a
        meta storage but stand for device memory)."""
        for t in tree_leaves(tensors):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                yield t.untyped_storage()

    def register(self, tensors, phase: str, on_device: bool = True) -> None:
        for s in self._storages(tensors):
            self._add(s, phase, host=not on_device)

    def place(self, tensors, on_device: bool, label: str | None = None) -> None:
        """Existing storages now live on the device (counted) or on the host (not counted); ``label``
        renames the phase they are counted under."""
        for s in self._storages(tensors):
            entry = self._entries.get(s)
            if entry is None:
                self._add(s, label or self.phase_name, host=not on_device)
                continue
            if not entry.host:
                self._count(entry, -1)
            entry.host = not on_device
            entry.phase = label or entry.phase
            if not entry.host:
                self._count(entry, +1)

    def bytes_by_phase(self, tensors) -> dict[str, int]:
        """Counted bytes of the distinct storages of ``tensors``, by the phase that allocated them."""
        out: dict[str, int] = {}
        seen = set()
        for s in self._storages(tensors):
            entry = self._entries.get(s)
            if entry is not None and not entry.host and id(entry) not in seen:
                seen.add(id(entry))
                out[entry.phase] = out.get(entry.phase, 0) + entry.nbytes
        return out

    @contextlib.contextmanager
    def phase(self, name: str):
        before = self.phase_name
        self.phase_name = name
        self.phase_stats.setdefault(name, {"entry": self.live, "peak": self.live})
        try:
            yield
        finally:
            self.phase_name = before

    @contextlib.contextmanager
    def host(self):
        self._host_depth += 1
        try:
            yield
        finally:
            self._host_depth -= 1

    # ------------------------------------------------------------------ dispatch
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.scalar_answers and func is torch.ops.aten._local_scalar_dense.default:
            return _scalar(args[0])
        out = func(*args, **kwargs)
        host = self._host_depth > 0
        for storage in self._storages(out):
            self._add(storage, self.phase_name, host)
        return out


def _scalar(t: torch.Tensor):
    """An answer for ``.item()`` on a fake tensor: its constant when it has one, else a harmless value that
    keeps the trainer on its normal path (True for flags such as isfinite, 0 for numbers: a finite loss, a
    finite gradient norm, prompt index 0)."""
    constant = getattr(t, "constant", None)
    if constant is not None:
        return constant.item()
    if t.dtype == torch.bool:
        return True
    return 0.0 if t.dtype.is_floating_point else 0
