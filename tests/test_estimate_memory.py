"""fnf estimate-memory: the storage counter, the CUDA imitation, the fake-tensor trace against the same trace on real
tensors (exact) and against torch.profiler's allocator events (within 5%), and the command."""
import json
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fnf_tiny_models import cached_model, one_torch_thread, tiny_config  # noqa: E402,F401

from fnf import cli  # noqa: E402
from fnf.memory import cuda_rules  # noqa: E402
from fnf.memory.counter import StorageCounter, rounded  # noqa: E402
from fnf.memory.estimate import estimate  # noqa: E402


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return cached_model("sd", str(tmp_path_factory.getbasetemp()))


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    return cached_model("sdxl", str(tmp_path_factory.getbasetemp()))


def memory_config(folder, out, **memory):
    """fp32 weights, bf16 autocast with UNet and VAE checkpointing (recomputation in backward) and a saliency mask."""
    return tiny_config(folder, out, model={"weight_dtype": "fp32"},
                       memory={"mixed_precision": "bf16", "denoiser_checkpointing": True,
                               "vae_checkpointing": True, **memory},
                       localize={"spec": "saliency"})


# ------------------------------------------------------------------------------------------ counter
def test_counter_counts_storages_once_rounded_and_frees_them():
    with StorageCounter() as counter:
        x = torch.empty(1000)                     # 4000 B -> 4096
        view = x[10:20]                           # same storage: not counted again
        assert counter.live == rounded(4000) == 4096
        with counter.phase("a"):
            y = torch.empty(10, dtype=torch.float64)  # 80 B -> 512
        assert counter.live == 4096 + 512 and counter.by_phase == {"other": 4096, "a": 512}
        del x
        assert counter.live == 4096 + 512         # the view keeps the storage alive
        del view
        assert counter.live == 512 and counter.peak == 4096 + 512 and counter.peak_phase == "a"
        with counter.host():
            z = torch.empty(1000)
        assert counter.live == 512                # host-resident: not counted
        counter.place([z], on_device=True)
        assert counter.live == 512 + 4096
        counter.place([z], on_device=False)
        assert counter.live == 512
        del y, z
    assert counter.live == 0


def test_counter_peak_split_by_phase_sums_to_the_peak():
    with StorageCounter() as counter:
        keep = torch.empty(256)
        with counter.phase("forward"):
            act = torch.empty(1024)
        with counter.phase("backward"):
            grad = torch.empty(2048)
        del act, keep, grad
    assert sum(counter.peak_by_phase.values()) == counter.peak == 1024 + 4096 + 8192
    assert counter.peak_phase == "backward"


# ------------------------------------------------------------------------------------------ CUDA imitation
def test_cuda_rules_run_the_cuda_fp32_ops_in_float32_under_autocast():
    x = torch.randn(1, 4, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = F.conv2d(x, torch.randn(4, 4, 1, 1))   # bf16 under autocast (lower-precision op)
        assert F.group_norm(h, 2).dtype == torch.bfloat16        # CPU autocast keeps bf16
        with cuda_rules.CudaRules():
            assert F.group_norm(h, 2).dtype == torch.float32      # CUDA's fp32 policy
            assert F.layer_norm(h, (8,)).dtype == torch.float32
            assert F.interpolate(h, scale_factor=2.0).dtype == torch.float32
            assert h.softmax(-1).dtype == torch.float32 and h.exp().dtype == torch.float32
            assert F.silu(h).dtype == torch.bfloat16               # not on the list
        assert F.group_norm(h, 2).dtype == torch.bfloat16         # restored on exit
    with cuda_rules.CudaRules():
        assert F.group_norm(x.bfloat16(), 2).dtype == torch.bfloat16  # autocast off: nothing changes


def test_gpu_attention_backend_choice():
    q16 = torch.empty(1, 8, 64, 40, dtype=torch.bfloat16)
    assert cuda_rules.gpu_attention_backend(q16, q16, None) == "flash"
    assert cuda_rules.gpu_attention_backend(q16, q16, torch.empty(64, 64)) == "efficient"
    q32 = q16.float()
    assert cuda_rules.gpu_attention_backend(q32, q32, None) == "efficient"
    assert cuda_rules.gpu_attention_backend(q32.double(), q32.double(), None) == "math"
    big = torch.empty(1, 1, 64, 512, dtype=torch.bfloat16)  # a VAE's one-head attention: too wide for flash
    assert cuda_rules.gpu_attention_backend(big, big, None) == "efficient"
    odd = torch.empty(1, 8, 64, 4)
    assert cuda_rules.gpu_attention_backend(odd, odd, None) == "math"


def test_math_attention_materialises_the_scores():
    q = torch.randn(1, 2, 64, 4, requires_grad=True)  # head dim 4: the GPU runs the math backend
    with StorageCounter() as counter, cuda_rules.CudaRules() as rules:
        out = F.scaled_dot_product_attention(q, q, q)
    assert rules.backends == {"math": 1}
    assert counter.live >= rounded(2 * 64 * 64 * 4)  # B*H*L^2 float32 attention weights kept for backward
    ref = torch.softmax(q @ q.transpose(-1, -2) / 2.0, -1) @ q
    torch.testing.assert_close(out, ref)


# ------------------------------------------------------------------------------------------ architectures
@pytest.mark.slow
@pytest.mark.parametrize("arch,unet_m,text_m,size", [("sd15", 859.5, [123.1], 512), ("sd21", 865.9, [340.4], 768),
                                                     ("sdxl", 2567.5, [123.1, 694.7], 1024)])
def test_named_architectures_have_the_released_parameter_counts(arch, unet_m, text_m, size):
    """Built under fake tensors (no memory, ~1 s each once diffusers is imported)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fnf.memory.estimate import build_model, model_spec

    with FakeTensorMode(allow_non_fake_inputs=True):
        m = build_model(model_spec(arch=arch), "bf16")
    count = lambda mod: round(sum(p.numel() for p in mod.parameters()) / 1e6, 1)  # noqa: E731
    assert count(m.denoiser) == unet_m and [count(e) for e in m.text_encoders] == text_m and count(m.vae) == 83.7
    assert m.native_size == size and next(m.denoiser.parameters()).dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------ the trace
@pytest.fixture(scope="module")
def sd_fake(sd, tmp_path_factory):
    """The fake-tensor estimate of the tiny SD model (T = K + 2, step 2 traced after AdamW's state is set up)."""
    return estimate(memory_config(sd, str(tmp_path_factory.mktemp("run"))), model_dir=sd, fake=True)


def _same(a, b) -> None:
    assert a.peak_bytes == b.peak_bytes > 0
    assert a.held_at_peak == b.held_at_peak and a.peak_phase == b.peak_phase and a.persistent == b.persistent


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_fake_trace_equals_the_real_tensor_counter(kind, sd, sdxl, sd_fake, tmp_path):
    """Same code on fake and on real CPU tensors: the same bytes at the peak, phase by phase."""
    folder = sd if kind == "sd" else sdxl
    cfg = memory_config(folder, str(tmp_path))
    fake = sd_fake if kind == "sd" else estimate(cfg, model_dir=folder, fake=True)
    _same(fake, estimate(cfg, model_dir=folder, fake=False))


@pytest.mark.slow
def test_initialised_adamw_state_gives_the_peak_of_two_traced_steps(sd, sd_fake, tmp_path):
    from fnf.memory.estimate import model_spec, run_trace, trace_config

    both = run_trace(trace_config(memory_config(sd, str(tmp_path))), model_spec(sd), init_state=False)
    _same(sd_fake, both)
    assert sd_fake.peak_step == both.peak_step == "optimizer step 2"


@pytest.mark.slow
def test_peak_does_not_depend_on_the_number_of_ddim_steps(sd, sd_fake, tmp_path):
    longer = estimate(memory_config(sd, str(tmp_path)), model_dir=sd, sampling_steps=5)
    _same(sd_fake, longer)
    assert sd_fake.settings["sampling_steps_traced"] == 4 and longer.settings["sampling_steps_traced"] == 5


def _profiler_peak(prof) -> int:
    """Peak of the running sum of the allocator's [memory] events (allocations > 0, frees < 0)."""
    events = prof.profiler.kineto_results.events()
    live = peak = 0
    for _, delta in sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]"):
        live += delta
        peak = max(peak, live)
    return peak


@pytest.mark.slow
def test_real_counter_within_5_percent_of_profiler_allocator_events(sd, tmp_path):
    """Unrounded counter vs torch.profiler's CPU allocator events over the same run (model build included).
    The counter cannot see scratch freed inside an op: the profiler may read higher, by a few percent."""
    cfg = memory_config(sd, str(tmp_path), offload_text_encoder=False)  # nothing host-resident on a CPU run
    from fnf.memory.estimate import model_spec, run_trace, trace_config

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        est = run_trace(trace_config(cfg), model_spec(sd), fake=False, round_bytes=False)
    measured = _profiler_peak(prof)
    print(f"counter {est.peak_bytes} B, profiler {measured} B, ratio {est.peak_bytes / measured:.4f}")
    assert abs(est.peak_bytes - measured) <= 0.05 * measured


@pytest.mark.slow
def test_command_prints_and_writes_json_with_consistent_phases(sd, tmp_path, capsys):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("model: {weight_dtype: fp32}\nmemory: {mixed_precision: bf16}\nlocalize: {spec: saliency}\nlora: {rank: 4}\n"
                        "train: {prompts: [a red car]}\n")
    out = tmp_path / "est.json"
    assert cli.main(["estimate-memory", "--config", str(cfg_file), "--model", sd, "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "estimated torch.cuda.max_memory_allocated" in text and "not included" in text
    est = json.loads(out.read_text())["estimate"]
    assert {"estimate_of", "peak_gib", "peak_bytes", "peak_phase", "peak_step", "plan_for_gib", "margin",
            "not_included", "held_at_peak_gib", "phases", "persistent_gib", "settings", "attention_backends",
            "trace_seconds"} <= set(est)
    assert est["estimate_of"] == "torch.cuda.max_memory_allocated"
    held = est["held_at_peak_gib"]
    assert abs(sum(held.values()) - est["peak_gib"]) < 1e-3        # the peak split by phase sums to the peak
    assert held["weights (frozen)"] == est["persistent_gib"]["weights (frozen, on the device)"]
    assert est["phases"][est["peak_phase"]]["peak"] == est["peak_gib"]
    for p in est["phases"].values():
        assert p["peak"] >= p["at_entry"] and abs(p["added"] - (p["peak"] - p["at_entry"])) < 1e-3
    assert est["settings"]["sampling_steps_traced"] == 4 and est["settings"]["height"] == 32


def test_errors_exit_2_with_a_message(tmp_path, capsys):
    assert cli.main(["estimate-memory", "--config", str(tmp_path / "missing.yaml"), "--arch", "sd15"]) == 2
    assert "config file not found" in capsys.readouterr().err
    assert cli.main(["estimate-memory", "--arch", "sd9"]) == 2
    err = capsys.readouterr().err
    assert "unknown architecture 'sd9'" in err and "sdxl" in err
    assert cli.main(["estimate-memory"]) == 2
    assert "no model" in capsys.readouterr().err
    folder = tmp_path / "broken"
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text("{}")
    assert cli.main(["estimate-memory", "--model", str(folder)]) == 2
    assert "config.json is missing" in capsys.readouterr().err
    assert cli.main(["estimate-memory", "--arch", "sd15", "--height", "500"]) == 2
    assert "--height must be a positive multiple of 8" in capsys.readouterr().err
    assert cli.main(["estimate-memory", "--arch", "sd15", "--reward-model", "vit-huge"]) == 2
    assert "--reward-model" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ model.quantize
def test_quantized_weight_bytes_per_method():
    """Hand counts: a (300, 200) Linear weight = 60000 elements."""
    from fnf.memory.quantized import stored_bytes

    assert stored_bytes("bnb-8bit", 300, 200, torch.bfloat16) == 60000 + 4 * 300           # int8 + fp32 row scale
    assert stored_bytes("bnb-4bit", 300, 200, torch.bfloat16) == 30000 + 4 * 938           # NF4 + absmax / 64
    assert stored_bytes("torchao-int8", 300, 200, torch.bfloat16) == 60000 + 2 * 300       # int8 + bf16 row scale
    with pytest.raises(ValueError, match="model.quantize"):
        stored_bytes("none", 3, 2, torch.float32)


@pytest.mark.parametrize("method", ["bnb-8bit", "bnb-4bit", "torchao-int8"])
def test_quantize_moves_the_step_peak_by_the_linear_weights_saving(sd, sd_fake, tmp_path, method, capsys):
    """model.quantize in the estimate: the traced phases are those of the unquantized trace; the quantized peak is
    the step's peak minus (the denoiser's Linear weights as traced - as stored quantized) plus its largest Linear
    weight in the compute dtype, counted here from the UNet's own modules; the command prints it (and the ladder
    uses it)."""
    from fnf.commands.estimate_memory import report

    cfg = memory_config(sd, str(tmp_path / "run"))
    cfg.model.quantize = method
    est = estimate(cfg, model_dir=sd, fake=True)
    assert est.peak_bytes == sd_fake.peak_bytes and est.phases == sd_fake.phases     # the trace is unchanged
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(sd, subfolder="unet")
    lin = [m for m in unet.modules() if isinstance(m, torch.nn.Linear)]
    per = {"bnb-8bit": lambda m: m.weight.numel() + 4 * m.out_features,
           "bnb-4bit": lambda m: m.weight.numel() / 2 + 4 * -(-m.weight.numel() // 64),
           "torchao-int8": lambda m: m.weight.numel() + 4 * m.out_features}[method]     # fp32 weights: fp32 scales
    q = est.quantized
    assert q["linear_layers"] == len(lin)
    assert q["linear_weight_bytes"] == sum(4 * m.weight.numel() for m in lin)
    assert q["saved_bytes"] == int(q["linear_weight_bytes"] - sum(per(m) for m in lin))
    assert q["transient_bytes"] == max(4 * m.weight.numel() for m in lin)
    step = max(v["peak"] for k, v in est.phases.items() if not k.startswith("build: "))
    assert q["step_peak_bytes"] == step - q["saved_bytes"] + q["transient_bytes"]
    assert q["peak_bytes"] == max(q["step_peak_bytes"], q["build_peak_bytes"]) < est.peak_bytes
    text = report(est)
    assert f"with model.quantize={method}: " in text and "not a trace of the quantized kernels" in text
    assert est.to_json()["quantized"]["peak_gib"] == round(q["peak_bytes"] / 2 ** 30, 4)


@pytest.mark.parametrize("method,offload", [("bnb-4bit", True), ("torchao-int8", True), ("bnb-4bit", False)])
def test_quantized_phases_where_the_denoiser_is_on_the_host(method, offload):
    """With text encoders first, prompt encoding holds no denoiser (torchao: it moves later, at full size, and is
    quantized there already) or, under bitsandbytes (loaded onto the GPU already), only the quantized denoiser:
    the prompts are then encoded on the host; every other phase holds the quantized denoiser; the step's phases
    add one dequantized layer."""
    from fnf import config
    from fnf.memory.estimate import _quantized

    cfg = config.from_dict({"model": {"quantize": method}, "memory": {"offload_text_encoder": offload}})
    adj = {"saved_bytes": 100, "stored_bytes": 30, "transient_bytes": 7}
    phases = {"build: other": {"peak": 500}, "build: prompt encoding": {"peak": 450}, "backward": {"peak": 600}}
    q = _quantized(cfg, adj, phases)
    assert q["step_peak_bytes"] == 600 - 100 + 7
    encoding = (30 if method.startswith("bnb") else 450) if offload else 450 - 100
    assert q["build_peak_bytes"] == max(500 - 100, encoding)
    assert q["peak_bytes"] == max(q["step_peak_bytes"], q["build_peak_bytes"])



def test_fused_norm_in_the_ladder_and_settings(sd, sd_fake, tmp_path):
    from fnf.memory.estimate import ladder_plan

    assert sd_fake.settings["memory"]["fused_norm"] == "auto"
    assert any("fused VAE norm on" in note for note in sd_fake.notes)
    rows = dict(ladder_plan(memory_config(sd, str(tmp_path)), model_dir=sd))
    assert rows["naive"].memory.fused_norm == "off"
    assert rows["+ text encoders offloaded"].memory.fused_norm == "off"
    assert rows["+ fused norm + SiLU in the VAE decode (fnf defaults)"].memory.fused_norm == "auto"


@pytest.mark.slow
def test_fused_norm_is_counted(sd, tmp_path):
    """memory.fused_norm lowers what the VAE decode holds (no checkpointing: every pair's tensors stay until
    backward): off holds the norm outputs, on only the inputs (the fused op's fake kernels and autograd). The tiny
    model's step peaks in the UNet's backward, so the decode phase is compared, not the peak. The slow
    fake-equals-real test above runs with the default (auto: on), which checks the fake kernels against reality."""
    added = {}
    for mode in ("off", "on"):
        cfg = memory_config(sd, str(tmp_path / mode), fused_norm=mode, vae_checkpointing="off")
        added[mode] = estimate(cfg, model_dir=sd, fake=True).phases["VAE decode"]["added"]
    print(added)
    assert added["on"] < added["off"]
