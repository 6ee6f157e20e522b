"""`fnf sample` and `fnf localize` keep data: a used --out is refused unless --overwrite (which moves the earlier
files aside), names carry prompt index, seed and LoRA, manifest.json comes before the pictures, pictures are
labelled; every command checks --out before a model loads."""
import json
import os
import sys

import pytest
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fnf_tiny_models import cached_model, one_torch_thread, randomize_lora_B  # noqa: E402,F401

from fnf import cli  # noqa: E402

PROMPTS = ["a red car", "a photo of a cat"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from fnf.families.registry import load_model
    from fnf.lora import add_lora, save_lora

    root = tmp_path_factory.mktemp("sample")
    folder = cached_model("sd", str(tmp_path_factory.getbasetemp()))
    m = load_model(folder)
    add_lora(m, rank=4, alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    randomize_lora_B(m.denoiser, seed=3, std=0.2)
    save_lora(m, str(root / "fix" / "lora"))
    return {"model": folder, "lora": str(root / "fix" / "lora"), "root": root}


def sample_args(s, out, *extra):
    return ["sample", "--model", s["model"], "--lora", s["lora"], "--prompts", *PROMPTS, "--seeds", "3",
            "--set", "sampling.steps=2", "--out", str(out), *extra]


def localize_args(s, out, *extra):
    return ["localize", "--model", s["model"], "--prompts", PROMPTS[0], "--seeds", "0", "5", "--reward",
            "brightness", "--localizer", "heatmap:box", "--set", "sampling.steps=2", "--out", str(out), *extra]


def no_loading(monkeypatch):
    import fnf.families.registry

    def fail(*a, **k):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(fnf.families.registry, "load_model", fail)


def manifest_first(monkeypatch):
    """save_png asserts that manifest.json is already in the picture's folder."""
    import fnf.images

    real, seen = fnf.images.save_png, []

    def save_png(image, path):
        assert os.path.isfile(os.path.join(os.path.dirname(path), "manifest.json")), path
        seen.append(os.path.basename(path))
        real(image, path)

    for module in ("fnf.commands.sample", "fnf.commands.localize"):
        monkeypatch.setattr(f"{module}.save_png", save_png)
    return seen


def test_sample_names_manifest_labels_and_never_overwrites(setup, tmp_path, monkeypatch, capsys):
    out = tmp_path / "cmp"
    seen = manifest_first(monkeypatch)
    assert cli.main(sample_args(setup, out)) == 0
    folder = out / "samples_compare"
    expected = {f"p{pi:03d}_s3_{what}.png" for pi in range(2) for what in ("base", "fix", "base-vs-fix")}
    assert set(seen) == expected and set(os.listdir(folder)) == expected | {"manifest.json"}
    m = json.loads((folder / "manifest.json").read_text())
    assert m["command"] == "fnf sample" and m["lora"]["name"] == "fix" and m["prompts"] == PROMPTS
    assert m["settings"]["steps"] == 2 and m["settings"]["family"] == "sd" and m["seeds"] == [3]
    rows = {r["file"]: r for r in m["files"]}
    assert set(rows) == expected
    assert rows["p001_s3_fix.png"] == {"file": "p001_s3_fix.png", "prompt_index": 1, "prompt": PROMPTS[1],
                                       "seed": 3, "image": "LoRA fix"}
    pair = Image.open(folder / "p000_s3_base-vs-fix.png")
    single = Image.open(folder / "p000_s3_base.png")
    assert pair.height > 2 * single.height                        # a label strip over images scaled up to be read
    assert "{" not in capsys.readouterr().out

    before = {n: (folder / n).read_bytes() for n in os.listdir(folder)}
    no_loading(monkeypatch)
    assert cli.main(sample_args(setup, out)) == 2
    err = capsys.readouterr().err
    assert "holds an earlier fnf sample (samples_compare)" in err and "--overwrite" in err and err.count("\n") == 1
    assert {n: (folder / n).read_bytes() for n in os.listdir(folder)} == before
    monkeypatch.undo()
    assert cli.main(sample_args(setup, out, "--overwrite", "--seeds", "4")) == 0
    previous = [n for n in os.listdir(out) if n.startswith("previous-")]
    assert len(previous) == 1
    moved = out / previous[0] / "samples_compare"
    assert {n: (moved / n).read_bytes() for n in os.listdir(moved)} == before       # nothing lost
    assert sorted(os.listdir(folder)) == sorted([f"p{pi:03d}_s4_{w}.png" for pi in range(2)
                                                 for w in ("base", "fix", "base-vs-fix")] + ["manifest.json"])


def test_localize_names_manifest_panel_and_never_overwrites(setup, tmp_path, monkeypatch, capsys):
    out = tmp_path / "masks"
    seen = manifest_first(monkeypatch)
    assert cli.main(localize_args(setup, out)) == 0
    folder = out / "localize"
    parts = ("i0", "heatmap", "mask", "overlay", "panel")
    expected = {f"p000_s{s}_{p}.png" for s in (0, 5) for p in parts}
    assert set(seen) == expected and set(os.listdir(folder)) == expected | {"manifest.json"}
    m = json.loads((folder / "manifest.json").read_text())
    assert m["reward"]["spec"] == "brightness" and m["localize"]["spec"] == "heatmap:box"
    assert {(r["file"], r["seed"], r["prompt"]) for r in m["files"]} == {
        (f"p000_s{s}_{p}.png", s, PROMPTS[0]) for s in (0, 5) for p in parts}
    assert Image.open(folder / "p000_s0_panel.png").height > 2 * Image.open(folder / "p000_s0_i0.png").height
    capsys.readouterr()
    before = {n: (folder / n).read_bytes() for n in os.listdir(folder)}
    no_loading(monkeypatch)
    assert cli.main(localize_args(setup, out)) == 2
    err = capsys.readouterr().err
    assert "holds an earlier fnf localize (localize)" in err and err.count("\n") == 1
    monkeypatch.undo()
    assert cli.main(localize_args(setup, out, "--overwrite")) == 0
    moved = next(out.glob("previous-*/localize"))
    assert {n: (moved / n).read_bytes() for n in os.listdir(moved)} == before


@pytest.mark.parametrize("command", ["train", "sample", "localize", "eval", "demo"])
def test_an_out_that_is_a_file_is_one_line_before_any_model_loads(setup, tmp_path, monkeypatch, capsys, command):
    import fnf.toy.demo

    no_loading(monkeypatch)
    monkeypatch.setattr(fnf.toy.demo, "run_demo", lambda *a, **k: pytest.fail("the demo ran"))
    monkeypatch.setattr("fnf.commands.train.train", lambda *a, **k: pytest.fail("training started"))
    (tmp_path / "f").write_text("user data")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red car\n")
    for out in (tmp_path / "f", tmp_path / "f" / "sub"):
        argv = {"train": ["train", "--model", setup["model"], "--set", "train.prompts=[a]"],
                "sample": sample_args(setup, out)[:-2], "localize": localize_args(setup, out)[:-2],
                "eval": ["eval", "--model", setup["model"], "--reward", "brightness", "--prompts-file", str(prompts)],
                "demo": ["demo"]}[command] + ["--out", str(out)]
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "expected a folder, found a file" in err and err.count("\n") == 1, err
    assert (tmp_path / "f").read_text() == "user data"
