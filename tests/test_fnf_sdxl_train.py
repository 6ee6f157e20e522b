"""The whole training loop on the tiny SDXL pipeline: Focus-N-Fix steps, a finite log, and an exported LoRA that
StableDiffusionXLPipeline.load_lora_weights loads and that reproduces the trainer's own samples."""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fnf_tiny_models import IMAGE_SIZE, cached_model, tiny_config, one_torch_thread  # noqa: E402,F401
from fnf.models import LORA_WEIGHTS, adapters_disabled, encode_prompts, lora_state_dict  # noqa: E402
from fnf.sampling import initial_latents, sample_images  # noqa: E402
from fnf.train import train  # noqa: E402


def test_sdxl_training_loop_end_to_end(tmp_path_factory, tmp_path):
    from diffusers import StableDiffusionXLPipeline

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
    lora = lora_state_dict(m.unet)
    assert all(torch.isfinite(p).all() for p in lora.values())
    assert max(p.abs().max().item() for n, p in lora.items() if "lora_B" in n) > 1e-4  # B starts at zero

    prompt = "a red car"
    cond = encode_prompts(m, [prompt], height=IMAGE_SIZE, width=IMAGE_SIZE)
    uncond = encode_prompts(m, [""], height=IMAGE_SIZE, width=IMAGE_SIZE, zero=True)
    x_T = initial_latents(m, 1, IMAGE_SIZE, IMAGE_SIZE, torch.Generator().manual_seed(7), "cpu")
    ours = sample_images(m, x_T, cond, uncond, steps=4, guidance_scale=3.0)
    with adapters_disabled(m.unet):
        ours_base = sample_images(m, x_T, cond, uncond, steps=4, guidance_scale=3.0)
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(latents=x_T.clone(), num_inference_steps=4, guidance_scale=3.0, output_type="pt",
              height=IMAGE_SIZE, width=IMAGE_SIZE)
    with torch.no_grad():
        base = pipe(prompt, **kw).images
        pipe.load_lora_weights(res.lora_dir, weight_name=LORA_WEIGHTS)
        tuned = pipe(prompt, **kw).images
    assert (tuned - base).abs().max() > 1e-3                   # the exported LoRA does something
    torch.testing.assert_close(base, ours_base, rtol=0, atol=1e-4)
    torch.testing.assert_close(tuned, ours, rtol=0, atol=1e-4)
