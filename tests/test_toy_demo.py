"""`fnf demo --quick` on the shipped toy model: runs end to end and writes the report files."""
import json
import os

import pytest

from fnf.toy import ASSETS

NEEDED = [os.path.join(ASSETS, "sd", "model_index.json")] + [
    os.path.join(ASSETS, n, "model.safetensors")
    for n in ("defect_classifier", "defect_heatmap", "attribute_classifier")]


def test_demo_subcommand_parses():
    from fnf.cli import build_parser

    args = build_parser().parse_args(["demo", "--out", "x", "--quick", "--eval-seed", "3"])
    assert args.command == "demo" and args.quick and args.eval_seed == 3 and args.out == "x" and not args.no_sepen
    assert not args.overwrite
    assert build_parser().parse_args(["demo", "--no-sepen"]).no_sepen


@pytest.mark.slow
@pytest.mark.skipif(not all(os.path.isfile(p) for p in NEEDED), reason="toy assets not trained yet")
def test_quick_demo_writes_report(tmp_path):
    from fnf.cli import main

    out = str(tmp_path / "demo")
    assert main(["demo", "--out", out, "--quick"]) == 0
    with open(os.path.join(out, "metrics.json")) as f:
        m = json.load(f)
    assert set(m) == {"base", "draft", "fnf_heatmap", "fnf_gradcam", "sepen"}
    sepen = m.pop("sepen")
    assert {"base", "sepen", "gain", "single_base", "single_sepen", "single_change", "loss_gap"} <= set(sepen)
    assert sepen["n_two_object"] == 4 and sepen["n_single_object"] == 2
    for k in m:
        assert {"defect_score", "defect_rate", "alignment", "outside_change_mse", "inside_change_mse"} <= set(m[k])
    assert m["base"]["outside_change_mse"] == 0
    for name in ("report.md", "training.png", "grids/defects.png", "grids/sepen.png", "settings.json"):
        assert os.path.isfile(os.path.join(out, name)), name
    with open(os.path.join(out, "settings.json")) as f:
        assert all(c["ok"] for c in json.load(f)["checks"].values())
    # A second demo into the same folder is refused (one line, exit 2) before any work; --overwrite moves it aside.
    assert main(["demo", "--out", out, "--quick"]) == 2


def test_demo_refuses_an_earlier_demo_and_overwrite_moves_it_aside(tmp_path):
    from fnf.toy.demo import prepare_out

    out = tmp_path / "demo"
    out.mkdir()
    prepare_out(str(out), overwrite=False)              # empty: fine
    (out / "metrics.json").write_text("{}")
    (out / "runs").mkdir()
    with pytest.raises(FileExistsError, match="metrics.json, runs"):
        prepare_out(str(out), overwrite=False)
    prepare_out(str(out), overwrite=True)
    moved = [p for p in out.iterdir() if p.name.startswith("previous-")]
    assert len(moved) == 1 and (moved[0] / "metrics.json").read_text() == "{}" and not (out / "runs").exists()


def test_demo_pictures_cost_only_the_picture_when_a_dependency_is_missing(capsys):
    from fnf.toy.demo import picture

    def needs_matplotlib(path):
        raise ModuleNotFoundError("No module named 'matplotlib'", name="matplotlib")

    assert picture("training.png", needs_matplotlib, "x.png") is False
    assert "training.png not drawn (matplotlib is not installed" in capsys.readouterr().out
