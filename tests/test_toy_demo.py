"""`fnf demo --quick` on the shipped toy model: runs end to end and writes the report files."""
import json
import os

import pytest
import torch

from fnf.toy import ASSETS

NEEDED = [os.path.join(ASSETS, "sd", "model_index.json")] + [
    os.path.join(ASSETS, n, "model.safetensors")
    for n in ("defect_classifier", "defect_heatmap", "attribute_classifier")]


def test_demo_subcommand_parses():
    from fnf.cli import build_parser

    args = build_parser().parse_args(["demo", "--out", "x", "--quick", "--eval-seed", "3"])
    assert args.command == "demo" and args.quick and args.eval_seed == 3 and args.out == "x" and not args.no_sepen
    assert not args.overwrite and not args.sweep and args.small == ""
    assert build_parser().parse_args(["demo", "--no-sepen"]).no_sepen
    args = build_parser().parse_args(["demo", "--seed", "5", "--sweep", "--small", "s"])
    assert args.eval_seed == 5 and args.sweep and args.small == "s"


@pytest.mark.slow
@pytest.mark.skipif(not all(os.path.isfile(p) for p in NEEDED), reason="toy assets not trained yet")
def test_quick_demo_writes_report(tmp_path):
    from fnf.cli import main

    out = str(tmp_path / "demo")
    assert main(["demo", "--out", out, "--quick"]) == 0
    with open(os.path.join(out, "metrics.json")) as f:
        m = json.load(f)
    assert set(m) == {"base", "draft", "fnf_heatmap", "fnf_gradcam", "sepen", "pareto", "headline", "judges"}
    assert list(m)[0] == "base"
    sepen = m.pop("sepen")
    assert {"base", "sepen", "gain", "single_base", "single_sepen", "single_change", "loss_gap"} <= set(sepen)
    assert sepen["n_two_object"] == 4 and sepen["n_single_object"] == 2
    assert "_tuned" not in sepen and "tuned_images" not in sepen
    pareto, judges = m.pop("pareto"), m.pop("judges")
    m.pop("headline")
    assert isinstance(pareto, list) and judges["pixel_threshold"] >= 1
    for k in m:
        assert {"defect_score", "defect_rate", "alignment", "outside_change_mse", "inside_change_mse",
                "judge_defect_rate", "ci", "delta", "on_base_defects"} <= set(m[k])
        assert m[k]["n_images"] == 6
        lo, hi = m[k]["ci"]["alignment"]
        assert lo <= m[k]["alignment"] <= hi
    assert m["base"]["outside_change_mse"] == 0 and m["base"]["delta"]["defect_score"]["mean"] == 0
    with open(os.path.join(out, "report.md")) as f:
        text = f.read()
    assert "bootstrap 95% intervals" in text and "Reward improved vs defect actually gone" in text
    assert text.startswith("# fnf demo: DRaFT vs Focus-N-Fix on") and "Training (every DRaFT / Focus-N-Fix run" in text
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


def _values(judge, defect, outside, recall=None):
    n = len(judge)
    t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    return {"p_defect": t(defect) * 0.9, "defect": t(defect), "judge": t(judge),
            "recall": t(recall if recall is not None else [1.0] * n), "exact": t([1.0] * n),
            "outside": t(outside), "inside": t([0.0] * n)}


def test_summarize_pairs_the_differences_and_separates_reward_from_judge():
    from fnf.toy.demo import summarize

    base = _values([1, 1, 1, 0, 0, 0], [1, 1, 1, 0, 0, 0], [0.0] * 6, recall=[0.5, 1.0, 0.5, 1.0, 0.5, 1.0])
    # Every alignment moves up by exactly 0.25: the paired interval of the change is that point, although the
    # alignments themselves vary (an unpaired interval would not be).
    tuned = _values([1, 0, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0], [0.1, 0.0, 0.2, 0.0, 0.0, 0.0],
                    recall=[0.75, 1.25, 0.75, 1.25, 0.75, 1.25])
    masks = torch.zeros(6, 4, 4, dtype=torch.bool)
    masks[:3, 0, 0] = True
    r = summarize(tuned, base, masks)
    d = r["delta"]["alignment"]
    assert d["mean"] == pytest.approx(0.25)
    assert d["ci_low"] == pytest.approx(0.25) and d["ci_high"] == pytest.approx(0.25)
    assert r["ci"]["alignment"][0] < r["alignment"] < r["ci"]["alignment"][1]
    assert r["judge_defect_rate"] == pytest.approx(1 / 6) and r["defect_rate"] == pytest.approx(1 / 6)
    on = r["on_base_defects"]                     # base judge-defective: images 0, 1, 2
    assert on["n"] == 3
    assert on["reward_says_clean"]["mean"] == pytest.approx(2 / 3)     # images 0 and 1
    assert on["judge_says_clean"]["mean"] == pytest.approx(2 / 3)      # images 1 and 2
    assert on["fooled"]["mean"] == pytest.approx(1 / 3)                # image 0: classifier clean, scratch there
    assert r["n_images_with_mask"] == 3 and r["outside_change_mse"] == pytest.approx(0.05)


def _point(name, run, step, red, out):
    s = lambda x: {"mean": x, "ci_low": x, "ci_high": x, "n": 10}  # noqa: E731
    return {"name": name, "run": run, "step": step, "beta": 0.0, "label": name, "judge_reduction": s(red),
            "outside_change_mse": s(out)}


def test_matched_interpolates_draft_along_its_checkpoints():
    from fnf.toy.demo import matched

    pts = [_point("draft@20", "draft", 20, 0.2, 0.002), _point("draft@40", "draft", 40, 0.4, 0.006),
           _point("draft", "draft", 60, 0.5, 0.010), _point("fnf_heatmap", "fnf_heatmap", 60, 0.3, 0.001)]
    h = matched(pts, "fnf_heatmap")
    assert h["in_draft_range"] and h["draft_interpolated"] == pytest.approx(0.004)   # halfway from 0.002 to 0.006
    assert h["ratio_interpolated"] == pytest.approx(4.0)
    assert h["draft_nearest"] in ("draft@20", "draft@40")
    pts[-1] = _point("fnf_heatmap", "fnf_heatmap", 60, 0.1, 0.001)                   # below the first checkpoint:
    assert matched(pts, "fnf_heatmap")["draft_interpolated"] == pytest.approx(0.001)  # from base (0, 0)
    pts[-1] = _point("fnf_heatmap", "fnf_heatmap", 60, 0.9, 0.001)                   # beyond DRaFT's reach
    h = matched(pts, "fnf_heatmap")
    assert not h["in_draft_range"] and h["draft_interpolated"] is None and h["draft_nearest"] == "draft"
    assert matched(pts, "fnf_gradcam") is None


def test_checkpoint_loras_are_the_run_s_loras_at_each_step(tmp_path):
    """The Pareto points of earlier steps load these: the last one must be the returned model's LoRA."""
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from fnf_tiny_models import cached_model, tiny_config

    from fnf.lora import lora_state_dict
    from fnf.toy.demo import _checkpoint_loras
    from fnf.train import train

    torch.set_num_threads(1)
    cfg = tiny_config(cached_model("sd", str(tmp_path)), str(tmp_path / "run"),
                      train={"steps": 3, "checkpoint_every": 1, "keep_checkpoints": 0})
    r = train(cfg)
    loras = _checkpoint_loras(cfg.train.out)
    assert [s for s, _ in loras] == [1, 2, 3]
    final = lora_state_dict(r.model.denoiser)
    assert set(loras[-1][1]) == set(final)
    assert all(torch.equal(loras[-1][1][k], final[k]) for k in final)
    assert not all(torch.equal(loras[0][1][k], final[k]) for k in final)      # step 1 differs from step 3


def test_eval_seeds_are_one_per_image_and_never_shared_between_sets():
    """Every (seed set, prompt, k) has noise of its own (no clustering across prompts), none overlaps another set or
    the small integer seeds training and validation use, and they are fixed numbers (stable across machines)."""
    from fnf.toy.evaluate_sd import eval_prompts, eval_seed

    n = len(eval_prompts())
    seeds = {(s, i, k): eval_seed(s, i, k) for s in range(3) for i in range(n) for k in range(16)}
    assert len(set(seeds.values())) == len(seeds)
    assert min(seeds.values()) > 2 ** 32 and max(seeds.values()) < 2 ** 63
    assert eval_seed(0, 0, 0) == eval_seed(0, 0, 0) and eval_seed(0, 0, 0) != eval_seed(1, 0, 0)


def test_run_demo_restores_the_callers_thread_count(tmp_path, monkeypatch):
    import fnf.toy.demo as demo

    seen = {}

    def fake(out, quick, seed, model, threads, *rest):
        seen["threads"] = threads
        torch.set_num_threads(threads)
        raise RuntimeError("stop")

    monkeypatch.setattr(demo, "_run_demo", fake)
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError, match="stop"):
        demo.run_demo(str(tmp_path / "d"), threads=None)
    assert seen["threads"] == demo.default_threads() and torch.get_num_threads() == before
