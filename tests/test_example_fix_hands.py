"""docs/example_fix_hands.md runs end to end (issue 27.5): its commands and its Python block, in the page's order,
through fnf.cli.main on a tiny Z-Image folder, with stand-ins for the user's files made here: the hand-quality
classifier (a tiny torchvision-format ResNet-18 state dict whose log p(good) is below log 0.5 everywhere, so the
known-bad pool keeps every entry) and the hand-artifact segmenter (TorchScript: logits +10 on the left half of the
image, -10 elsewhere). configs/zimage_fix_hands.yaml is shrunk to seconds (2 steps at 32x32, K = 1, rank 4, 2
training steps, a large lr so the LoRA visibly moves the image).

Checks, each against an independent computation: every localize mask is the stand-in's sigmoid > 0.5 dilated by
the config's radius (computed here by hand); the LoRA's B matrices left zero; training wrote the ComfyUI file; the
pipeline's own load_lora_weights on that file gives the images of the diffusers LoRA folder within 1e-4, and those
differ from the base model's by > 1e-2; fnf sample / eval wrote their images and metrics."""
import contextlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import tiny_zimage  # noqa: E402
from fnf_tiny_models import one_torch_thread  # noqa: E402,F401

ROOT = os.path.dirname(HERE)
DOC = os.path.join(ROOT, "docs", "example_fix_hands.md")
CONFIG = "configs/zimage_fix_hands.yaml"
MARK = "<!-- run by tests/test_example_fix_hands.py::test_the_worked_example_runs_end_to_end -->"
SIZE, RADIUS = 32, 2

pytestmark = pytest.mark.skipif(not tiny_zimage.have_zimage(), reason="this diffusers has no ZImagePipeline")


class LeftHalfSegmenter(torch.nn.Module):
    """Stand-in hand-artifact segmenter: (B, 3, h, w) -> (B, 1, h, w) logits, +10 on the left half, -10 elsewhere."""

    def forward(self, x):
        logits = torch.full_like(x[:, :1], -10.0)
        logits[..., : x.shape[-1] // 2] = 10.0
        return logits


def doc_blocks():
    """(language, text) of the page's blocks this test runs, in order."""
    text = open(DOC, encoding="utf-8").read()
    found = []
    for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M):
        before = text[:m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        if before.strip() == MARK:
            found.append((m.group(1), m.group(2)))
    return found


def user_files(models: str) -> dict:
    """The user's three things, as tiny local stand-ins: {placeholder path: local path}."""
    from safetensors.torch import save_file

    from fnf.classifiers import ResNet

    torch.manual_seed(0)
    net = ResNet("resnet18", 2, width=4)
    with torch.no_grad():
        net.fc.weight.mul_(0.1)
        net.fc.bias.copy_(torch.tensor([-1.0, 1.0]))      # p(good) ~ sigmoid(-2): every I0 is a "bad hand"
    clf = os.path.join(models, "hand_quality.safetensors")
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, clf)
    seg = os.path.join(models, "hand_artifact_heatmap.pt")
    torch.jit.save(torch.jit.script(LeftHalfSegmenter()), seg)
    return {"/models/Z-Image-Turbo": tiny_zimage.cached_zimage(models),
            "/models/hands/hand_quality_resnet50.safetensors": clf,
            "/models/hands/hand_artifact_heatmap.pt": seg}


def shrunk_config(files: dict) -> str:
    """configs/zimage_fix_hands.yaml with the user's paths swapped and its sizes shrunk to seconds."""
    text = open(os.path.join(ROOT, CONFIG), encoding="utf-8").read()
    for placeholder, local in files.items():
        text = text.replace(placeholder, local)
    cfg = yaml.safe_load(text)
    cfg["sampling"].update(steps=2, truncation_k=1, height=SIZE, width=SIZE)
    cfg["lora"].update(rank=4, alpha=4)
    cfg["reward"]["kwargs"]["model_kwargs"].update(arch="resnet18", width=4)
    cfg["reward"]["kwargs"]["size"] = SIZE
    cfg["localize"]["kwargs"]["size"] = SIZE
    cfg["localize"]["radius"] = RADIUS
    cfg["model"]["weight_dtype"] = "fp32"
    cfg["memory"]["mixed_precision"] = "no"
    cfg["train"].update(prompts=cfg["train"]["prompts"][:2], seeds_per_prompt=2, steps=2, grad_accum=1, lr=0.05,
                        checkpoint_every=1, sample_every=2, device="cpu")
    return yaml.safe_dump(cfg)


def run_fnf(argv, cwd):
    from fnf import cli

    old = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(io.StringIO()) as out:
            try:
                code = cli.main(argv)
            except SystemExit as exc:
                code = exc.code
    finally:
        os.chdir(old)
    return code or 0, out.getvalue()


def commands(text):
    for logical in re.sub(r"\\\n", " ", text).splitlines():
        argv = shlex.split(logical, comments=True)
        if argv:
            yield argv


def swap(text, files, home):
    for placeholder, local in files.items():
        text = text.replace(placeholder, local)
    return text.replace("~/", home + "/")


def python_for_cpu(text):
    """The Python block as the tiny CPU run needs it (same calls; device, dtype and sizes changed)."""
    return (text.replace('.to("cuda")', "").replace('Generator("cuda")', "Generator()")
            .replace("torch.bfloat16", "torch.float32")
            .replace("num_inference_steps=9", f"height={SIZE}, width={SIZE}, num_inference_steps=2"))


def expected_mask():
    """The localizer's mask for the stand-in, by hand: sigmoid(+-10) > 0.5 on the left half, grown by RADIUS."""
    mask = np.zeros((SIZE, SIZE), dtype=bool)
    mask[:, : SIZE // 2 + RADIUS] = True
    return mask


def pipeline_images(pipe, prompt):
    with torch.no_grad():
        return pipe(prompt=[prompt], num_inference_steps=2, guidance_scale=0.0, height=SIZE, width=SIZE,
                    output_type="pt", generator=torch.Generator().manual_seed(0)).images


def test_the_page_runs_every_block_it_marks():
    blocks = doc_blocks()
    langs = [lang for lang, _ in blocks]
    assert langs.count("python") == 1 and langs.count("bash") >= 6, langs
    text = " ".join(t for _, t in blocks)
    for command in ("fnf localize", "fnf estimate-memory", "fnf train", "fnf sample", "fnf eval", "fnf export-lora",
                    "load_lora_weights"):
        assert command in text, command
    # every runnable block of the page is one this test runs
    page = open(DOC, encoding="utf-8").read()
    assert len(re.findall(r"^```(?:bash|python)\n", page, re.M)) == len(blocks)


@pytest.mark.slow     # ~45 s on 2 cores: two estimate traces, two localize runs, train, sample, eval
def test_the_worked_example_runs_end_to_end(tmp_path, one_torch_thread):  # noqa: F811
    from diffusers import ZImagePipeline
    from safetensors.torch import load_file

    print("seed 0 (fixed: torch.manual_seed(0) for the stand-in classifier)")
    models, work, home = (str(tmp_path / d) for d in ("models", "work", "home"))
    for d in (models, work, home):
        os.makedirs(d)
    os.makedirs(os.path.join(work, "configs"))
    files = user_files(models)
    with open(os.path.join(work, CONFIG), "w") as f:
        f.write(shrunk_config(files))

    for lang, text in doc_blocks():
        text = swap(text, files, home)
        if lang == "python":
            old = os.getcwd()
            os.chdir(work)
            try:
                exec(compile(python_for_cpu(text), DOC, "exec"), {"__name__": "__docs__"})
            finally:
                os.chdir(old)
            continue
        for argv in commands(text):
            if argv[0] == "fnf":
                if argv[1] == "estimate-memory" and "--arch" in argv:    # the tiny folder, not the full-size trace
                    i = argv.index("--arch")
                    argv = argv[:i] + argv[i + 2:]
                code, out = run_fnf(argv[1:], work)
            else:
                result = subprocess.run(argv, cwd=work, capture_output=True, text=True, timeout=60)
                code, out = result.returncode, result.stdout + result.stderr
            assert code == 0, f"`{' '.join(argv)}` exited {code}:\n{out[-3000:]}"

    # (b) masks: one per prompt x seed, each the stand-in's thresholded, dilated output
    from PIL import Image

    masks = sorted(p for p in os.listdir(os.path.join(work, "runs/hands_masks/localize")) if p.endswith("_mask.png"))
    assert len(masks) == 2 * 4, masks
    for name in masks:
        got = np.asarray(Image.open(os.path.join(work, "runs/hands_masks/localize", name)).convert("L")) > 127
        assert (got == expected_mask()).all(), (name, got.sum(), expected_mask().sum())

    # (e) the run trained: every LoRA B left zero; the ComfyUI file came from training
    run = os.path.join(work, "runs/zimage_fix_hands")
    lora = load_file(os.path.join(run, "lora", "pytorch_lora_weights.safetensors"))
    ups = [v for k, v in lora.items() if "lora_B" in k]
    assert ups and all(v.abs().max() > 0 for v in ups)
    comfy = os.path.join(run, "lora-comfyui.safetensors")
    keys = load_file(comfy).keys()
    assert keys and all(k.startswith("diffusion_model.") for k in keys)
    assert os.path.isfile(os.path.join(home, "ComfyUI/models/loras/zimage_fix_hands.safetensors"))
    assert os.path.isfile(os.path.join(work, "runs/zimage_fix_hands_comfyui.safetensors"))

    # (f) base vs fine-tuned
    assert any(n.endswith("_base-vs-zimage_fix_hands.png") for n in os.listdir(os.path.join(work, "runs/hands_compare",
                                                                                     "samples_compare")))
    metrics = json.load(open(os.path.join(work, "runs/hands_eval/metrics.json")))
    assert len(json.dumps(metrics)) > 100 and os.path.isfile(os.path.join(work, "runs/hands_eval/report.md"))
    assert os.path.isfile(os.path.join(work, "pianist_fixed.png"))

    # (g) the pipeline's load_lora_weights on the ComfyUI file = the diffusers folder, which moves the image
    pipe = ZImagePipeline.from_pretrained(files["/models/Z-Image-Turbo"], torch_dtype=torch.float32)
    prompt = "a pianist's hands on the keys, close-up"
    base = pipeline_images(pipe, prompt)
    pipe.load_lora_weights(os.path.join(run, "lora"))
    ref = pipeline_images(pipe, prompt)
    assert (ref - base).abs().max() > 1e-2
    pipe.unload_lora_weights()
    pipe.load_lora_weights(comfy)
    got = pipeline_images(pipe, prompt)
    assert (got - ref).abs().max() < 1e-4, (got - ref).abs().max()
