"""`fnf export-lora` and `train.export_formats`: the family from the run's config.yaml (or --family), one file per
call, never a user's file replaced without --overwrite, bad input one line and exit 2."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fnf import cli, config
from fnf.config import ConfigError
from fnf.core import LORA_WEIGHTS
from tests.fnf_tiny_models import cached_model, one_torch_thread, tiny_config  # noqa: F401

os.environ.setdefault("HF_HUB_OFFLINE", "1")
QKV = ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_v")


def _run(tmp_path, *, kind="auto", model_path="", prefix="transformer.", names=QKV, alpha=8):
    """A run folder as `fnf train` leaves it: config.yaml naming the model, lora/ with a random LoRA."""
    run = tmp_path / "run"
    (run / "lora").mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    state = {}
    for name in names:
        state[f"{prefix}{name}.lora_A.weight"] = torch.randn(4, 8, generator=gen)
        state[f"{prefix}{name}.lora_B.weight"] = torch.randn(8, 4, generator=gen)
    meta = {f"{prefix}r": 4, f"{prefix}lora_alpha": alpha}
    save_file(state, str(run / "lora" / LORA_WEIGHTS), metadata={"lora_adapter_metadata": json.dumps(meta)})
    (run / "config.yaml").write_text(f"model:\n  path: '{model_path}'\n  kind: {kind}\ntrain:\n  out: '{run}'\n")
    return run


def _model_folder(tmp_path, pipeline_class):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": pipeline_class}))
    return str(folder)


def _keys(path):
    with safe_open(str(path), framework="pt") as f:
        return set(f.keys()), dict(f.metadata())


def _fails(capsys, *argv):
    assert cli.main(list(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_family_from_the_run_and_one_file_written(tmp_path, capsys):
    """model.kind auto: the family of model.path's model_index.json (FLUX.1): q, k, v fuse into BFL's qkv; the run
    folder and its lora/ folder give the same file; the report line says what was written."""
    run = _run(tmp_path, model_path=_model_folder(tmp_path, "FluxPipeline"))
    out = tmp_path / "flux_comfy.safetensors"
    assert cli.main(["export-lora", str(run), "--format", "comfyui", "--out", str(out)]) == 0
    line = capsys.readouterr().out.strip()
    assert line == (f"fnf: wrote {out}: flux LoRA, comfyui format, 3 modules -> 3 tensors, rank 4, alpha 8"), line
    keys, meta = _keys(out)
    qkv = "diffusion_model.double_blocks.0.img_attn.qkv"
    assert keys == {f"{qkv}.lora_down.weight", f"{qkv}.lora_up.weight", f"{qkv}.alpha"}
    assert meta["fnf_family"] == "flux" and meta["ss_base_model_version"] == "flux1"
    gone = _run(tmp_path / "gone", model_path=str(tmp_path / "moved"))
    err = _fails(capsys, "export-lora", str(gone), "--format", "comfyui", "--out", str(tmp_path / "g.safetensors"))
    assert "model.kind auto and model.path" in err and "is not a model folder here): pass --family" in err
    out2 = tmp_path / "from_lora_dir.safetensors"
    assert cli.main(["export-lora", str(run / "lora"), "--format", "comfyui", "--out", str(out2)]) == 0
    assert _keys(out2)[0] == keys


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    run = _run(tmp_path, kind="sd3")
    out = tmp_path / "x.safetensors"
    err = _fails(capsys, "export-lora", str(run), "--format", "kohya", "--out", str(out))
    assert "'kohya' is not defined for 'sd3' models (it has: diffusers, comfyui)" in err
    err = _fails(capsys, "export-lora", str(run), "--format", "a1111", "--out", str(out))
    assert "'a1111': expected one of diffusers, kohya, comfyui" in err
    err = _fails(capsys, "export-lora", str(run), "--family", "flux", "--format", "comfyui", "--out", str(out))
    assert "--family 'flux' but" in err and "trained a 'sd3' model" in err
    err = _fails(capsys, "export-lora", str(run), "--format", "comfyui", "--out", str(tmp_path / "x.ckpt"))
    assert "expected a .safetensors file name" in err
    err = _fails(capsys, "export-lora", str(tmp_path / "nope"), "--format", "comfyui", "--out", str(out))
    assert "no such folder" in err
    assert not out.exists()
    mine = tmp_path / "mine.safetensors"
    mine.write_bytes(b"a user's file")
    err = _fails(capsys, "export-lora", str(run), "--format", "comfyui", "--out", str(mine))
    assert "exists; pass --overwrite" in err and mine.read_bytes() == b"a user's file"
    err = _fails(capsys, "export-lora", str(run), "--format", "comfyui", "--out", str(mine), "--dtype", "fp8")
    assert "dtype 'fp8': expected one of fp32, fp16, bf16" in err and mine.read_bytes() == b"a user's file"
    assert cli.main(["export-lora", str(run), "--format", "comfyui", "--out", str(mine), "--overwrite"]) == 0
    assert "transformer.transformer_blocks.0.attn.to_q.lora_B.weight" in _keys(mine)[0]


def test_dtype_casts_every_tensor_and_keeps_the_values(tmp_path, capsys):
    """--dtype fp16 / bf16: every tensor (alpha too) in that dtype, equal to the fp32 file's cast."""
    run = _run(tmp_path, kind="flux")
    files = {}
    for dtype in ("fp32", "fp16", "bf16"):
        files[dtype] = tmp_path / f"{dtype}.safetensors"
        assert cli.main(["export-lora", str(run), "--format", "kohya", "--out", str(files[dtype]),
                         "--dtype", dtype]) == 0
    with safe_open(str(files["fp32"]), framework="pt") as ref:
        full = {k: ref.get_tensor(k) for k in ref.keys()}  # noqa: SIM118
    for dtype, torch_dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        with safe_open(str(files[dtype]), framework="pt") as f:
            assert f.metadata()["fnf_dtype"] == dtype
            for k, v in full.items():
                got = f.get_tensor(k)
                assert got.dtype == torch_dtype and torch.equal(got, v.to(torch_dtype)), k



def test_a_lora_of_another_family_is_refused(tmp_path, capsys):
    """An SD LoRA (unet keys) exported as FLUX.1, and a bare LoRA folder without --family: one line each."""
    run = _run(tmp_path, kind="sd", prefix="unet.", names=("mid_block.attentions.0.proj_in",))
    out = tmp_path / "x.safetensors"
    err = _fails(capsys, "export-lora", str(run / "lora"), "--family", "flux", "--format", "kohya", "--out", str(out))
    assert "--family 'flux' but" in err
    os.remove(run / "config.yaml")
    err = _fails(capsys, "export-lora", str(run / "lora"), "--family", "flux", "--format", "kohya", "--out", str(out))
    assert "is not a LoRA of a 'flux' model: its keys start with ['unet']" in err
    err = _fails(capsys, "export-lora", str(run / "lora"), "--format", "kohya", "--out", str(out))
    assert "cannot tell the model family" in err and "pass --family" in err
    assert cli.main(["export-lora", str(run / "lora"), "--family", "sd", "--format", "kohya", "--out", str(out)]) == 0
    assert "lora_unet_mid_block_attentions_0_proj_in.alpha" in _keys(out)[0]


def test_help_explains_the_formats(capsys):
    with pytest.raises(SystemExit):
        cli.main(["export-lora", "--help"])
    text = capsys.readouterr().out
    for word in ("diffusers", "kohya", "comfyui", "lora_unet_", "diffusion_model.", "--overwrite", "--family",
                 "train.export_formats", "docs/lora_formats.md"):
        assert word in text, word


def test_export_formats_config_is_checked():
    cfg = config.from_dict({"train": {"export_formats": ["kohya", "comfyui"]}})
    assert cfg.train.export_formats == ["kohya", "comfyui"]
    with pytest.raises(ConfigError, match="train.export_formats.*diffusers, kohya, comfyui"):
        config.from_dict({"train": {"export_formats": ["ckpt"]}})
    with pytest.raises(ConfigError, match="sepen.lora=false"):
        config.from_dict({"objective": {"name": "sepen"}, "sepen": {"concepts": ["cat", "dog"]},
                          "train": {"export_formats": ["kohya"]}})


def test_training_writes_the_export_formats(tmp_path, tmp_path_factory, one_torch_thread):  # noqa: F811
    """train.export_formats: <out>/lora-<format>.safetensors beside lora/, equal to fnf export-lora's files."""
    from fnf.train import train

    sd = cached_model("sd", str(tmp_path_factory.getbasetemp() / "export_lora_models"))
    out = str(tmp_path / "run")
    result = train(tiny_config(sd, out, train={"steps": 1, "export_formats": ["kohya", "diffusers"]}))
    assert result.lora_dir == os.path.join(out, "lora")
    for fmt in ("kohya", "diffusers"):
        written = os.path.join(out, f"lora-{fmt}.safetensors")
        again = str(tmp_path / f"again-{fmt}.safetensors")
        assert cli.main(["export-lora", out, "--format", fmt, "--out", again]) == 0
        with safe_open(written, framework="pt") as a, safe_open(again, framework="pt") as b:
            assert set(a.keys()) == set(b.keys()) and len(list(a.keys())) > 0
            assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())
    assert not os.path.exists(os.path.join(out, "lora-comfyui.safetensors"))
