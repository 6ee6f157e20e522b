"""Training checkpoints: crash-safe writes, no pickle, exact resume, pruning of this run's checkpoints only.

A checkpoint is a folder ``<out>/checkpoints/step-0000100`` holding

- ``lora.safetensors``: the trainable tensors (LoRA, or sepen's to_k weights);
- ``training_state.safetensors`` + ``training_state.json``: optimizer, lr-schedule and grad-scaler states,
  tensors in the first, everything else (param groups, scalars) in the second;
- ``rng-<rank>.safetensors`` + ``rng-<rank>.json``: torch/CUDA RNG states (uint8 tensors) and python's and
  numpy's MT19937 states of every process;
- ``state.json``, written last: format, step, run id (fnf/train/run_dir.py), world size, and the run's
  resolved precision (weight_dtype, mixed_precision; fnf/precision.py), which a resume keeps.

Nothing is pickled. Checkpoints of older fnf versions (``optimizer.pt``, ``rng-<rank>.pt``) still load, with
``torch.load(..., weights_only=True)``.

Writing: every file goes to ``.tmp-step-N`` beside the final folder and is fsynced, then ``state.json``,
then the folder. An existing ``step-N`` is first renamed to ``.old-step-N``, the new folder renamed into
place, the parent fsynced, and only then the old one removed: at every instant a complete ``step-N`` or
``.old-step-N`` exists. Readers ignore ``.tmp-*`` and ``.del-*`` folders and take ``.old-step-N`` as step N
when ``step-N`` is missing (a crash between the two renames; :func:`recover`, run when a run starts,
renames it back). Pruning renames a checkpoint to ``.del-*``
before deleting it, and only touches checkpoints whose run id is this run's.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
import time

import numpy as np
import torch
from safetensors.torch import load_file, save_file

FORMAT = 2
STEP_DIR = re.compile(r"^(?:\.old-)?step-(\d+)$")
PAUSE_ENV = "FNF_CHECKPOINT_TEST_PAUSE"


def _dist():
    import torch.distributed as dist
    return dist if dist.is_available() and dist.is_initialized() else None


def _barrier():
    d = _dist()
    if d is not None:
        d.barrier()


def _stage(name: str, what: str = "") -> None:
    """Fault-test hook: with $FNF_CHECKPOINT_TEST_PAUSE=<seconds> set, announce each stage of a write on
    stderr and wait there, so that tests/train/test_checkpoint_faults.py can kill the process inside it."""
    pause = os.environ.get(PAUSE_ENV)
    if pause:
        print(f"fnf-checkpoint-stage {name} {what}", file=sys.stderr, flush=True)
        time.sleep(float(pause))


# ---------------------------------------------------------------------------------------- durable files
def fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str) -> None:
    """Make renames and new entries in ``path`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json(path: str, data) -> None:
    """Write JSON to ``path`` and fsync it (not atomic: callers write into a temp folder or rename)."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())


def replace_json(path: str, data) -> None:
    """Atomically replace ``path`` with JSON ``data`` (temp file beside it, fsync, rename, fsync folder)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    write_json(tmp, data)
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


# ---------------------------------------------------------------------------------------- state without pickle
def encode(obj, tensors: dict, path: str = "s"):
    """A JSON-able copy of ``obj`` whose tensors are moved into ``tensors`` (placeholders mark them);
    tuples and dicts with non-string keys are tagged so that :func:`decode` rebuilds them exactly."""
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().to("cpu", copy=True).contiguous()
        return {"__tensor__": path}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: encode(v, tensors, f"{path}.{k}") for k, v in obj.items()}
        if not all(isinstance(k, (str, int, float, bool)) or k is None for k in obj):
            raise TypeError(f"checkpoint state {path}: dict keys must be str/int/float/bool/None, got {list(obj)[:3]}")
        return {"__items__": [[k, encode(v, tensors, f"{path}.{k}")] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [encode(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    if isinstance(obj, (str, bool, int, float)) or obj is None:
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"checkpoint state {path}: cannot store a {type(obj).__name__} without pickle")


def decode(obj, tensors: dict):
    if isinstance(obj, list):
        return [decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__tuple__" in obj:
            return tuple(decode(v, tensors) for v in obj["__tuple__"])
        if "__items__" in obj:
            return {k: decode(v, tensors) for k, v in obj["__items__"]}
        return {k: decode(v, tensors) for k, v in obj.items()}
    return obj


def save_state(stem: str, obj) -> list[str]:
    """Write ``obj`` as ``<stem>.safetensors`` + ``<stem>.json`` (both fsynced); returns the file names."""
    tensors: dict[str, torch.Tensor] = {}
    meta = encode(obj, tensors)
    save_file(tensors, stem + ".safetensors")
    fsync_file(stem + ".safetensors")
    write_json(stem + ".json", meta)
    return [os.path.basename(stem) + ".safetensors", os.path.basename(stem) + ".json"]


def load_state(stem: str, device="cpu"):
    with open(stem + ".json", encoding="utf-8") as f:
        meta = json.load(f)
    return decode(meta, load_file(stem + ".safetensors", device=str(device)))


# ---------------------------------------------------------------------------------------- RNG
def rng_state() -> dict:
    name, key, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [name, key.tolist(), int(pos), int(has_gauss), float(gauss)],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    numpy_state = state["numpy"]
    name, key, pos, has_gauss, cached = numpy_state
    np.random.set_state((name, np.asarray(key, dtype=np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


# ---------------------------------------------------------------------------------------- reading
def read_meta(folder: str) -> dict | None:
    """``state.json`` of a checkpoint folder, or None when it is missing or unreadable (incomplete)."""
    try:
        with open(os.path.join(folder, "state.json"), encoding="utf-8") as f:
            meta = json.load(f)
        int(meta["step"])
        return meta
    except (OSError, ValueError, KeyError, TypeError):
        return None


def list_checkpoints(root: str, run_id: str | None = None) -> list[tuple[int, str]]:
    """Complete checkpoints under ``root`` as sorted (step, folder); only run ``run_id``'s when given.

    ``.old-step-N`` stands in for step N when ``step-N`` is missing; temp and deleted folders are ignored."""
    if not os.path.isdir(root):
        return []
    found: dict[int, str] = {}
    for name in sorted(os.listdir(root), key=lambda n: n.startswith(".old-")):  # step-N before .old-step-N
        m = STEP_DIR.match(name)
        if not m or int(m.group(1)) in found:
            continue
        folder = os.path.join(root, name)
        meta = read_meta(folder)
        if meta is None or (run_id is not None and meta.get("run_id") != run_id):
            continue
        found[int(m.group(1))] = folder
    return sorted(found.items())


def read(folder: str, *, rank: int = 0, device="cpu") -> dict:
    """Everything in a checkpoint, without side effects: step, run_id, lora, training_state, rng."""
    meta = read_meta(folder)
    if meta is None:
        raise FileNotFoundError(f"{folder!r}: not a complete checkpoint folder (no readable state.json)")
    lora = load_file(os.path.join(folder, "lora.safetensors"), device=str(device))
    if "format" in meta:
        training_state = load_state(os.path.join(folder, "training_state"))
        stem = os.path.join(folder, f"rng-{rank}")
        if not os.path.isfile(stem + ".json"):
            stem = os.path.join(folder, "rng-0")
        rng = load_state(stem)
    else:  # written before format 2: pickles, loaded without running code
        training_state = torch.load(os.path.join(folder, "optimizer.pt"), map_location="cpu", weights_only=True)
        rng_file = os.path.join(folder, f"rng-{rank}.pt")
        if not os.path.isfile(rng_file):
            rng_file = os.path.join(folder, "rng-0.pt")
        rng = _load_legacy_rng(rng_file)
    return {"step": int(meta["step"]), "run_id": meta.get("run_id"), "lora": lora,
            "training_state": training_state, "rng": rng}


def _load_legacy_rng(path: str) -> dict:
    try:  # numpy >= 2
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct
    allowed = [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    with torch.serialization.safe_globals(allowed):
        state = torch.load(path, weights_only=True)
    name, key, pos, has_gauss, cached = state["numpy"]
    state["numpy"] = [name, np.asarray(key).tolist(), int(pos), int(has_gauss), float(cached)]
    return state


def load(folder: str, *, rank: int, device="cpu") -> tuple[int, dict, dict]:
    """Return (step, lora tensors, training state) and restore this process's RNG state.

    Training-state tensors stay on the CPU: ``optimizer.load_state_dict`` moves them next to their parameters
    (and keeps AdamW's ``step`` on the CPU, where it was)."""
    ck = read(folder, rank=rank, device=device)
    set_rng_state(ck["rng"])
    return ck["step"], ck["lora"], ck["training_state"]


# ---------------------------------------------------------------------------------------- writing
def _is_ours(folder: str, run_id: str | None) -> bool:
    meta = read_meta(folder)
    return meta is not None and meta.get("run_id") == run_id


def _remove(root: str, folder: str) -> None:
    """Delete a checkpoint folder: first renamed to ``.del-*`` (atomic), so a half-deleted one never lists."""
    trash = os.path.join(root, f".del-{os.path.basename(folder).lstrip('.')}-{os.getpid()}-{time.time_ns()}")
    os.replace(folder, trash)
    fsync_dir(root)
    _stage("deleting", os.path.basename(folder))
    shutil.rmtree(trash, ignore_errors=True)


def prune(root: str, run_id: str | None, keep: int) -> list[str]:
    """Remove all but the newest ``keep`` checkpoints of run ``run_id`` (others' are never touched) and
    leftover ``.del-*`` folders; returns the removed folders."""
    removed = []
    if keep > 0:
        for _, folder in list_checkpoints(root, run_id)[:-keep]:
            _remove(root, folder)
            removed.append(folder)
    for name in os.listdir(root):
        if name.startswith(".del-"):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    return removed


def save(root: str, step: int, lora: dict[str, torch.Tensor], training_state: dict, *, rank: int,
         is_main: bool, keep: int = 0, run_id: str | None = None, world_size: int = 1,
         precision: dict | None = None) -> str:
    """Write checkpoint ``step`` of run ``run_id`` (all processes call this; each writes its RNG state),
    then prune to the newest ``keep`` of this run (0 keeps all). ``precision``: the run's resolved
    weight_dtype / mixed_precision, kept in state.json (a resume keeps them)."""
    name = f"step-{step:07d}"
    final, tmp, old = (os.path.join(root, n) for n in (name, f".tmp-{name}", f".old-{name}"))
    if is_main:
        if os.path.isdir(final) and read_meta(final) is not None and not _is_ours(final, run_id):
            raise FileExistsError(f"{final} belongs to another run (run id {read_meta(final).get('run_id')!r}, "
                                  f"this run {run_id!r}); not replacing it: move it away and resume")
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a write of ours that never completed
        os.makedirs(tmp)
    _barrier()
    save_state(os.path.join(tmp, f"rng-{rank}"), rng_state())
    _barrier()
    if is_main:
        save_file({k: v.detach().cpu().contiguous() for k, v in lora.items()}, os.path.join(tmp, "lora.safetensors"))
        fsync_file(os.path.join(tmp, "lora.safetensors"))
        _stage("lora-written", name)
        save_state(os.path.join(tmp, "training_state"), training_state)
        _stage("files-written", name)
        write_json(os.path.join(tmp, "state.json"), {"format": FORMAT, "step": step, "run_id": run_id,
                                                     "world_size": world_size,
                                                     **({"precision": precision} if precision else {})})
        fsync_dir(tmp)
        _stage("tmp-complete", name)
        if os.path.isdir(final):
            if os.path.isdir(old):  # a superseded copy left by an earlier crash; step-N is complete
                if read_meta(old) is not None and not _is_ours(old, run_id):
                    raise FileExistsError(f"{old} belongs to another run; not replacing it: move it away and resume")
                _remove(root, old)
            os.replace(final, old)
            fsync_dir(root)
            _stage("old-moved", name)
        os.replace(tmp, final)
        fsync_dir(root)
        _stage("renamed", name)
        if os.path.isdir(old) and _is_ours(old, run_id):
            _remove(root, old)
        prune(root, run_id, keep)
        _stage("saved", name)
    _barrier()
    return final


def recover(root: str) -> list[str]:
    """Rename each ``.old-step-N`` whose ``step-N`` is missing (a crash between the two renames of a replace)
    back to ``step-N``; returns the recovered folders. Main process only."""
    recovered = []
    if os.path.isdir(root):
        for name in sorted(os.listdir(root)):
            final = os.path.join(root, name[len(".old-"):])
            if name.startswith(".old-") and STEP_DIR.match(name) and not os.path.exists(final):
                os.replace(os.path.join(root, name), final)
                recovered.append(final)
        if recovered:
            fsync_dir(root)
    return recovered


def resolve(resume: str, root: str, run_id: str | None = None, fallback: str | None = None) -> str | None:
    """'' -> None; 'latest' -> the newest checkpoint of run ``run_id`` under root (of any run when run_id
    is None), else ``fallback`` when it is a checkpoint, else None; otherwise the folder given."""
    if not resume:
        return None
    if resume == "latest":
        found = list_checkpoints(root, run_id)
        if found:
            return found[-1][1]
        return fallback if fallback and read_meta(fallback) is not None else None
    if read_meta(resume) is None:
        raise FileNotFoundError(f"--resume {resume!r}: not a checkpoint folder (no readable state.json)")
    return resume
