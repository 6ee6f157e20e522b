"""Two CPU processes (gloo, local rendezvous on 127.0.0.1): the synced gradient is the mean over ranks (the
gradient of the joint batch), and LoRA weights stay identical across ranks."""
import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from accelerate import PartialState
from accelerate.utils import DistributedType

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fnf_tiny_models import cached_model, tiny_config, one_torch_thread  # noqa: E402,F401


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_env(rank: int, world: int, port: int, tests_dir: str) -> None:
    """What torchrun would set for this rank (accelerate reads it), one thread, the test helpers importable."""
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world),
                       "HF_HUB_OFFLINE": "1"})
    torch.set_num_threads(1)
    sys.path.insert(0, tests_dir)


def _worker(rank: int, world: int, port: int, model: str, out: str, tests_dir: str) -> None:
    _worker_env(rank, world, port, tests_dir)
    from fnf.lora import lora_state_dict
    from fnf.train import train

    cfg = tiny_config(model, out, train={"steps": 2, "lr": 2e-2, "device": "cpu", "checkpoint_every": 2})
    res = train(cfg)
    import torch.distributed as dist
    assert dist.is_initialized() and dist.get_world_size() == world and dist.get_backend() == "gloo"
    torch.save({"lora": lora_state_dict(res.model.denoiser), "history": res.history}, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_cpu_run_keeps_lora_identical(tmp_path_factory, tmp_path):
    model = cached_model("sd", str(tmp_path_factory.getbasetemp()))
    out = str(tmp_path / "ddp")
    os.makedirs(out)
    tests_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    mp.start_processes(_worker, args=(2, _free_port(), model, out, tests_dir), nprocs=2, join=True,
                       start_method="spawn")
    r0, r1 = (torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in (0, 1))
    assert r0["lora"].keys() == r1["lora"].keys()
    for k in r0["lora"]:
        assert torch.equal(r0["lora"][k], r1["lora"][k]), k
    # LoRA B started at zero: training moved it, in step on both ranks
    assert any(v.abs().sum() > 0 for k, v in r0["lora"].items() if "lora_B" in k)
    # logged metrics are the cross-rank means, identical on both ranks
    assert [h["loss"] for h in r0["history"]] == [h["loss"] for h in r1["history"]]
    assert os.path.isfile(os.path.join(out, "lora", "pytorch_lora_weights.safetensors"))
    assert os.listdir(os.path.join(out, "checkpoints")) == ["step-0000002"]


def _grad_worker(rank: int, world: int, port: int, model: str, out: str, tests_dir: str) -> None:
    """One first step on this rank's micro-batch (batch 1, float64): local gradient, synced gradient, grad_norm."""
    _worker_env(rank, world, port, tests_dir)
    import torch.distributed as dist
    from fnf_tiny_models import float64_session, randomize_lora_B

    session = float64_session(tiny_config(model, out, train={"batch_size": 1, "device": "cpu"}))
    assert dist.is_initialized() and dist.get_world_size() == world
    randomize_lora_B(session.model.denoiser, seed=0, std=0.05)  # the same on both ranks
    loss = session.micro_batch(0, 0).loss
    assert bool(torch.isfinite(loss))
    loss.backward()
    local = [p.grad.clone() for p in session.params]
    session.sync_grads()
    synced = [p.grad.clone() for p in session.params]
    record, _ = session.optimizer_step(0)  # the same micro-batch again, then sync, clip (norm before clipping), step
    torch.save({"local": local, "synced": synced, "grad_norm": record["grad_norm"], "loss": loss.item(),
                "logged_loss": record["loss"]}, os.path.join(out, f"grads{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow  # two spawned interpreters importing torch + diffusers: ~50 s on a loaded 2-core machine
def test_two_process_gradient_is_the_mean_over_ranks(tmp_path_factory, tmp_path):
    """Each rank draws its own sample (batch 1); after sync_grads every rank holds (g_0 + g_1) / 2, the gradient of
    the batch-mean loss over the joint batch of 2, and the step's grad_norm is its norm. A sum all-reduce would
    be 2x off, a missing one would leave g_r (the two differ by > 10 %, asserted). Float64 gradients: the mean of
    two numbers is exact to 1 ulp (rtol 1e-12); grad_norm comes from a rerun of the same micro-batch in the same
    process (same ops, so rtol 1e-9)."""
    model = cached_model("sd", str(tmp_path_factory.getbasetemp()))
    out = str(tmp_path / "grads")
    os.makedirs(out)
    tests_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    mp.start_processes(_grad_worker, args=(2, _free_port(), model, out, tests_dir), nprocs=2, join=True,
                       start_method="spawn")
    r0, r1 = (torch.load(os.path.join(out, f"grads{r}.pt"), weights_only=False) for r in (0, 1))
    flat = {k: [torch.cat([g.flatten() for g in r[k]]) for r in (r0, r1)] for k in ("local", "synced")}
    (g0, g1), (s0, s1) = flat["local"], flat["synced"]
    assert g0.dtype == torch.float64 and r0["loss"] != r1["loss"]  # different samples on the two ranks
    assert (g0 - g1).norm() > 0.1 * g0.norm(), "the ranks' gradients must differ for mean vs sum to show"
    mean = (g0 + g1) / 2
    torch.testing.assert_close(s0, mean, rtol=1e-12, atol=1e-12 * mean.abs().max().item())
    assert torch.equal(s0, s1)
    for r in (r0, r1):
        assert r["grad_norm"] == pytest.approx(mean.norm().item(), rel=1e-9)
        assert r["logged_loss"] == pytest.approx((r0["loss"] + r1["loss"]) / 2, rel=1e-9)  # logged: rank mean
    print(f"grad_norm {r0['grad_norm']:.6g} = |mean| {mean.norm():.6g}; |sum| would be {(g0 + g1).norm():.6g}")


class _PeerSum:
    """Stands in for torch.distributed on rank 0 of 2: all_reduce(SUM) adds the peer's tensor, as gloo/NCCL do."""

    def __init__(self, peer: torch.Tensor):
        self.peer = peer

    def all_reduce(self, t, op=None):
        assert op in (None, dist.ReduceOp.SUM), "sync_grads must use the default op (SUM)"
        t += self.peer


def test_sync_grads_averages_over_ranks_in_process(tmp_path_factory, tmp_path, monkeypatch):
    """Quick, single-process form of the two-process test: rank 1's gradient (its own sample, session.rank = 1)
    plays the peer of a SUM all-reduce; sync_grads must leave (g_0 + g_1) / 2, not the sum and not g_0 alone.
    Float64: the mean of two numbers is exact to 1 ulp (rtol 1e-12); the ranks' gradients differ by > 10 %.
    accelerate's reduce runs for real, told by its state that there are 2 CPU processes; torch.distributed's
    all_reduce is the peer's sum."""
    from fnf_tiny_models import float64_session, randomize_lora_B

    model = cached_model("sd", str(tmp_path_factory.getbasetemp()))
    session = float64_session(tiny_config(model, str(tmp_path), train={"batch_size": 1}))
    randomize_lora_B(session.model.denoiser, seed=0, std=0.05)
    local = {}
    for rank in (1, 0):  # rank 0 last: its gradient is the one left in p.grad
        session.rank = rank  # micro_batch draws this rank's prompts and noise
        for p in session.params:
            p.grad = None
        session.micro_batch(0, 0)[0].backward()
        local[rank] = torch.cat([p.grad.flatten() for p in session.params]).clone()
    g0, g1 = local[0], local[1]
    assert (g0 - g1).norm() > 0.1 * g0.norm()
    session.rank, session.world = 0, 2
    state = PartialState()
    monkeypatch.setattr(state, "distributed_type", DistributedType.MULTI_CPU)
    monkeypatch.setattr(state, "num_processes", 2)
    monkeypatch.setattr(dist, "all_reduce", _PeerSum(g1).all_reduce)
    session.sync_grads()
    synced = torch.cat([p.grad.flatten() for p in session.params])
    mean = (g0 + g1) / 2
    torch.testing.assert_close(synced, mean, rtol=1e-12, atol=1e-12 * mean.abs().max().item())
