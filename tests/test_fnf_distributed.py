"""Two CPU processes (gloo, local rendezvous on 127.0.0.1): LoRA weights stay identical across ranks."""
import os
import socket
import sys

import pytest
import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fnf_tiny_models import cached_model, tiny_config, one_torch_thread  # noqa: E402,F401


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, model: str, out: str, tests_dir: str) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world),
                       "HF_HUB_OFFLINE": "1"})
    torch.set_num_threads(1)
    sys.path.insert(0, tests_dir)
    from fnf.models import lora_state_dict
    from fnf.train import train

    cfg = tiny_config(model, out, train={"steps": 2, "lr": 2e-2, "device": "cpu", "checkpoint_every": 2})
    res = train(cfg)
    import torch.distributed as dist
    assert dist.is_initialized() and dist.get_world_size() == world and dist.get_backend() == "gloo"
    torch.save({"lora": lora_state_dict(res.model.unet), "history": res.history}, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_cpu_run_keeps_lora_identical(tmp_path_factory, tmp_path):
    model = cached_model("sd", str(tmp_path_factory.getbasetemp()))
    out = str(tmp_path / "ddp")
    os.makedirs(out)
    tests_dir = os.path.dirname(os.path.abspath(__file__))
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
