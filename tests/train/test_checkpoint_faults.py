"""Fault test: SIGKILL a real `fnf train` process at random moments and inside checkpoint writes.

After every kill, `--resume latest` must find a loadable checkpoint no older than the newest one whose write
had completed, and each interrupted run, resumed to the end, must end with the LoRA of an uninterrupted run,
bit for bit (CPU, one thread).

A python interpreter with torch/diffusers imported takes ~10 s to start here, so the training processes are
forked from a "zygote" subprocess that has imported everything once (``python this_file zygote``); each fork
runs ``fnf.cli.main(["train", ...])`` and is killed with SIGKILL by pid. One uninterrupted reference run
also goes through a plain ``python -m fnf train`` subprocess and must give the same LoRA.

Kills come in two kinds: at a uniformly random delay (setup, steps, writes), and at a chosen stage of a
checkpoint write ($FNF_CHECKPOINT_TEST_PAUSE makes fnf.train.checkpoint announce each stage and wait there), every
stage at least twice, the replace of an existing checkpoint included (resumes from the older kept checkpoint
re-save the newer one). The seed is printed; FNF_FAULT_SEED=<n> repeats a schedule, FNF_FAULT_KILLS sets the
number of kills (default 24).
"""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.dirname(TESTS)
sys.path.insert(0, TESTS)
STAGES = ("lora-written", "files-written", "tmp-complete", "old-moved", "renamed", "deleting", "saved")
MARK = "fnf-checkpoint-stage "
PAUSE = "0.1"
STEPS = 6

CONFIG = """\
model: {{path: {model}}}
lora: {{rank: 4, alpha: 8, dropout: 0.1}}
sampling: {{steps: 3, truncation_k: 1, guidance_scale: 3.0, eta: 0.5}}
reward: {{spec: brightness}}
localize: {{spec: none, radius: 0}}
objective: {{beta: 1.0}}
memory: {{denoiser_checkpointing: false, vae_checkpointing: false}}
train: {{steps: {steps}, lr: 1.0e-2, warmup_steps: 2, checkpoint_every: 1, keep_checkpoints: 2, sample_every: 0,
        progress: false, tensorboard: false, device: cpu, prompts: ["a photo of a cat", "a red car"]}}
"""


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}


# ---------------------------------------------------------------------------------------- the zygote
def _zygote() -> None:
    """Import everything once, then fork one `fnf train` process per job line {argv, log, env} on stdin."""
    import traceback

    torch.set_num_threads(1)
    import diffusers  # noqa: F401
    import transformers  # noqa: F401

    from fnf import cli, train  # noqa: F401
    print("ready", flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        pid = os.fork()
        if pid == 0:
            rc = 99
            try:
                fd = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
                os.environ.update(job["env"])
                rc = cli.main(job["argv"])
            except BaseException:  # noqa: BLE001 - report anything, then leave without cleanup
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(rc)
        print(f"pid {pid}", flush=True)
        _, status = os.waitpid(pid, 0)
        print(f"exit {os.waitstatus_to_exitcode(status)}", flush=True)


class Zygote:
    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "zygote"], cwd=ROOT, env=_env(),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        first = self.proc.stdout.readline().strip()
        assert first == "ready", f"zygote did not start: {first!r}"

    def start(self, argv: list, log: str, env: dict) -> int:
        self.proc.stdin.write(json.dumps({"argv": argv, "log": log, "env": env}) + "\n")
        self.proc.stdin.flush()
        word, pid = self.proc.stdout.readline().split()
        assert word == "pid"
        return int(pid)

    def wait(self) -> int:
        word, rc = self.proc.stdout.readline().split()
        assert word == "exit"
        return int(rc)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _markers(log: str) -> list[tuple[str, str]]:
    if not os.path.isfile(log):
        return []
    with open(log, encoding="utf-8", errors="replace") as f:
        return [tuple(line[len(MARK):].split()[:2]) for line in f if line.startswith(MARK)]


# ---------------------------------------------------------------------------------------- the test
@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    from fnf_tiny_models import cached_model
    return cached_model("sd", str(tmp_path_factory.getbasetemp()))


def _final_lora(out: str) -> dict:
    return load_file(os.path.join(out, "lora", "pytorch_lora_weights.safetensors"))


def _assert_same(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: {k} differs by {(a[k] - b[k]).abs().max().item()}"


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork") or not hasattr(signal, "SIGKILL"), reason="needs fork and SIGKILL")
def test_sigkill_at_random_moments_always_leaves_a_resumable_checkpoint_and_the_same_lora(sd, tmp_path):
    from fnf.train import checkpoint as ckpt
    from fnf.train import run_dir

    seed = int(os.environ.get("FNF_FAULT_SEED", random.SystemRandom().randrange(2**31)))
    kills_wanted = int(os.environ.get("FNF_FAULT_KILLS", "24"))
    print(f"fault test seed {seed} (FNF_FAULT_SEED={seed} repeats it), {kills_wanted} kills")
    rng = random.Random(seed)
    cfg = tmp_path / "config.yaml"
    cfg.write_text(CONFIG.format(model=sd, steps=STEPS))
    logs = tmp_path / "logs"
    logs.mkdir()

    zyg, ref_cli = Zygote(), None
    try:
        began = time.time()
        ref_out = str(tmp_path / "ref")
        zyg.start(["train", "--config", str(cfg), "--out", ref_out], str(logs / "ref.log"), {})
        assert zyg.wait() == 0, open(logs / "ref.log").read()
        duration = time.time() - began
        step_s = [json.loads(x)["seconds"] for x in open(os.path.join(ref_out, "log.jsonl"))]
        setup_s, step_s = max(0.0, duration - sum(step_s)), sum(step_s) / len(step_s)
        ref_cli_out = str(tmp_path / "ref_cli")                    # runs alongside the kills
        ref_cli = subprocess.Popen([sys.executable, "-m", "fnf", "train", "--config", str(cfg), "--out",
                                    ref_cli_out], cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)
        reference = _final_lora(ref_out)
        last = os.path.join(ref_out, "checkpoints", f"step-{STEPS:07d}", "lora.safetensors")
        ckpt_keys = load_file(last).keys()

        # the kill schedule: every stage twice, the rest at random delays; shuffled
        plan = [("stage", s) for s in STAGES * 2]
        # a delay is a fraction of the attempt's expected time (setup + its remaining steps)
        plan += [("delay", rng.random()) for _ in range(max(0, kills_wanted - len(plan)))]
        rng.shuffle(plan)
        print(f"uninterrupted run {duration:.1f} s (setup {setup_s:.1f} s, {step_s:.2f} s/step); plan {plan}")

        runs, finished, out, attempt, killed, stages_hit = [], set(), None, 0, 0, []
        renamed: dict[str, int] = {}      # run folder -> newest step whose checkpoint rename had completed
        while plan:
            if out is None:
                out = str(tmp_path / f"run{len(runs)}")
                runs.append(out)
            kind, target = plan[0]
            mine = ckpt.list_checkpoints(run_dir.checkpoint_root(out), run_dir.read_run(out).get("run_id"))
            if kind == "stage" and target == "old-moved":
                if len(mine) < 2:                                   # needs two checkpoints: kill later
                    plan.append(plan.pop(0))
                    if all(k == "stage" and t == "old-moved" for k, t in plan):
                        plan.insert(0, ("stage", "saved"))          # an extra kill that makes progress first
                    continue
                resume = ["--resume", mine[-2][1]]                  # re-saves (replaces) the newer one
            elif not os.path.isfile(os.path.join(out, "run.json")):
                resume = []                                         # a fresh run
            else:
                resume = ["--resume"]
            attempt += 1
            assert attempt <= 3 * kills_wanted + 10, f"no progress: {attempt} attempts, {killed} kills, plan {plan}"
            log = str(logs / f"attempt{attempt:03d}.log")
            env = {ckpt.PAUSE_ENV: PAUSE if kind == "stage" else "0"}
            pid = zyg.start(["train", "--config", str(cfg), "--out", out, *resume], log, env)
            hit = None
            if kind == "delay":
                done = mine[-1][0] if mine and resume else 0
                time.sleep(target * (setup_s + (STEPS - done) * step_s))
                _kill(pid)
            else:
                while _alive(pid):
                    seen = [m for m in _markers(log) if m[0] == target]
                    if seen:
                        _kill(pid)
                        hit = seen[0]
                        break
                    time.sleep(0.005)
            rc = zyg.wait()
            for name, step_dir in _markers(log):
                if name == "renamed":
                    renamed[out] = max(renamed.get(out, 0), int(step_dir.split("-")[1]))
            if rc == 0:                                             # finished before the kill: next run
                finished.add(out)
                out = None
                continue
            assert rc == -signal.SIGKILL, f"attempt {attempt} exited with {rc}:\n" + open(log).read()[-3000:]
            plan.pop(0)
            killed += 1
            if hit is not None:
                stages_hit.append(hit[0])
            latest = run_dir.resolve("latest", out)
            what = f"{target:.2f} of the expected time" if kind == "delay" else f"{target} {hit[1]}"
            print(f"kill {killed} ({kind} {what}) -> latest {latest and os.path.basename(latest)}")
            if out in renamed:
                assert latest is not None, f"kill {killed} ({kind} {target}) left no checkpoint in {out}"
                ck = ckpt.read(latest)
                assert ck["step"] >= renamed[out] and ck["lora"].keys() == ckpt_keys
        for out in runs:                                            # resume every interrupted run to its end
            if out not in finished:
                attempt += 1
                log = str(logs / f"attempt{attempt:03d}.log")
                zyg.start(["train", "--config", str(cfg), "--out", out, "--resume"], log, {})
                assert zyg.wait() == 0, open(log).read()[-3000:]
    finally:
        zyg.close()
        if ref_cli is not None:
            ref_cli.wait(timeout=600)

    assert killed >= kills_wanted
    assert set(stages_hit) == set(STAGES), stages_hit
    print(f"{killed} kills in {len(runs)} runs, {attempt} attempts; stages hit {sorted(stages_hit)}")
    assert ref_cli.returncode == 0, ref_cli.stdout.read()[-3000:]
    _assert_same(_final_lora(ref_cli_out), reference, "python -m fnf train vs the zygote's uninterrupted run")
    for out in runs:
        _assert_same(_final_lora(out), reference, f"{out} (killed and resumed)")
        latest = run_dir.resolve("latest", out)
        assert latest.endswith(f"step-{STEPS:07d}"), latest
        _assert_same(load_file(os.path.join(latest, "lora.safetensors")), load_file(last), f"{out} last checkpoint")
        lines = [json.loads(x) for x in open(os.path.join(out, "log.jsonl"))]
        assert lines[-1]["step"] == STEPS


if __name__ == "__main__" and sys.argv[1:] == ["zygote"]:
    _zygote()
