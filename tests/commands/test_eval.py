"""`fnf eval` on the tiny SD model: end to end through fnf.cli.main, and the metric functions against hand
computations (fnf/metrics.py)."""
import json
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fnf_tiny_models import IMAGE_SIZE, cached_model, one_torch_thread, randomize_lora_B  # noqa: E402,F401

from fnf import metrics as M  # noqa: E402

PROMPTS = ["a photo of a cat", "a red car", "a blue house"]
SEEDS = 2
BOX = (8, 24)   # heatmap:box's default (0.25, 0.75) box on 32x32 images, radius 0: rows and columns 8..23


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The tiny SD folder, a LoRA with random B, one with zero B (peft's init), a prompts file."""
    from fnf.lora import add_lora, save_lora
    from fnf.families.registry import load_model

    root = tmp_path_factory.mktemp("eval")
    folder = cached_model("sd", str(tmp_path_factory.getbasetemp()))
    loras = {"rand": str(root / "lora_rand"), "zero": str(root / "lora_zero")}
    m = load_model(folder)
    add_lora(m, rank=4, alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    save_lora(m, loras["zero"])
    randomize_lora_B(m.denoiser, seed=3, std=0.2)
    save_lora(m, loras["rand"])
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n\n")
    return {"model": folder, "loras": loras, "prompts": str(prompts), "root": root}


def eval_args(s, out, *extra):
    return ["eval", "--model", s["model"], "--lora", s["loras"]["rand"], s["loras"]["zero"], "--prompts-file",
            s["prompts"], "--seeds", str(SEEDS), "--steps", "2", "--guidance", "3", "--reward", "brightness",
            "--localizer", "heatmap:box", "--set", "localize.radius=0", "--metric", "redness", "--out", str(out),
            "--bootstrap", "300", "--batch-size", "4", "--no-progress", *extra]


@pytest.fixture(scope="module")
def result(setup):
    from fnf.cli import main

    out = setup["root"] / "out"
    assert main(eval_args(setup, out)) == 0
    with open(out / "metrics.json") as f:
        return {"out": out, "m": json.load(f)}


def test_eval_writes_metrics_report_and_grids(result):
    m, out = result["m"], result["out"]
    assert set(m) == {"settings", "checks", "models", "images", "per_image", "grids"}
    assert list(m["models"]) == ["base", "lora_rand", "lora_zero"]
    n = len(PROMPTS) * SEEDS
    assert m["settings"]["n_images"] == n and m["settings"]["n_images_with_mask"] == n
    assert m["settings"]["bootstrap"] == {"resamples": 300, "seed": 0, "level": 0.95,
                                          "method": "percentile bootstrap of the mean over images"}
    assert [(i["prompt"], i["seed"]) for i in m["images"]] == [(p, s) for p in PROMPTS for s in range(SEEDS)]
    assert all(abs(i["mask_fraction"] - 0.25) < 1e-9 for i in m["images"])   # the 16x16 box of 32x32
    for name, row in m["models"].items():
        assert {"reward", "reward_delta", "win_rate", "metrics", "change", "lora"} <= set(row), name
        assert set(row["metrics"]) == {"redness"}
        assert set(row["change"]) == {"inside_mse", "outside_mse", "inside_psnr", "outside_psnr"}
        for s in [row["reward"], row["win_rate"], row["metrics"]["redness"]] + list(row["change"].values()):
            assert s["n"] == n and s["ci_low"] <= s["mean"] <= s["ci_high"], (name, s)
    assert m["checks"]["adapters-off model reproduces the base images"]["ok"]
    report = (out / "report.md").read_text()
    assert "B = 300 resamples" in report and "## lora_rand" in report and "## base (no LoRA)" in report
    assert m["grids"] == ["grids/grid_000.png"]
    from PIL import Image
    grid = Image.open(out / "grids" / "grid_000.png")
    scale = 128 // IMAGE_SIZE   # 6 rows x 3 columns of 32 px cells, 2 px padding, upscaled x4
    assert grid.size == (scale * (3 * (IMAGE_SIZE + 2) + 2), scale * (n * (IMAGE_SIZE + 2) + 2))


def test_zero_B_lora_and_base_against_itself_change_nothing(result):
    """peft's zero-B LoRA adds exactly 0: the same images as base, every change 0, every image a tie."""
    models = result["m"]["models"]
    for name in ("base", "lora_zero"):
        row = models[name]
        for key in ("inside_mse", "outside_mse"):
            assert row["change"][key] == {"mean": 0.0, "ci_low": 0.0, "ci_high": 0.0, "n": SEEDS * len(PROMPTS)}
        assert row["change"]["inside_psnr"]["mean"] == M.PSNR_MAX_DB
        assert row["win_rate"]["mean"] == row["win_rate"]["ci_low"] == row["win_rate"]["ci_high"] == 0.5
        assert row["reward_delta"]["mean"] == 0.0 and row["reward"] == models["base"]["reward"]
    rand = models["lora_rand"]
    assert rand["change"]["outside_mse"]["mean"] > 1e-6 and rand["change"]["inside_mse"]["mean"] > 1e-6
    assert rand["change"]["inside_psnr"]["mean"] < M.PSNR_MAX_DB


def test_summaries_match_an_independent_numpy_computation(result):
    """Means, bootstrap intervals (seed 0, B = 300) and win rates recomputed here from the per-image values."""
    m = result["m"]
    per = m["per_image"]
    r, base = np.array(per["lora_rand"]["reward"]), np.array(per["base"]["reward"])
    rng = np.random.default_rng(0)
    boot = [r[rng.integers(0, r.size, size=r.size)].mean() for _ in range(300)]
    lo, hi = np.percentile(boot, [2.5, 97.5])
    s = m["models"]["lora_rand"]["reward"]
    assert s["mean"] == pytest.approx(r.mean(), rel=1e-12)
    assert (s["ci_low"], s["ci_high"]) == (pytest.approx(lo, rel=1e-12), pytest.approx(hi, rel=1e-12))
    wins = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(r, base)]
    assert m["models"]["lora_rand"]["win_rate"]["mean"] == pytest.approx(np.mean(wins), rel=1e-12)
    mse = np.array(per["lora_rand"]["inside_mse"])
    assert np.allclose(per["lora_rand"]["inside_psnr"], 10 * np.log10(1 / mse), rtol=1e-12)


def test_masked_change_matches_a_hand_computation_on_sampled_images(setup):
    """The eval's per-image MSE inside/outside the box equals loops over the pixels of the same images."""
    from fnf import evaluate as E
    from fnf.config import from_dict
    from fnf.lora import load_lora
    from fnf.families.registry import load_model

    cfg = from_dict({"model": {"path": setup["model"]}, "sampling": {"steps": 2, "guidance_scale": 3.0,
                                                                     "truncation_k": 1}})
    model = load_model(setup["model"])
    base = E.sample_batch(model, cfg, PROMPTS[:1] * 2, [0, 1], IMAGE_SIZE, IMAGE_SIZE, "cpu")
    load_lora(model, setup["loras"]["rand"], adapter_name="rand")
    tuned = E.sample_batch(model, cfg, PROMPTS[:1] * 2, [0, 1], IMAGE_SIZE, IMAGE_SIZE, "cpu")
    mask = torch.zeros(2, 1, IMAGE_SIZE, IMAGE_SIZE)
    mask[:, :, BOX[0]:BOX[1], BOX[0]:BOX[1]] = 1
    inside, outside = M.masked_mse(tuned, base, mask)
    a, b = tuned.double().numpy(), base.double().numpy()
    for i in range(2):
        ins, outs = [], []
        for y in range(IMAGE_SIZE):
            for x in range(IMAGE_SIZE):
                d = float(((a[i, :, y, x] - b[i, :, y, x]) ** 2).mean())
                (ins if BOX[0] <= y < BOX[1] and BOX[0] <= x < BOX[1] else outs).append(d)
        assert inside[i].item() == pytest.approx(np.mean(ins), rel=1e-5)
        assert outside[i].item() == pytest.approx(np.mean(outs), rel=1e-5)
    per = None
    with open(os.path.join(setup["root"], "out", "metrics.json")) as f:
        per = json.load(f)["per_image"]["lora_rand"]
    # metrics.json's first two images are (prompt 0, seeds 0 and 1), sampled in a batch of 4 there: same up to
    # float32 GEMM ordering.
    assert per["inside_mse"][:2] == pytest.approx(inside.tolist(), rel=1e-3)


def test_masked_mse_psnr_and_wins_by_hand():
    seed = 1234
    print(f"seed {seed}")
    g = torch.Generator().manual_seed(seed)
    a, b = torch.rand(3, 3, 5, 4, generator=g), torch.rand(3, 3, 5, 4, generator=g)
    mask = torch.rand(3, 5, 4, generator=g) > 0.5
    mask[1] = True      # nothing outside
    mask[2] = False     # nothing inside
    inside, outside = M.masked_mse(a, b, mask[:, None].float())
    sq = ((a - b) ** 2).mean(1)
    assert inside[0].item() == pytest.approx(sq[0][mask[0]].mean().item(), rel=1e-6)
    assert outside[0].item() == pytest.approx(sq[0][~mask[0]].mean().item(), rel=1e-6)
    assert torch.isnan(outside[1]) and torch.isnan(inside[2])
    assert inside[1].item() == pytest.approx(sq[1].mean().item(), rel=1e-6)
    # the toy demo's formula (fnf/toy/demo.py before it used fnf.metrics) gives the same bits where defined
    out_w, in_w = (~mask).float(), mask.float()
    old_out = (sq * out_w).sum((1, 2)) / out_w.sum((1, 2)).clamp_min(1)
    old_in = (sq * in_w).sum((1, 2)) / in_w.sum((1, 2)).clamp_min(1)
    assert torch.equal(old_out[[0, 2]], outside[[0, 2]]) and torch.equal(old_in[:2], inside[:2])
    assert M.psnr_from_mse(np.array([0.01, 0.0, np.nan])).tolist()[:2] == [20.0, M.PSNR_MAX_DB]
    assert np.isnan(M.psnr_from_mse([np.nan])[0])
    assert M.paired_wins([1, 2, 3], [1, 1, 4]).tolist() == [0.5, 1.0, 0.0]
    assert M.paired_wins([1, 2, 3], [1, 1, 4], higher_is_better=False).tolist() == [0.5, 0.0, 1.0]


def test_bootstrap_interval_contains_the_mean_and_matches_numpy():
    seed = 7
    print(f"seed {seed}")
    values = np.random.default_rng(seed).normal(size=40)
    lo, hi = M.bootstrap_ci(values, resamples=500, seed=11)
    rng = np.random.default_rng(11)
    means = [values[rng.integers(0, 40, size=40)].mean() for _ in range(500)]
    assert (lo, hi) == (pytest.approx(np.percentile(means, 2.5), rel=1e-12),
                        pytest.approx(np.percentile(means, 97.5), rel=1e-12))
    assert lo < values.mean() < hi
    s = M.summary([1.0, float("nan"), 3.0], resamples=50)
    assert s["n"] == 2 and s["mean"] == 2.0 and 1.0 <= s["ci_low"] <= s["ci_high"] <= 3.0
    assert M.summary([float("nan")])["n"] == 0
    with pytest.raises(ValueError, match="level"):
        M.bootstrap_ci([1.0], level=95)


def test_refuses_an_earlier_evaluation_and_overwrite_moves_it_aside(setup, result, capsys):
    from fnf.cli import main

    out = result["out"]
    capsys.readouterr()
    assert main(eval_args(setup, out)) == 2
    assert "--overwrite" in capsys.readouterr().err
    before = (out / "metrics.json").read_text()
    args = eval_args(setup, out, "--overwrite")
    args[args.index("--lora") + 1:args.index("--prompts-file")] = [setup["loras"]["zero"]]
    i = args.index("--localizer")
    del args[i:i + 2]          # without --localizer (and no --config) the mask is empty: nothing is "inside"
    assert main(args) == 0
    moved = [p for p in out.iterdir() if p.name.startswith("previous-")]
    assert len(moved) == 1 and (moved[0] / "metrics.json").read_text() == before
    assert (moved[0] / "grids" / "grid_000.png").is_file() and (out / "grids" / "grid_000.png").is_file()
    with open(out / "metrics.json") as f:
        m = json.load(f)
    assert list(m["models"]) == ["base", "lora_zero"] and m["settings"]["localizer"] == "none"
    change = m["models"]["lora_zero"]["change"]
    assert change["inside_mse"] == {"mean": None, "ci_low": None, "ci_high": None, "n": 0}
    assert change["outside_mse"]["n"] == SEEDS * len(PROMPTS) and m["settings"]["n_images_with_mask"] == 0
    assert "| change inside mask, MSE | n/a | 0 |" in (out / "report.md").read_text()


@pytest.mark.parametrize("change, message", [
    (("--model", "/nonexistent/model"), "/nonexistent/model"),
    (("--prompts-file", "/nonexistent/prompts.txt"), "--prompts-file"),
    (("--reward", "no_such_reward"), "unknown reward 'no_such_reward'"),
    (("--reward", "no_such_module_xyz:f"), "cannot import module"),
    (("--seeds", "0"), "--seeds: expected an integer >= 1"),
    (("--lora", "/nonexistent/lora"), "--lora"),
    (("--localizer", "blur"), "localize.spec"),
    (("--metric", "redness={bad json"), "--metric"),
    (("--reward-kwargs", "[1]"), "--reward-kwargs"),
    (("--clip", "/nonexistent/clip"), "--clip '/nonexistent/clip'"),
    (("--bootstrap", "0"), "--bootstrap: expected an integer >= 1"),
])
def test_bad_input_is_one_line_and_exit_2_before_any_model_loads(setup, tmp_path, monkeypatch, capsys, change,
                                                                 message):
    import fnf.families.registry
    from fnf.cli import main

    def no_loading(*a, **k):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(fnf.families.registry, "load_model", no_loading)
    args = eval_args(setup, tmp_path / "o")
    flag, value = change
    i = args.index(flag) if flag in args else None
    if i is None:
        args += [flag, value]
    elif flag == "--lora":
        args[i + 1:args.index("--prompts-file")] = [value]
    else:
        args[i + 1] = value
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_metric_specs_and_lora_names():
    from fnf.commands.eval import lora_names, parse_metric

    assert parse_metric("redness") == ("redness", {})
    assert parse_metric('region={"statistic": "redness"}') == ("region", {"statistic": "redness"})
    assert list(lora_names(["runs/fix/lora", "runs/draft/lora", "x/fix/lora", "y/base"])) == \
        ["fix", "draft", "fix-2", "base-2"]


def test_lpips_runs_when_the_package_and_its_weights_are_local(setup, tmp_path, monkeypatch):
    """With an `lpips` module and the AlexNet file present, the inside/outside LPIPS columns appear. A stand-in
    LPIPS (mean squared difference of the [-1, 1] images, a spatial map) must give 4 x the pixel MSE."""
    import types

    from fnf.cli import main
    from fnf.evaluate import lpips_status

    class FakeLPIPS(torch.nn.Module):
        def __init__(self, net="alex", spatial=False, verbose=True):
            super().__init__()
            assert net == "alex" and spatial

        def forward(self, x, y):
            return ((x - y) ** 2).mean(1, keepdim=True)

    monkeypatch.setitem(sys.modules, "lpips", types.SimpleNamespace(LPIPS=FakeLPIPS))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    assert "AlexNet weights" in lpips_status()
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "alexnet-owt-7be5be79.pth").write_bytes(b"")
    assert lpips_status() == ""
    args = eval_args(setup, tmp_path / "out")
    args[args.index("--lora") + 1:args.index("--prompts-file")] = [setup["loras"]["rand"]]
    args[args.index("--seeds") + 1] = "1"
    assert main(args) == 0
    with open(tmp_path / "out" / "metrics.json") as f:
        m = json.load(f)
    per = m["per_image"]["lora_rand"]
    assert m["settings"]["lpips"] == "" and "inside_lpips" in m["models"]["lora_rand"]["change"]
    for where in ("inside", "outside"):
        assert per[f"{where}_lpips"] == pytest.approx([4 * v for v in per[f"{where}_mse"]], rel=1e-5)
    assert "LPIPS" in (tmp_path / "out" / "report.md").read_text()


def test_base_model_alone_over_several_batches(setup, tmp_path):
    """No --lora: only the base row, batches of 2 images, no adapter to switch."""
    from fnf.cli import main

    args = eval_args(setup, tmp_path / "out", "--grid-images", "3")
    del args[args.index("--lora"):args.index("--prompts-file")]
    args[args.index("--batch-size") + 1] = "2"
    assert main(args) == 0
    with open(tmp_path / "out" / "metrics.json") as f:
        m = json.load(f)
    assert list(m["models"]) == ["base"] and m["checks"] == {} and m["settings"]["n_images"] == 6
    assert m["grids"] == ["grids/grid_000.png"]
    from PIL import Image
    assert Image.open(tmp_path / "out" / "grids" / "grid_000.png").size[1] == 4 * (3 * (IMAGE_SIZE + 2) + 2)


def test_clip_folder_adds_the_clipscore_metric(setup, tmp_path):
    """--clip DIR scores every image with the `clipscore` reward spec (fnf.reward_models.clip) built from DIR: the
    per-image values of metrics.json are that spec's on the same images; the zero-B LoRA changes nothing."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from fnf import evaluate as E
    from fnf.cli import main
    from fnf.config import from_dict
    from fnf.families.registry import load_model
    from fnf.rewards import build_reward
    from fnf_tiny_models import write_tokenizer

    seed = 5
    print(f"seed {seed}")
    torch.manual_seed(seed)
    clip_dir = str(tmp_path / "clip")
    cfg = CLIPConfig(text_config={"vocab_size": 128, "hidden_size": 32, "intermediate_size": 64,
                                  "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 16,
                                  "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2},
                     vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                    "num_attention_heads": 2, "image_size": 28, "patch_size": 7}, projection_dim=16)
    CLIPModel(cfg).eval().save_pretrained(clip_dir)
    write_tokenizer(clip_dir)
    CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}).save_pretrained(clip_dir)
    args = eval_args(setup, tmp_path / "out", "--clip", clip_dir)
    args[args.index("--seeds") + 1] = "1"
    assert main(args) == 0
    with open(tmp_path / "out" / "metrics.json") as f:
        m = json.load(f)
    assert m["settings"]["metrics"]["clipscore"] == {"spec": "clipscore", "kwargs": {"model": clip_dir}}
    zero = m["models"]["lora_zero"]["metrics"]["clipscore"]
    assert zero["delta"]["mean"] == 0.0 and zero["mean"] == m["models"]["base"]["metrics"]["clipscore"]["mean"]
    sample_cfg = from_dict({"model": {"path": setup["model"]}, "sampling": {"steps": 2, "guidance_scale": 3.0,
                                                                            "truncation_k": 1}})
    model = load_model(setup["model"])
    base = E.sample_batch(model, sample_cfg, PROMPTS, [0] * len(PROMPTS), IMAGE_SIZE, IMAGE_SIZE, "cpu")
    with torch.no_grad():
        direct = build_reward("clipscore", model=clip_dir)(base, PROMPTS)
    assert m["per_image"]["base"]["metric:clipscore"] == pytest.approx(direct.tolist(), abs=1e-3)  # of 100 cos


def test_lora_folders_named_like_module_attributes(setup, tmp_path):
    """runs/train/lora is reported as 'train'; its peft adapter must not be called 'train' (nn.Module.train)."""
    import shutil

    from fnf.cli import main

    folder = tmp_path / "train" / "lora"
    shutil.copytree(setup["loras"]["rand"], folder)
    out = tmp_path / "out"
    args = ["eval", "--model", setup["model"], "--lora", str(folder), "--prompts-file", setup["prompts"], "--seeds", "1",
            "--steps", "2", "--reward", "brightness", "--out", str(out), "--bootstrap", "50", "--no-progress"]
    assert main(args) == 0
    with open(out / "metrics.json") as f:
        models = json.load(f)["models"]
    assert list(models) == ["base", "train"] and models["train"]["change"]["outside_mse"]["mean"] > 1e-6
