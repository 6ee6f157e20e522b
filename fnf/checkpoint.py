"""Atomic training checkpoints with exact resume.

A checkpoint is a folder ``<out>/checkpoints/step-0000100`` holding ``lora.safetensors`` (the trainable LoRA
tensors), ``optimizer.pt`` (optimizer, lr schedule and grad-scaler states), ``rng-<rank>.pt`` (python,
numpy, torch and CUDA RNG states of every process) and ``state.json`` (the step). It is written to a
temporary folder first and renamed into place, so a crash never leaves a half-written checkpoint behind.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil

import numpy as np
import torch
from safetensors.torch import load_file, save_file

STEP_DIR = re.compile(r"^step-(\d+)$")


def _dist():
    import torch.distributed as dist
    return dist if dist.is_available() and dist.is_initialized() else None


def _barrier():
    d = _dist()
    if d is not None:
        d.barrier()


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(root: str) -> list[tuple[int, str]]:
    if not os.path.isdir(root):
        return []
    found = [(int(m.group(1)), os.path.join(root, name)) for name in os.listdir(root)
             if (m := STEP_DIR.match(name)) and os.path.isfile(os.path.join(root, name, "state.json"))]
    return sorted(found)


def resolve(resume: str, root: str) -> str | None:
    """'' -> None; 'latest' -> newest checkpoint under root (None if there is none); else the folder given."""
    if not resume:
        return None
    if resume == "latest":
        found = list_checkpoints(root)
        return found[-1][1] if found else None
    if not os.path.isfile(os.path.join(resume, "state.json")):
        raise FileNotFoundError(f"--resume {resume!r}: not a checkpoint folder (no state.json)")
    return resume


def save(root: str, step: int, lora: dict[str, torch.Tensor], training_state: dict, *, rank: int,
         is_main: bool, keep: int = 0) -> str:
    """Write a checkpoint atomically (all processes call this; each writes its RNG state)."""
    final = os.path.join(root, f"step-{step:07d}")
    tmp = os.path.join(root, f".tmp-step-{step:07d}")
    if is_main:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    _barrier()
    torch.save(rng_state(), os.path.join(tmp, f"rng-{rank}.pt"))
    _barrier()
    if is_main:
        save_file({k: v.detach().cpu().contiguous() for k, v in lora.items()}, os.path.join(tmp, "lora.safetensors"))
        torch.save(training_state, os.path.join(tmp, "optimizer.pt"))
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump({"step": step}, f)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        if keep > 0:
            for _, old in list_checkpoints(root)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load(folder: str, *, rank: int, device="cpu") -> tuple[int, dict, dict]:
    """Return (step, lora tensors, training state) and restore this process's RNG state."""
    with open(os.path.join(folder, "state.json")) as f:
        step = int(json.load(f)["step"])
    lora = load_file(os.path.join(folder, "lora.safetensors"), device=str(device))
    training_state = torch.load(os.path.join(folder, "optimizer.pt"), map_location=device, weights_only=False)
    rng_file = os.path.join(folder, f"rng-{rank}.pt")
    if not os.path.isfile(rng_file):
        rng_file = os.path.join(folder, "rng-0.pt")
    set_rng_state(torch.load(rng_file, weights_only=False))
    return step, lora, training_state
