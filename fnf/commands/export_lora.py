"""`fnf export-lora`: a trained LoRA as one .safetensors file for diffusers, kohya-based tools or ComfyUI."""
from __future__ import annotations

from ..config import LORA_FORMATS
from ..lora_formats import FORMATS, export
from .common import wrapped

EPILOG = """\
formats (docs/lora_formats.md has the key layouts and which tool reads which):
  diffusers  pipe.load_lora_weights(FILE): the LoRA folder's tensors in one file, peft keys, adapter metadata
  kohya      kohya-ss sd-scripts keys: lora_unet_<module>.lora_down / .lora_up / .alpha, in the module names
             sd-scripts trains on: SD 1.x/2.x diffusers' UNet names, SDXL the original UNet's (input_blocks_4_1_...),
             FLUX.1 and FLUX.2 / klein BFL's (q/k/v fused into qkv, FLUX.1's single-block q/k/v/MLP into
             linear1). A1111 / Forge / ComfyUI read these too
  comfyui    what ComfyUI's LoRA loader maps: SD/SDXL as kohya; SD3 transformer.<diffusers name>; FLUX.1
             diffusion_model.<BFL name> (lora_down/up/alpha); FLUX.2 / klein diffusion_model.<BFL name>
             (lora_A/B); Z-Image and Qwen-Image diffusion_model.<diffusers name> (lora_down/up/alpha)
  The files carry their rank, alpha and base model in the safetensors metadata (ss_network_dim, ss_network_alpha,
  ss_base_model_version, modelspec.architecture, fnf_family). Text encoders are never trained, so there are no
  lora_te keys.

examples:
  fnf export-lora runs/fix --format comfyui --out ~/ComfyUI/models/loras/fix_hands.safetensors
  fnf export-lora runs/fix/lora --format kohya --out fix_kohya.safetensors --dtype fp16 --overwrite
  fnf export-lora downloaded_lora/ --family flux --format kohya --out flux_fix.safetensors

  (To write them at the end of training: train.export_formats: [comfyui, kohya] in the config.)
"""


def add_arguments(parser) -> None:
    parser.description = wrapped(
        "Convert a LoRA trained by fnf (a run folder, or its lora/ folder) into one .safetensors file in the layout "
        "a generation tool reads: diffusers, kohya (sd-scripts, A1111, Forge) or ComfyUI. The model family comes "
        "from the run's config.yaml, or --family.")
    parser.epilog = EPILOG
    parser.add_argument("source", metavar="RUN_OR_LORA_DIR",
                        help="a run folder (train.out, with lora/ and config.yaml) or a LoRA folder "
                             "(pytorch_lora_weights.safetensors)")
    parser.add_argument("--format", required=True, metavar="|".join(LORA_FORMATS), help="the file layout (see below)")
    parser.add_argument("--out", required=True, metavar="FILE.safetensors", help="the file to write")
    parser.add_argument("--family", default="", metavar="NAME",
                        help=f"the model family of the LoRA ({', '.join(FORMATS)}); needed for a LoRA folder "
                             "outside a run, checked against the run's model otherwise")
    parser.add_argument("--dtype", default="fp32", metavar="fp32|fp16|bf16",
                        help="the tensors' dtype in the file (default fp32, as trained; fp16 / bf16 halve the size)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")


def run(args) -> int:
    if not args.out.endswith(".safetensors"):
        raise ValueError(f"--out {args.out!r}: expected a .safetensors file name")
    report = export(args.source, args.format, args.out, family=args.family, overwrite=args.overwrite,
                    dtype=args.dtype)
    ranks = "/".join(str(r) for r in report["rank"])
    alphas = "/".join(f"{a:g}" for a in report["alpha"])
    print(f"fnf: wrote {report['path']}: {report['family']} LoRA, {report['format']} format, "
          f"{report['modules']} modules -> {report['tensors']} tensors, rank {ranks}, alpha {alphas}")
    return 0
