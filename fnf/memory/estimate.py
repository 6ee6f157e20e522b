"""Trace the trainer's own ``Session.optimizer_step`` (step 2, AdamW's state live) and count device bytes.

``fake=True`` (the command): under torch's FakeTensorMode, models built from config.json files alone (no
weights read, no compute). ``fake=False``: the same code on real CPU tensors (tests check the two agree).
CUDA's autocast fp32 ops, its attention backend and foreach AdamW are imitated (cuda_rules.py) for a GPU
(``gpu``: cuda_rules.GPUS), whose capability also resolves ``auto`` precision as the trainer would there
(fnf/precision.py). A reward or localizer whose files are not here gets a stand-in of its size (stand_ins.py).
Models the trainer keeps on the host (offloaded text encoders, a reward built on the host before it moves) are
not counted.
"""
from __future__ import annotations

import contextlib
import copy
import math
import time
import warnings
from dataclasses import dataclass, field

import torch

from .. import precision
from ..config import grpo_layout
from ..core import DTYPES, ModelLoadError
from ..families.registry import detect_kind, family_by_name, read_index
from ..localize import GradCAM
from ..train import Session
from ..train.placement import text_encoders_first
from . import cuda_rules
from .archs import ARCHS
from .components import ConfigComponents, folder_components, native_size
from .counter import StorageCounter, rounded
from .quantized import adjustment, quantized_peak
from .stand_ins import CLIP_L14, stand_ins

GIB = 2 ** 30
# What a dispatch-level counter cannot see, as a margin on top of the estimate (uncalibrated until the first
# GPU run of benchmarks/train_memory.py): cuDNN convolution and cuBLAS workspaces and kernel scratch pass
# through the caching allocator and so count in max_memory_allocated.
MARGIN_FRACTION, MARGIN_BYTES = 0.10, GIB // 4


def plan_bytes(peak: float) -> float:
    """What to plan for: the estimate plus the margin."""
    return peak * (1 + MARGIN_FRACTION) + MARGIN_BYTES
NOT_INCLUDED = ("CUDA context (~0.3-0.6 GiB, outside max_memory_allocated)",
                "reserved-but-unallocated memory of the caching allocator (fragmentation; typically 5-20% more "
                "in torch.cuda.max_memory_reserved)")
FROZEN = "weights (frozen)"   # the counter's label of the model's weights
REWARD_STAND_INS = {"clip-l14": CLIP_L14}

# The memory ladder: each row adds one lever to the row before (memory.* keys; train.* for the pool); the last
# two rows each replace one lever of the fnf-defaults row (HALF_SIDE: tiles of half the image's longer side).
HALF_SIDE = "half the image side"
LADDER = [
    ("naive", {"memory": {"denoiser_checkpointing": False, "vae_checkpointing": "off", "reward_checkpointing": False,
                          "offload_text_encoder": False, "fused_lora": "off", "vae_tile": 0, "fused_norm": "off"},
               "train": {"seeds_per_prompt": 0}}),
    ("+ UNet checkpointing", {"memory": {"denoiser_checkpointing": True}}),
    ("+ VAE checkpointing per up-block (diffusers)", {"memory": {"vae_checkpointing": "blocks"}}),
    ("+ VAE checkpointing per ResNet", {"memory": {"vae_checkpointing": "resnet"}}),
    ("+ text encoders offloaded", {"memory": {"offload_text_encoder": True}}),
    ("+ fused norm + SiLU in the VAE decode (fnf defaults)", {"memory": {"fused_norm": "auto"}}),
    ("+ reward checkpointing", {"memory": {"reward_checkpointing": True}}),
    ("+ fused LoRA", {"memory": {"fused_lora": "on"}}),
    ("reference pool instead of fused LoRA", {"memory": {"fused_lora": "off"}, "train": {"seeds_per_prompt": 1}}),
    ("fnf defaults + tiled VAE decode (half-side tiles)",
     {"memory": {"reward_checkpointing": False, "vae_tile": HALF_SIDE}, "train": {"seeds_per_prompt": 0}}),
]


class _TraceAccelerator:
    """The few accelerator attributes a Session reads: one process, on the (traced) CPU."""

    device = torch.device("cpu")
    process_index, num_processes, is_main_process = 0, 1, True

    def __init__(self):
        self.notes: list[str] = []

    def print(self, *args, **_):
        self.notes.append(" ".join(str(a) for a in args))

    def wait_for_everyone(self):
        pass

    gradient_accumulation_steps = 1   # the Session sets it

    def backward(self, loss):
        (loss / self.gradient_accumulation_steps).backward()

    def clip_grad_norm_(self, parameters, max_norm):
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)

    _flag = False

    def set_trigger(self):
        self._flag = True

    def check_trigger(self):
        flag = torch.tensor([1.0 if self._flag else 0.0], device=self.device)  # the one device tensor of the check
        self._flag = False
        return bool(flag.item() > 0)


class CounterProbe:
    """The Session's estimation hook (fnf.objectives.base.NoProbe's interface) backed by a StorageCounter."""

    def __init__(self, counter: StorageCounter, on_phase=None):
        self.counter = counter
        self.on_phase = on_phase

    def phase(self, name: str, host: bool = False):
        if self.on_phase is not None:
            self.on_phase(name)
        if not host:
            return self.counter.phase(name)
        stack = contextlib.ExitStack()
        stack.enter_context(self.counter.phase(name))
        stack.enter_context(self.counter.host())
        return stack

    def placed(self, modules, on_device: bool) -> None:
        for module in modules:
            tensors = [*module.parameters(), *module.buffers()]
            # the model's own weights keep their label when they come back (the denoiser placed after encoding)
            frozen = any(getattr(self.counter._entries.get(s), "phase", None) == FROZEN
                         for s in self.counter._storages(tensors))
            label = "weights (moved to the device)" if on_device and not frozen else None
            self.counter.place(tensors, on_device, label)


@contextlib.contextmanager
def _fake_module_moves():
    """``Module.to()`` swaps FakeTensor parameters (torch >= 2.4), which fails: every fake tensor is weakly
    memoised by its FakeTensorMode. Inside, a swap of two fake tensors sets ``.data`` instead."""
    from torch._subclasses.fake_tensor import FakeTensor

    original = torch.utils.swap_tensors

    def swap(t1, t2):
        if isinstance(t1, FakeTensor) and isinstance(t2, FakeTensor):
            with torch.no_grad():
                t1.data = t2
            return None
        return original(t1, t2)

    torch.utils.swap_tensors = swap
    try:
        yield
    finally:
        torch.utils.swap_tensors = original


# ------------------------------------------------------------------------------------------ model specs
def model_spec(model_dir: str | None = None, arch: str | None = None) -> dict:
    """The architecture to build: a named one, or the config.json files of a diffusers folder (no weights)."""
    if arch:
        if arch not in ARCHS:
            raise ValueError(f"--arch: unknown architecture {arch!r}; expected one of {', '.join(sorted(ARCHS))}")
        return {"name": arch, "tokenizers": None, **copy.deepcopy(ARCHS[arch])}
    try:
        index = read_index(model_dir or "")
    except ModelLoadError as e:
        raise ValueError(str(e)) from None
    kind = detect_kind(model_dir, index)
    return {"kind": kind, **folder_components(model_dir, index, family_by_name(kind).components)}


def build_model(spec: dict, weight_dtype: str, fp16_autocast: bool = False):
    """A frozen DiffusionModel with random (under FakeTensorMode: fake) weights in the training dtypes: the
    family's own ``build`` from the spec's config values."""
    family = family_by_name(spec["kind"])
    return family.build(ConfigComponents(spec), weight_dtype=DTYPES[weight_dtype], device=None,
                        fp16_autocast=fp16_autocast)


# ------------------------------------------------------------------------------------------ the trace
@dataclass
class Estimate:
    peak_bytes: int
    peak_phase: str
    peak_step: str
    held_at_peak: dict
    phases: dict
    persistent: dict
    settings: dict
    attention_backends: dict
    trace_seconds: float
    notes: list = field(default_factory=list)
    quantized: dict | None = None   # model.quantize: fnf.memory.quantized's adjustment and its peak
    grpo_states: dict | None = None  # objective grpo: the traced rollout's kept (x_i, x_{i+1}) bytes per step

    def to_json(self) -> dict:
        gib = lambda b: round(b / GIB, 4)  # noqa: E731
        return {
            "estimate_of": "torch.cuda.max_memory_allocated", "peak_gib": gib(self.peak_bytes),
            "peak_bytes": self.peak_bytes, "peak_phase": self.peak_phase, "peak_step": self.peak_step,
            "plan_for_gib": gib(plan_bytes(self.peak_bytes)),
            "margin": {"fraction": MARGIN_FRACTION, "gib": gib(MARGIN_BYTES),
                       "covers": "cuDNN/cuBLAS workspaces and kernel scratch (not visible to the trace)"},
            "not_included": list(NOT_INCLUDED),
            "held_at_peak_gib": {k: gib(v) for k, v in self.held_at_peak.items()},
            "phases": {k: {kk: gib(vv) for kk, vv in v.items()} for k, v in self.phases.items()},
            "persistent_gib": {k: gib(v) for k, v in self.persistent.items()},
            "settings": self.settings, "attention_backends": self.attention_backends,
            "trace_seconds": round(self.trace_seconds, 2),
            **({"quantized": {**dict((k[:-6] + "_gib", gib(v)) if k.endswith("_bytes") else (k, v)
                                     for k, v in self.quantized.items()),
                              "plan_for_gib": gib(plan_bytes(self.quantized["peak_bytes"]))}}
               if self.quantized else {})}


def trace_config(cfg, height: int = 0, width: int = 0, sampling_steps: int = 0):
    """The config as traced: T = K + 2 DDIM steps (the peak does not depend on T), CPU, no side output."""
    cfg = copy.deepcopy(cfg)
    s = cfg.sampling
    grad_steps = 1 if s.lv_copies > 0 else s.truncation_k
    s.steps = sampling_steps or min(s.steps, grad_steps + 2)
    if height:
        s.height = height
    if width:
        s.width = width
    t = cfg.train
    t.device, t.progress, t.tensorboard = "cpu", False, False
    if cfg.memory.fused_lora == "auto":  # on a CUDA machine with triton, auto is on
        cfg.memory.fused_lora = "on"
    if t.seeds_per_prompt > 0:  # the pool is built batch by batch and kept on the host: one seed per prompt peaks
        t.seeds_per_prompt = 1  # as many do; its reward filter reads values (no fake tensor has them): all kept
        t.pool_reward_below = math.inf
    if cfg.objective.name == "grpo":  # one micro-batch per traced step (each is one step's backward: same peak)
        cfg.train.grad_accum = 1
        if cfg.grpo.steps != "all":
            cfg.grpo.train_steps = min(cfg.grpo.train_steps, s.steps)
    return cfg


def half_side_tile(cfg) -> int:
    """Tiles of half the image's longer side, a multiple of 8 pixels (at least 64)."""
    return max(64, max(cfg.sampling.height, cfg.sampling.width) // 16 * 8)


def _apply(cfg, overrides: dict):
    for section, values in overrides.items():
        for key, value in values.items():
            setattr(getattr(cfg, section), key, value)
    return cfg


def _trained(session) -> list:
    return [p for group in session.optimizer.param_groups for p in group["params"]]


def _init_adamw_state(session) -> None:
    """AdamW's state as a first optimizer step leaves it (zero gradients, one step), without tracing that step:
    the second step of a run, the one holding the state through its forward and backward, is then traced alone."""
    for p in _trained(session):
        p.grad = torch.zeros_like(p)
    session.optimizer.step()
    session.optimizer.zero_grad(set_to_none=True)


def family_terms(model, negative, guidance_scale: float) -> dict:
    """The family's own words for its sampler and guidance (the report's header)."""
    flow = "FlowMatch" in type(model.scheduler).__name__
    if model.settings.get("guidance_embeds", False):
        guidance = f"guidance embedding {guidance_scale:g} (guidance-distilled: no CFG batch)"
    elif model.family.uses_cfg(model, negative, guidance_scale):
        guidance = f"CFG {guidance_scale:g}"
    else:
        guidance = "no guidance (one denoiser batch)"
    return {"sampler": "flow-matching Euler steps" if flow else "DDIM steps", "guidance": guidance}


def run_trace(cfg, spec: dict, *, fake: bool = True, cuda: bool = True, optimizer_steps: int = 2,
              round_bytes: bool = True, init_state: bool = True, model_hook=None, capability=(9, 0),
              on_phase=None) -> Estimate:
    """Build the model, then a Session, then trace optimizer steps under the counter: with ``init_state``
    (default) AdamW's state is set up as step 1 leaves it and step 2 alone is traced (half the time, the same
    peak: step 1 holds no state; tests check both ways agree); else ``optimizer_steps`` steps are traced.
    ``model_hook(model)`` may change the built model first (experiments with memory levers). ``capability``: the
    imitated GPU's (attention backend); ``on_phase(name)`` is called as each phase of the trainer begins.
    ``cfg``'s precision must be resolved (fnf.precision.resolve for that GPU): the Session runs on the CPU."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    acc = _TraceAccelerator()
    fp16_autocast = cfg.memory.mixed_precision == "fp16"
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext()
    rules = cuda_rules.CudaRules(capability) if cuda else contextlib.nullcontext()
    began = time.time()
    with contextlib.ExitStack() as stack:
        stack.enter_context(warnings.catch_warnings())
        # fnf_kernels' fused-LoRA weight cache keys on data_ptr(), which fake tensors report as 0 (same bytes)
        warnings.filterwarnings("ignore", message="Accessing the data pointer of FakeTensor")
        stack.enter_context(_fake_module_moves())
        stack.enter_context(fake_mode)
        model = build_model(spec, cfg.model.weight_dtype, fp16_autocast)
        if model_hook is not None:
            model_hook(model)
        # the denoiser's own Linear layers, before the Session puts LoRA layers beside them
        quant = _quantize_adjustment(cfg, model) if cfg.model.quantize != "none" else None
        counter = stack.enter_context(StorageCounter(scalar_answers=fake, round_to=512 if round_bytes else 1))
        if cuda:
            stack.enter_context(rules)
        counter.register([t for m in [model.vae, *model.text_encoders] for t in [*m.parameters(), *m.buffers()]],
                         FROZEN)
        # the Session keeps the denoiser on the host until the prompts are encoded (text_encoders_first)
        counter.register([*model.denoiser.parameters(), *model.denoiser.buffers()], FROZEN,
                         on_device=not text_encoders_first(cfg))
        session = Session(cfg, acc, model, probe=CounterProbe(counter, on_phase))
        terms = family_terms(model, getattr(session.objective, "negative", None), cfg.sampling.guidance_scale)
        localizer = getattr(session.objective, "localizer", None)
        if cfg.localize.spec == "auto" and localizer is not None:  # what auto became for this reward
            terms["localizer"] = f"auto ({'gradcam' if isinstance(localizer.source, GradCAM) else 'saliency'})"
        if cuda:  # torch.optim picks foreach on CUDA tensors
            for group in session.optimizer.param_groups:
                group["foreach"] = True
        phases = {f"build: {k}": v for k, v in counter.phase_stats.items()}
        peak_step = "session build"
        first = 0
        if init_state:
            with counter.phase("optimizer"):
                _init_adamw_state(session)
            first = optimizer_steps - 1
        for step in range(first, optimizer_steps):
            counter.phase_stats = {}
            before = counter.peak
            with counter.phase("other (step)"):
                record, last = session.optimizer_step(step)  # fnf.train.train keeps `last` through the next step
            if record["skipped"]:
                raise RuntimeError(f"the traced step was skipped ({record.get('skip_reason')}); "
                                   "cannot estimate its memory")
            if counter.peak > before:
                peak_step = f"optimizer step {step + 1}"
        peak, held = counter.peak, dict(counter.peak_by_phase)
        step_phases = counter.phase_stats
        if init_state and peak_step != "session build":  # step 1's `last` would be alive all through step 2
            kept = counter.bytes_by_phase(last)
            shift = sum(kept.values())
            peak += shift
            for name, nbytes in kept.items():
                held[name] = held.get(name, 0) + nbytes
            step_phases = {k: {"entry": v["entry"] + shift, "peak": v["peak"] + shift} for k, v in step_phases.items()}
        phases.update(step_phases)
        kept = getattr(getattr(session.objective, "rollout", None), "states", None) or {}
        grpo_states = {"per_step_bytes": sum(rounded(t.untyped_storage().nbytes(), counter.round_to)
                                             for t in next(iter(kept.values()))), "steps": len(kept)} if kept else None
        params = _trained(session)
        state_bytes = sum(rounded(v.untyped_storage().nbytes(), counter.round_to)
                          for st in session.optimizer.state.values() for v in st.values()
                          if isinstance(v, torch.Tensor))
        param_bytes = sum(rounded(p.untyped_storage().nbytes(), counter.round_to) for p in params)
        persistent = {"weights (frozen, on the device)": counter.by_phase.get("weights (frozen)", 0),
                      "LoRA params": param_bytes, "LoRA grads (during backward)": param_bytes,
                      "AdamW state": state_bytes}
        result = Estimate(
            quantized=_quantized(cfg, quant, phases) if quant else None,
            peak_bytes=peak, peak_phase=counter.peak_phase, peak_step=peak_step,
            held_at_peak=dict(sorted(held.items(), key=lambda kv: -kv[1])),
            phases={k: {"at_entry": v["entry"], "peak": v["peak"], "added": v["peak"] - v["entry"]}
                    for k, v in phases.items()},
            persistent=persistent, settings=terms, trace_seconds=0.0, notes=acc.notes,
            attention_backends=dict(rules.backends) if cuda else {}, grpo_states=grpo_states)
        del session, model
    result.trace_seconds = time.time() - began
    return result


def _quantize_adjustment(cfg, model) -> dict:
    return adjustment(model.denoiser, cfg.model.quantize, DTYPES[cfg.model.weight_dtype])


def _quantized(cfg, adj: dict, phases: dict) -> dict:
    """The estimate with model.quantize (fnf/memory/quantized.py), phase by phase: where the denoiser is on the
    device its Linear weights take the stored bytes instead of the traced ones, and the step's phases gain one
    dequantized layer. With text_encoders_first the denoiser is on the host while the prompts are encoded; a
    bitsandbytes denoiser is loaded onto the GPU already quantized, and then the prompts are encoded on the host
    (fnf.train.placement.encode_before_denoiser): the device holds only the quantized denoiser meanwhile."""

    encoding_first = text_encoders_first(cfg)
    bnb = cfg.model.quantize.startswith("bnb-")
    build, step = 0, 0
    for name, p in phases.items():
        if not name.startswith("build: "):
            step = max(step, quantized_peak(p["peak"], adj))
        elif name == "build: prompt encoding" and encoding_first:
            build = max(build, adj["stored_bytes"] if bnb else p["peak"])
        else:
            build = max(build, p["peak"] - adj["saved_bytes"])
    return {**adj, "step_peak_bytes": int(step), "build_peak_bytes": int(build), "peak_bytes": int(max(step, build))}


def settings_of(cfg, spec: dict) -> dict:
    s, m = cfg.sampling, cfg.memory
    return {"model": spec["name"], "kind": spec["kind"], "height": s.height, "width": s.width,
            "weight_dtype": cfg.model.weight_dtype, "quantize": cfg.model.quantize,
            "mixed_precision": m.mixed_precision,
            "lora_rank": cfg.lora.rank, "truncation_k": s.truncation_k, "lv_copies": s.lv_copies,
            "guidance_scale": s.guidance_scale, "batch_size": cfg.train.batch_size,
            "grad_accum": cfg.train.grad_accum, "reward": cfg.reward.spec, "localizer": cfg.localize.spec,
            "beta": cfg.objective.beta, "sampling_steps_traced": s.steps,
            "memory": {k: getattr(m, k) for k in ("denoiser_checkpointing", "vae_checkpointing", "vae_tile",
                                                   "fused_norm", "reward_checkpointing", "offload_text_encoder",
                                                   "fused_lora")},
            "seeds_per_prompt": cfg.train.seeds_per_prompt}


def estimate(cfg, *, model_dir: str | None = None, arch: str | None = None, height: int = 0, width: int = 0,
             reward_model: str = "", fake: bool = True, sampling_steps: int = 0, gpu: str = cuda_rules.DEFAULT_GPU,
             on_phase=None) -> Estimate:
    """Peak device memory of one training step of ``cfg`` on ``gpu`` (see the module docstring)."""
    if not cuda_rules.torch_supported():
        raise RuntimeError(f"estimate-memory needs torch >= {'.'.join(map(str, cuda_rules.MIN_TORCH))}")
    target = cuda_rules.gpu(gpu)
    spec = model_spec(model_dir or (None if arch else cfg.model.path), arch)
    auto_fused = cfg.memory.fused_lora == "auto"
    autos = [k for k, v in (("model.weight_dtype", cfg.model.weight_dtype),
                            ("memory.mixed_precision", cfg.memory.mixed_precision)) if v == precision.AUTO]
    real_grpo = (cfg, grpo_layout(cfg)) if cfg.objective.name == "grpo" else None
    cfg = trace_config(precision.resolve(cfg, target.capability), height, width, sampling_steps)
    family = family_by_name(spec["kind"])
    if auto_fused and not family.fused_lora:  # patch_lora refuses joint-attention processors: auto falls back to off
        cfg.memory.fused_lora = "off"
    if not cfg.sampling.height:  # the model's native size
        native = native_size(spec, family)
        cfg.sampling.height = cfg.sampling.height or native
        cfg.sampling.width = cfg.sampling.width or native
    if reward_model:
        if reward_model not in REWARD_STAND_INS:
            raise ValueError(f"--reward-model: unknown stand-in {reward_model!r}; expected one of "
                             f"{', '.join(REWARD_STAND_INS)}")
        cfg.reward.spec = REWARD_STAND_INS[reward_model]
        cfg.reward.kwargs = {"dtype": cfg.model.weight_dtype}
    notes = stand_ins(cfg)
    if cfg.memory.vae_tile == HALF_SIDE:  # a ladder row
        cfg.memory.vae_tile = half_side_tile(cfg)
    result = run_trace(cfg, spec, fake=fake, capability=target.capability, on_phase=on_phase)
    if real_grpo is not None:
        grpo_mode(result, cfg, real_grpo, family)
    result.settings = {**settings_of(cfg, spec), **result.settings, "gpu": gpu, "gpu_title": target.title,
                       "capability": ".".join(map(str, target.capability)), "gpu_memory_gb": target.memory_gib,
                       "precision_auto": autos, "stand_ins": notes}
    return result


def grpo_mode(result: Estimate, cfg, real: tuple, family) -> None:
    """objective grpo: no backprop through the chain, so the traced step (rollout sampling and decode, rewards, I0,
    one denoiser step's backward, the frozen model's forward for KL) holds for any T, except the rollout's kept
    (x_i, x_{i+1}) latents, which grow with the trained steps: added for the configured ones beyond the traced."""
    real_cfg, layout = real
    g = real_cfg.grpo
    states = result.grpo_states or {"per_step_bytes": 0, "steps": 0}
    extra = max(0, layout["trained_steps"] - states["steps"]) * states["per_step_bytes"]
    if extra:
        result.peak_bytes += extra
        result.held_at_peak["GRPO rollout latents (configured T)"] = extra
    level = g.noise_level or family.sde_noise_level
    sampler = result.settings.get("sampler", "")
    result.settings["sampler"] = (f"stochastic DDIM steps (eta {level:g})" if "DDIM" in sampler
                                  else f"flow SDE steps (Flow-GRPO, a {level:g})")
    result.settings["method"] = (f"GRPO: {layout['samples']} samples per rollout ({g.prompts_per_rollout} x group "
                                 f"{g.group_size}), {layout['trained_steps']} of {real_cfg.sampling.steps} steps "
                                 f"trained, KL {g.kl_beta:g}, region KL {g.region_kl_beta:g}")
    result.notes.append(f"grpo: the rollout keeps (x_i, x_{{i+1}}) of {layout['trained_steps']} trained steps "
                        f"({extra / GIB:.3f} GiB beyond the {states['steps']} traced, added to the peak)")


def ladder_plan(cfg, model_dir: str | None = None, arch: str | None = None) -> list[tuple[str, object]]:
    """(row name, config) of each ladder row this model gets (LADDER; the fused-LoRA row only where it applies)."""
    rows, current = [], copy.deepcopy(cfg)
    spec = model_spec(model_dir or (None if arch else cfg.model.path), arch)
    for name, overrides in LADDER:
        current = _apply(copy.deepcopy(current), overrides)
        if not family_by_name(spec["kind"]).fused_lora and current.memory.fused_lora == "on":  # SD3 / FLUX
            continue
        rows.append((name, current))
    return rows


def ladder(cfg, on_row=None, **kwargs) -> list[tuple[str, Estimate]]:
    """The estimate for each memory lever added one at a time (LADDER); ``on_row(i, n, name)`` before each."""
    plan = ladder_plan(cfg, kwargs.get("model_dir"), kwargs.get("arch"))
    rows = []
    for i, (name, row_cfg) in enumerate(plan):
        if on_row is not None:
            on_row(i, len(plan), name)
        rows.append((name, estimate(row_cfg, **kwargs)))
    return rows
