"""`fnf demo --grpo` (issue 28 item 3): the black-box defect reward, the GRPO run configs, the known-bad pool's
prompts, the goal's bookkeeping, the CLI flags, and `--grpo-only --quick` end to end on the shipped toy."""
import json
import os

import pytest
import torch

from fnf.config import grpo_layout
from fnf.reference_pool import entry_seed
from fnf.reward_client import GradientUseError
from fnf.toy import ASSETS
from fnf.toy import grpo_demo
from fnf.toy.grpo_demo import GRPO_METHODS, black_box_defect_reward, goal, grpo_config, grpo_settings

NEEDED = [os.path.join(ASSETS, "sd", "model_index.json")] + [
    os.path.join(ASSETS, n, "model.safetensors")
    for n in ("defect_classifier", "defect_heatmap", "attribute_classifier")]
have_assets = pytest.mark.skipif(not all(os.path.isfile(p) for p in NEEDED), reason="toy assets not trained yet")


@have_assets
def test_black_box_reward_scores_like_the_classifier_and_refuses_gradients():
    from fnf.toy.rewards import DefectReward

    torch.manual_seed(3)
    print("seed 3")
    x = torch.rand(4, 3, 64, 64)
    bb = black_box_defect_reward()
    assert not isinstance(bb, torch.nn.Module)            # no layers or parameters to reach (no Grad-CAM on it)
    with torch.no_grad():
        want = DefectReward()(x)
    torch.testing.assert_close(bb(x, None), want, rtol=0, atol=0)
    xg = x.clone().requires_grad_(True)
    with pytest.raises(GradientUseError, match="black box"):
        bb(xg, None)
    with torch.no_grad():                                  # under no_grad even a grad-requiring input is fine
        assert not bb(xg, None).requires_grad


def test_grpo_configs_one_optimizer_step_per_rollout():
    st = grpo_settings(False)
    for method in GRPO_METHODS:
        cfg = grpo_config("/toy/sd", "/tmp/x", method, st, ["a red circle", "a blue square"])
        assert cfg.objective.name == "grpo"
        assert cfg.reward.spec == "fnf.toy.grpo_demo:black_box_defect_reward"
        lay = grpo_layout(cfg)
        assert lay["optimizer_steps"] == 1 and lay["samples"] == st["group_size"] * st["prompts_per_rollout"]
        assert cfg.train.steps == st["rollouts"] and cfg.train.seeds_per_prompt == st["pool_seeds"]
        assert cfg.grpo.steps == "random" and cfg.grpo.train_steps == st["trained_steps"]
        assert cfg.train.prompts == ["a red circle", "a blue square"]
    assert grpo_config("/m", "/o", "grpo", st, ["p"]).objective.beta == 0
    assert grpo_config("/m", "/o", "grpo", st, ["p"]).localize.spec == "none"
    assert grpo_config("/m", "/o", "grpo_heatmap", st, ["p"]).objective.beta == st["beta"] > 0
    assert "defect_gradcam" in grpo_config("/m", "/o", "grpo_gradcam", st, ["p"]).localize.spec
    assert grpo_config("/m", "/o", "grpo", st, ["p"]).grpo.region_kl_beta == 0      # plain GRPO: no region KL
    for method in GRPO_METHODS[1:]:
        assert grpo_config("/m", "/o", method, st, ["p"]).grpo.region_kl_beta == st["region_kl_beta"] > 0
    assert grpo_settings(True, {"rollouts": 7})["rollouts"] == 7


def test_known_bad_prompts_keeps_the_pool_entries_the_classifier_calls_defective(monkeypatch):
    prompts = [f"prompt {i}" for i in range(5)]
    seen = {}

    def fake_sample(model, ps, ss, **kw):
        seen["prompts"], seen["seeds"] = ps, ss
        return torch.arange(len(ps), dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 3, 2, 2)

    monkeypatch.setattr(grpo_demo, "sample", fake_sample)
    monkeypatch.setattr(grpo_demo, "defect_probability",
                        lambda images, root="": torch.tensor([0.9, 0.1, 0.5, 0.51, 0.2])[images[:, 0, 0, 0].long()])
    assert grpo_demo.known_bad_prompts(None, prompts) == ["prompt 0", "prompt 3"]
    assert seen["prompts"] == prompts and seen["seeds"] == [entry_seed(0, p) for p in range(5)]  # DRaFT's pool seeds
    assert grpo_demo.known_bad_prompts(None, prompts, keep_all=True) == prompts
    monkeypatch.setattr(grpo_demo, "defect_probability", lambda images, root="": torch.zeros(len(images)))
    with pytest.raises(ValueError, match="no training prompt"):
        grpo_demo.known_bad_prompts(None, prompts)


def _point(name, run, step, red, outside):
    s = lambda m: {"mean": m, "ci_low": m, "ci_high": m}  # noqa: E731
    return {"name": name, "run": run, "step": step, "judge_reduction": s(red), "outside_change_mse": s(outside)}


def test_goal_reads_fraction_ratio_and_alignment():
    from fnf.toy.demo import matched

    points = [_point("grpo@10", "grpo", 10, 0.2, 0.004), _point("grpo", "grpo", 20, 0.5, 0.010),
              _point("grpo_heatmap", "grpo_heatmap", 20, 0.45, 0.001),
              _point("grpo_gradcam", "grpo_gradcam", 20, 0.30, 0.003)]
    heads = [matched(points, m, "grpo") for m in ("grpo_heatmap", "grpo_gradcam")]
    # GRPO at 0.45 reduction, interpolated between (0.2, 0.004) and (0.5, 0.010): 0.009 -> 9x; at 0.30: 0.006 -> 2x
    assert abs(heads[0]["ratio_interpolated"] - 9.0) < 1e-9 and abs(heads[1]["ratio_interpolated"] - 2.0) < 1e-9
    delta = lambda m: {"delta": {"alignment": {"mean": m, "ci_low": m - 0.01, "ci_high": m + 0.01}}}  # noqa: E731
    res = {"headline": heads, "models": {"grpo": delta(-0.05), "grpo_heatmap": delta(-0.01),
                                         "grpo_gradcam": delta(0.03)}}
    g = goal(res, points)
    assert g["grpo_judge_reduction"] == 0.5
    h, c = g["grpo_heatmap"], g["grpo_gradcam"]
    assert abs(h["fraction_of_grpo_reduction"] - 0.9) < 1e-12 and h["reduction_ok"] and h["outside_ok"]
    assert h["alignment_ok"] and h["met"]
    assert abs(c["fraction_of_grpo_reduction"] - 0.6) < 1e-12 and not c["reduction_ok"] and not c["outside_ok"]
    assert not c["alignment_ok"] and not c["met"]
    lines = "\n".join(grpo_demo.goal_lines(g))
    assert "| grpo_heatmap | +0.450 | 0.90 (ok) | 9.0x (ok) |" in lines and "| no |" in lines


def test_demo_grpo_flags_parse_and_plan():
    from fnf.cli import build_parser
    from fnf.commands.demo import plan

    args = build_parser().parse_args(["demo", "--grpo"])
    assert args.grpo and not args.grpo_only
    assert "GRPO and region-constrained GRPO" in plan(args) and "Separate-and-Enhance" in plan(args)
    args = build_parser().parse_args(["demo", "--grpo-only", "--quick"])
    assert args.grpo_only and "Separate-and-Enhance" not in plan(args) and "DRaFT" not in plan(args)


@have_assets
def test_quick_grpo_demo_reports_grpo_models_like_draft_models(tmp_path):
    from fnf.toy.demo import run_demo

    out = str(tmp_path / "demo")
    m = run_demo(out, quick=True, grpo_only=True, sepen=False, threads=1,
                 settings={"eval_pairs": 2}, grpo_overrides={"rollouts": 1, "pool_seeds": 2})
    assert set(GRPO_METHODS) <= set(m) and not {"draft", "fnf_heatmap", "sepen"} & set(m)
    for k in ("base",) + GRPO_METHODS:   # the DRaFT models' keys (tests/test_toy_demo.py)
        assert {"defect_score", "defect_rate", "alignment", "outside_change_mse", "inside_change_mse",
                "judge_defect_rate", "ci", "delta", "on_base_defects", "n_images"} <= set(m[k]), k
        assert m[k]["n_images"] == 4
    assert m["grpo_goal"]["grpo_judge_reduction"] is not None or not m["pareto"]
    assert all(h["baseline"] == "grpo" for h in m["headline"])
    with open(os.path.join(out, "settings.json")) as f:
        settings = json.load(f)
    assert all(c["ok"] for c in settings["checks"].values())    # LoRA off reproduces the base images
    assert settings["grpo"]["rollouts"] == 1 and settings["grpo_prompts"] == 4
    with open(os.path.join(out, "report.md")) as f:
        text = f.read()
    assert "| grpo_heatmap |" in text and "GRPO: the region constraint without a reward gradient" in text
    assert text.startswith("# fnf demo: GRPO vs region-constrained GRPO on")      # no DRaFT title or paragraph
    assert "Training (every DRaFT / Focus-N-Fix run alike)" not in text and "region_kl_beta" in text
    assert os.path.isfile(os.path.join(out, "grids", "defects.png"))
