"""`hpsv2` and `sd-safety` rewards on tiny random-weight models saved in the official formats.

hpsv2: an open_clip-format state dict (built here by :class:`RefOpenCLIP`, whose parameter names are open_clip's)
saved as the official ``{'state_dict': ...}``; our score (transformers path, float32) is compared with this file's
own float64 forward of open_clip's architecture. sd-safety: a diffusers StableDiffusionSafetyChecker with planted
concept embeddings, saved with save_pretrained beside a CLIPImageProcessor, against the official forward.
"""
from __future__ import annotations

import math
import os
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fnf.rewards import SpecError, build_reward, check_reward_spec
from tests.fnf_tiny_models import one_torch_thread, write_tokenizer  # noqa: F401  (fixture)

SEED = 1234
PROMPTS = ["a photo of a cat", "a red car in the sky", "the dog", "a blue house"]


# ------------------------------------------------------------------------------------------ open_clip reference
class _Block(nn.Module):
    """open_clip ResidualAttentionBlock (pre-LN, fused in_proj attention, GELU MLP), batch first."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.Module()
        self.attn.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.attn.in_proj_bias = nn.Parameter(torch.empty(3 * width))
        self.attn.out_proj = nn.Linear(width, width)
        self.mlp = nn.Module()
        self.mlp.c_fc, self.mlp.c_proj = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x, causal: bool):
        b, n, c = x.shape
        d = c // self.heads
        q, k, v = F.linear(self.ln_1(x), self.attn.in_proj_weight, self.attn.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.reshape(b, n, self.heads, d).transpose(1, 2) for t in (q, k, v))
        scores = q @ k.transpose(-1, -2) / math.sqrt(d)
        if causal:
            scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        o = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, c)
        x = x + self.attn.out_proj(o)
        return x + self.mlp.c_proj(F.gelu(self.mlp.c_fc(self.ln_2(x))))


class _Tower(nn.Module):
    def __init__(self, width, layers, heads):
        super().__init__()
        self.resblocks = nn.ModuleList(_Block(width, heads) for _ in range(layers))

    def forward(self, x, causal=False):
        for block in self.resblocks:
            x = block(x, causal)
        return x


class RefOpenCLIP(nn.Module):
    """open_clip's CLIP (ViT image tower, causal text tower) written out, with open_clip's parameter names and
    ``encode_image`` / ``encode_text``. Text pooling takes the first end-of-text token (open_clip's argmax of the
    ids is the same token for its vocabulary, where <|endoftext|> has the largest id)."""

    def __init__(self, vocab, eot_id, ctx=16, width=32, layers=2, heads=2, patch=8, image=32, embed=24):
        super().__init__()
        self.eot_id = eot_id
        grid = image // patch
        self.visual = nn.Module()
        v = self.visual
        v.conv1 = nn.Conv2d(3, width, patch, patch, bias=False)
        v.class_embedding = nn.Parameter(torch.empty(width))
        v.positional_embedding = nn.Parameter(torch.empty(grid * grid + 1, width))
        v.ln_pre, v.ln_post = nn.LayerNorm(width), nn.LayerNorm(width)
        v.transformer = _Tower(width, layers, heads)
        v.proj = nn.Parameter(torch.empty(width, embed))
        self.token_embedding = nn.Embedding(vocab, width)
        self.positional_embedding = nn.Parameter(torch.empty(ctx, width))
        self.transformer = _Tower(width, layers, heads)
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, embed))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def randomize(self, seed):
        g = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            if name == "logit_scale":
                continue
            base = 1.0 if (name.endswith("weight") and p.dim() == 1) else 0.0   # LayerNorm gains around 1
            scale = 0.1 if p.dim() == 1 else 1.0 / math.sqrt(p.shape[-1])
            with torch.no_grad():
                p.copy_(base + scale * torch.randn(p.shape, generator=g))
        return self

    def encode_image(self, x):
        v = self.visual
        x = v.conv1(x).flatten(2).transpose(1, 2)
        x = torch.cat([v.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + v.positional_embedding
        x = v.transformer(v.ln_pre(x))
        return v.ln_post(x[:, 0]) @ v.proj

    def encode_text(self, ids):
        x = self.transformer(self.token_embedding(ids) + self.positional_embedding, causal=True)
        eot = (ids == self.eot_id).int().argmax(dim=-1)
        return self.ln_final(x)[torch.arange(ids.shape[0]), eot] @ self.text_projection

    def score(self, x, ids):
        return (F.normalize(self.encode_image(x), dim=-1) * F.normalize(self.encode_text(ids), dim=-1)).sum(-1)


@pytest.fixture(scope="module")
def hps_files(tmp_path_factory):
    """(checkpoint path, tokenizer folder, float32 reference model, tokenizer)."""
    from transformers import CLIPTokenizer

    root = tmp_path_factory.mktemp("hps")
    write_tokenizer(str(root / "tokenizer"))
    tok = CLIPTokenizer.from_pretrained(str(root / "tokenizer"))
    print(f"hpsv2 reference seed {SEED}")
    ref = RefOpenCLIP(len(tok), tok.eos_token_id).randomize(SEED).eval()
    path = str(root / "HPS_tiny.pt")
    torch.save({"state_dict": ref.state_dict()}, path)
    return path, str(root / "tokenizer"), ref, tok


def _images(shape, seed):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def _reference_hps(ref, tok, pixels, prompts):
    """Float64 reference score of open_clip's forward on model-ready pixels (B, 3, 32, 32)."""
    ids = tok(prompts, padding="max_length", max_length=16, truncation=True, return_tensors="pt").input_ids
    ref64 = RefOpenCLIP(len(tok), tok.eos_token_id).double()
    ref64.load_state_dict(ref.state_dict())
    with torch.no_grad():
        return ref64.score(pixels.double(), ids)


def _square_pixels(images):
    """Square images: resize to 32 and normalise (the same under HPS's pad-to-square and a center crop)."""
    from fnf.reward_models.preprocess import clip_preprocess

    return clip_preprocess(images, size=32)


def _hps(path, tokenizer, **kw):
    return build_reward("hpsv2", checkpoint=path, tokenizer=tokenizer, vision_head_width=16, text_head_width=16,
                        backend="transformers", **kw)


@pytest.mark.parametrize("shape,resize", [((4, 3, 32, 32), "longest"), ((4, 3, 64, 64), "longest"),
                                          ((4, 3, 40, 48), "longest"), ((4, 3, 48, 40), "shortest")])
def test_hpsv2_score_matches_float64_open_clip_reference(hps_files, shape, resize):
    path, tokenizer, ref, tok = hps_files
    reward = _hps(path, tokenizer, resize=resize)
    images = _images(shape, SEED + 1)
    with torch.no_grad():
        ours = reward(images, PROMPTS)
    # non-square: the model-ready pixels are ours (their geometry is checked against PIL below)
    pixels = _square_pixels(images) if shape[-1] == shape[-2] else reward.preprocess(images)
    expected = _reference_hps(ref, tok, pixels, PROMPTS)
    err = (ours.double() - expected).abs().max().item()
    print(f"hpsv2 {shape} {resize}: max |ours (float32) - reference (float64)| = {err:.2e}; "
          f"scores {expected.tolist()}")
    assert ours.shape == (4,) and ours.dtype == torch.float32
    assert expected.std() > 0.02, "reference scores should differ between the pairs"
    assert err < 2e-5   # float32 through 2+2 tiny blocks: ~1e-7 measured


@pytest.mark.parametrize("hw", [(40, 48), (48, 40)])
def test_hpsv2_pad_to_square_matches_pil_resize_max_size(hw):
    """HPS v2's eval transform (open_clip ResizeMaxSize: long side to 32 with PIL bicubic, black padding
    centred) on a smooth image: the padding is exact, the resized part within PIL's uint8 rounding + filter."""
    from PIL import Image

    from fnf.reward_models.hps import hps_preprocess
    from fnf.reward_models.preprocess import CLIP_MEAN, CLIP_STD

    h, w = hw
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    img = torch.stack([0.5 + 0.4 * torch.sin(3 * xx + 2 * yy), yy, 1 - xx * yy]).unsqueeze(0)
    img = (img * 255).round() / 255
    ours = hps_preprocess(img, 32, "longest")[0]
    scale = 32 / max(h, w)
    nh, nw = round(h * scale), round(w * scale)
    pil = Image.fromarray((img[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).resize(
        (nw, nh), Image.BICUBIC)
    canvas = Image.new("RGB", (32, 32), (0, 0, 0))
    canvas.paste(pil, ((32 - nw) // 2, (32 - nh) // 2))
    x = torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1).float() / 255
    expected = (x - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)
    pad = torch.ones(32, 32, dtype=torch.bool)
    top, left = (32 - nh) // 2, (32 - nw) // 2
    pad[top:top + nh, left:left + nw] = False
    assert pad.sum() > 0 and torch.equal(ours[:, pad], expected[:, pad])
    err = (ours[:, ~pad] - expected[:, ~pad]).abs().max().item()
    print(f"hpsv2 pad-to-square {hw}: max |ours - PIL| inside = {err:.3e} (normalised units)")
    assert err < 0.03   # ~1.4e-2 measured: PIL rounds to uint8 (1/255 / std = 0.015)


def test_hpsv2_module_prefix_and_broadcast_prompt(hps_files, tmp_path):
    _, tokenizer, ref, tok = hps_files
    prefixed = str(tmp_path / "prefixed.pt")
    state = {f"module.{k}": v for k, v in ref.state_dict().items()}
    state["module.attn_mask"] = torch.full((16, 16), float("-inf")).triu(1)   # older open_clip saved this buffer
    torch.save({"state_dict": state, "epoch": 3}, prefixed)
    reward = _hps(prefixed, tokenizer)
    images = _images((2, 3, 32, 32), SEED + 2)
    with torch.no_grad():
        ours = reward(images, ["a red car"])
    expected = _reference_hps(ref, tok, _square_pixels(images), ["a red car"] * 2)
    assert (ours.double() - expected).abs().max() < 2e-5
    with pytest.raises(ValueError, match="prompts"):
        reward(images, ["a", "b", "c"])


def test_hpsv2_gradients_and_gradcam_layer(hps_files):
    path, tokenizer, _, _ = hps_files
    reward = _hps(path, tokenizer)
    assert not any(p.requires_grad for p in reward.parameters()) and not reward.training
    seen = []
    layer = dict(reward.named_modules())[reward.gradcam_layer]
    handle = layer.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    images = _images((2, 3, 32, 32), SEED + 3).requires_grad_(True)
    reward(images, PROMPTS[:2]).sum().backward()
    handle.remove()
    assert reward.gradcam_prefix_tokens == 1 and seen == [torch.Size([2, 1 + 16, 32])]
    g = images.grad
    assert torch.isfinite(g).all() and (g != 0).float().mean() > 0.99


def test_hpsv2_open_clip_backend_uses_create_model(hps_files, monkeypatch):
    """With open_clip importable the model is open_clip.create_model(arch, pretrained=None) + the state dict
    (a stand-in open_clip module here: open-clip-torch does not install beside this torch)."""
    path, tokenizer, ref, tok = hps_files
    calls = []

    def create_model(arch, pretrained=None):
        calls.append((arch, pretrained))
        return RefOpenCLIP(len(tok), tok.eos_token_id)

    fake = types.ModuleType("open_clip")
    fake.create_model = create_model
    monkeypatch.setitem(sys.modules, "open_clip", fake)
    monkeypatch.setattr("fnf.reward_models.hps._open_clip_available", lambda: True)
    reward = build_reward("hpsv2", checkpoint=path, tokenizer=tokenizer)
    assert calls == [("ViT-H-14", None)]
    images = _images((2, 3, 32, 32), SEED + 4)
    with torch.no_grad():
        ours = reward(images, PROMPTS[:2])
    assert (ours.double() - _reference_hps(ref, tok, _square_pixels(images), PROMPTS[:2])).abs().max() < 2e-5
    assert reward.gradcam_layer in dict(reward.named_modules())


def _bad_checkpoint(tmp_path, ref, edit):
    state = dict(ref.state_dict())
    edit(state)
    path = str(tmp_path / "bad.pt")
    torch.save({"state_dict": state}, path)
    return path


def test_hpsv2_errors_name_the_path(hps_files, tmp_path, monkeypatch):
    path, tokenizer, ref, _ = hps_files
    monkeypatch.setattr("fnf.reward_models.hps._open_clip_available", lambda: False)
    with pytest.raises(SpecError, match="backend 'open_clip' needs the open-clip-torch package"):
        check_reward_spec("hpsv2", {"checkpoint": path, "backend": "open_clip"})
    with pytest.raises(SpecError, match="needs reward.kwargs.tokenizer"):
        check_reward_spec("hpsv2", {"checkpoint": path})
    kw = dict(tokenizer=tokenizer, vision_head_width=16, text_head_width=16, backend="transformers")
    missing = str(tmp_path / "nope.pt")
    for call in (check_reward_spec, lambda s, k: build_reward(s, **k)):
        with pytest.raises(SpecError, match="nope.pt.*does not exist"):
            call("hpsv2", dict(kw, checkpoint=missing))
    for kwargs in ({}, dict(kw)):
        with pytest.raises(SpecError, match="needs reward.kwargs.checkpoint"):
            check_reward_spec("hpsv2", kwargs)
    with pytest.raises(SpecError, match="tokenizer .*not a folder"):
        check_reward_spec("hpsv2", dict(kw, checkpoint=path, tokenizer=str(tmp_path / "none")))
    with pytest.raises(SpecError, match="vision_head_width"):
        check_reward_spec("hpsv2", dict(kw, checkpoint=path, arch="RN50", vision_head_width=None))
    with pytest.raises(SpecError, match="resize must be"):
        check_reward_spec("hpsv2", dict(kw, checkpoint=path, resize="stretch"))
    check_reward_spec("hpsv2", dict(kw, checkpoint=path))   # the good spec passes

    no_ln = _bad_checkpoint(tmp_path, ref, lambda s: s.pop("visual.ln_post.weight"))
    with pytest.raises(SpecError, match=r"bad\.pt.*has no 'visual\.ln_post\.weight'"):
        build_reward("hpsv2", checkpoint=no_ln, **kw)
    shape = _bad_checkpoint(tmp_path, ref, lambda s: s.update({"transformer.resblocks.1.ln_2.bias": torch.zeros(5)}))
    with pytest.raises(SpecError,
                       match=r"bad\.pt.*'transformer\.resblocks\.1\.ln_2\.bias' has shape \(5,\), expected \(32,\)"):
        build_reward("hpsv2", checkpoint=shape, **kw)
    extra = _bad_checkpoint(tmp_path, ref, lambda s: s.update({"visual.attn_pool.query": torch.zeros(2)}))
    with pytest.raises(SpecError, match=r"bad\.pt.*visual\.attn_pool\.query"):
        build_reward("hpsv2", checkpoint=extra, **kw)
    heads = dict(kw, vision_head_width=5)
    with pytest.raises(SpecError, match="vision_head_width=5 does not divide"):
        build_reward("hpsv2", checkpoint=path, **heads)
    not_state = str(tmp_path / "list.pt")
    torch.save([1, 2, 3], not_state)
    with pytest.raises(SpecError, match=r"list\.pt.*no tensor state dict"):
        build_reward("hpsv2", checkpoint=not_state, **kw)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(SpecError, match=r"garbage\.pt.*could not be read"):
        build_reward("hpsv2", checkpoint=str(garbage), **kw)


# ------------------------------------------------------------------------------------------ sd-safety
SAFETY_MEAN, SAFETY_STD = [0.5, 0.45, 0.4], [0.25, 0.3, 0.27]   # not CLIP's: shows they are read from the config
# (image, concept, margin) planted; image 2 is flagged only through the special-care adjustment (+0.01).
PLANTED = [(0, 0, 0.03), (1, 1, 0.06), (2, 2, -0.004), (3, 3, -0.004)]
PLANTED_SPECIAL = [(2, 0, 0.08)]
FLAGGED = [True, True, True, False, False, False]


def _safety_images():
    """Six 40x40 images on the uint8 grid (so the PIL pipeline and ours see the same pixels)."""
    g = torch.Generator().manual_seed(SEED + 10)
    ramp = torch.linspace(0, 1, 40)
    imgs = [torch.rand(3, 40, 40, generator=g), ramp.view(1, 1, 40).expand(3, 40, 40),
            ramp.view(1, 40, 1).expand(3, 40, 40) * torch.tensor([1.0, 0.2, 0.5]).view(3, 1, 1),
            torch.rand(3, 5, 5, generator=g).repeat_interleave(8, 1).repeat_interleave(8, 2),
            0.5 + 0.3 * torch.sin(ramp * 12).view(1, 1, 40) * torch.cos(ramp * 7).view(1, 40, 1).expand(3, 40, 40),
            torch.rand(3, 40, 40, generator=g) * 0.3 + 0.6]
    return (torch.stack(imgs) * 255).round() / 255


def _official_pixels(processor, images):
    from PIL import Image

    pil = [Image.fromarray((im.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for im in images]
    return processor(images=pil, return_tensors="pt").pixel_values


def _spread_projection(checker, pixels):
    """Shrink the images' common pooled direction in visual_projection to a tenth (random towers map all images to
    nearly one direction), so that each planted image has room of its own (removing it fully would make the six
    centred embeddings linearly dependent)."""
    with torch.no_grad():
        pooled = checker.vision_model(pixels).pooler_output.double()
        m = F.normalize(pooled.mean(0), dim=0)
        w = checker.visual_projection.weight.double()
        checker.visual_projection.weight.copy_((w - 0.9 * (w @ m)[:, None] * m[None, :]).float())


def _unit_embeds(checker, pixels):
    """Float64 image embeddings of the official tower, L2-normalised."""
    import copy

    c64 = copy.deepcopy(checker).double()
    with torch.no_grad():
        e = c64.visual_projection(c64.vision_model(pixels.double()).pooler_output)
    return F.normalize(e, dim=-1)


def _plant(embeds_param, weights_param, u, plants, seed):
    """Concept rows orthogonal to every other image's embedding, thresholds giving the planted margins;
    the other rows random with threshold 1 (margins cos - 1, far below 0)."""
    g = torch.Generator().manual_seed(seed)
    rows = F.normalize(torch.randn(embeds_param.shape, generator=g, dtype=torch.float64), dim=-1)
    weights = torch.ones(weights_param.shape, dtype=torch.float64)
    for k, i, margin in plants:
        others = torch.cat([u[:k], u[k + 1:]]).t()                        # (D, B-1)
        q, _ = torch.linalg.qr(others)
        residual = u[k] - q @ (q.t() @ u[k])                               # u_k minus its part in the others' span
        rows[i] = F.normalize(residual, dim=0)
        weights[i] = residual.norm() - margin                              # cos(u_k, row) = |residual|
        assert residual.norm() - margin > 0.04, "planted image too close to the others' span"
    with torch.no_grad():
        embeds_param.copy_(rows.float())
        weights_param.copy_(weights.float())


@pytest.fixture(scope="module")
def safety_model(tmp_path_factory):
    """An SD-1.x-shaped folder with safety_checker/ (planted concepts) and feature_extractor/."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    root = tmp_path_factory.mktemp("sd") / "sd15"
    print(f"sd-safety seed {SEED}")
    torch.manual_seed(SEED)
    cfg = CLIPConfig(vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, image_size=32, patch_size=8),
                     text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      vocab_size=64, max_position_embeddings=8, bos_token_id=0, eos_token_id=1,
                                      pad_token_id=1),
                     projection_dim=32)
    checker = StableDiffusionSafetyChecker(cfg).eval()
    processor = CLIPImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32},
                                   image_mean=SAFETY_MEAN, image_std=SAFETY_STD, resample=3)
    images = _safety_images()
    pixels = _official_pixels(processor, images)
    _spread_projection(checker, pixels)
    u = _unit_embeds(checker, pixels)
    _plant(checker.concept_embeds, checker.concept_embeds_weights, u, PLANTED, SEED + 11)
    _plant(checker.special_care_embeds, checker.special_care_embeds_weights, u, PLANTED_SPECIAL, SEED + 12)
    checker.save_pretrained(str(root / "safety_checker"))
    processor.save_pretrained(str(root / "feature_extractor"))
    official = StableDiffusionSafetyChecker.from_pretrained(str(root / "safety_checker")).eval()
    return str(root), official, processor, images


def _official_flags(official, processor, images):
    pixels = _official_pixels(processor, images)
    _, flags = official(clip_input=pixels, images=np.zeros((len(images), 4, 4, 3)))
    return list(flags)


def _independent_margin(official, processor, images):
    """max_i(cos(e, concept_i) - w_i + adj), adj = 0.01 if any special-care margin > 0, in float64."""
    u = _unit_embeds(official, _official_pixels(processor, images))
    concept = u @ F.normalize(official.concept_embeds.double(), dim=-1).t() - official.concept_embeds_weights.double()
    special = (u @ F.normalize(official.special_care_embeds.double(), dim=-1).t()
               - official.special_care_embeds_weights.double())
    adj = 0.01 * (special > 0).any(dim=-1).double()
    return (concept + adj[:, None]).amax(dim=-1)


def test_sd_safety_soft_score_flags_where_the_official_checker_does(safety_model):
    root, official, processor, images = safety_model
    flags = _official_flags(official, processor, images)
    assert flags == FLAGGED, "planted: images 0-2 flagged (2 through the special-care adjustment), 3-5 not"
    reward = build_reward("sd-safety", model=root)
    with torch.no_grad():
        p = reward(images, None)
    print(f"sd-safety p = {p.tolist()}")
    assert p.shape == (6,) and ((p > 0.5).tolist() == flags)
    assert reward.size == 40 and reward.crop_size == 32 and list(reward.mean) == SAFETY_MEAN


def test_sd_safety_margin_equals_official_concept_scores(safety_model):
    root, official, processor, images = safety_model
    expected = _independent_margin(official, processor, images)
    for model in (root, os.path.join(root, "safety_checker")):   # the SD folder or its safety_checker/
        reward = build_reward("sd-safety", model=model)
        with torch.no_grad():
            ours = reward.hard_margin(images)
        err = (ours.double() - expected).abs().max().item()
        print(f"sd-safety hard margin, model={os.path.basename(model)}: max |ours - float64| = {err:.2e}")
        assert err < 1e-5
    planted = {k: m for k, _, m in PLANTED}
    planted[2] += 0.01
    for k, m in planted.items():
        assert abs(expected[k].item() - m) < 1e-6


def test_sd_safety_zero_temperature_is_the_hard_decision(safety_model):
    root, _, _, images = safety_model
    reward = build_reward("sd-safety", model=root, temperature=1e-4, smooth_max_temperature=1e-5)
    with torch.no_grad():
        p, soft, hard = reward(images), reward.soft_margin(images), reward.hard_margin(images)
    hard_decision = torch.tensor(FLAGGED, dtype=torch.float32)
    print(f"sd-safety tau->0: max |p - hard| = {(p - hard_decision).abs().max():.2e}, "
          f"max |soft - hard margin| = {(soft - hard).abs().max():.2e}")
    assert (p - hard_decision).abs().max() < 1e-6
    assert (soft - hard).abs().max() < 1e-4 * math.log(17) + 1e-6
    default = build_reward("sd-safety", model=root)
    with torch.no_grad():
        wide = default.soft_margin(images) - hard
    assert wide.abs().max() > 1e-4, "the default temperatures must actually soften"


def test_sd_safety_gradients_and_gradcam_layer(safety_model):
    root, _, _, images = safety_model
    reward = build_reward("sd-safety", model=root)
    assert not any(p.requires_grad for p in reward.parameters()) and not reward.training
    seen = []
    layer = dict(reward.named_modules())[reward.gradcam_layer]
    handle = layer.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    x = images.clone().requires_grad_(True)
    reward.soft_margin(x).sum().backward()
    handle.remove()
    assert reward.gradcam_prefix_tokens == 1 and seen == [torch.Size([6, 1 + 16, 32])]
    assert torch.isfinite(x.grad).all() and (x.grad.flatten(1) != 0).float().mean(1).min() > 0.5
    y = images[3:4].clone().requires_grad_(True)     # the probability itself, near the boundary
    reward(y).sum().backward()
    assert y.grad.abs().sum() > 0


def test_sd_safety_fp16_variant_loads_as_float32(safety_model, tmp_path):
    import copy
    import shutil

    root, official, processor, images = safety_model
    folder = tmp_path / "sd16"
    copy.deepcopy(official).half().save_pretrained(str(folder / "safety_checker"), variant="fp16")
    shutil.copytree(os.path.join(root, "feature_extractor"), folder / "feature_extractor")
    with pytest.raises(SpecError, match="sd16.*could not be loaded"):   # the fp16 file needs variant='fp16'
        build_reward("sd-safety", model=str(folder))
    reward = build_reward("sd-safety", model=str(folder), variant="fp16")
    assert all(p.dtype == torch.float32 for p in reward.parameters())
    with torch.no_grad():
        err = (reward.hard_margin(images).double() - _independent_margin(official, processor, images)).abs().max()
    assert err < 5e-3   # fp16 weights: ~1e-3 relative


def test_sd_safety_errors(safety_model, tmp_path):
    import json

    from fnf.reward_models.sd_safety import resolve_folders

    root, _, _, _ = safety_model
    check_reward_spec("sd-safety", {"model": root})
    with pytest.raises(SpecError, match="needs reward.kwargs.model"):
        check_reward_spec("sd-safety", {})
    with pytest.raises(SpecError, match="nowhere.*not a folder"):
        check_reward_spec("sd-safety", {"model": str(tmp_path / "nowhere")})
    sd2 = tmp_path / "sd2"
    sd2.mkdir()
    (sd2 / "model_index.json").write_text("{}")
    with pytest.raises(SpecError, match="sd2.*neither safety_checker/config.json"):
        build_reward("sd-safety", model=str(sd2))
    unet = tmp_path / "unet"
    unet.mkdir()
    (unet / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(SpecError, match="unet.*not a StableDiffusionSafetyChecker config"):
        check_reward_spec("sd-safety", {"model": str(unet)})
    empty = tmp_path / "empty_checker"
    empty.mkdir()
    with open(os.path.join(root, "safety_checker", "config.json")) as f:
        (empty / "config.json").write_text(f.read())
    with pytest.raises(SpecError, match="empty_checker.*has no weights"):
        check_reward_spec("sd-safety", {"model": str(empty)})
    (empty / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(SpecError, match="empty_checker.*could not be loaded"):
        build_reward("sd-safety", model=str(empty))
    assert resolve_folders(str(empty)) == (str(empty), None)   # no processor config: CLIP defaults
    (empty / "preprocessor_config.json").write_text("{}")      # a standalone checker snapshot's own file
    assert resolve_folders(str(empty))[1] == str(empty / "preprocessor_config.json")
    with pytest.raises(SpecError, match="processor.*does not exist"):
        check_reward_spec("sd-safety", {"model": root, "processor": str(tmp_path)})
    for bad in (0, -1.0, True, "0.1"):
        with pytest.raises(SpecError, match="temperature must be a positive number"):
            check_reward_spec("sd-safety", {"model": root, "temperature": bad})


def test_sd_safety_preprocessing_config_forms(tmp_path):
    import json

    from fnf.reward_models.preprocess import CLIP_MEAN
    from fnf.reward_models.sd_safety import read_preprocessing

    assert read_preprocessing(None, 224) == dict(size=224, crop_size=224, mean=CLIP_MEAN, std=read_preprocessing(
        None, 1)["std"])
    legacy = tmp_path / "preprocessor_config.json"   # the SD 1.x feature_extractor/ form
    legacy.write_text(json.dumps({"crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
                                  "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": SAFETY_MEAN,
                                  "image_std": SAFETY_STD, "resample": 3, "size": 256}))
    assert read_preprocessing(str(legacy), 224) == dict(size=256, crop_size=224, mean=tuple(SAFETY_MEAN),
                                                        std=tuple(SAFETY_STD))
    legacy.write_text(json.dumps({"size": "big"}))
    with pytest.raises(SpecError, match="size must be an int"):
        read_preprocessing(str(legacy), 224)


# ------------------------------------------------------------------------------------------ Grad-CAM plumbing
def test_gradcam_windows_follow_the_preprocessing(hps_files, safety_model):
    """gradcam_crop: the image window each model input covers (pad-to-square reaches past the image)."""
    path, tokenizer, _, _ = hps_files
    hps = _hps(path, tokenizer)
    assert hps.gradcam_crop(40, 48) == (-3.0, 0.0, 48.0, 48.0)   # 40x48 -> 27x32 + 2 rows of padding on top
    assert hps.gradcam_crop(64, 64) == (0.0, 0.0, 64.0, 64.0)
    shortest = _hps(path, tokenizer, resize="shortest").gradcam_crop(40, 48)   # 40x48 -> 32x38, crop from col 3
    assert shortest == pytest.approx((0.0, 3 * 48 / 38, 40.0, 32 * 48 / 38))
    root, _, _, _ = safety_model
    assert build_reward("sd-safety", model=root).gradcam_crop(40, 40) == (4.0, 4.0, 32.0, 32.0)  # 40 -> crop 32


def test_gradcam_runs_on_both_rewards(hps_files, safety_model):
    """fnf's Grad-CAM on each reward's own gradcam_layer: a (B, H, W) map, finite, >= 0, not all zero."""
    from fnf.localize import GradCAM

    path, tokenizer, _, _ = hps_files
    root, _, _, images = safety_model
    for reward, weight, x, prompts in ((_hps(path, tokenizer), 1.0, _images((2, 3, 32, 32), SEED + 5), PROMPTS[:2]),
                                       (build_reward("sd-safety", model=root), -1.0, images, None)):
        cam = GradCAM(reward, reward_weight=weight)(x, prompts)
        assert cam.shape == (x.shape[0],) + x.shape[-2:] and torch.isfinite(cam).all() and (cam >= 0).all()
        assert (cam.flatten(1).amax(1) > 0).any()
