"""The subcommands of ``fnf``, one module each: ``add_arguments(parser)`` declares its options, ``run(args)``
runs it and returns the exit status. fnf/cli.py imports a command's module only when that command runs."""
from __future__ import annotations

# command -> (module in fnf/commands/, the one line `fnf --help` shows), in the order `fnf --help` lists them
COMMANDS = {
    "train": ("train", "train a LoRA"),
    "localize": ("localize", "write I0 / heatmap / mask / overlay PNGs for prompts"),
    "sample": ("sample", "base and fine-tuned images side by side"),
    "eval": ("eval", "base vs LoRAs on prompts x seeds: reward with intervals, change inside/outside the base "
                     "mask, grids"),
    "estimate-memory": ("estimate_memory", "predict a training step's peak GPU memory (no GPU, no weights)"),
    "export-lora": ("export_lora", "a trained LoRA as one file for diffusers, kohya tools or ComfyUI"),
    "demo": ("demo", "DRaFT vs Focus-N-Fix on the embedded toy model, with a held-out report"),
}
