"""Training configuration: nested dataclasses, YAML loading, ``key=value`` overrides and validation.

Every key is addressed as ``section.name`` (e.g. ``sampling.steps``, ``objective.beta``). Errors raise
:class:`ConfigError` naming the bad key, the value found and the value expected.

Defaults that the papers leave open are ours; each is documented next to its field.
"""
from __future__ import annotations

import dataclasses
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """A configuration key is unknown or holds a value of the wrong kind."""


@dataclass
class ModelConfig:
    path: str = ""                 # local diffusers folder (SD 1.x/2.x or SDXL); never a hub id
    kind: str = "auto"             # auto | sd | sdxl | sd3 | flux  (auto: from model_index.json's pipeline class)
    # dtype of the frozen weights: auto | fp32 | fp16 | bf16 (LoRA params stay fp32). auto (fnf/precision.py): bf16
    # on CUDA with bf16 (sm >= 8.0), fp16 on older CUDA, fp32 on CPU; the resolved value is saved with the run.
    weight_dtype: str = "auto"
    scheduler: str = "ddim"        # ddim: a DDIMScheduler built from the folder's scheduler config
    # The frozen denoiser quantized at load (fnf/quantize.py, diffusers' quantization configs; LoRA stays fp32 on
    # top): none | bnb-8bit (bitsandbytes LLM.int8) | bnb-4bit (bitsandbytes NF4) | torchao-int8 (torchao int8
    # weight-only). bitsandbytes needs CUDA. Every family (SD/SDXL: the UNet's Linear layers); not with sepen.
    quantize: str = "none"
    text_encoder_3: bool = True    # SD3/3.5: false loads no T5 (zeros for its tokens, as the pipeline without it)
    max_sequence_length: int = 0   # T5 tokens (SD3, FLUX.1); 0: the pipeline's default (SD3 256, FLUX.1 512)


@dataclass
class LoraSettings:
    rank: int = 64                 # Focus-N-Fix reports rank 64
    alpha: float = 64.0            # scale = alpha / rank
    dropout: float = 0.0
    target_modules: list = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])


@dataclass
class SamplingConfig:
    steps: int = 50                # DDIM steps T
    guidance_scale: float = 7.5
    truncation_k: int = 2          # DRaFT-K: the last K steps carry gradient (Focus-N-Fix reports K=2)
    lv_copies: int = 0             # > 0: DRaFT-LV (K=1) with this many re-noised copies of the last step
    eta: float = 0.0               # DDIM eta (0 = deterministic)
    height: int = 0                # 0: the model's native size (unet.sample_size * vae factor)
    width: int = 0
    negative_prompt: str = ""


@dataclass
class RewardConfig:
    spec: str = "brightness"       # registry name, "module:callable" or "path/file.py:callable"
    weight: float = 1.0            # w in loss = -w * r(I, c) + beta * penalty
    kwargs: dict = field(default_factory=dict)


@dataclass
class LocalizeConfig:
    # auto | gradcam[:layer] | saliency | heatmap:SPEC | boxes:PATH.onnx | file:GLOB | none. auto (default):
    # gradcam where the reward has a layer for it (gradcam_layer or a Conv2d), else saliency (e.g. brightness).
    spec: str = "auto"
    kwargs: dict = field(default_factory=dict)   # heatmap:SPEC factory kwargs; gradcam: {explain: reward|problem}
    normalize: str = "minmax"      # per-image heatmap normalisation: minmax | max | none
    threshold: float = 0.5         # ours: half of the normalised heatmap's range
    threshold_mode: str = "relative"   # relative: threshold * each image's max; absolute: threshold as is
    radius: int = -1               # dilation radius in pixels; -1: ours, 1/64 of the image side (8 px at 512); 0: none
    shape: str = "square"          # square | disk


@dataclass
class ObjectiveConfig:
    # fnf: Focus-N-Fix / DRaFT (reward, localizer, region penalty); sepen: Separate-and-Enhance (section
    # `sepen`; fnf/sepen/). The YAML shorthand `objective: sepen` sets this key.
    name: str = "fnf"
    beta: float = 1.0              # ours (the paper does not publish it); see fnf/objectives.py
    squared: bool = False          # the paper writes the plain Frobenius norm


@dataclass
class SepenConfig:
    """objective.name=sepen: tune only attn2.to_k on two-object prompts (fnf/objectives/sepen.py).

    Use train.lr in the paper's range 5e-7 .. 8e-6 (full to_k tuning); LoRA on to_k usually wants more."""
    concepts: list = field(default_factory=lambda: ["cat", "dog", "car", "tree", "house", "person"])
    template: str = "a photo of a {A} and a {B}"    # two-object training prompts (A != B drawn per sample)
    single_template: str = "a photo of a {A}"       # the regulariser's single-object prompts
    exclude_prompts: list = field(default_factory=list)  # two-object prompts never trained on (held-out ones)
    # training timesteps t drawn uniformly from [lo, hi) as fractions of the scheduler's num_train_timesteps;
    # [0, 1] is the paper's "random timestep"; e.g. [0.5, 1] trains only the noisy steps where layout forms
    timestep_range: list = field(default_factory=lambda: [0.0, 1.0])
    lambda_sep: float = 1.0
    lambda_en: float = 0.5
    lambda_norm: float = 0.5       # MSE between fine-tuned and frozen noise predictions on single-object prompts
    eps: float = 1e-8              # Separate denominator epsilon (the official code has none)
    downsample: int = 4            # capture the cross-attention layers at latent/downsample (SD-1.x 512: 16x16)
    lora: bool = False             # false: train the to_k weights themselves; true: a LoRA (lora.rank/alpha) on them
    loss_backend: str = "auto"     # fnf_kernels backend of the losses: auto | triton | reference


@dataclass
class GrpoConfig:
    """objective.name=grpo: group-relative policy optimisation with the Focus-N-Fix region term
    (fnf/objectives/grpo.py; docs/grpo.md). A rollout per process: ``prompts_per_rollout`` prompts x
    ``group_size`` samples each (a group never spans processes); each micro-batch of the trainer is then
    ``train.batch_size`` samples at one trained step, ``inner_epochs`` passes over the rollout."""
    group_size: int = 8            # G samples per prompt (Flow-GRPO uses 12-24; ours, for one GPU)
    prompts_per_rollout: int = 1   # groups per process per rollout
    inner_epochs: int = 1          # passes over one rollout (PPO epochs)
    sample_batch_size: int = 0     # rows per denoiser batch while sampling a rollout; 0: train.batch_size
    clip_range: float = 1e-4       # PPO ratio clip (Flow-GRPO and DDPO both use 1e-4)
    adv_clip_max: float = 5.0      # advantages clamped to [-max, max] (Flow-GRPO, DDPO: 5)
    std_eps: float = 1e-4          # (R - mean) / (std + eps) within a group (Flow-GRPO: 1e-4)
    steps: str = "all"             # the trained steps: all | window (sliding) | random (a subset per rollout)
    train_steps: int = 0           # window / random subset size; 0 with steps=all
    window_stride: int = 1         # steps=window: the window moves this many steps per rollout (wrapping)
    # KL to the frozen model (adapters off): the exact KL of the step's two Gaussians, per element. Flow-GRPO's
    # leaves dt out of the variance (its KL = ours x |dt|): its kl 0.04 at T = 10 is about ours 0.004.
    kl_beta: float = 0.0
    # The same KL outside the problem mask M(I0) only (the mask pooled to the latent grid; averaged over all
    # elements, so with an empty mask it is kl_beta's term): an exact per-step gradient that holds the region the
    # per-sample term -beta ||(1 - M)(I0 - I)|| holds only through the noisy policy gradient. Needs a localizer.
    region_kl_beta: float = 0.0
    # the sampler's noise: DDIM eta for the UNet families, Flow-GRPO's a for the flow families; 0: the family's
    # default (DDIM eta 1.0 as DDPO, flow a 0.7 as Flow-GRPO)
    noise_level: float = 0.0


@dataclass
class TrainConfig:
    prompts: list = field(default_factory=lambda: ["a photo of a person"])
    prompts_file: str = ""         # one prompt per line; added to `prompts`
    # 0: fresh noise for every sample. N > 0: a fixed pool of N noise seeds per prompt; the pretrained images I0
    # (and masks) of the pool are computed once before training (fnf/reference_pool.py), so a step samples only
    # the fine-tuned trajectory. Needs sampling.eta = 0.
    seeds_per_prompt: int = 0
    # With seeds_per_prompt > 0: keep only the pool entries whose I0 scores a reward below this (train on known-bad
    # generations, as the Focus-N-Fix paper does); inf keeps every entry.
    pool_reward_below: float = math.inf
    batch_size: int = 1            # images per process per micro-step
    steps: int = 1000              # optimizer steps
    grad_accum: int = 1
    lr: float = 3e-4
    weight_decay: float = 0.1
    adam_betas: list = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1e-8
    warmup_steps: int = 0
    grad_clip: float = 1.0         # max grad norm; 0 disables clipping
    seed: int = 0
    out: str = "runs/fnf"
    resume: str = ""               # "", "latest" or a checkpoint directory
    # A fresh run into an `out` that holds an earlier run's checkpoints, log, LoRA or samples is refused unless
    # `resume` is set or this is true: then the earlier run's files move to <out>/previous-<UTC time>/ (nothing
    # is deleted) and a new run starts there (fnf/train/run_dir.py).
    overwrite: bool = False
    checkpoint_every: int = 100
    keep_checkpoints: int = 2      # 0 keeps all
    sample_every: int = 50         # PNG grid I0 | mask overlay | I every N steps; 0 disables
    log_every: int = 1
    tensorboard: bool = True       # when tensorboard is installed
    device: str = "auto"           # auto | cpu | cuda
    progress: bool = True
    # LoRA files written at the end of training beside <out>/lora/ (fnf/lora_formats.py): <out>/lora-<format>
    # .safetensors for each of diffusers | kohya | comfyui (kohya for SD/SDXL/FLUX; see docs/lora_formats.md)
    export_formats: list = field(default_factory=list)


@dataclass
class MemoryConfig:
    # auto | no | fp16 | bf16 (autocast; LoRA params and optimizer stay fp32). auto: the weights' half dtype, else
    # bf16 on CUDA with bf16, fp16 (+ grad scaler) on older CUDA, no on CPU (fnf/precision.py).
    mixed_precision: str = "auto"
    denoiser_checkpointing: bool = True   # gradient checkpointing of the UNet / transformer blocks
    # Activation checkpointing of the VAE decode that carries the reward's gradient (fnf/train/vae_memory.py):
    #   resnet: a checkpoint per ResNet, upsampler and mid-block attention of the decoder and one for its tail;
    #           same images and gradients as off, same recompute cost as blocks, less memory (default).
    #   blocks: diffusers' enable_gradient_checkpointing (backward recomputes a whole up-block at once).
    #   off:    none. true means resnet, false off.
    vae_checkpointing: str = "resnet"
    # Tiled VAE decode (diffusers' tiled_decode, a checkpoint per tile when vae_checkpointing is not off):
    # tiles of this many pixels (a multiple of 8), a quarter of a tile blended with its neighbours; 0: one
    # full decode (default). Differentiable, but a different image from the full decode (group norms and the
    # mid-block attention see one tile); I and I0 are decoded the same way. Only tiles images larger than it.
    vae_tile: int = 0
    # Fused norm + SiLU in the VAE decode (fnf/train/fused_norm.py): the decoder's GroupNorm -> SiLU pairs (its
    # ResNets, mid block and tail; Qwen-Image's RMSNorm -> SiLU) run as one fnf_kernels op that saves only its
    # input, not the float32 norm and SiLU outputs CUDA autocast keeps: the same image and gradients up to float
    # rounding, less backward memory (SDXL 1024^2, see docs/memory_levers.md). auto | on | off (also true/false):
    #   auto: on wherever the decoder's blocks are the supported layout, on every device (default: the memory
    #         win is the same on CPU and GPU); on: the same, an error when the VAE has no supported pair.
    fused_norm: str = "auto"
    reward_checkpointing: bool = False
    offload_text_encoder: bool = True  # embeddings are computed once; then the text encoders leave the device
    # Fused LoRA path (fnf/train/fused_lora.py): fnf_kernels' LoRA-fused attention, and the no-grad denoising steps of
    # I0 and I run as one UNet batch (LoRA scale 0 | 1 rows). off | on | auto (also true/false).
    #   on:   any device (CPU: plain-torch kernels); an error when the LoRA cannot be fused (lora.dropout > 0,
    #         LoRA on non-Linear layers). Same samples and gradients as off up to float rounding; the exported
    #         LoRA and checkpoints are unchanged.
    #   auto: on when training on CUDA with triton installed and the LoRA can be fused, else off.
    # Default off (ours): the Triton kernels have been checked only under the CPU interpreter so far; switch
    # the default to auto once the GPU tests and benchmarks/bench_trainer_batching.py have run on a GPU.
    fused_lora: str = "off"


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    localize: LocalizeConfig = field(default_factory=LocalizeConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    sepen: SepenConfig = field(default_factory=SepenConfig)
    grpo: GrpoConfig = field(default_factory=GrpoConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def all_prompts(self) -> list[str]:
        prompts = list(self.train.prompts)
        if self.train.prompts_file:
            with open(self.train.prompts_file, encoding="utf-8") as f:
                prompts += [line.strip() for line in f if line.strip()]
        return prompts


LORA_FORMATS = ("diffusers", "kohya", "comfyui")   # fnf export-lora --format / train.export_formats

CHOICES = {
    "model.kind": ("auto", "sd", "sdxl", "sd3", "flux", "flux2", "flux2-klein", "qwen-image", "z-image"),
    "objective.name": ("fnf", "sepen", "grpo"),
    "grpo.steps": ("all", "window", "random"),
    "sepen.loss_backend": ("auto", "triton", "reference"),
    "model.weight_dtype": ("auto", "fp32", "fp16", "bf16"),
    "model.scheduler": ("ddim",),
    "model.quantize": ("none", "bnb-8bit", "bnb-4bit", "torchao-int8"),
    "localize.normalize": ("minmax", "max", "none"),
    "localize.threshold_mode": ("relative", "absolute"),
    "localize.shape": ("square", "disk"),
    "memory.mixed_precision": ("auto", "no", "fp16", "bf16"),
    "memory.fused_lora": ("auto", "on", "off"),
    "memory.vae_checkpointing": ("resnet", "blocks", "off"),
    "memory.fused_norm": ("auto", "on", "off"),
    "train.device": ("auto", "cpu", "cuda"),
}


# Spellings accepted for a choice key and the value they stand for (YAML reads on/off/yes/no as booleans,
# which the string coercion turns into "yes"/"no").
ALIASES = {
    "model.quantize": {"no": "none", "false": "none", "off": "none", "0": "none"},
    "memory.fused_lora": {"yes": "on", "true": "on", "1": "on", "no": "off", "false": "off", "0": "off"},
    "memory.fused_norm": {"yes": "on", "true": "on", "1": "on", "no": "off", "false": "off", "0": "off"},
    "memory.vae_checkpointing": {"yes": "resnet", "true": "resnet", "1": "resnet", "on": "resnet",
                                 "no": "off", "false": "off", "0": "off"},
}


# Keys that were renamed: still read, with a one-line deprecation message.
RENAMED = {"memory.unet_checkpointing": "memory.denoiser_checkpointing"}


def _sections(cfg: Config):
    for f in dataclasses.fields(cfg):
        yield f.name, getattr(cfg, f.name)


def _field_type(section_obj, name: str):
    return get_type_hints(type(section_obj))[name]


def _coerce(key: str, value: Any, typ) -> Any:
    """Convert ``value`` to ``typ`` or raise ConfigError naming ``key``."""
    origin = get_origin(typ) or typ
    expected = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
                list: "a list", dict: "a mapping"}.get(origin, str(typ))
    bad = ConfigError(f"config key '{key}': expected {expected}, got {value!r}")
    if origin is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise bad
    if origin is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                raise bad from None
        raise bad
    if origin is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if origin is str:
        if isinstance(value, bool):  # YAML 1.1 reads a bare `no` as false (memory.mixed_precision: no)
            return "no" if value is False else "yes"
        if isinstance(value, (str, int, float)):
            return str(value)
        if value is None:
            return ""
        raise bad
    if origin is list:
        if isinstance(value, str):
            parsed = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
            value = parsed
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise bad
        return value
    if origin is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise bad
        return value
    return value


def _set(cfg: Config, key: str, value: Any) -> None:
    if key in RENAMED:
        warnings.warn(f"config key '{key}' is deprecated; use '{RENAMED[key]}'", FutureWarning, stacklevel=2)
        key = RENAMED[key]
    parts = key.split(".")
    sections = dict(_sections(cfg))
    if len(parts) != 2 or parts[0] not in sections:
        raise ConfigError(f"unknown config key '{key}': expected 'section.name' with section one of "
                          f"{', '.join(sections)}")
    section, name = parts
    obj = sections[section]
    names = [f.name for f in dataclasses.fields(obj)]
    if name not in names:
        raise ConfigError(f"unknown config key '{key}': section '{section}' has {', '.join(names)}")
    value = _coerce(key, value, _field_type(obj, name))
    if key in ALIASES and isinstance(value, str):
        value = ALIASES[key].get(value.lower(), value)
    setattr(obj, name, value)


def from_dict(data: dict | None) -> Config:
    """Build a validated Config from a nested mapping ``{section: {name: value}}``."""
    cfg = Config()
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config: expected a mapping of sections, got {type(data).__name__}")
    for section, values in data.items():
        if values is None:
            continue
        if section == "objective" and isinstance(values, str):  # shorthand: `objective: sepen`
            values = {"name": values}
        if not isinstance(values, dict):
            raise ConfigError(f"config section '{section}': expected a mapping of keys, got {values!r}")
        for name, value in values.items():
            _set(cfg, f"{section}.{name}", value)
    validate(cfg)
    return cfg


def load(path: str | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML file (optional), apply ``key=value`` overrides, validate."""
    data: dict = {}
    if path:
        if not os.path.isfile(path):
            raise ConfigError(f"config file not found: {path}")
        with open(path, encoding="utf-8") as f:
            try:
                data = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    cfg = from_dict(data)
    if path:
        _resolve_file_paths(cfg, data, os.path.dirname(os.path.abspath(path)))
    apply_overrides(cfg, overrides or [])
    return cfg


def _resolve_file_paths(cfg: Config, data: dict, base: str) -> None:
    """A relative ``train.prompts_file`` in a YAML file names a file beside that YAML file (configs/x.yaml
    with ``prompts/people.txt`` reads configs/prompts/people.txt); a path that only exists relative to the
    working directory is kept as it is. ``--set`` values stay relative to the working directory."""
    given = (data.get("train") or {}).get("prompts_file") if isinstance(data.get("train"), dict) else None
    if not given or os.path.isabs(str(given)):
        return
    beside = os.path.join(base, str(given))
    if os.path.isfile(beside) or not os.path.isfile(str(given)):
        cfg.train.prompts_file = beside


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply ``section.key=value`` strings (values parsed as YAML scalars/lists), then validate."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected the form section.key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        _set(cfg, key.strip(), value)
    validate(cfg)
    return cfg


def _require(ok: bool, key: str, expected: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}': expected {expected}, got {value!r}")


def validate(cfg: Config) -> Config:
    """Check ranges and choices; raise ConfigError naming the key and the expected value."""
    for key, choices in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        _require(value in choices, key, "one of " + ", ".join(choices), value)
    positive_ints = {"lora.rank": cfg.lora.rank, "sampling.steps": cfg.sampling.steps,
                     "train.batch_size": cfg.train.batch_size, "train.steps": cfg.train.steps,
                     "train.grad_accum": cfg.train.grad_accum, "train.log_every": cfg.train.log_every}
    for key, value in positive_ints.items():
        _require(value >= 1, key, "an integer >= 1", value)
    nonneg_ints = {"sampling.lv_copies": cfg.sampling.lv_copies, "sampling.height": cfg.sampling.height,
                   "sampling.width": cfg.sampling.width,
                   "train.warmup_steps": cfg.train.warmup_steps, "train.checkpoint_every": cfg.train.checkpoint_every,
                   "train.sample_every": cfg.train.sample_every, "train.keep_checkpoints": cfg.train.keep_checkpoints,
                   "train.seed": cfg.train.seed, "train.seeds_per_prompt": cfg.train.seeds_per_prompt}
    for key, value in nonneg_ints.items():
        _require(value >= 0, key, "an integer >= 0", value)
    _require(0 <= cfg.model.max_sequence_length <= 512, "model.max_sequence_length",
             "an integer in [1, 512] (T5 tokens), or 0 for the pipeline's default", cfg.model.max_sequence_length)
    tile = cfg.memory.vae_tile
    _require(tile == 0 or (tile >= 64 and tile % 8 == 0), "memory.vae_tile",
             "0 (no tiling) or a multiple of 8 pixels >= 64", tile)
    _require(cfg.localize.radius >= -1, "localize.radius", "an integer >= 0 (or -1 for 1/64 of the image side)",
             cfg.localize.radius)
    for key in ("sampling.height", "sampling.width"):
        value = getattr(cfg.sampling, key.split(".")[1])
        _require(value % 8 == 0, key, "a multiple of 8 (or 0 for the model's size)", value)
    k = cfg.sampling.truncation_k
    _require(1 <= k <= cfg.sampling.steps, "sampling.truncation_k", f"an integer in [1, sampling.steps={cfg.sampling.steps}]", k)
    if cfg.sampling.lv_copies > 0:
        _require(k == 1, "sampling.truncation_k", "1 when sampling.lv_copies > 0 (DRaFT-LV)", k)
    finite_nonneg = {"sampling.guidance_scale": cfg.sampling.guidance_scale, "sampling.eta": cfg.sampling.eta,
                     "objective.beta": cfg.objective.beta, "train.weight_decay": cfg.train.weight_decay,
                     "train.grad_clip": cfg.train.grad_clip, "lora.dropout": cfg.lora.dropout}
    for key, value in finite_nonneg.items():
        _require(math.isfinite(value) and value >= 0, key, "a finite number >= 0", value)
    _require(math.isfinite(cfg.lora.alpha) and cfg.lora.alpha > 0, "lora.alpha", "a finite number > 0", cfg.lora.alpha)
    if cfg.train.seeds_per_prompt > 0:
        _require(cfg.sampling.eta == 0, "sampling.eta", "0 with train.seeds_per_prompt > 0 (a pooled I0 is "
                 "reused, so the fine-tuned trajectory must not draw DDIM noise)", cfg.sampling.eta)
    _require(not math.isnan(cfg.train.pool_reward_below), "train.pool_reward_below", "a number (inf keeps every pool "
             "entry)", cfg.train.pool_reward_below)
    _require(math.isfinite(cfg.train.lr) and cfg.train.lr > 0, "train.lr", "a finite number > 0", cfg.train.lr)
    _require(math.isfinite(cfg.train.adam_eps) and cfg.train.adam_eps > 0, "train.adam_eps", "a number > 0",
             cfg.train.adam_eps)
    _require(math.isfinite(cfg.reward.weight), "reward.weight", "a finite number", cfg.reward.weight)
    _require(0 <= cfg.lora.dropout < 1, "lora.dropout", "a number in [0, 1)", cfg.lora.dropout)
    if cfg.memory.fused_lora == "on":
        _require(cfg.lora.dropout == 0, "lora.dropout", "0 with memory.fused_lora=on (the fused LoRA path has no "
                 "dropout; use memory.fused_lora=auto or off)", cfg.lora.dropout)
    betas = cfg.train.adam_betas
    _require(len(betas) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas),
             "train.adam_betas", "two numbers in [0, 1)", betas)
    tm = cfg.lora.target_modules
    _require(len(tm) > 0 and all(isinstance(t, str) and t for t in tm), "lora.target_modules",
             "a non-empty list of module names", tm)
    ef = cfg.train.export_formats
    _require(isinstance(ef, list) and all(f in LORA_FORMATS for f in ef), "train.export_formats",
             f"a list of LoRA formats from {', '.join(LORA_FORMATS)}", ef)
    _require(not (ef and cfg.objective.name == "sepen" and not cfg.sepen.lora), "train.export_formats",
             "[] with sepen.lora=false (the result is to_k weights, not a LoRA)", ef)
    pr = cfg.train.prompts
    _require(all(isinstance(p, str) for p in pr), "train.prompts", "a list of strings", pr)
    _require(len(pr) > 0 or bool(cfg.train.prompts_file), "train.prompts",
             "at least one prompt (or train.prompts_file)", pr)
    _require(math.isfinite(cfg.localize.threshold), "localize.threshold", "a finite number", cfg.localize.threshold)
    if cfg.localize.threshold_mode == "relative":
        _require(0 <= cfg.localize.threshold <= 1, "localize.threshold",
                 "a fraction in [0, 1] with threshold_mode=relative", cfg.localize.threshold)
    _require(bool(cfg.reward.spec), "reward.spec", "a reward name, module:callable or file.py:callable",
             cfg.reward.spec)
    _require(bool(cfg.localize.spec), "localize.spec",
             "auto, gradcam[:layer], saliency, heatmap:SPEC, file:GLOB or none", cfg.localize.spec)
    head = cfg.localize.spec.split(":", 1)[0]
    _require(head in ("auto", "gradcam", "saliency", "heatmap", "boxes", "file", "none"), "localize.spec",
             "auto, gradcam[:layer], saliency, heatmap:SPEC, boxes:PATH.onnx, file:GLOB or none", cfg.localize.spec)
    argument = {"heatmap": "SPEC", "boxes": "PATH.onnx", "file": "GLOB"}.get(head)
    if argument:
        _require(":" in cfg.localize.spec and cfg.localize.spec.split(":", 1)[1] != "", "localize.spec",
                 f"{head}:<{argument}>", cfg.localize.spec)
    if cfg.objective.name == "sepen":
        _validate_sepen(cfg)
    if cfg.objective.name == "grpo":
        _validate_grpo(cfg)
    return cfg


def grpo_layout(cfg: Config) -> dict:
    """How the trainer's steps map onto GRPO rollouts (per process): ``samples`` per rollout, ``trained_steps`` per
    sample, ``micro_batches`` per rollout (inner_epochs x samples / batch_size x trained_steps; each one
    micro-batch of the trainer), and ``optimizer_steps`` per rollout (micro_batches / grad_accum)."""
    g, t = cfg.grpo, cfg.train
    samples = g.group_size * g.prompts_per_rollout
    trained = cfg.sampling.steps if g.steps == "all" else g.train_steps
    micro = g.inner_epochs * (samples // t.batch_size) * trained
    return {"samples": samples, "trained_steps": trained, "micro_batches": micro,
            "optimizer_steps": micro // t.grad_accum}


def _validate_grpo(cfg: Config) -> None:
    g, t = cfg.grpo, cfg.train
    for key in ("group_size", "prompts_per_rollout", "inner_epochs", "window_stride"):
        floor = 2 if key == "group_size" else 1
        value = getattr(g, key)
        _require(value >= floor, f"grpo.{key}", f"an integer >= {floor}", value)
    _require(g.sample_batch_size >= 0, "grpo.sample_batch_size", "an integer >= 0 (0: train.batch_size)",
             g.sample_batch_size)
    for key in ("clip_range", "adv_clip_max", "std_eps"):
        value = getattr(g, key)
        _require(math.isfinite(value) and value > 0, f"grpo.{key}", "a finite number > 0", value)
    for key in ("kl_beta", "region_kl_beta", "noise_level"):
        value = getattr(g, key)
        _require(math.isfinite(value) and value >= 0, f"grpo.{key}", "a finite number >= 0", value)
    _require(g.region_kl_beta == 0 or cfg.localize.spec != "none", "grpo.region_kl_beta",
             "0 without a localizer (localize.spec: none): the region KL needs the mask M(I0)", g.region_kl_beta)
    steps = cfg.sampling.steps
    if g.steps == "all":
        _require(g.train_steps in (0, steps), "grpo.train_steps", f"0 (or sampling.steps={steps}) with "
                 "grpo.steps=all", g.train_steps)
    else:
        _require(1 <= g.train_steps <= steps, "grpo.train_steps",
                 f"an integer in [1, sampling.steps={steps}] with grpo.steps={g.steps}", g.train_steps)
    layout = grpo_layout(cfg)
    _require(layout["samples"] % t.batch_size == 0, "train.batch_size", "a divisor of grpo.group_size x "
             f"grpo.prompts_per_rollout = {layout['samples']} (a micro-batch takes whole rows of one rollout)",
             t.batch_size)
    _require(layout["micro_batches"] % t.grad_accum == 0, "train.grad_accum",
             f"a divisor of the {layout['micro_batches']} micro-batches of one rollout (inner_epochs x samples / "
             "batch_size x trained steps), so that optimizer steps do not straddle rollouts", t.grad_accum)
    _require(t.seeds_per_prompt == 0 or t.seeds_per_prompt >= g.group_size, "train.seeds_per_prompt",
             f"0 or at least grpo.group_size={g.group_size} (a group draws distinct seeds of its prompt)",
             t.seeds_per_prompt)
    _require(t.pool_reward_below == math.inf, "train.pool_reward_below", "inf with objective.name=grpo (the "
             "pool filter is a DRaFT option)", t.pool_reward_below)
    _require(cfg.sampling.lv_copies == 0, "sampling.lv_copies", "0 with objective.name=grpo (DRaFT-LV is a "
             "DRaFT option)", cfg.sampling.lv_copies)


def _validate_sepen(cfg: Config) -> None:
    sc = cfg.sepen
    concepts = sc.concepts
    _require(all(isinstance(c, str) and c.strip() for c in concepts) and len(set(concepts)) >= 2,
             "sepen.concepts", "a list of at least 2 distinct non-empty words", concepts)
    for key, value, fields in (("sepen.template", sc.template, ("{A}", "{B}")),
                               ("sepen.single_template", sc.single_template, ("{A}",))):
        _require(all(f in value for f in fields) and "{" not in value.replace("{A}", "").replace("{B}", ""),
                 key, "a string with the fields " + " and ".join(fields) + " (and no other braces)", value)
    for key in ("lambda_sep", "lambda_en", "lambda_norm", "eps"):
        value = getattr(sc, key)
        _require(math.isfinite(value) and value >= 0, f"sepen.{key}", "a finite number >= 0", value)
    d = sc.downsample
    _require(d >= 1 and d & (d - 1) == 0, "sepen.downsample", "a power of two >= 1", d)
    tr = sc.timestep_range
    _require(isinstance(tr, list) and len(tr) == 2 and all(isinstance(v, (int, float)) for v in tr)
             and 0 <= tr[0] < tr[1] <= 1, "sepen.timestep_range", "[lo, hi] with 0 <= lo < hi <= 1", tr)
    ex = sc.exclude_prompts
    _require(all(isinstance(p, str) for p in ex), "sepen.exclude_prompts", "a list of strings", ex)
    n_free = len(sepen_pairs(sc))
    _require(n_free > 0, "sepen.exclude_prompts", "to leave at least one (A, B) concept pair to train on",
             f"{len(ex)} prompts that exclude every pair")


def sepen_concepts(sc: SepenConfig) -> list[str]:
    """``sc.concepts`` stripped, duplicates dropped, in order."""
    return list(dict.fromkeys(c.strip() for c in sc.concepts))


def sepen_pairs(sc: SepenConfig) -> list[tuple[str, str]]:
    """The ordered concept pairs (A != B) whose template prompt is not in ``sc.exclude_prompts``."""
    concepts = sepen_concepts(sc)
    excluded = {" ".join(p.split()).lower() for p in sc.exclude_prompts}
    return [(a, b) for a in concepts for b in concepts
            if a != b and " ".join(sc.template.format(A=a, B=b).split()).lower() not in excluded]


def dump(cfg: Config, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
