"""benchmarks/train_memory.py: variants, architectures (parameter counts of the real models) and a CPU smoke run."""
import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import train_memory as tm  # noqa: E402


def test_variants_are_cumulative_and_validated():
    naive = tm.variant_settings("naive")["memory"]
    assert not any(v for k, v in naive.items() if k != "fused_lora") and naive["fused_lora"] == "off"
    full = tm.variant_settings("full")["memory"]
    assert full == {"denoiser_checkpointing": True, "vae_checkpointing": True, "reward_checkpointing": True,
                    "offload_text_encoder": True, "fused_lora": "on"}
    draft = tm.variant_settings("draft_k")
    assert draft["memory"] == full and draft["objective"]["beta"] == 0 and draft["localize"]["spec"] == "none"
    assert "train" not in draft
    pooled = tm.variant_settings("full+reference_pool")
    assert pooled["memory"] == full and pooled["train"] == {"seeds_per_prompt": 1} and "objective" not in pooled
    with pytest.raises(ValueError, match="--variants"):
        tm.variant_settings("nope")


@pytest.mark.parametrize("arch,unet_m,text_m", [("sd15", 859.5, [123.1]), ("sdxl", 2567.5, [123.1, 694.7])])
def test_architectures_have_the_real_parameter_counts(arch, unet_m, text_m):
    m = tm.build_model(arch, "meta")
    count = lambda mod: round(sum(p.numel() for p in mod.parameters()) / 1e6, 1)  # noqa: E731
    assert count(m.denoiser) == unet_m and [count(e) for e in m.text_encoders] == text_m
    assert m.native_size == tm.ARCHS[arch]["resolution"]
    with torch.device("meta"):
        assert count(tm.clip_reward(arch=arch)) == 304.2                 # CLIP ViT-L/14 vision tower + MLP head


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["tiny", "tiny_xl"])
def test_tiny_cpu_run_writes_records(tmp_path, arch):
    out = tmp_path / "r.json"
    assert tm.main(["--model", arch, "--variants", "naive,full,full+reference_pool,draft_k", "--steps", "2", "--sampling-steps", "3",
                    "--device", "cpu", "--json", str(out)]) == 0
    records = json.loads(out.read_text())
    assert [r["variant"] for r in records] == ["naive", "full", "full+reference_pool", "draft_k"]
    keys = {"benchmark", "device", "commit", "date", "command", "model", "resolution", "variant", "peak_gib",
            "step_s"}
    for r in records:
        assert keys <= set(r) and r["benchmark"] == "train_memory" and r["model"] == arch
        assert r["step_s"] > 0 and r["skipped_steps"] == 0 and r["peak_gib"] is None and not r["oom"]
