"""fnf.region_reward against a float64 computation, and the two examples/ scripts on the tiny SD folder (issue 28
item 4): the penalty in a plain diffusers DRaFT-K loop, and the region term as an external GRPO trainer's reward
shaping."""
import importlib.util
import os
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from fnf_tiny_models import cached_model, one_torch_thread  # noqa: E402,F401

import fnf  # noqa: E402

SEED = 28


def load_example(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", os.path.join(ROOT, "examples", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def region_reward64(images, reference, mask, beta, squared=False):
    """-beta ||(1 - M) (I0 - I)||_F per sample in float64, M clamped to [0, 1] and broadcast over channels."""
    m = mask.double().clamp(0, 1)
    if m.dim() == 3:
        m = m[:, None]
    d = ((1 - m) * (reference.double() - images.double())).flatten(1)
    n = (d * d).sum(1)
    return -beta * (n if squared else n.sqrt())


@pytest.mark.parametrize("mask_shape", ["bhw", "b1hw", "bchw", "bool"])
@pytest.mark.parametrize("squared", [False, True])
def test_region_reward_matches_float64(mask_shape, squared):
    print(f"seed {SEED}")
    g = torch.Generator().manual_seed(SEED)
    b, c, h, w = 3, 3, 9, 11
    images = torch.rand(b, c, h, w, generator=g, requires_grad=True)
    reference = torch.rand(b, c, h, w, generator=g)
    soft = torch.rand(b, h, w, generator=g)
    mask = {"bhw": soft, "b1hw": soft[:, None], "bchw": torch.rand(b, c, h, w, generator=g),
            "bool": soft > 0.6}[mask_shape]
    beta = 0.7
    got = fnf.region_reward(images, reference, mask, beta, squared=squared)
    assert got.shape == (b,) and got.dtype == torch.float32
    if mask_shape == "bchw":
        want = -beta * (((1 - mask.double()) * (reference.double() - images.double())).flatten(1) ** 2).sum(1)
        want = want if squared else -(-want / beta).sqrt() * beta
    else:
        want = region_reward64(images, reference, mask, beta, squared)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    # gradient in the images, against float64 autograd
    got.sum().backward()
    x64 = images.detach().double().requires_grad_(True)
    if mask_shape == "bchw":
        d = ((1 - mask.double()) * (reference.double() - x64)).flatten(1)
        w64 = -beta * ((d * d).sum(1) if squared else (d * d).sum(1).sqrt())
    else:
        w64 = region_reward64(x64, reference, mask, beta, squared)
    w64.sum().backward()
    torch.testing.assert_close(images.grad.double(), x64.grad, rtol=1e-4, atol=1e-6)


def test_region_reward_zero_when_nothing_outside_changed_and_float64_in_float64_out():
    g = torch.Generator().manual_seed(SEED)
    ref = torch.rand(2, 3, 8, 8, generator=g, dtype=torch.float64)
    mask = torch.zeros(2, 8, 8, dtype=torch.float64)
    mask[:, 2:5, 2:5] = 1
    img = ref.clone()
    img[:, :, 2:5, 2:5] = 0.0                                    # a change inside the mask only
    got = fnf.region_reward(img, ref, mask, 3.0)
    assert got.dtype == torch.float64 and torch.equal(got, torch.zeros(2, dtype=torch.float64))
    img[0, 1, 7, 7] += 0.5                                       # one pixel outside, sample 0 only
    torch.testing.assert_close(fnf.region_reward(img, ref, mask, 3.0), torch.tensor([-1.5, 0.0], dtype=torch.float64))
    assert torch.equal(fnf.region_reward(img, ref, mask, 0.0), torch.zeros(2, dtype=torch.float64))


@pytest.mark.parametrize("beta", [-1.0, float("nan"), float("inf"), "1", True])
def test_region_reward_refuses_a_bad_beta(beta):
    x = torch.rand(1, 3, 4, 4)
    with pytest.raises(ValueError, match="beta must be a finite number >= 0"):
        fnf.region_reward(x, x, torch.zeros(1, 4, 4), beta)


def test_example_draft_penalty_in_a_plain_diffusers_loop(tmp_path_factory):
    folder = cached_model("sd", str(tmp_path_factory.getbasetemp()))
    ex = load_example("draft_penalty_diffusers")
    unet0 = {n: p.detach().clone() for n, p in
             __import__("diffusers").UNet2DConditionModel.from_pretrained(folder, subfolder="unet").named_parameters()}
    out = ex.main(["--model", folder, "--train-steps", "2", "--sampling-steps", "3", "--beta", "1.0"])
    h = out["history"]
    assert len(h) == 2
    assert h[0]["penalty"] == 0.0      # LoRA B = 0 at step 0: I is I0 exactly (same x_T, same sampler)
    assert h[1]["penalty"] > 0         # after one update the image moved outside the mask
    # the loop's penalty is ||(1 - M)(I0 - I)||_F, batch mean, recomputed in float64
    want = -region_reward64(out["image"], out["reference"], out["mask"], 1.0).mean()
    assert abs(h[1]["penalty"] - want.item()) < 1e-5
    assert abs(h[1]["loss"] - (-h[1]["reward"] + h[1]["penalty"])) < 1e-5
    # only the LoRA weights trained
    named = dict(out["pipe"].unet.named_parameters())
    assert all("lora_" in n for n, p in named.items() if p.requires_grad)
    assert any(not torch.equal(p.detach(), torch.zeros_like(p)) for n, p in named.items() if "lora_B" in n)
    for n, p in named.items():
        key = n.replace(".base_layer", "")
        if "lora_" not in n:
            assert torch.equal(p.detach(), unet0[key]), n


def test_example_grpo_region_reward_shapes_an_external_reward_fn(tmp_path_factory):
    folder = cached_model("sd", str(tmp_path_factory.getbasetemp()))
    ex = load_example("grpo_region_reward")
    out = ex.main(["--model", folder, "--group", "2", "--steps", "3", "--beta", "0.5"])
    images, scores, info, fn = out["images"], out["scores"], out["info"], out["reward_fn"]
    assert scores.shape == (4,) and len(fn.cache) == 4
    ref = torch.stack([fn.cache[k][0] for k in zip(out["prompts"], out["seeds"])])
    mask = torch.stack([fn.cache[k][1] for k in zip(out["prompts"], out["seeds"])])
    want = images.double().mean(dim=(1, 2, 3)) + region_reward64(images, ref, mask, 0.5)
    torch.testing.assert_close(scores.double(), want, rtol=1e-5, atol=1e-6)
    assert (info["region"] < 0).all()                           # a random LoRA changes pixels outside the mask
    # I0 is the frozen model from the sample's own seeds: recomputed alone, it is the cached one
    again = out["reference_fn"](out["prompts"][:1], out["seeds"][:1])
    torch.testing.assert_close(again[0], ref[0], rtol=0, atol=1e-5)
    # cached: a second call samples no reference
    calls = []
    fn.reference_fn = lambda *a: calls.append(a)
    scores2, _ = fn(images, out["prompts"], [{"seed": s} for s in out["seeds"]])
    assert not calls and torch.equal(scores2, scores)
    adv = out["advantages"].view(-1, 2)
    torch.testing.assert_close(adv.mean(1), torch.zeros(2), atol=1e-5, rtol=0)


def test_example_grpo_frozen_policy_has_zero_region_term(tmp_path_factory):
    """LoRA B = 0 is the frozen model: from the same seeds every sample is its own I0, the region term is 0."""
    folder = cached_model("sd", str(tmp_path_factory.getbasetemp()))
    out = load_example("grpo_region_reward").main(["--model", folder, "--group", "2", "--steps", "2",
                                                    "--prompts", "a cat", "--lora-std", "0"])
    assert torch.equal(out["info"]["region"], torch.zeros(2))
    torch.testing.assert_close(out["scores"], out["images"].mean(dim=(1, 2, 3)), rtol=0, atol=1e-6)
