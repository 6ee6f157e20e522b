"""What the installed torch, triton, diffusers, peft, accelerate and transformers must be able to do for fnf_kernels
and fnf: the APIs the package relies on exist and work here. `make floor-check` runs this on the floor versions of
ci/floors.txt (torch 2.11, ...), `make test` on the newest ones; a failure names the capability that is missing
rather than a version number. (That ci/floors.txt and setup.py agree is checked in tests/test_build.py.)"""
import importlib.util
import inspect

import pytest
import torch

# -- torch ---------------------------------------------------------------------------------------------------------

_LIB = "fnf_floor_probe"


@torch.library.custom_op(f"{_LIB}::scaled_square", mutates_args=())
def _scaled_square(x: torch.Tensor, scale: float) -> torch.Tensor:
    return x * x * scale


@_scaled_square.register_fake
def _(x, scale):
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])
    ctx.scale = inputs[1]


def _backward(ctx, grad):
    (x,) = ctx.saved_tensors
    return grad * 2 * x * ctx.scale, None


_scaled_square.register_autograd(_backward, setup_context=_setup_context)


def test_custom_op_with_fake_and_autograd_passes_opcheck():
    """torch.library.custom_op + register_fake + register_autograd + opcheck, as fnf_kernels registers every op."""
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.fnf_floor_probe.scaled_square.default, (x, 0.5))
    (g,) = torch.autograd.grad(torch.ops.fnf_floor_probe.scaled_square(x, 0.5).sum(), x)
    torch.testing.assert_close(g, x.detach())
    assert torch.autograd.gradcheck(lambda t: _scaled_square(t, 0.5), (x,))


def test_string_registration_of_fake_and_autograd():
    """The string-name forms fnf_kernels/penalty.py and lora.py use for ops defined in C++ or with torch.library.define."""
    lib = torch.library.Library(_LIB, "FRAGMENT")
    lib.define("twice(Tensor x) -> Tensor")
    lib.impl("twice", lambda x: x * 2, "CompositeExplicitAutograd")
    torch.library.register_fake(f"{_LIB}::twice")(lambda x: torch.empty_like(x))
    torch.library.register_autograd(f"{_LIB}::twice", lambda ctx, grad: grad * 2,
                                    setup_context=lambda ctx, inputs, output: None)
    x = torch.randn(4, requires_grad=True)
    torch.library.opcheck(torch.ops.fnf_floor_probe.twice.default, (x,))
    lib._destroy()


def test_compile_fullgraph_through_a_custom_op():
    """torch.compile(fullgraph=True) traces through a custom op (its fake kernel) with no graph break, forward and
    backward (aot_eager: no C++ compiler needed)."""
    torch._dynamo.reset()

    def step(x):
        return torch.ops.fnf_floor_probe.scaled_square(x.sin(), 2.0).sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x = torch.randn(8, requires_grad=True)
    out = compiled(x)
    out.backward()
    torch.testing.assert_close(out, step(x.detach()))
    torch.testing.assert_close(x.grad, 4 * x.detach().sin() * x.detach().cos())


def test_fsdp2_and_dtensor_import_paths():
    """fnf/fsdp.py applies FSDP2 through the public torch.distributed.fsdp names (not the _composable path)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
    from torch.distributed.tensor import DTensor

    assert callable(fully_shard) and issubclass(CPUOffloadPolicy, OffloadPolicy)
    assert "reshard_after_forward" in inspect.signature(fully_shard).parameters
    assert MixedPrecisionPolicy and DTensor


def test_training_utilities_on_cpu():
    """Device-generic GradScaler (fnf/train/distributed.py, with 'cpu' in the tests), non-reentrant checkpointing
    with autocast, scaled_dot_product_attention in bf16 on CPU."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([w], lr=0.1)
    scaler.scale((w * 2).sum()).backward()
    scaler.step(opt)
    scaler.update()
    torch.testing.assert_close(w.detach(), torch.full((3,), 0.8))
    lin = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = torch.utils.checkpoint.checkpoint(lin, x, use_reentrant=False)
    y.float().sum().backward()
    assert x.grad is not None and y.dtype == torch.bfloat16
    q = torch.randn(1, 2, 5, 8, dtype=torch.bfloat16)
    assert torch.isfinite(torch.nn.functional.scaled_dot_product_attention(q, q, q)).all()


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_triton_kernel_runs():
    """A tiny Triton kernel with the features the fnf_kernels Triton kernels use (program_id, masked load/store,
    constexpr block sizes) runs: on the GPU, or under TRITON_INTERPRET=1 on CPU (tests/conftest.py sets it)."""
    import triton
    import triton.language as tl

    @triton.jit
    def axpy(x_ptr, y_ptr, out_ptr, n, alpha, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask, other=0.0)
        y = tl.load(y_ptr + offs, mask=mask, other=0.0)
        tl.store(out_ptr + offs, tl.maximum(alpha * x + y, 0.0), mask=mask)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    x, y = torch.randn(37, device=device), torch.randn(37, device=device)
    out = torch.empty_like(x)
    axpy[(triton.cdiv(37, 16),)](x, y, out, 37, 0.5, BLOCK=16)
    torch.testing.assert_close(out, torch.relu(0.5 * x + y))


# -- diffusers / peft / accelerate / transformers ------------------------------------------------------------------

needs_train = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("diffusers", "peft", "accelerate", "transformers")),
    reason="the train extra (diffusers, peft, accelerate, transformers) is not installed")


@needs_train
def test_diffusers_lora_adapter_with_metadata_round_trip(tmp_path):
    """A peft LoRA on a tiny UNet through diffusers' add_adapter; save_lora_weights with the adapter metadata
    (rank_pattern / alpha_pattern; diffusers >= 0.34) and lora_state_dict reading it back (fnf/lora.py, families)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 16), norm_num_groups=4, cross_attention_dim=8,
                                attention_head_dim=2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                        rank_pattern={"to_q": 2}, alpha_pattern={"to_q": 8}, init_lora_weights=False)
    unet.add_adapter(config, adapter_name="fnf")
    state = get_peft_model_state_dict(unet, adapter_name="fnf")   # peft keys, as fnf's UNet families save them
    assert state and all("lora" in k for k in state)
    assert "unet_lora_adapter_metadata" in inspect.signature(StableDiffusionPipeline.save_lora_weights).parameters
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=state,
                                              unet_lora_adapter_metadata=config.to_dict(),
                                              weight_name="pytorch_lora_weights.safetensors")
    loaded, _, metadata = StableDiffusionPipeline.lora_state_dict(
        tmp_path, weight_name="pytorch_lora_weights.safetensors", return_lora_metadata=True)
    assert sorted(k.removeprefix("unet.") for k in loaded) == sorted(state)
    metadata = {k.removeprefix("unet."): v for k, v in (metadata or {}).items()}
    assert metadata.get("rank_pattern") == {"to_q": 2} and metadata.get("alpha_pattern") == {"to_q": 8}, metadata


@needs_train
def test_diffusers_model_and_scheduler_classes():
    """The classes fnf's families build or load (SD 1.x/2.x, SDXL, SD3, FLUX.1) and the schedulers they step."""
    import diffusers
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    for name in ("UNet2DConditionModel", "AutoencoderKL", "SD3Transformer2DModel", "FluxTransformer2DModel",
                 "StableDiffusionPipeline", "StableDiffusionXLPipeline", "StableDiffusion3Pipeline", "FluxPipeline"):
        assert hasattr(diffusers, name), name
    ddim = DDIMScheduler(num_train_timesteps=1000)
    ddim.set_timesteps(4)
    assert len(ddim.timesteps) == 4
    flow = FlowMatchEulerDiscreteScheduler(shift=3.0)
    flow.set_timesteps(4)
    assert len(flow.sigmas) == 5


@needs_train
def test_accelerate_fsdp_plugin_and_accelerator():
    """accelerate's Accelerator on CPU and the FSDP plugin fnf/fsdp.py reads its config from."""
    from accelerate import Accelerator
    from accelerate.utils import FullyShardedDataParallelPlugin

    assert "sharding_strategy" in FullyShardedDataParallelPlugin.__dataclass_fields__ or \
        "reshard_after_forward" in FullyShardedDataParallelPlugin.__dataclass_fields__
    acc = Accelerator(cpu=True)
    model = acc.prepare(torch.nn.Linear(2, 2))
    acc.backward(model(torch.ones(1, 2)).sum())
    assert model.weight.grad is not None


@needs_train
def test_transformers_clip_text_encoder_in_bfloat16():
    """A tiny CLIP text encoder (the SD text encoders) encodes a padded batch in bf16 with finite outputs (transformers
    4.48 overflowed its causal mask in bf16); CLIPTextModelWithProjection, CLIPVisionModel and T5EncoderModel exist."""
    from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer,  # noqa: F401
                              CLIPVisionModel, T5EncoderModel)

    cfg = CLIPTextConfig(vocab_size=99, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=12, projection_dim=8)
    torch.manual_seed(0)
    model = CLIPTextModel(cfg).to(torch.bfloat16).eval()
    ids = torch.randint(1, 98, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.no_grad():
        out = model(ids, attention_mask=mask, output_hidden_states=True)
    assert out.last_hidden_state.dtype == torch.bfloat16
    assert torch.isfinite(out.last_hidden_state.float()).all() and torch.isfinite(out.pooler_output.float()).all()
    assert len(out.hidden_states) == 3
