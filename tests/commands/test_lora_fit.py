"""A LoRA that does not belong to the model (another family, another size, another rank layout) is one line
naming both, exit 2, before any sampling, in every command that takes --lora (sample, eval)."""
import json
import os
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fnf_tiny_models import cached_model, one_torch_thread  # noqa: E402,F401

from fnf import cli  # noqa: E402
from fnf.core import LORA_WEIGHTS  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The tiny SD folder, its own LoRA, and three that are not its: FLUX.1 keys, twice the width, rank 8 under
    rank-4 metadata (each written as diffusers' save_lora_weights writes them)."""
    from fnf.families.registry import load_model
    from fnf.lora import add_lora, save_lora

    root = tmp_path_factory.mktemp("lorafit")
    folder = cached_model("sd", str(tmp_path_factory.getbasetemp()))
    m = load_model(folder)
    add_lora(m, rank=4, alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    own = str(root / "own" / "lora")
    save_lora(m, own)
    path = os.path.join(own, LORA_WEIGHTS)
    state = load_file(path)
    with open(path, "rb") as f:
        meta = json.loads(f.read(int.from_bytes(f.read(8), "little")))["__metadata__"]

    def write(name, tensors, metadata):
        os.makedirs(root / name, exist_ok=True)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(root / name / LORA_WEIGHTS), metadata=metadata)
        return str(root / name)

    flux_meta = {"format": "pt", "lora_adapter_metadata": meta["lora_adapter_metadata"].replace("unet.",
                                                                                                 "transformer.")}
    flux = write("flux_lora", {f"transformer.single_transformer_blocks.0.attn.{p}.{ab}.weight": torch.zeros(4, 16)
                               for p in ("to_q", "to_k") for ab in ("lora_A", "lora_B")}, flux_meta)
    wide = write("wide_lora", {k: torch.zeros(*(2 * n if n != 4 else n for n in v.shape))
                               for k, v in state.items()}, meta)
    rank8 = write("rank8_lora", {k: torch.zeros(*(8 if n == 4 else n for n in v.shape))
                                 for k, v in state.items()}, meta)
    return {"model": folder, "own": own, "flux": flux, "wide": wide, "rank8": rank8}


def no_loading(monkeypatch):
    import fnf.families.registry

    monkeypatch.setattr(fnf.families.registry, "load_model",
                        lambda *a, **k: pytest.fail("the model loaded before the LoRA was checked"))


def no_sampling(monkeypatch):
    for module in ("fnf.commands.sample", "fnf.evaluate"):
        monkeypatch.setattr(f"{module}.sample_seeded", lambda *a, **k: pytest.fail("sampled before the LoRA check"))


def argv(command, s, lora, out):
    if command == "sample":
        return ["sample", "--model", s["model"], "--lora", lora, "--prompts", "a red car", "--out", str(out)]
    return ["eval", "--model", s["model"], "--lora", lora, "--prompts", "a red car", "--reward", "brightness",
            "--no-progress", "--out", str(out)]


@pytest.mark.parametrize("command", ["sample", "eval"])
def test_a_lora_of_another_family_is_one_line_before_the_model_loads(setup, tmp_path, monkeypatch, capfd, command):
    no_loading(monkeypatch)
    assert cli.main(argv(command, setup, setup["flux"], tmp_path / "o")) == 2
    err = capfd.readouterr().err
    assert err.count("\n") == 1, err
    assert "does not belong to --model" in err and "the LoRA is for a FLUX.1 transformer" in err, err
    assert "the model is Stable Diffusion (unet)" in err and "holds no unet LoRA weights" in err, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("command", ["sample", "eval"])
@pytest.mark.parametrize("lora, words", [("wide", ["input size is 32, the model's is 16", "another size",
                                                   "attention width 32", "attention width 16"]),
                                         ("rank8", ["rank 8 in the weights, rank 4 in the LoRA's metadata",
                                                    "another rank layout"])])
def test_a_lora_of_another_size_or_rank_layout_is_one_line_before_sampling(setup, tmp_path, monkeypatch, capfd,
                                                                           command, lora, words):
    no_sampling(monkeypatch)
    assert cli.main(argv(command, setup, setup[lora], tmp_path / "o")) == 2
    err = capfd.readouterr().err.replace("\r", "\n")
    lines = [line for line in err.splitlines() if line.startswith("fnf ")]
    assert len(lines) == 1 and "does not belong to --model" in lines[0], err
    assert "Traceback" not in err and "size mismatch" not in err and "warn" not in err.lower(), err
    for word in words:
        assert word in lines[0], err
    assert "Stable Diffusion 1.x/2.x UNet" in lines[0]


def test_the_models_own_lora_and_other_key_formats_pass_the_check(setup, tmp_path):
    """The model's own LoRA passes; a LoRA in a key format diffusers converts (kohya) is left to the loader."""
    from fnf.families.registry import load_model
    from fnf.inference import check_lora_fits, check_lora_for_folder

    check_lora_for_folder(setup["own"], setup["model"])
    m = load_model(setup["model"])
    check_lora_fits(setup["own"], m.family, setup["model"], m.denoiser)
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file({f"{key}.lora_down.weight": torch.zeros(4, 16), f"{key}.lora_up.weight": torch.zeros(16, 4)},
              str(tmp_path / LORA_WEIGHTS))
    check_lora_for_folder(str(tmp_path), setup["model"])
    check_lora_fits(str(tmp_path), m.family, setup["model"], m.denoiser)
