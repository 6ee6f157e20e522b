"""FSDP of the frozen base (fnf/fsdp.py): the wrapping plan, the settings read from accelerate's FSDP config, and
FSDP2 itself on CPU processes (gloo): one process in-process (the hooks, ignored LoRA parameters, adapters off),
two spawned processes (first-step gradient and weights against the single-process step on the same global
batch, SD UNet and FLUX with gradient checkpointing; training, checkpoints, resume and the LoRA export)."""
import copy
import os
import socket
import sys

import pytest
import torch
import torch.multiprocessing as mp

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
sys.path.insert(0, TESTS)
from fnf_tiny_models import cached_model, one_torch_thread, tiny_config  # noqa: E402,F401
from tiny_flux import IMAGE_SIZE as FLUX_SIZE, cached_flux  # noqa: E402

from fnf import fsdp  # noqa: E402

FSDP_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}
FSDP_KEYS = ("ACCELERATE_USE_FSDP", "FSDP_VERSION", "FSDP_SHARDING_STRATEGY", "FSDP_RESHARD_AFTER_FORWARD",
             "FSDP_OFFLOAD_PARAMS", "FSDP_AUTO_WRAP_POLICY", "FSDP_TRANSFORMER_CLS_TO_WRAP",
             "FSDP_ACTIVATION_CHECKPOINTING", "FSDP_STATE_DICT_TYPE")


@pytest.fixture
def clean_fsdp_env(monkeypatch):
    for key in FSDP_KEYS:
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


def _with_lora(folder: str, weight_dtype: str = "fp32"):
    from fnf.lora import add_lora
    from fnf.families.registry import load_model

    model = load_model(folder, weight_dtype=weight_dtype)
    params = add_lora(model, rank=4, alpha=8, target_modules=list(model.family.lora_targets))
    return model, params


# ------------------------------------------------------------------------------------------ the wrapping plan
@pytest.mark.parametrize("kind", ["sd", "sd3", "flux", "flux2"])
def test_wrap_plan_units_hold_every_lora_parameter(kind, tmp_path_factory):
    """Units: every instance of the family's block classes (found here with isinstance on diffusers' classes),
    children before parents, the root last; every LoRA parameter lies in a block unit, not in the root."""
    from diffusers.models.attention import BasicTransformerBlock, JointTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock
    from tiny_flux2 import cached_flux2, have_flux2
    from tiny_sd3 import cached_sd3

    if kind == "flux2" and not have_flux2():
        pytest.skip("the installed diffusers has no Flux2Pipeline")
    root = str(tmp_path_factory.getbasetemp())
    folder = {"sd": lambda: cached_model("sd", root), "sd3": lambda: cached_sd3(root),
              "flux": lambda: cached_flux(root), "flux2": lambda: cached_flux2(root)}[kind]()
    model, params = _with_lora(folder)
    if kind == "flux2":
        from diffusers.models.transformers.transformer_flux2 import (
                                                                     Flux2SingleTransformerBlock,
                                                                     Flux2TransformerBlock,
        )
    classes = {"sd": lambda: (BasicTransformerBlock, ResnetBlock2D), "sd3": lambda: (JointTransformerBlock,),
               "flux": lambda: (FluxTransformerBlock, FluxSingleTransformerBlock),
               "flux2": lambda: (Flux2TransformerBlock, Flux2SingleTransformerBlock)}[kind]()
    plan = fsdp.wrap_plan(model.denoiser, fsdp.wrap_class_names(model))
    expected = {n for n, m in model.denoiser.named_modules() if isinstance(m, classes)}
    assert plan[-1] == "" and set(plan[:-1]) == expected and len(plan) == len(expected) + 1
    for i, unit in enumerate(plan[:-1]):  # no unit comes after its parent unit
        assert not any(unit.startswith(parent + ".") for parent in plan[:i]), (unit, plan[:i])
    lora = [n for n, p in model.denoiser.named_parameters() if p.requires_grad]
    assert len(lora) == len(params) > 0
    owners = {fsdp.unit_of(plan, n) for n in lora}
    assert "" not in owners and owners <= expected
    frozen_in_root = [n for n, p in model.denoiser.named_parameters() if fsdp.unit_of(plan, n) == ""]
    assert frozen_in_root and not any("lora_" in n for n in frozen_in_root)  # embeddings, norms, projections


def test_wrap_plan_refuses_unknown_class(tmp_path_factory):
    model, _ = _with_lora(cached_flux(str(tmp_path_factory.getbasetemp())))
    with pytest.raises(ValueError, match=r"fsdp_transformer_layer_cls_to_wrap: \['NoSuchBlock'\].*"
                                         r"FluxTransformerBlock"):
        fsdp.wrap_plan(model.denoiser, ["FluxTransformerBlock", "NoSuchBlock"])
    assert fsdp.wrap_class_names(model, ("FluxSingleTransformerBlock",)) == ("FluxSingleTransformerBlock",)


# ------------------------------------------------------------------------------------------ settings
def _plugin_settings(monkeypatch, env: dict):
    from accelerate.utils import FullyShardedDataParallelPlugin

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return fsdp.settings_from_plugin(FullyShardedDataParallelPlugin())


def test_settings_from_accelerate_env(clean_fsdp_env):
    """The plugin built from accelerate's FSDP environment (what `accelerate launch` sets) maps to fnf's settings;
    these FSDP1-style variables mean the same in accelerate 1.0 and today's."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    mp_ = clean_fsdp_env
    has_version = "fsdp_version" in FullyShardedDataParallelPlugin.__dataclass_fields__  # accelerate >= 1.6
    s = _plugin_settings(mp_, {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1",
                               "FSDP_SHARDING_STRATEGY": "SHARD_GRAD_OP", "FSDP_OFFLOAD_PARAMS": "true",
                               "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
                               "FSDP_TRANSFORMER_CLS_TO_WRAP": "FluxTransformerBlock,FluxSingleTransformerBlock",
                               "FSDP_ACTIVATION_CHECKPOINTING": "true"})
    assert s == fsdp.FsdpSettings(wrap_classes=("FluxTransformerBlock", "FluxSingleTransformerBlock"),
                                  reshard_after_forward=False, cpu_offload=True, activation_checkpointing=True,
                                  fsdp_version=1 if has_version else None)
    s = _plugin_settings(mp_, {"FSDP_SHARDING_STRATEGY": "FULL_SHARD", "FSDP_OFFLOAD_PARAMS": "false",
                               "FSDP_AUTO_WRAP_POLICY": "NO_WRAP", "FSDP_ACTIVATION_CHECKPOINTING": "false"})
    assert (s.wrap_classes, s.reshard_after_forward, s.cpu_offload, s.activation_checkpointing) == (None, True,
                                                                                                 False, False)
    with pytest.raises(ValueError, match="NO_SHARD"):
        _plugin_settings(mp_, {"FSDP_SHARDING_STRATEGY": "NO_SHARD"})


def test_shipped_accelerate_config_turns_fsdp2_on(clean_fsdp_env, monkeypatch):
    """configs/accelerate/fsdp.yaml through accelerate's own launcher code (argument parsing, config file,
    the environment it hands each process) gives FSDP on, full sharding, no offload, the family's blocks."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    path = os.path.join(REPO, "configs", "accelerate", "fsdp.yaml")
    args = launch_command_parser().parse_args(["--config_file", path, "-m", "fnf", "train"])
    validated = _validate_launch_command(args)
    args = validated[0] if isinstance(validated, tuple) else args
    env = prepare_multi_gpu_env(args)
    assert env["ACCELERATE_USE_FSDP"] == "true" and args.num_processes == 2
    s = _plugin_settings(monkeypatch, {k: v for k, v in env.items() if k.startswith(("FSDP_", "ACCELERATE_USE"))})
    assert (s.wrap_classes, s.reshard_after_forward, s.cpu_offload, s.activation_checkpointing) == (None, True,
                                                                                                 False, False)
    import accelerate.utils.dataclasses as acc_dataclasses
    if "fsdp_version" in acc_dataclasses.FullyShardedDataParallelPlugin.__dataclass_fields__:
        assert s.fsdp_version == 2  # accelerate < 1.6 has no fsdp_version (fnf uses FSDP2 either way)


class _NoFsdpAccelerator:
    class state:
        fsdp_plugin = None


def test_settings_off_without_fsdp_and_refused_without_a_process_group(clean_fsdp_env):
    assert fsdp.settings(_NoFsdpAccelerator()) is None
    clean_fsdp_env.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(RuntimeError, match="torch.distributed is not initialized.*accelerate launch"):
        fsdp.settings(_NoFsdpAccelerator())
    with pytest.raises(ValueError, match="memory.fused_lora=on is not supported with FSDP"):
        fsdp.fused_lora_mode("on")
    assert fsdp.fused_lora_mode("auto") == fsdp.fused_lora_mode("off") == "off"


# ------------------------------------------------------------------------------------------ one process, in-process
@pytest.fixture
def one_process_group(tmp_path):
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this interpreter")
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _flux_call(model, generator):
    """One FLUX transformer call on random packed latents (batch 2) and random text embeddings."""
    cfg = model.denoiser.config
    n_img, n_txt = 16, 6
    kw = dict(hidden_states=torch.randn(2, n_img, cfg.in_channels, generator=generator),
              encoder_hidden_states=torch.randn(2, n_txt, cfg.joint_attention_dim, generator=generator),
              pooled_projections=torch.randn(2, cfg.pooled_projection_dim, generator=generator),
              timestep=torch.tensor([0.5, 0.25]), guidance=torch.tensor([3.5, 3.5]),
              img_ids=torch.zeros(n_img, 3), txt_ids=torch.zeros(n_txt, 3), return_dict=False)
    return lambda unet: unet(**kw)[0]


@pytest.mark.parametrize("weights", ["fp32", "bf16"])
def test_sharded_denoiser_matches_plain_one_process(weights, one_process_group, tmp_path_factory):
    """World size 1 (gloo): after shard_model the base weights are DTensors and the LoRA plain tensors (ignored);
    the output with adapters on and off and the LoRA gradient (two grad calls, then one backward) equal those of
    an unsharded deep copy. Same weights, same ops in the same order: equal up to float32 rounding (rtol 1e-6).
    bf16: bf16 frozen weights beside float32 LoRA in one unit, under bf16 autocast, as training on GPUs runs."""
    from fnf.lora import adapters_disabled

    model, params = _with_lora(cached_flux(str(tmp_path_factory.getbasetemp())), weights)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=weights == "bf16")
    gen = torch.Generator().manual_seed(0)
    print("seed 0")
    with torch.no_grad():
        for n, p in model.denoiser.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    plain = copy.deepcopy(model.denoiser)
    plan = fsdp.shard_model(model, params, fsdp.FsdpSettings(), "cpu", log=lambda *_: None)
    from torch.distributed.tensor import DTensor

    assert all(not isinstance(p, DTensor) for p in params)
    assert all(isinstance(p, DTensor) for n, p in model.denoiser.named_parameters() if "lora_" not in n)
    assert type(model.denoiser).__name__.startswith("FSDP") and len(plan) == 3
    call = _flux_call(model, gen)
    with torch.no_grad(), autocast:
        on, on_ref = call(model.denoiser), call(plain)
        with adapters_disabled(model.denoiser), adapters_disabled(plain):
            off, off_ref = call(model.denoiser), call(plain)
    torch.testing.assert_close(on, on_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(off, off_ref, rtol=1e-6, atol=1e-6)
    assert (on - off).abs().max() > 1e-3  # the LoRA changes the output
    grads = []
    for unet in (model.denoiser, plain):
        with autocast:
            loss = call(unet).float().square().mean() + call(unet).float().mean()
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in unet.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == len(params)
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-6, atol=1e-9)
    assert any(g.abs().max() > 0 for n, g in grads[0].items() if "lora_A" in n)


# ------------------------------------------------------------------------------------------ two processes
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _parity_session(kind: str, folder: str, out: str):
    """float64, batch 1 per process; FLUX with the denoiser's gradient checkpointing (FSDP + recompute)."""
    from fnf_tiny_models import float64_session, randomize_lora_B

    if kind == "sd":
        session = float64_session(tiny_config(folder, out, train={"batch_size": 1, "device": "cpu"}))
    else:
        session = float64_session(tiny_config(folder, out, train={"batch_size": 1, "device": "cpu"},
                                              sampling={"height": FLUX_SIZE, "width": FLUX_SIZE},
                                              memory={"denoiser_checkpointing": True}))
    randomize_lora_B(session.model.denoiser, seed=0, std=0.05)  # the same on every process
    return session


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().flatten() for t in tensors]).clone()


def _train_cfg(folder: str, out: str, steps: int, resume: bool = False):
    cfg = tiny_config(folder, out, train={"steps": steps, "lr": 5e-2, "device": "cpu", "checkpoint_every": 1})
    cfg.train.resume = "latest" if resume else cfg.train.resume
    return cfg


def _fsdp_worker(rank: int, world: int, port: int, sd: str, flux: str, out: str) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world),
                       "HF_HUB_OFFLINE": "1", **FSDP_ENV})
    torch.set_num_threads(1)
    sys.path.insert(0, TESTS)
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from fnf.lora import lora_state_dict
    from fnf.train import train

    result = {}
    for kind, folder in (("sd", sd), ("flux", flux)):
        session = _parity_session(kind, folder, os.path.join(out, f"{kind}-parity"))
        base = [p for n, p in session.model.denoiser.named_parameters() if "lora_" not in n]
        loss = session.micro_batch(0, 0)[0]
        loss.backward()
        local = _flat(p.grad for p in session.params)
        session.sync_grads()
        synced = _flat(p.grad for p in session.params)
        record, _ = session.optimizer_step(0)  # the same micro-batch again, synced, clipped, AdamW
        result[kind] = {"loss": loss.item(), "local": local, "synced": synced, "grad_norm": record["grad_norm"],
                        "after": _flat(session.params), "fsdp": session.fsdp is not None,
                        "sharded": all(isinstance(p, DTensor) for p in base),
                        "lora_plain": not any(isinstance(p, DTensor) for p in session.params),
                        "local_numel": sum(p.to_local().numel() for p in base),
                        "full_numel": sum(p.numel() for p in base)}
    straight = train(_train_cfg(sd, os.path.join(out, "straight"), 3))
    train(_train_cfg(sd, os.path.join(out, "part"), 2))
    resumed = train(_train_cfg(sd, os.path.join(out, "part"), 3, resume=True))
    result.update(straight=lora_state_dict(straight.model.denoiser), resumed=lora_state_dict(resumed.model.denoiser),
                  straight_history=straight.history, resumed_history=resumed.history,
                  lora_dir=straight.lora_dir, world=dist.get_world_size(), backend=dist.get_backend())
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """One spawn of 2 CPU processes under FSDP (gloo) for all the two-process checks below (~1-2 min)."""
    root = str(tmp_path_factory.getbasetemp())
    sd, flux = cached_model("sd", root), cached_flux(root)
    out = str(tmp_path_factory.mktemp("fsdp2proc"))
    mp.start_processes(_fsdp_worker, args=(2, _free_port(), sd, flux, out), nprocs=2, join=True,
                       start_method="spawn")
    ranks = [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in (0, 1)]
    return {"sd": sd, "flux": flux, "out": out, "ranks": ranks}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sd", "flux"])
def test_first_step_matches_single_process_on_the_same_global_batch(kind, two_process_run, clean_fsdp_env,
                                                                    tmp_path):
    """Each process draws its own sample (batch 1), with the frozen base sharded over the two. The reference: one
    process without FSDP computes both ranks' gradients (session.rank = 0, 1), averages them and takes the
    optimizer step. In float64 the local gradients, the synced gradient (their mean), the logged grad_norm and the
    LoRA after the step agree to float64 rounding (rtol 1e-10). The losses of the two ranks differ and their
    gradients by > 10 %, so a missing or summed all-reduce would show. The loss includes the Focus-N-Fix penalty
    against I0 from the adapters-off denoiser: a broken adapter switch under FSDP would change it. FLUX runs with
    the denoiser's gradient checkpointing (recompute inside FSDP units)."""
    r0, r1 = (r[kind] for r in two_process_run["ranks"])
    assert r0["fsdp"] and r0["sharded"] and r0["lora_plain"]
    assert r0["local_numel"] <= r0["full_numel"] // 2 + 64 * 8  # half of the frozen base per process (+ padding)
    session = _parity_session(kind, two_process_run[kind], str(tmp_path / "single"))
    assert session.fsdp is None
    grads, losses = {}, {}
    for rank in (0, 1):
        session.rank = rank  # micro_batch draws this rank's prompts and noise
        for p in session.params:
            p.grad = None
        loss = session.micro_batch(0, 0)[0]
        loss.backward()
        grads[rank], losses[rank] = _flat(p.grad for p in session.params), loss.item()
    mean = (grads[0] + grads[1]) / 2
    assert r0["loss"] != r1["loss"] and (grads[0] - grads[1]).norm() > 0.1 * grads[0].norm()
    tol = dict(rtol=1e-10, atol=1e-10 * mean.abs().max().item())
    for rank, r in ((0, r0), (1, r1)):
        assert r["loss"] == pytest.approx(losses[rank], rel=1e-10)
        torch.testing.assert_close(r["local"], grads[rank], **tol)
        torch.testing.assert_close(r["synced"], mean, **tol)
    offset = 0
    for p in session.params:
        p.grad = mean[offset:offset + p.numel()].view_as(p).clone()
        offset += p.numel()
    before = _flat(session.params)
    skipped, _, _, grad_norm = session._apply_gradients(0)
    after = _flat(session.params)
    assert not skipped and (after - before).abs().max() > 0
    for r in (r0, r1):
        assert r["grad_norm"] == pytest.approx(grad_norm, rel=1e-10)
        torch.testing.assert_close(r["after"], after, rtol=1e-10, atol=1e-12)
    print(f"{kind}: grad_norm {grad_norm:.6g}, max |after - single| "
          f"{(r0['after'] - after).abs().max().item():.3g}")


@pytest.mark.slow
def test_training_resume_and_export_under_fsdp(two_process_run, clean_fsdp_env):
    """fnf train under FSDP (2 processes, tiny SD): the LoRA stays identical on both ranks; 2 steps, then resume
    from the latest checkpoint for the third, equals 3 steps straight (torch.equal); the exported LoRA, loaded by
    StableDiffusionPipeline.load_lora_weights, reproduces fnf's images of the FSDP-trained LoRA (atol 1e-4: same
    float32 weights and ops, batching differs; 10x below the LoRA's effect, asserted > 1e-3)."""
    from fnf.lora import add_lora, load_lora_state_dict
    from fnf.families.registry import load_model
    from fnf_tiny_models import ours_and_pipeline_images

    r0, r1 = two_process_run["ranks"]
    assert r0["world"] == 2 and r0["backend"] == "gloo"
    for key in ("straight", "resumed"):
        assert r0[key].keys() == r1[key].keys() and r0[key]
        assert all(torch.equal(r0[key][k], r1[key][k]) for k in r0[key])
    assert all(torch.equal(r0["straight"][k], r0["resumed"][k]) for k in r0["straight"])
    assert [h["step"] for h in r0["resumed_history"]] == [3]
    assert r0["resumed_history"][0]["loss"] == r0["straight_history"][2]["loss"]
    assert not any(h["skipped"] for h in r0["straight_history"])
    sd = two_process_run["sd"]
    model = load_model(sd)
    cfg = tiny_config(sd, two_process_run["out"])
    add_lora(model, rank=cfg.lora.rank, alpha=cfg.lora.alpha, target_modules=cfg.lora.target_modules)
    load_lora_state_dict(model.denoiser, r0["straight"])
    images = ours_and_pipeline_images(model, sd, r0["lora_dir"])
    assert (images["tuned"] - images["base"]).abs().max() > 1e-3
    torch.testing.assert_close(images["tuned"], images["ours"], atol=1e-4, rtol=0)


@pytest.mark.slow  # two fresh interpreters through accelerate's launcher: ~1.5 min on a loaded 2-core machine
def test_accelerate_launch_with_the_shipped_config(tmp_path_factory, tmp_path):
    """The user's command, end to end on CPU: `accelerate launch --config_file configs/accelerate/fsdp.yaml
    --num_processes 2 -m fnf train ...` shards the denoiser over 2 processes, trains, checkpoints and exports."""
    import subprocess

    import yaml

    sd = cached_model("sd", str(tmp_path_factory.getbasetemp()))
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"path": sd}, "lora": {"rank": 4, "alpha": 8},
        "sampling": {"steps": 4, "truncation_k": 2, "guidance_scale": 3.0}, "reward": {"spec": "brightness"},
        "localize": {"spec": "none", "radius": 0}, "objective": {"beta": 1.0},
        "memory": {"denoiser_checkpointing": False, "vae_checkpointing": "off"},
        "train": {"prompts": ["a photo of a cat", "a red car"], "steps": 2, "lr": 1e-2, "checkpoint_every": 1,
                  "sample_every": 0, "device": "cpu", "progress": False}}))
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in FSDP_KEYS}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=REPO)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           os.path.join(REPO, "configs", "accelerate", "fsdp.yaml"), "--num_processes", "2", "--main_process_port",
           str(_free_port()), "-m", "fnf", "train", "--config", str(config), "--out", str(out)]
    proc = subprocess.run(cmd, env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert "sharded over 2 processes" in log, log[-3000:]
    assert os.path.isfile(out / "lora" / "pytorch_lora_weights.safetensors")
    assert sorted(os.listdir(out / "checkpoints")) == ["step-0000001", "step-0000002"]


def test_config_settings_fsdp_refuses(clean_fsdp_env, tmp_path):
    """Refused before any model loads: a quantized frozen base, memory.fused_lora=on."""
    from fnf import config

    base = tiny_config("/nonexistent", str(tmp_path))
    fsdp.check_config(base)  # the defaults combine with FSDP
    quantized = config.from_dict({"model": {"quantize": "bnb-8bit"}})
    with pytest.raises(ValueError, match="model.quantize='bnb-8bit' with FSDP is not supported"):
        fsdp.check_config(quantized)
    fused = config.from_dict({"memory": {"fused_lora": "on"}})
    with pytest.raises(ValueError, match="memory.fused_lora=on is not supported with FSDP"):
        fsdp.check_config(fused)
    clean_fsdp_env.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ValueError, match="model.quantize"):  # settings() checks the config first
        fsdp.settings(_NoFsdpAccelerator(), quantized)
