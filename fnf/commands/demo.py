"""`fnf demo`: DRaFT vs Focus-N-Fix (and Separate-and-Enhance) on the embedded toy model, with a held-out report."""
from __future__ import annotations

import contextlib
import json
import os
import sys

from ..inference import check_out_path
from ..toy.demo import prepare_out, run_demo
from .common import wrapped


def add_arguments(parser) -> None:
    parser.description = wrapped("Fine-tune the embedded toy model (fnf/assets/toy/sd) with DRaFT (beta=0) and Focus-N-Fix "
                          "(heatmap and Grad-CAM localization), then evaluate on held-out prompts x seeds; then "
                          "Separate-and-Enhance (attn2.to_k) on held-out two-object prompts, base vs tuned success "
                          "and the single-object forgetting check; writes report.md, metrics.json, grids and a plot.")
    p = parser
    p.add_argument("--out", default="runs/demo", metavar="DIR", help="output folder (default runs/demo)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke test (a few steps, a few images, a minute or two): it shows the demo runs; its "
                        "numbers say nothing about the methods")
    p.add_argument("--eval-seed", "--seed", type=int, default=0, metavar="N", dest="eval_seed",
                   help="which set of held-out evaluation noise seeds to use (default 0); training seeds are fixed")
    p.add_argument("--sweep", action="store_true",
                   help="also train Focus-N-Fix at every beta of the sweep (0.3, 1, 3, 10) for the Pareto plot "
                        "(several times the default run time)")
    p.add_argument("--small", default="", metavar="DIR",
                   help="folder of the toy's small models (defect classifier, heatmap, attribute classifier; "
                        "default the shipped ones)")
    p.add_argument("--model", default="", metavar="DIR", help="toy pipeline folder (default the shipped one)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch CPU threads (default 2, or 1 on a one-core machine)")
    p.add_argument("--no-sepen", action="store_true", help="skip the Separate-and-Enhance part (saves ~1.5 min)")
    p.add_argument("--grpo", action="store_true",
                   help="also train GRPO (beta 0) and region-constrained GRPO (heatmap and Grad-CAM masks) with the "
                        "defect classifier as a black box (no gradient), reported beside DRaFT and Focus-N-Fix "
                        "(docs/grpo.md; ~10 more min)")
    p.add_argument("--grpo-only", action="store_true",
                   help="only the GRPO models (no DRaFT / Focus-N-Fix training, no Separate-and-Enhance)")
    p.add_argument("--overwrite", action="store_true",
                   help="an --out holding an earlier demo is moved to <out>/previous-<time>/ (without it: refused)")
    p.add_argument("--json", action="store_true",
                   help="print metrics.json to stdout at the end (progress then goes to stderr)")


# Wall minutes of a whole demo on the 2-core box with 2 torch threads (README; --quick: a few steps and images)
DEMO_MINUTES = {"default": 9.3, "quick": 2.0, "sweep_run": 1.5, "sepen": 1.5, "grpo": 10.0}


def plan(args) -> str:
    """What the demo will run and about how long it takes (said before it starts)."""
    scale = 0.2 if args.quick else 1
    minutes = DEMO_MINUTES["quick" if args.quick else "default"]
    what = "DRaFT and Focus-N-Fix (heatmap and Grad-CAM masks)"
    grpo_only = getattr(args, "grpo_only", False)
    if grpo_only:   # base images and GRPO's three runs only
        what, minutes = "GRPO and region-constrained GRPO (heatmap and Grad-CAM masks)", DEMO_MINUTES["sepen"] * scale
    elif getattr(args, "grpo", False):
        what += ", GRPO and region-constrained GRPO"
    if grpo_only or getattr(args, "grpo", False):
        minutes += DEMO_MINUTES["grpo"] * scale
    if args.sweep and not grpo_only:
        what += ", Focus-N-Fix at beta 0.3 / 3 / 10"
        minutes += 3 * DEMO_MINUTES["sweep_run"] * scale
    if args.no_sepen and not grpo_only:
        minutes -= DEMO_MINUTES["sepen"] * scale
    elif not grpo_only:
        what += ", then Separate-and-Enhance"
    size = "a smoke test on a few images" if args.quick else "evaluated on 544 held-out images"
    return (f"fnf demo: trains {what} on the toy model, {size}: about {max(1, round(minutes))} min on 2 CPU cores "
            f"(more on a busy machine)")


def run(args) -> int:
    check_out_path(args.out)   # before anything loads
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        prepare_out(args.out, args.overwrite)   # refused, or the earlier demo moved aside, before the plan
        print(plan(args), file=sys.stderr, flush=True)
        run_demo(args.out, quick=args.quick, seed=args.eval_seed, model=args.model, threads=args.threads,
                 sepen=not (args.no_sepen or args.grpo_only), overwrite=args.overwrite, sweep=args.sweep, small=args.small,
                 grpo=args.grpo, grpo_only=args.grpo_only)
        note = " (--quick: a smoke test, its numbers say nothing about the methods)" if args.quick else ""
        print(f"fnf demo: report in {os.path.join(args.out, 'report.md')}{note}")
    if args.json:
        with open(os.path.join(args.out, "metrics.json"), encoding="utf-8") as f:
            json.dump(json.load(f), sys.stdout, indent=1)
        print()
    return 0
