"""The output folder of a training run: refuse to clobber an earlier run, and the run's identity.

``<out>/run.json`` names the run that owns the folder (a random ``run_id``); every checkpoint records it, so
pruning and ``--resume latest`` see only this run's checkpoints. A resumed run keeps the run id of the
checkpoint it resumes. :func:`check` (read-only, every process, before the model is loaded) refuses a fresh
run into a folder that holds an earlier run's data unless ``train.resume`` or ``train.overwrite`` is set;
:func:`begin` (main process) moves the earlier run aside on overwrite and writes run.json. Nothing is
ever deleted here: ``--overwrite`` moves the earlier run's files into ``<out>/previous-<UTC time>/``.
"""
from __future__ import annotations

import json
import os
import time
import uuid

from . import checkpoint as ckpt
from ..config import dump

RUN_FILE = "run.json"
# What a training run writes into <out>: DATA refuses a fresh run there; --overwrite moves all of these aside.
DATA = ("checkpoints", "log.jsonl", "lora", "to_k.safetensors", "samples", "tensorboard",
        "lora-diffusers.safetensors", "lora-kohya.safetensors", "lora-comfyui.safetensors")  # train.export_formats
MOVED_ON_OVERWRITE = DATA + (RUN_FILE, "config.yaml")


class OutDirInUse(ValueError):
    """train.out holds an earlier run's data and neither train.resume nor train.overwrite is set."""


def checkpoint_root(out: str) -> str:
    return os.path.join(out, "checkpoints")


def read_run(out: str) -> dict:
    """run.json of ``out`` ({} when there is none or it cannot be read)."""
    try:
        with open(os.path.join(out, RUN_FILE), encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def inventory(out: str) -> list[str]:
    """What an earlier run left in ``out`` that a fresh run would clobber, in words (empty: nothing)."""
    found = []
    root = checkpoint_root(out)
    steps = ckpt.list_checkpoints(root)
    if steps:
        names = [os.path.basename(f) for _, f in steps]
        found.append(f"{len(steps)} checkpoint{'s' * (len(steps) > 1)} ({names[0]}"
                     + (f" .. {names[-1]})" if len(names) > 1 else ")"))
    elif os.path.isdir(root) and os.listdir(root):
        found.append("checkpoints/ (incomplete checkpoints)")
    for name in DATA[1:]:
        path = os.path.join(out, name)
        if os.path.isdir(path):
            if os.listdir(path):
                found.append(name + "/")
        elif os.path.exists(path):
            found.append(name)
    return found


def _inside(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder


def check(out: str, resume: str, overwrite: bool) -> None:
    """Raise :class:`OutDirInUse` when a run into ``out`` would clobber an earlier run's data. Read-only:
    every process calls it before building the Session (whose parameter broadcast is the first collective),
    so all of them see the folder before the main process changes it in :func:`begin`.

    Allowed: an empty (or unused) folder; ``resume='latest'`` (continue the run there; a fresh start when it
    has no checkpoint); ``resume=<folder>`` of the run that owns ``out`` (or into an unused ``out``);
    ``overwrite`` without ``resume='latest'`` (the earlier run is moved aside by :func:`begin`)."""
    if overwrite and resume == "latest":
        raise OutDirInUse("train.overwrite starts a new run, train.resume=latest continues the earlier one: "
                          "pass only one of --overwrite and --resume")
    if overwrite and resume and _inside(resume, out):
        raise OutDirInUse(f"train.overwrite moves {out}'s earlier run aside, including the checkpoint "
                          f"--resume {resume!r}: resume into another --out, or drop --overwrite")
    if resume and resume != "latest" and ckpt.read_meta(resume) is None:
        raise FileNotFoundError(f"--resume {resume!r}: not a checkpoint folder (no readable state.json)")
    found = inventory(out)
    if not found or overwrite or resume == "latest":
        return
    what = ", ".join(found)
    if resume:
        theirs = ckpt.read_meta(resume).get("run_id")
        owner = read_run(out).get("run_id")
        if _inside(resume, out) and (owner is None or owner == theirs):
            return
        raise OutDirInUse(f"{out} holds another run ({what}; run id {owner!r}) than the checkpoint "
                          f"{resume} (run id {theirs!r}); pass --overwrite to move that run aside to "
                          f"{out}/previous-<time>/ first, or choose another --out")
    raise OutDirInUse(f"{out} holds {what} of an earlier run; pass --resume to continue it, or --overwrite to "
                      f"start a new run there (the earlier run's files move to {out}/previous-<time>/)")


def move_aside(out: str, names=MOVED_ON_OVERWRITE) -> str | None:
    """Move the earlier run's files of ``out`` (those of ``names`` that exist) into a new
    ``out/previous-<UTC time>/``; returns it (None if there was nothing to move)."""
    names = [n for n in names if os.path.lexists(os.path.join(out, n))]
    if not names:
        return None
    base = os.path.join(out, "previous-" + time.strftime("%Y%m%d-%H%M%S", time.gmtime()))
    dest, n = base, 1
    while os.path.lexists(dest):
        n += 1
        dest = f"{base}-{n}"
    os.makedirs(dest)
    for name in names:
        os.replace(os.path.join(out, name), os.path.join(dest, name))
    ckpt.fsync_dir(dest)
    ckpt.fsync_dir(out)
    return dest


def begin(out: str, resume: str, overwrite: bool) -> tuple[str, str | None]:
    """Main process, after :func:`check`: move an earlier run aside on ``overwrite``, decide the run id and
    the checkpoint to resume, write run.json. Returns (run_id, checkpoint folder or None)."""
    os.makedirs(out, exist_ok=True)
    moved = move_aside(out) if overwrite else None
    if moved:
        print(f"fnf: --overwrite: moved the earlier run's files to {moved}")
    ckpt.recover(checkpoint_root(out))
    run = read_run(out)
    folder = resolve(resume, out, run)
    if folder is not None:
        run_id = ckpt.read_meta(folder).get("run_id") or run.get("run_id") or uuid.uuid4().hex
    elif resume == "latest" and run.get("run_id"):
        run_id = run["run_id"]  # nothing to resume yet: the run in this folder starts over
    else:
        run_id = uuid.uuid4().hex
    same = run.get("run_id") == run_id
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    record = {"run_id": run_id, "created": run.get("created", now) if same else now,
              "resumed_from": os.path.abspath(folder) if folder else (run.get("resumed_from") if same else None)}
    ckpt.replace_json(os.path.join(out, RUN_FILE), record)
    return run_id, folder


def resolve(resume: str, out: str, run: dict | None = None) -> str | None:
    """The checkpoint folder ``resume`` means for ``out`` ('' -> None; 'latest' -> the newest checkpoint of
    the run in run.json, else the one that run resumed from; in a folder without run.json, the newest)."""
    run = read_run(out) if run is None else run
    return ckpt.resolve(resume, checkpoint_root(out), run.get("run_id"), run.get("resumed_from"))


def write_config(cfg, out: str) -> None:
    """``<out>/config.yaml`` of this run, replaced atomically (a crash never leaves a truncated one)."""

    path = os.path.join(out, "config.yaml")
    tmp = f"{path}.tmp-{os.getpid()}"
    dump(cfg, tmp)
    ckpt.fsync_file(tmp)
    os.replace(tmp, path)
    ckpt.fsync_dir(out)
