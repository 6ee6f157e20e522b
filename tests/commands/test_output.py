"""Output a person reads: --quick says it is a smoke test, the console has progress and a short summary (JSON goes
to files, or to stdout with --json), third-party notes the user cannot act on are dropped, the Pareto plot's
labels do not overlap, the smoke config's size fits every family."""
import json
import logging
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, ROOT)
from fnf_tiny_models import cached_model, one_torch_thread  # noqa: E402,F401
from tiny_flux import cached_flux  # noqa: E402

from fnf import cli  # noqa: E402


def test_quick_demo_says_smoke_test_and_prints_a_summary_not_json(tmp_path, capfd):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--quick", "--no-sepen", "--threads", "1", "--out", str(out), "--json"]) == 0
    stdout, stderr = capfd.readouterr()
    assert json.loads(stdout) == json.loads((out / "metrics.json").read_text())     # --json: stdout is the JSON
    lines = [line for line in stderr.replace("\r", "\n").splitlines() if line.strip()]
    # the plan line first (what will run, how long), then the smoke-test note, before any work
    assert lines[0].startswith("fnf demo: trains ") and lines[1].startswith("fnf demo: --quick is a smoke test"), lines
    assert "say nothing" in lines[-1], lines
    assert not any("{" in line for line in lines), lines                             # no JSON dumps on screen
    assert not any("torchvision" in line or "Loading weights" in line for line in lines), lines
    assert any(line.startswith("fnf demo: draft: defect rate ") for line in lines), lines
    report = (out / "report.md").read_text()
    assert "**Smoke test: this run used `--quick`" in report.split("Held-out evaluation")[0]
    assert json.loads((out / "settings.json").read_text())["quick"] is True


def test_eval_prints_a_short_summary_and_json_only_with_json(tmp_path_factory, capfd):
    folder = cached_model("sd", str(tmp_path_factory.getbasetemp()))
    out = tmp_path_factory.mktemp("eval")
    argv = ["eval", "--model", folder, "--reward", "brightness", "--prompts", "a red car", "--steps", "2",
            "--no-progress"]
    assert cli.main([*argv, "--out", str(out / "a")]) == 0
    stdout = capfd.readouterr().out
    assert "{" not in stdout and "  base: reward " in stdout, stdout
    assert cli.main([*argv, "--out", str(out / "b"), "--json"]) == 0
    stdout, stderr = capfd.readouterr()
    assert json.loads(stdout) == json.loads((out / "b" / "metrics.json").read_text())
    assert "  base: reward " in stderr


def test_third_party_notes_the_user_cannot_act_on_are_dropped():
    cli.quiet_third_party()
    cli.quiet_third_party()                                                           # once, however often called
    logger = logging.getLogger("transformers.utils.import_utils")
    assert sum(isinstance(f, cli._DropNoise) for f in logger.filters) == 1
    seen = []
    handler = logging.Handler()
    handler.emit = seen.append
    logger.addHandler(handler)
    try:
        logger.warning("`CLIPImageProcessor` requires torchvision (not installed); falling back to "
                       "`CLIPImageProcessorPil` for backward compatibility.")
        logger.warning("something the user can act on")
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage() for r in seen] == ["something the user can act on"]
    assert os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") == "1"


def _point(run, label, step, x, y):
    s = lambda m, w: {"mean": m, "ci_low": m - w, "ci_high": m + w, "n": 6}  # noqa: E731
    return {"name": f"{run}@{step}", "run": run, "beta": 1.0, "step": step, "label": label,
            "outside_change_mse": s(x, 2e-6), "judge_reduction": s(y, 0.02), "reward_reduction": s(y + 0.1, 0.02),
            "alignment": s(0.8, 0.05)}


def test_pareto_labels_overlap_nothing():
    """Crowded points (equal coordinates too, as a --quick run gives): every label lies inside its axes and
    overlaps no other label, no marker and no title or axis label."""
    from matplotlib.text import Text

    from fnf.toy.demo import pareto_figure

    points = [_point("draft", f"DRaFT {k}", k, 1e-5 * (1 + 0.05 * k), 0.3 + 0.004 * k) for k in range(1, 9)]
    points += [_point("fnf_heatmap", "FnF 8", 8, 1.02e-5, 0.31), _point("fnf_gradcam", "FnF-CAM 8", 8, 1.02e-5, 0.31),
               _point("fnf_heatmap@beta3", "FnF b3 8", 8, 1.01e-5, 0.305)]
    fig = pareto_figure(points)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes[:2]:
        labels = [Text.get_window_extent(t, renderer) for t in ax.texts]
        assert len(labels) == len(points)
        frame = ax.get_window_extent(renderer)
        others = [t.get_window_extent(renderer) for t in (ax.title, ax.xaxis.label, ax.yaxis.label)]
        for i, box in enumerate(labels):
            assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
            assert not any(box.overlaps(b) for b in labels[i + 1:] + others), ax.texts[i].get_text()
    import matplotlib.pyplot as plt
    plt.close(fig)


@pytest.mark.parametrize("family", ["sd", "flux"])
def test_smoke_config_runs_every_family_at_its_small_size(tmp_path_factory, family, capfd):
    base = str(tmp_path_factory.getbasetemp())
    folder = cached_flux(base) if family == "flux" else cached_model(family, base)
    out = tmp_path_factory.mktemp("smoke") / "run"
    config = os.path.join(ROOT, "configs", "tiny_cpu_smoke.yaml")
    assert cli.main(["train", "--config", config, "--model", folder, "--out", str(out), "--steps", "1",
                     "--set", "train.checkpoint_every=0", "--set", "train.sample_every=0"]) == 0
    from fnf.config import load

    cfg = load(config)
    assert (cfg.sampling.height, cfg.sampling.width) == (32, 32)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line.strip()]
    assert log and "{" not in capfd.readouterr().out
