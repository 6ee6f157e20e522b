"""Checkpoints and run folders never destroy data: run ids, pruning, refusal, --overwrite, crash-safe replace,
no pickle. (Kills of a real training process: tests/train/test_checkpoint_faults.py.)"""
import json
import os
import random
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fnf_tiny_models import cached_model, one_torch_thread, tiny_config  # noqa: E402,F401
from fnf import cli  # noqa: E402
from fnf.train import checkpoint as ckpt  # noqa: E402
from fnf.train import run_dir  # noqa: E402
from fnf.lora import lora_state_dict  # noqa: E402
from fnf.train import train  # noqa: E402


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return cached_model("sd", str(tmp_path_factory.getbasetemp()))


def _optimizer(seed=0):
    torch.manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    opt = torch.optim.AdamW(params, lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3))
    return params, opt, sched


def _steps(params, opt, sched, n, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
        sched.step()


def _save(root, step, run_id, keep=0, value=0.0, **kw):
    lora = {"w": torch.full((2, 2), float(value))}
    return ckpt.save(root, step, lora, {"x": torch.tensor([float(value)])}, rank=0, is_main=True, keep=keep,
                     run_id=run_id, **kw)


def _steps_of(root, run_id=None):
    return [s for s, _ in ckpt.list_checkpoints(root, run_id)]


# ---------------------------------------------------------------------------------------- format
def test_state_round_trip_is_exact_and_pickle_free(tmp_path, monkeypatch):
    """Optimizer, schedule and scaler states written as safetensors + JSON continue bit-exactly."""
    params, opt, sched = _optimizer()
    _steps(params, opt, sched, 2, seed=1)
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    state = {"optimizer": opt.state_dict(), "lr_schedule": sched.state_dict(), "scaler": scaler.state_dict(),
             "odd": {"t": (1, 2.5, None), 3: float("nan"), "__x": [True]}}
    lora = {n: p.detach().clone() for n, p in zip("ab", params)}
    folder = ckpt.save(str(tmp_path), 2, lora, state, rank=0, is_main=True, run_id="r1")
    assert sorted(os.listdir(folder)) == ["lora.safetensors", "rng-0.json", "rng-0.safetensors", "state.json",
                                          "training_state.json", "training_state.safetensors"]
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("format 2 must not unpickle anything"))
    ck = ckpt.read(folder)
    monkeypatch.undo()
    assert ck["step"] == 2 and ck["run_id"] == "r1"
    back = ck["training_state"]
    assert back["odd"]["t"] == (1, 2.5, None) and back["odd"]["__x"] == [True] and np.isnan(back["odd"][3])
    assert back["scaler"] == scaler.state_dict() and back["lr_schedule"] == sched.state_dict()
    params2, opt2, sched2 = _optimizer(seed=5)  # other values: everything must come from the checkpoint
    with torch.no_grad():
        for p, n in zip(params2, "ab"):
            p.copy_(ck["lora"][n])
    opt2.load_state_dict(back["optimizer"])
    sched2.load_state_dict(back["lr_schedule"])
    _steps(params, opt, sched, 3, seed=9)
    _steps(params2, opt2, sched2, 3, seed=9)
    for p, q in zip(params, params2):
        assert torch.equal(p, q)


def test_rng_states_are_restored(tmp_path):
    folder = _save(str(tmp_path), 1, "r")
    draws = (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist(), np.random.randn())
    ckpt.load(folder, rank=0)
    assert (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist(), np.random.randn()) == draws


def test_checkpoints_of_older_versions_load_without_running_pickled_code(tmp_path):
    folder = tmp_path / "step-0000004"
    folder.mkdir()
    from safetensors.torch import save_file
    save_file({"w": torch.ones(2)}, str(folder / "lora.safetensors"))
    torch.save({"optimizer": {"state": {}, "param_groups": []}}, str(folder / "optimizer.pt"))
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    torch.save(rng, str(folder / "rng-0.pt"))
    (folder / "state.json").write_text(json.dumps({"step": 4}))
    expect = (random.random(), np.random.rand(2).tolist(), torch.rand(2).tolist())
    step, lora, state = ckpt.load(str(folder), rank=0)
    assert step == 4 and torch.equal(lora["w"], torch.ones(2)) and state["optimizer"]["state"] == {}
    assert (random.random(), np.random.rand(2).tolist(), torch.rand(2).tolist()) == expect


# ---------------------------------------------------------------------------------------- run identity
def test_pruning_removes_only_this_runs_checkpoints(tmp_path):
    """The reported bug: an earlier run's step-100/200 outrank a new run's step-1/2/3, and pruning by step
    deleted the new run's checkpoints as soon as they were written."""
    root = str(tmp_path)
    for s in (100, 200):
        _save(root, s, "old", keep=2)
    for s in (1, 2, 3):
        _save(root, s, "new", keep=2)
    assert _steps_of(root) == [2, 3, 100, 200]
    assert _steps_of(root, "new") == [2, 3] and _steps_of(root, "old") == [100, 200]
    assert ckpt.resolve("latest", root, "new").endswith("step-0000003")
    assert ckpt.resolve("latest", root, None).endswith("step-0000200")   # no run id: newest of any (legacy)
    with pytest.raises(FileExistsError, match="another run"):            # never replaces another run's
        _save(root, 100, "new", keep=2)
    assert ckpt.read(os.path.join(root, "step-0000100"))["run_id"] == "old"


def test_leftover_temp_old_and_deleted_folders(tmp_path):
    root = str(tmp_path)
    _save(root, 1, "r", value=1)
    os.makedirs(os.path.join(root, ".tmp-step-0000002"))           # a write killed before completing
    os.makedirs(os.path.join(root, ".del-step-0000000-1-1"))       # a removal killed half-way
    os.replace(os.path.join(root, "step-0000001"), os.path.join(root, ".old-step-0000001"))  # between renames
    assert _steps_of(root, "r") == [1]
    assert ckpt.resolve("latest", root, "r").endswith(".old-step-0000001")
    assert ckpt.recover(root) == [os.path.join(root, "step-0000001")]           # renamed back when a run starts
    assert ckpt.resolve("latest", root, "r").endswith("/step-0000001")
    _save(root, 2, "r", keep=1, value=2)
    assert sorted(os.listdir(root)) == ["step-0000002"]


@pytest.mark.parametrize("fail_at", ["lora-written", "files-written", "tmp-complete", "old-moved", "renamed",
                                     "deleting", "replace-1", "replace-2", "replace-3", "replace-4"])
def test_a_crash_anywhere_in_a_replacing_save_leaves_a_loadable_checkpoint(tmp_path, monkeypatch, fail_at):
    """Re-saving step 2 over an existing step 2 (and pruning step 1), with the process 'dying' (an exception,
    no cleanup runs) at each stage or at the k-th os.replace: step 2 always loads, old or new."""
    root = str(tmp_path)
    _save(root, 1, "r", value=1)
    _save(root, 2, "r", value=2)

    class Died(Exception):
        pass

    if fail_at.startswith("replace-"):
        calls, real = [0], os.replace

        def replace(a, b):
            calls[0] += 1
            if calls[0] == int(fail_at.split("-")[1]):
                raise Died
            real(a, b)
        monkeypatch.setattr(ckpt.os, "replace", replace)
    else:
        def stage(name, what=""):
            if name == fail_at:
                raise Died
        monkeypatch.setattr(ckpt, "_stage", stage)
    try:
        _save(root, 2, "r", keep=1, value=22)
        died = False
    except Died:
        died = True
    monkeypatch.undo()
    assert died or fail_at == "replace-4", "the injected failure did not happen"
    folder = ckpt.resolve("latest", root, "r")
    assert folder is not None and ckpt.read(folder)["step"] == 2
    assert ckpt.read(folder)["lora"]["w"][0, 0].item() in (2.0, 22.0)
    _save(root, 2, "r", keep=1, value=23)                            # the next save cleans up
    assert sorted(os.listdir(root)) == ["step-0000002"]
    assert ckpt.read(os.path.join(root, "step-0000002"))["lora"]["w"][0, 0].item() == 23.0


# ---------------------------------------------------------------------------------------- the run folder
def _fake_run(out, run_id="earlier", steps=(1, 2, 3)):
    os.makedirs(out, exist_ok=True)
    for s in steps:
        _save(run_dir.checkpoint_root(out), s, run_id)
    with open(os.path.join(out, "log.jsonl"), "w") as f:
        f.write('{"step": 1}\n')
    ckpt.replace_json(os.path.join(out, "run.json"), {"run_id": run_id})


def test_check_refuses_a_used_folder_and_names_what_is_there(tmp_path):
    out = str(tmp_path / "run")
    run_dir.check(out, "", False)                                   # missing: fine
    os.makedirs(os.path.join(out, "localize"))                      # `fnf localize` output is not a run
    run_dir.check(out, "", False)
    _fake_run(out)
    with pytest.raises(run_dir.OutDirInUse) as e:
        run_dir.check(out, "", False)
    msg = str(e.value)
    assert "3 checkpoints (step-0000001 .. step-0000003)" in msg and "log.jsonl" in msg
    assert "--resume" in msg and "--overwrite" in msg
    run_dir.check(out, "latest", False)
    run_dir.check(out, os.path.join(out, "checkpoints", "step-0000002"), False)
    run_dir.check(out, "", True)
    with pytest.raises(run_dir.OutDirInUse, match="only one of"):
        run_dir.check(out, "latest", True)
    other = str(tmp_path / "other")
    _fake_run(other, run_id="someone-else", steps=(5,))
    with pytest.raises(run_dir.OutDirInUse, match="another run"):
        run_dir.check(out, os.path.join(other, "checkpoints", "step-0000005"), False)
    with pytest.raises(FileNotFoundError, match="not a checkpoint folder"):
        run_dir.check(out, str(tmp_path / "nope"), False)


def test_overwrite_moves_the_earlier_run_aside_and_latest_resumes_the_new_one(tmp_path):
    out = str(tmp_path / "run")
    _fake_run(out)
    before = {n: open(os.path.join(out, "checkpoints", n, "lora.safetensors"), "rb").read()
              for n in os.listdir(os.path.join(out, "checkpoints"))}
    run_id, folder = run_dir.begin(out, "", True)
    assert folder is None and run_id != "earlier"
    prev = [n for n in os.listdir(out) if n.startswith("previous-")]
    assert len(prev) == 1 and sorted(os.listdir(out)) == sorted(prev + ["run.json"])
    moved = os.path.join(out, prev[0])
    assert sorted(os.listdir(moved)) == ["checkpoints", "log.jsonl", "run.json"]
    for n, data in before.items():
        assert open(os.path.join(moved, "checkpoints", n, "lora.safetensors"), "rb").read() == data
    assert run_dir.resolve("latest", out) is None                  # the new run has no checkpoint yet
    _save(run_dir.checkpoint_root(out), 1, run_id)
    assert run_dir.resolve("latest", out).endswith("step-0000001")
    assert run_dir.begin(out, "latest", False) == (run_id, run_dir.resolve("latest", out))  # same run goes on


def test_resume_of_a_legacy_folder_adopts_a_new_run_id_and_never_prunes_the_legacy_checkpoints(tmp_path):
    out = str(tmp_path / "run")
    _fake_run(out, run_id=None, steps=(1, 2))
    os.remove(os.path.join(out, "run.json"))
    run_id, folder = run_dir.begin(out, "latest", False)
    assert folder.endswith("step-0000002") and run_id
    assert run_dir.resolve("latest", out) == folder                # killed before saving: resume the same one
    for s in (3, 4, 5):
        _save(run_dir.checkpoint_root(out), s, run_id, keep=1)
    assert _steps_of(run_dir.checkpoint_root(out)) == [1, 2, 5]
    assert run_dir.resolve("latest", out).endswith("step-0000005")


# ---------------------------------------------------------------------------------------- with training
def test_reused_output_folder(sd, tmp_path, monkeypatch, capsys):
    """A second run into a used --out is refused before the model loads (train() and the CLI); --overwrite
    keeps the first run's files byte for byte in previous-*/ and the new run's checkpoints survive pruning."""
    from fnf.train import trainer as train_mod

    out = str(tmp_path / "run")
    extra = dict(train={"steps": 3, "checkpoint_every": 1, "keep_checkpoints": 2})
    first = train(tiny_config(sd, out, **extra))
    files = {}
    for base, _, names in os.walk(out):
        for n in names:
            files[os.path.relpath(os.path.join(base, n), out)] = open(os.path.join(base, n), "rb").read()
    assert "checkpoints/step-0000003/lora.safetensors" in files and "log.jsonl" in files

    monkeypatch.setattr(train_mod, "load_model", lambda *a, **k: pytest.fail("loaded the model before refusing"))
    with pytest.raises(run_dir.OutDirInUse, match=r"2 checkpoints \(step-0000002 .. step-0000003\), log.jsonl"):
        train(tiny_config(sd, out, **extra))
    rc = cli.main(["train", "--model", sd, "--out", out, "--steps", "1", "--set", "train.progress=false",
                   "--set", "train.tensorboard=false", "--set", "localize.spec=none", "--set", "reward.spec=brightness",
                   "--set", "sampling.steps=4"])
    assert rc == 2 and "--overwrite" in capsys.readouterr().err
    monkeypatch.undo()

    cfg = tiny_config(sd, out, train={"steps": 2, "checkpoint_every": 1, "keep_checkpoints": 2, "overwrite": True,
                                      "seed": 1})
    second = train(cfg)
    prev = [n for n in os.listdir(out) if n.startswith("previous-")]
    assert len(prev) == 1
    for rel, data in files.items():
        assert open(os.path.join(out, prev[0], rel), "rb").read() == data, rel
    assert _steps_of(run_dir.checkpoint_root(out)) == [1, 2]
    new_id = run_dir.read_run(out)["run_id"]
    assert new_id != json.loads(files["run.json"])["run_id"]
    assert ckpt.read(run_dir.resolve("latest", out))["run_id"] == new_id
    assert len(open(os.path.join(out, "log.jsonl")).readlines()) == 2
    a, b = lora_state_dict(first.model.denoiser), lora_state_dict(second.model.denoiser)
    assert any(not torch.equal(a[k], b[k]) for k in a)           # seed 1: a different LoRA really was trained
