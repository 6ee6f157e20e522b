"""Separate-and-Enhance: token resolution and cross-attention capture on a tiny diffusers UNet."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from fnf_tiny_models import IMAGE_SIZE, cached_model, one_torch_thread  # noqa: E402,F401

import fnf_kernels  # noqa: E402
from fnf.lora import add_lora  # noqa: E402
from fnf.encoding import encode_prompts  # noqa: E402
from fnf.families.registry import load_model  # noqa: E402
from fnf.sepen.capture import capture, install_capture, map_size, remove_capture  # noqa: E402
from fnf.sepen.tokens import token_weights, word_positions  # noqa: E402

PROMPTS = ["a photo of a cat and a dog", "a photo of a cats and a red car"]
OBJECTS = [["cat", "dog"], ["cats", "red car"]]


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return cached_model("sd", str(tmp_path_factory.getbasetemp()))


@pytest.fixture(scope="module")
def model(sd):
    return load_model(sd)


def test_word_positions_single_and_multi_token(model):
    tok = model.tokenizers[0]
    ids = tok(PROMPTS[0]).input_ids
    spans = word_positions(tok, PROMPTS[0], OBJECTS[0])
    # BOS a photo of a cat and a dog: "cat" is token 5 (after BOS), "dog" the last word before EOS
    assert spans == [[5], [len(ids) - 2]]
    assert tok.convert_ids_to_tokens([ids[5]]) == ["cat</w>"]
    spans = word_positions(tok, PROMPTS[1], OBJECTS[1])
    ids = tok(PROMPTS[1]).input_ids
    pieces = [tok.convert_ids_to_tokens([ids[p] for p in s]) for s in spans]
    assert len(pieces[0]) > 1 and "".join(pieces[0]) == "cats</w>"  # out of vocabulary: several tokens
    assert pieces[1] == ["red</w>", "car</w>"]
    # "a" occurs several times: whole-word, in order
    assert word_positions(tok, "a cat in a sky", ["a", "a"]) == [[1], [4]]


def test_word_positions_errors(model):
    tok = model.tokenizers[0]
    with pytest.raises(ValueError, match="'horse' not found"):
        word_positions(tok, PROMPTS[0], ["horse"])
    with pytest.raises(ValueError, match="truncated"):  # model_max_length is 16 in the tiny tokenizer
        word_positions(tok, "a photo of a " + "cat " * 20 + "dog", ["dog"])
    with pytest.raises(ValueError, match="non-empty"):
        word_positions(tok, PROMPTS[0], [""])


def test_token_weights_mean_of_tokens():
    w = token_weights([[[1], [2, 3]]], seq_len=6)
    assert w.shape == (1, 2, 6)
    assert w[0, 0].tolist() == [0, 1, 0, 0, 0, 0] and w[0, 1].tolist() == [0, 0, 0.5, 0.5, 0, 0]


def test_map_size():
    assert map_size((64, 64), 4) == (16, 16)
    assert map_size((96, 64), 8) == (12, 8)
    assert map_size((15, 15), 2) == (8, 8)
    with pytest.raises(ValueError):
        map_size((64, 64), 3)


def _inputs(model, prompts, objects, seed=0):
    g = torch.Generator().manual_seed(seed)
    cond = encode_prompts(model, prompts, height=IMAGE_SIZE, width=IMAGE_SIZE)
    spans = [word_positions(model.tokenizers[0], p, o) for p, o in zip(prompts, objects)]
    weights = token_weights(spans, cond.hidden.shape[1])
    latents = torch.randn(len(prompts), 4, IMAGE_SIZE // 2, IMAGE_SIZE // 2, generator=g)
    return latents, cond.hidden, weights


def _hand_maps(unet, latents, hidden, weights, t):
    """softmax(Q K^T * scale) written out per batch item and head from the attn2 inputs and weights."""
    inputs = []
    hooks = [m.register_forward_pre_hook(lambda mod, args, kw: inputs.append((mod, args, kw)), with_kwargs=True)
             for n, m in unet.named_modules() if n.endswith("attn2")]
    with torch.no_grad():
        out = unet(latents, t, encoder_hidden_states=hidden).sample
    for h in hooks:
        h.remove()
    per_layer = []
    for mod, args, kw in inputs:
        x = args[0] if args else kw["hidden_states"]
        ctx = kw.get("encoder_hidden_states")
        if x.shape[1] != latents.shape[-2] * latents.shape[-1]:
            continue  # the mid block's 8x8 cross-attention is not at the captured resolution
        q = x @ mod.to_q.weight.T
        k = ctx @ mod.to_k.weight.T
        heads = mod.heads
        d = q.shape[-1] // heads
        maps = torch.zeros(x.shape[0], heads, weights.shape[1], x.shape[1])
        for b in range(x.shape[0]):
            for h in range(heads):
                qh, kh = q[b, :, h * d:(h + 1) * d], k[b, :, h * d:(h + 1) * d]
                p = torch.softmax(qh @ kh.T / d ** 0.5, dim=-1)  # (pixels, tokens)
                for i in range(weights.shape[1]):
                    cols = weights[b, i].nonzero().flatten()
                    maps[b, h, i] = p[:, cols].mean(dim=1)
        per_layer.append(maps)
    return torch.stack(per_layer).mean(0), out


def test_capture_matches_hand_computation_and_keeps_output(model):
    unet = model.denoiser
    latents, hidden, weights = _inputs(model, PROMPTS, OBJECTS)
    t = torch.tensor(500)
    expected, out_plain = _hand_maps(unet, latents, hidden, weights, t)
    install_capture(unet)
    try:
        with torch.no_grad(), capture(unet, weights, latents.shape[-2:], downsample=1) as store:
            out = unet(latents, t, encoder_hidden_states=hidden).sample
        assert len(store.layers) == 3  # the tiny UNet's 16x16 cross-attentions: 1 down, 2 up
        maps = store.maps()
        assert maps.shape == (2, expected.shape[1], 2, 16, 16)
        torch.testing.assert_close(maps, expected.reshape(maps.shape), rtol=1e-5, atol=1e-6)
        assert torch.equal(out, out_plain)  # the layer outputs are the wrapped processor's, untouched
        # Not armed: nothing recorded. Wrong resolution: a clear error.
        with torch.no_grad(), capture(unet, weights, latents.shape[-2:], downsample=4) as store:
            unet(latents, t, encoder_hidden_states=hidden)
        with pytest.raises(RuntimeError, match="no cross-attention layer ran"):
            store.maps()
        # Capturing only the first row: row 0 of the full capture.
        with torch.no_grad(), capture(unet, weights[:1], latents.shape[-2:], downsample=1) as store:
            unet(latents, t, encoder_hidden_states=hidden)
        torch.testing.assert_close(store.maps(), maps[:1])
    finally:
        remove_capture(unet)
    assert not any(type(m.processor).__name__ == "CaptureAttnProcessor"
                   for n, m in unet.named_modules() if n.endswith("attn2"))


def test_capture_with_fused_lora_processor(sd):
    m = load_model(sd)
    torch.manual_seed(0)
    params = add_lora(m, rank=2, alpha=2, target_modules=["to_k", "to_q", "to_v", "to_out.0"])
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.1)  # a non-trivial LoRA
    latents, hidden, weights = _inputs(m, PROMPTS, OBJECTS, seed=1)
    t = torch.tensor(300)
    install_capture(m.denoiser)
    with torch.no_grad(), capture(m.denoiser, weights, latents.shape[-2:], downsample=1) as store:
        out_peft = m.denoiser(latents, t, encoder_hidden_states=hidden).sample
    maps_peft = store.maps()
    remove_capture(m.denoiser)
    fnf_kernels.patch_lora(m.denoiser)
    install_capture(m.denoiser)
    kinds = {type(a.processor.inner).__name__ for n, a in m.denoiser.named_modules() if n.endswith("attn2")}
    assert kinds == {"FusedLoRAAttnProcessor"}
    with torch.no_grad(), capture(m.denoiser, weights, latents.shape[-2:], downsample=1) as store:
        out_fused = m.denoiser(latents, t, encoder_hidden_states=hidden).sample
    torch.testing.assert_close(store.maps(), maps_peft, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_fused, out_peft, rtol=1e-4, atol=1e-5)
    # The fused processor's per-sample LoRA scale applies to the captured maps as well.
    with torch.no_grad(), fnf_kernels.lora_scale(m.denoiser, 0.0), \
            capture(m.denoiser, weights, latents.shape[-2:], downsample=1) as store:
        m.denoiser(latents, t, encoder_hidden_states=hidden)
    assert not torch.allclose(store.maps(), maps_peft)
    remove_capture(m.denoiser)
    fnf_kernels.unpatch_lora(m.denoiser)


def test_captured_maps_carry_gradient_to_to_k(model):
    unet = model.denoiser
    latents, hidden, weights = _inputs(model, PROMPTS, OBJECTS, seed=2)
    install_capture(unet)
    try:
        k = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k.weight
        k.requires_grad_(True)
        with capture(unet, weights, latents.shape[-2:], downsample=1) as store:
            unet(latents, torch.tensor(10), encoder_hidden_states=hidden)
        fnf_kernels.separate_loss(store.maps()).sum().backward()
        assert k.grad is not None and k.grad.abs().sum() > 0
    finally:
        k.requires_grad_(False)
        k.grad = None
        remove_capture(unet)
