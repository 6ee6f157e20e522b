"""The whole training loop on the tiny SDXL pipeline: Focus-N-Fix steps, a finite log, and an exported LoRA that
StableDiffusionXLPipeline.load_lora_weights loads and that reproduces the trainer's own samples."""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fnf_tiny_models import cached_model, one_torch_thread, ours_and_pipeline_images, tiny_config  # noqa: E402,F401
from fnf.lora import lora_state_dict  # noqa: E402
from fnf.train import train  # noqa: E402


def test_sdxl_training_loop_end_to_end(tmp_path_factory, tmp_path):

    sdxl = cached_model("sdxl", str(tmp_path_factory.getbasetemp()))
    out = tmp_path / "run"
    res = train(tiny_config(sdxl, str(out), localize={"spec": "saliency", "radius": 1},
                            train={"steps": 2, "lr": 5e-2, "grad_accum": 2}))
    m = res.model
    assert m.kind == "sdxl" and not any(h["skipped"] for h in res.history)
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [r["step"] for r in log] == [1, 2]
    for r in log:
        assert {"reward", "penalty", "loss", "grad_norm", "lr"} <= set(r) and not r["scaler_overflow"]
        assert all(torch.isfinite(torch.tensor(float(r[k]))) for k in ("reward", "penalty", "loss", "grad_norm"))
    lora = lora_state_dict(m.denoiser)
    assert all(torch.isfinite(p).all() for p in lora.values())
    assert max(p.abs().max().item() for n, p in lora.items() if "lora_B" in n) > 1e-4  # B starts at zero

    im = ours_and_pipeline_images(m, sdxl, res.lora_dir, zero_uncond=True)
    assert (im["tuned"] - im["base"]).abs().max() > 1e-3       # the exported LoRA does something
    torch.testing.assert_close(im["base"], im["ours_base"], rtol=0, atol=1e-4)
    torch.testing.assert_close(im["tuned"], im["ours"], rtol=0, atol=1e-4)
