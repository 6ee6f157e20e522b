"""`fnf estimate-memory` with fnf's defaults (issues 30 and 25): `auto` precision resolved for the --gpu imitated,
the header in each family's terms, stand-ins for a reward/localizer whose files are missing, a time estimate and a
progress bar before a trace, and a bare `--arch sd15` that reports what the README's table says."""
import json
import os
import re
import sys
import types

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fnf_tiny_models import cached_model, one_torch_thread  # noqa: E402,F401
from tiny_flux import cached_flux  # noqa: E402
from tiny_flux2 import cached_flux2  # noqa: E402
from tiny_sd3 import cached_sd3  # noqa: E402
from tiny_zimage import cached_zimage, have_zimage  # noqa: E402
from fnf import cli, config, precision  # noqa: E402
from fnf.commands.estimate_memory import report  # noqa: E402
from fnf.families.flux import FLUX  # noqa: E402
from fnf.memory import cuda_rules  # noqa: E402
from fnf.memory.estimate import family_terms  # noqa: E402
from fnf.memory.stand_ins import CLIP_L14, stand_ins  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return cached_model("sd", str(tmp_path_factory.getbasetemp()))


@pytest.mark.parametrize("gpu, expected", [("h100", "bf16"), ("a100", "bf16"), ("4090", "bf16"), ("3090", "bf16"),
                                           ("t4", "fp16"), ("v100", "fp16")])
def test_each_gpu_resolves_auto_as_the_trainer_would_there(gpu, expected):
    cfg = precision.resolve(config.Config(), cuda_rules.GPUS[gpu].capability)
    assert (cfg.model.weight_dtype, cfg.memory.mixed_precision) == (expected, expected)
    assert cuda_rules.DEFAULT_GPU == "h100"


def test_attention_backend_follows_the_capability():
    q = torch.zeros(1, 8, 16, 64, dtype=torch.bfloat16)
    assert cuda_rules.gpu_attention_backend(q, q, None, (9, 0)) == "flash"
    assert cuda_rules.gpu_attention_backend(q, q, None, (8, 0)) == "flash"
    assert cuda_rules.gpu_attention_backend(q.half(), q.half(), None, (7, 5)) == "efficient"   # no flash before sm80
    assert cuda_rules.gpu_attention_backend(q.double(), q.double(), None, (7, 0)) == "math"
    with pytest.raises(ValueError, match="--gpu"):
        cuda_rules.gpu("a6000")


def test_file_backed_reward_and_localizer_get_stand_ins_of_their_size():
    cfg = config.load(os.path.join(ROOT, "configs", "sd15_artifacts.yaml"), [])
    notes = stand_ins(cfg)
    assert cfg.reward.spec == "classifier" and cfg.reward.kwargs["model_kwargs"] == {
        "arch": "resnet50", "num_classes": 2, "random_init": True}
    assert cfg.localize.spec == "auto" and cfg.localize.kwargs == {}
    assert len(notes) == 2 and "/models/artifacts/classifier.safetensors" in notes[0] and "resnet50" in notes[0]
    assert "heatmap:fnf.classifiers:exported" in notes[1] and "stands in" in notes[1]

    cfg = config.load(None, ["reward.spec=hpsv2", "reward.kwargs={path: /models/hps/HPS_v2_compressed.pt}"])
    notes = stand_ins(cfg)
    assert cfg.reward.spec == CLIP_L14 and "CLIP ViT-L/14-sized stand-in" in notes[0]

    cfg = config.Config()      # the built-in defaults read no file: kept
    assert stand_ins(cfg) == [] and (cfg.reward.spec, cfg.localize.spec) == ("brightness", "auto")


def test_header_speaks_each_familys_terms():
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    dev = types.SimpleNamespace(settings={"guidance_embeds": True}, scheduler=FlowMatchEulerDiscreteScheduler(),
                                family=FLUX)
    assert family_terms(dev, object(), 3.5) == {"sampler": "flow-matching Euler steps",
                                                "guidance": "guidance embedding 3.5 (guidance-distilled: no CFG batch)"}
    schnell = types.SimpleNamespace(settings={}, scheduler=FlowMatchEulerDiscreteScheduler(), family=FLUX)
    assert family_terms(schnell, None, 3.5)["guidance"] == "no guidance (one denoiser batch)"
    sd = types.SimpleNamespace(settings={}, scheduler=DDIMScheduler(), family=types.SimpleNamespace(
        uses_cfg=lambda m, u, g: u is not None and g > 1))
    assert family_terms(sd, object(), 7.5) == {"sampler": "DDIM steps", "guidance": "CFG 7.5"}
    settings = {"model": "flux1-dev", "kind": "flux", "width": 1024, "height": 1024, "weight_dtype": "bf16",
                "mixed_precision": "bf16", "lora_rank": 16, "truncation_k": 1, "guidance_scale": 3.5, "batch_size": 1,
                "reward": "r", "localizer": "auto (gradcam)", "sampling_steps_traced": 3, "gpu_title": "H100",
                "capability": "9.0", "gpu_memory_gb": 80, "precision_auto": ["model.weight_dtype",
                                                                             "memory.mixed_precision"],
                "stand_ins": ["reward x reads /m, not on this machine: ..."],
                "sampler": "flow-matching Euler steps", "guidance": "guidance embedding 3.5 (no CFG batch)"}
    est = types.SimpleNamespace(settings=settings, peak_bytes=2 ** 30, peak_phase="backward", peak_step="s",
                                quantized=None, held_at_peak={}, persistent={}, phases={}, attention_backends={},
                                trace_seconds=1.0)
    text = report(est)
    assert text.splitlines()[0].startswith("fnf estimate-memory: flux1-dev (flux) at 1024x1024 on an H100 (sm_90, "
                                           "80 GB), weights bf16, autocast bf16 (auto on the H100)")
    assert "guidance embedding 3.5" in text and "CFG 3.5" not in text and "DDIM" not in text
    assert "T = 3 flow-matching Euler steps" in text and "  stand-in: reward x reads /m" in text


def test_bare_command_on_a_tiny_folder_for_an_old_gpu(sd, capsys):
    """No config at all: the defaults (brightness reward, auto localizer, auto precision) trace; on a T4 auto is
    fp16 with the grad scaler; the time estimate and the progress bar come first, on stderr."""
    assert cli.main(["estimate-memory", "--model", sd, "--gpu", "t4"]) == 0
    out, err = capsys.readouterr()
    first = out.splitlines()[0]
    assert "on a T4 (sm_75, 16 GB)" in first
    assert "weights fp16, autocast fp16 + grad scaler (auto on the T4)" in first
    assert "CFG 7.5" in first and "localizer auto (saliency)" in first and "DDIM steps" in out
    assert re.search(r"tracing one training step of sd for a T4 .*: about \d+ s on this CPU", err)
    assert "tracing sd:" in err and "100%" in err


@pytest.mark.slow
@pytest.mark.parametrize("make", ["sdxl", "sd3", "flux", "flux-schnell", "flux2", "z-image"])
def test_bare_command_runs_for_every_family(make, tmp_path_factory, capsys):
    if make == "z-image" and not have_zimage():
        pytest.skip("the installed diffusers has no ZImagePipeline")
    root = str(tmp_path_factory.getbasetemp())
    folder = {"sdxl": lambda: cached_model("sdxl", root), "sd3": lambda: cached_sd3(root),
              "flux": lambda: cached_flux(root), "flux-schnell": lambda: cached_flux(root, "flux_schnell"),
              "flux2": lambda: cached_flux2(root), "z-image": lambda: cached_zimage(root)}[make]()
    out = tmp_path_factory.mktemp("est") / "e.json"
    assert cli.main(["estimate-memory", "--model", folder, "--json", str(out)]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    settings = json.loads(out.read_text())["estimate"]["settings"]
    assert settings["weight_dtype"] == settings["mixed_precision"] == "bf16" and settings["gpu"] == "h100"
    flow = make != "sdxl"
    assert ("flow-matching Euler steps" if flow else "DDIM steps") == settings["sampler"]
    if make in ("flux", "flux2"):   # guidance-distilled: the scale is an embedding
        assert "guidance embedding" in first and "CFG 7.5" not in first
    if make == "z-image":   # ZImagePipeline runs CFG at any scale > 0
        assert "CFG 7.5" in first


@pytest.mark.slow
def test_ladder_announces_its_rows_and_shows_progress(sd, capsys):
    assert cli.main(["estimate-memory", "--model", sd, "--ladder"]) == 0
    out, err = capsys.readouterr()
    assert re.search(r"memory ladder: \d+ rows, each a full trace like the one above \(\d+ s\): about", err)
    assert "ladder:" in err and "naive" in out


def readme_bare_sd15() -> float:
    """The README's figure for a bare `fnf estimate-memory --arch sd15` ("... --arch sd15` (...) gives X GiB")."""
    import re

    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        m = re.search(r"A bare `fnf estimate-memory --arch sd15`[^.]*?gives ([0-9.]+) GiB", f.read())
    assert m, "no README sentence for a bare --arch sd15"
    return float(m.group(1))


def test_readme_card_table_is_the_cached_traces():
    """The README's consumer-card table is what benchmarks/consumer_cards.py --table prints from the committed
    traces (benchmarks/results/consumer_cards/), so the two cannot drift apart."""
    import subprocess
    import sys

    table = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "consumer_cards.py"), "--table"],
                           capture_output=True, text=True, check=True).stdout.strip()
    assert table.count("\n") >= 10
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        assert table in f.read()


@pytest.mark.slow
def test_bare_arch_sd15_reports_the_readme_figure(tmp_path, capsys):
    """A full-size SD-1.5 trace (~1 min on the 2-core box): `fnf estimate-memory --arch sd15` and nothing else."""
    out = tmp_path / "sd15.json"
    assert cli.main(["estimate-memory", "--arch", "sd15", "--json", str(out)]) == 0
    est = json.loads(out.read_text())["estimate"]
    assert est["settings"]["weight_dtype"] == est["settings"]["mixed_precision"] == "bf16"
    assert round(est["peak_gib"], 2) == readme_bare_sd15()
    assert f"{readme_bare_sd15():.2f} GiB" in capsys.readouterr().out
