"""fnf estimate-memory for the transformer (flow-matching) families: the named SD3.5 / FLUX.1 architectures have the
released parameter counts; a folder's configs build what the family's own load() gives; on the tiny SD3 (and FLUX)
folders the fake-tensor trace equals the real-tensor counter exactly; T5 is counted only until it is offloaded;
the command runs and writes its JSON keys."""
import importlib.util
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fnf_tiny_models import one_torch_thread, tiny_config  # noqa: E402,F401
from tiny_sd3 import cached_sd3  # noqa: E402

from fnf import cli  # noqa: E402
from fnf.memory.counter import rounded  # noqa: E402
from fnf.memory.estimate import build_model, estimate, model_spec  # noqa: E402

HAS_FLUX = importlib.util.find_spec("fnf.families.flux") is not None and \
    os.path.isfile(os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny_flux.py"))


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    return cached_sd3(str(tmp_path_factory.getbasetemp()))


@pytest.fixture(scope="module")
def sd3_no_t5(tmp_path_factory):
    return cached_sd3(str(tmp_path_factory.getbasetemp()), t5=False)


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    if not HAS_FLUX:
        pytest.skip("the FLUX family (fnf/families/flux.py, tests/tiny_flux.py) is not in this tree yet")
    import tiny_flux

    return tiny_flux.cached_flux(str(tmp_path_factory.getbasetemp()))


def memory_config(folder, out, size=0, **memory):
    """bf16 weights and autocast, transformer and VAE checkpointing, text encoders offloaded, a saliency mask;
    ``size``: the image side (FLUX folders have no native size in their configs: the family's is 1024)."""
    return tiny_config(folder, out, model={"path": folder, "weight_dtype": "bf16"},
                       sampling={"height": size, "width": size}, memory={"mixed_precision": "bf16", "denoiser_checkpointing": True,
                                            "vae_checkpointing": True, "offload_text_encoder": True, **memory},
                       localize={"spec": "saliency"})


def _device_bytes(modules) -> int:
    """Rounded bytes of the distinct storages of ``modules``' parameters and buffers (what the device holds)."""
    seen, total = set(), 0
    for m in modules:
        for t in [*m.parameters(), *m.buffers()]:
            key = t.untyped_storage()._cdata
            if key not in seen:
                seen.add(key)
                total += rounded(t.untyped_storage().nbytes())
    return total


# ------------------------------------------------------------------------------------------ architectures
@pytest.mark.slow
@pytest.mark.parametrize("arch,denoiser_m,text_m", [
    ("sd35-medium", 2243.2, [123.7, 694.7, 4762.3]),
    ("sd35-large", 8056.6, [123.7, 694.7, 4762.3]),
    ("flux1-dev", 11901.4, [123.1, 4762.3]),
    ("flux1-schnell", 11891.2, [123.1, 4762.3]),
])
def test_named_flow_architectures_have_the_released_parameter_counts(arch, denoiser_m, text_m):
    """Built under fake tensors (no memory). Released counts: SD3.5-Medium 2.24B, Large 8.06B, FLUX.1 11.9B,
    CLIP-L 123M (with projection 124M), CLIP-G 695M, T5-XXL encoder 4.76B; the 16-channel VAE 83.8M."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    if arch.startswith("flux") and not HAS_FLUX:
        pytest.skip("the FLUX family is not in this tree yet")
    with FakeTensorMode(allow_non_fake_inputs=True):
        m = build_model(model_spec(arch=arch), "bf16")
    count = lambda mod: round(sum(p.numel() for p in mod.parameters()) / 1e6, 1)  # noqa: E731
    assert count(m.denoiser) == denoiser_m and [count(e) for e in m.text_encoders] == text_m and count(m.vae) == 83.8
    dtypes = {t.dtype for mod in [m.denoiser, m.vae, *m.text_encoders] for t in [*mod.parameters(), *mod.buffers()]
              if t.is_floating_point()}
    assert dtypes == {torch.bfloat16} and m.native_size == 1024


@pytest.mark.parametrize("kind,parts", [("sd3", 5), ("sd3_no_t5", 4), ("flux", 4)])
def test_folder_configs_build_what_the_family_loads(kind, parts, request):
    """The fake build from config.json files holds the same device bytes, dtypes and extras as the family's
    load() of the real folder (bf16; SD3's persistent positional-embedding buffer and T5's tied embedding
    included), and the same model pieces in the same order."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fnf.families.registry import load_model

    folder = request.getfixturevalue(kind)
    real = load_model(folder, weight_dtype="bf16")
    with FakeTensorMode(allow_non_fake_inputs=True):
        fake = build_model(model_spec(folder), "bf16")
        fake_parts = [fake.denoiser, fake.vae, *fake.text_encoders]
        fake_bytes = [_device_bytes([m]) for m in fake_parts]
    real_parts = [real.denoiser, real.vae, *real.text_encoders]
    assert [type(m) for m in fake_parts] == [type(m) for m in real_parts] and len(real_parts) == parts
    assert fake_bytes == [_device_bytes([m]) for m in real_parts]
    assert fake.family is real.family and fake.settings == real.settings and fake.vae_upcast == real.vae_upcast
    assert [type(t).__name__ for t in fake.tokenizers] == [type(t).__name__ for t in real.tokenizers]


# ------------------------------------------------------------------------------------------ the trace
def _same(a, b) -> None:
    assert a.peak_bytes == b.peak_bytes > 0 and a.phases == b.phases
    assert a.held_at_peak == b.held_at_peak and a.peak_phase == b.peak_phase and a.persistent == b.persistent


@pytest.mark.slow
def test_fake_trace_equals_the_real_tensor_counter_sd3(sd3, tmp_path):
    cfg = memory_config(sd3, str(tmp_path))
    _same(estimate(cfg, model_dir=sd3, fake=True), estimate(cfg, model_dir=sd3, fake=False))


@pytest.mark.slow
def test_fake_trace_equals_the_real_tensor_counter_flux(flux, tmp_path):
    import tiny_flux

    cfg = memory_config(flux, str(tmp_path), size=tiny_flux.IMAGE_SIZE)
    _same(estimate(cfg, model_dir=flux, fake=True), estimate(cfg, model_dir=flux, fake=False))


@pytest.mark.slow
def test_text_encoders_count_until_offloaded(sd3, tmp_path):
    """Offloaded: the frozen weights on the device after the prompts are encoded are the transformer and the VAE
    only (T5 and both CLIPs counted during encoding, then not; the transformer reaches the device only after
    the encoding); kept: all five."""
    from fnf.families.registry import load_model

    real = load_model(sd3, weight_dtype="bf16")
    denoiser_vae = _device_bytes([real.denoiser, real.vae])
    everything = _device_bytes([real.denoiser, real.vae, *real.text_encoders])
    off = estimate(memory_config(sd3, str(tmp_path)), model_dir=sd3)
    kept = estimate(memory_config(sd3, str(tmp_path), offload_text_encoder=False), model_dir=sd3)
    assert off.persistent["weights (frozen, on the device)"] == denoiser_vae
    assert kept.persistent["weights (frozen, on the device)"] == everything > denoiser_vae
    transformer = _device_bytes([real.denoiser])
    # all encoders on the device to encode, the transformer not yet (fnf.models.encode_before_denoiser)
    assert off.phases["build: prompt encoding"]["at_entry"] == everything - transformer
    assert kept.phases["build: prompt encoding"]["at_entry"] >= everything
    step = [v["peak"] for k, v in off.phases.items() if not k.startswith("build: ")]
    step_kept = [v["peak"] for k, v in kept.phases.items() if not k.startswith("build: ")]
    assert max(step_kept) - max(step) == everything - denoiser_vae


@pytest.mark.slow
def test_command_on_the_tiny_sd3_folder_writes_the_json_keys(sd3, tmp_path, capsys):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("memory: {mixed_precision: bf16}\nlocalize: {spec: saliency}\nlora: {rank: 4}\n"
                        "train: {prompts: [a red car]}\n")
    out = tmp_path / "est.json"
    assert cli.main(["estimate-memory", "--config", str(cfg_file), "--model", sd3, "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "estimated torch.cuda.max_memory_allocated" in text and "(sd3)" in text
    est = json.loads(out.read_text())["estimate"]
    assert {"estimate_of", "peak_gib", "peak_bytes", "peak_phase", "peak_step", "plan_for_gib", "margin",
            "not_included", "held_at_peak_gib", "phases", "persistent_gib", "settings", "attention_backends",
            "trace_seconds"} <= set(est)
    assert abs(sum(est["held_at_peak_gib"].values()) - est["peak_gib"]) < 1e-3
    assert est["settings"]["kind"] == "sd3" and est["settings"]["height"] == 32   # the tiny folder's native size
    assert est["settings"]["memory"]["fused_lora"] == "off"


def test_unknown_flow_pipeline_and_missing_config_are_clear_errors(sd3, tmp_path, capsys):
    from fnf.core import ModelLoadError
    from fnf.memory.estimate import model_spec

    foo = tmp_path / "foo"
    foo.mkdir()
    (foo / "model_index.json").write_text(json.dumps({"_class_name": "FooPipeline"}))
    with pytest.raises(ModelLoadError, match="'FooPipeline' .* which fnf does not support"):
        model_spec(str(foo))
    broken = tmp_path / "sd3_broken"
    (broken / "transformer").mkdir(parents=True)
    index = json.loads(open(os.path.join(sd3, "model_index.json")).read())
    (broken / "model_index.json").write_text(json.dumps(index))
    assert cli.main(["estimate-memory", "--model", str(broken)]) == 2
    assert "transformer/config.json is missing" in capsys.readouterr().err
