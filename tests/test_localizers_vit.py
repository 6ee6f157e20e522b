"""Localizers for real models: Grad-CAM on ViT / CLIP tokens (patch grid, CLS prefix, crop window), a TorchScript
heatmap model (``heatmap:torchscript:PATH``) and an ONNX box detector (``boxes:PATH.onnx``), each on a planted
region, plus their preflight checks and errors."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fnf_tiny_models import RedDetector, one_torch_thread  # noqa: E402,F401
from fnf.localize import (GradCAM, LocalizerError, build_localizer,  # noqa: E402
                          check_localizer_spec, layer_name)
from fnf.reward_models.preprocess import center_crop, center_crop_window, clip_preprocess, resize_short_side  # noqa: E402,E501
from fnf.rewards import SpecError  # noqa: E402


def _iou(mask: torch.Tensor, truth: torch.Tensor) -> float:
    inter = (mask.bool() & truth.bool()).sum().item()
    return inter / max(1, (mask.bool() | truth.bool()).sum().item())


def _grey_with_red(height, width, boxes, seed=0):
    """Grey noise images (one per box) with a red rectangle (top, bottom, left, right) in each; truth masks."""
    g = torch.Generator().manual_seed(seed)
    b = len(boxes)
    x = (0.4 + 0.1 * torch.rand(b, 1, height, width, generator=g)).expand(b, 3, height, width).clone()
    truth = torch.zeros(b, height, width)
    for i, (t, bt, l, r) in enumerate(boxes):
        x[i, :, t:bt, l:r] = torch.tensor([0.9, 0.1, 0.1]).view(3, 1, 1)
        truth[i, t:bt, l:r] = 1
    return x, truth


# ------------------------------------------------------------------------------------------ Grad-CAM on a CLIP ViT
class PlantedClipRedness(torch.nn.Module):
    """A transformers CLIP vision tower whose score is the redness it sees: the patch embedding's channel 0 measures
    redness, channels 1 and 2 hold constants (position embedding) so the LayerNorms stay near-linear, every block
    passes tokens through (attention output and MLP zeroed) except the last, whose uniform attention pools all
    tokens into CLS; the score reads the pooled CLS channel 0. Grad-CAM must hook a block before the last."""

    def __init__(self, image_size=32, patch=4, layers=3, crop=False):
        super().__init__()
        from transformers import CLIPVisionConfig, CLIPVisionModel
        torch.manual_seed(0)
        cfg = CLIPVisionConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=layers, num_attention_heads=1,
                               image_size=image_size, patch_size=patch, projection_dim=8)
        self.vision = CLIPVisionModel(cfg).eval()
        vm, c = getattr(self.vision, "vision_model", self.vision), cfg.hidden_size   # transformers 4 / 5
        with torch.no_grad():
            emb = vm.embeddings
            emb.patch_embedding.weight.zero_()
            emb.patch_embedding.weight[0] = torch.tensor([1.0, -0.5, -0.5]).view(3, 1, 1) / patch ** 2
            emb.class_embedding.zero_()
            emb.position_embedding.weight.zero_()
            emb.position_embedding.weight[:, 1], emb.position_embedding.weight[:, 2] = 5.0, -5.0
            for i, layer in enumerate(vm.encoder.layers):
                layer.mlp.fc2.weight.zero_()
                layer.mlp.fc2.bias.zero_()
                att = layer.self_attn
                if i < layers - 1:
                    att.out_proj.weight.zero_()
                    att.out_proj.bias.zero_()
                else:
                    for proj in (att.q_proj, att.k_proj):
                        proj.weight.zero_()
                        proj.bias.zero_()
                    for proj in (att.v_proj, att.out_proj):
                        proj.weight.copy_(torch.eye(c))
                        proj.bias.zero_()
        self.image_size = image_size
        self.gradcam_layer = layer_name(self, vm.encoder.layers[layers - 2])
        self.last_layer = layer_name(self, vm.encoder.layers[-1])
        self.post_layernorm = layer_name(self, vm.post_layernorm)
        self.gradcam_prefix_tokens = 1
        if crop:
            self.gradcam_crop = center_crop_window(image_size)

    def forward(self, images, prompts=None):
        pooled = self.vision(pixel_values=clip_preprocess(images, self.image_size)).pooler_output
        return pooled[:, 0]


def test_gradcam_on_clip_vit_tokens_lands_on_the_planted_region():
    reward = PlantedClipRedness().requires_grad_(False)
    # 64x64 images -> 32x32 model input, 8x8 patch grid; regions on the grid (8 image px per patch)
    images, truth = _grey_with_red(64, 64, [(16, 40, 32, 56), (40, 64, 0, 16)])
    # the reward (redness) is lowered in training (weight -1): Grad-CAM explains the evidence for it
    loc = build_localizer("gradcam", reward, threshold=0.5, radius=1, reward_weight=-1.0)
    assert loc.source.layer.endswith("encoder.layers.1") and loc.source.prefix_tokens == 1
    heat, mask = loc(images, ["a", "b"])
    assert heat.shape == (2, 64, 64) and mask.shape == (2, 1, 64, 64) and not heat.requires_grad
    for i in range(2):
        iou = _iou(mask[i, 0], truth[i])
        print(f"vit gradcam image {i}: IoU {iou:.3f}")
        assert iou > 0.5, (i, iou)
        assert heat[i][truth[i] > 0].mean() > 5 * heat[i][truth[i] == 0].mean()
    # the last block's patch outputs never reach CLS: no evidence there, an empty mask
    heat_last, mask_last = build_localizer(f"gradcam:{reward.last_layer}", reward, reward_weight=-1.0)(
        images, ["a", "b"])
    assert heat_last.abs().max() == 0 and mask_last.sum() == 0
    # explain=problem with weight +1 (training raises redness) maps what lowers it: not the red region
    _, mask_problem = build_localizer("gradcam", reward, threshold=0.5, radius=1)(images, ["a", "b"])
    assert _iou(mask_problem[0, 0], truth[0]) < 0.2


def test_gradcam_maps_the_crop_window_back_onto_a_non_square_image():
    # 48x64 -> short side 32 (32x42) -> center crop 32: the model sees image columns 7.6 .. 56.4
    window = center_crop_window(32)(48, 64)
    assert window == pytest.approx((0.0, 5 * 64 / 42, 48.0, 32 * 64 / 42))
    # independently: a column ramp through the same resize + crop reads the window's columns back
    ramp = torch.arange(64, dtype=torch.float32).add(0.5).view(1, 1, 1, 64).expand(1, 3, 48, 64)
    seen = center_crop(resize_short_side(ramp, 32), 32)[0, 0, 16]
    expected = window[1] + (torch.arange(32) + 0.5) * window[3] / 32
    assert (seen[2:-2] - expected[2:-2]).abs().max() < 0.1
    # red region on the crop's patch columns 0..2 (image columns ~7.6 .. 25.9) and patch rows 2..5
    left, right = round(window[1]), round(window[1] + 3 * window[3] / 8)
    images, truth = _grey_with_red(48, 64, [(12, 30, left, right)])
    with_crop = PlantedClipRedness(crop=True).requires_grad_(False)
    heat, mask = build_localizer("gradcam", with_crop, threshold=0.5, radius=1, reward_weight=-1.0)(images, ["a"])
    stretched = PlantedClipRedness(crop=False).requires_grad_(False)
    _, mask_stretched = build_localizer("gradcam", stretched, threshold=0.5, radius=1, reward_weight=-1.0)(
        images, ["a"])
    iou, iou_stretched = _iou(mask[0, 0], truth[0]), _iou(mask_stretched[0, 0], truth[0])
    print(f"non-square: IoU with gradcam_crop {iou:.3f}, stretched {iou_stretched:.3f}")
    assert iou > 0.6 and iou > iou_stretched + 0.15
    assert heat[0, :, :7].abs().max() == 0 and heat[0, :, 57:].abs().max() == 0   # outside the window


class TokensOfConv(torch.nn.Module):
    """RedDetector whose conv features also pass through a token layer: (B, C, h, w) -> prefix + h*w tokens,
    batch-first or sequence-first; the score reads the tokens, so Grad-CAM on either layer must agree."""

    def __init__(self, prefix: int, seq_first: bool):
        super().__init__()
        self.inner = RedDetector().double()
        self.tokens = torch.nn.Identity()
        self.prefix, self.seq_first = prefix, seq_first

    def forward(self, images, prompts=None):
        feats = self.inner.features(images.double())
        b, c = feats.shape[:2]
        tok = torch.cat([torch.ones(b, self.prefix, c, dtype=feats.dtype), feats.flatten(2).transpose(1, 2)], 1)
        tok = self.tokens(tok.transpose(0, 1) if self.seq_first else tok)
        tok = tok.transpose(0, 1) if self.seq_first else tok
        return self.inner.head(torch.relu(tok[:, self.prefix:]).mean(dim=1))[:, 0]


@pytest.mark.parametrize("prefix,seq_first", [(1, False), (0, True), (3, False)])
def test_gradcam_on_tokens_equals_gradcam_on_the_same_feature_map(prefix, seq_first):
    reward = TokensOfConv(prefix, seq_first)
    images, _ = _grey_with_red(24, 40, [(4, 12, 18, 28), (12, 20, 2, 10)])   # non-square grid: 24 x 40 tokens
    conv = GradCAM(reward, "inner.features", explain="reward")(images, ["a", "b"])
    tokens = GradCAM(reward, "tokens", explain="reward", prefix_tokens=prefix, grid=(24, 40))(images, ["a", "b"])
    assert conv.abs().max() > 0
    torch.testing.assert_close(tokens, conv, rtol=1e-6, atol=1e-9)
    with pytest.raises(LocalizerError, match="do not fill a square grid"):
        GradCAM(reward, "tokens", prefix_tokens=prefix)(images, ["a", "b"])
    with pytest.raises(LocalizerError, match=r"grid=\[20, 40\]"):
        GradCAM(reward, "tokens", prefix_tokens=prefix, grid=(20, 40))(images, ["a", "b"])


def test_gradcam_options_are_checked():
    reward = PlantedClipRedness()
    for kwargs, match in (({"prefix_tokens": -1}, "prefix_tokens"), ({"grid": [8]}, "grid"),
                          ({"grid": [8, 0]}, "grid"), ({"layer": "x"}, "not gradcam options")):
        with pytest.raises(LocalizerError, match=match):
            check_localizer_spec("gradcam", kwargs)
        with pytest.raises(LocalizerError, match=match):
            build_localizer("gradcam", reward, kwargs=kwargs)
    check_localizer_spec("gradcam:vision", {"prefix_tokens": 1, "grid": [8, 8], "explain": "reward"})
    with pytest.raises(LocalizerError, match=r"\(B, L, C\) tokens"):
        build_localizer(f"gradcam:{reward.post_layernorm}", reward)(torch.rand(1, 3, 32, 32), ["a"])


# ------------------------------------------------------------------------------------------ TorchScript heatmap
class RednessSegmenter(torch.nn.Module):
    """Channel 1 lights up red pixels, channel 0 the rest, at half resolution (as segmenters often output)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 2, 1)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[1, :, 0, 0] = torch.tensor([8.0, -4.0, -4.0])
            self.conv.weight[0] = -self.conv.weight[1]
            self.conv.bias.copy_(torch.tensor([2.0, -2.0]))

    def forward(self, x):
        return torch.nn.functional.avg_pool2d(self.conv(x), 2)


def test_torchscript_heatmap_lights_up_the_planted_region(tmp_path):
    path = str(tmp_path / "seg.pt")
    torch.jit.save(torch.jit.script(RednessSegmenter()), path)
    images, truth = _grey_with_red(64, 48, [(8, 32, 8, 24), (40, 60, 24, 44)])
    kwargs = {"size": [32, 32], "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "channel": 1,
              "activation": "sigmoid"}
    check_localizer_spec(f"heatmap:torchscript:{path}", kwargs)
    heat, mask = build_localizer(f"heatmap:torchscript:{path}", kwargs=kwargs, normalize="none",
                                 threshold=0.5, threshold_mode="absolute", radius=0)(images, ["a", "b"])
    assert heat.shape == (2, 64, 48) and 0 <= heat.min() and heat.max() <= 1
    for i in range(2):
        iou = _iou(mask[i, 0], truth[i])
        print(f"torchscript heatmap image {i}: IoU {iou:.3f}")
        assert iou > 0.8, (i, iou)
    # softmax over the two channels, channel 0: the complement of the region
    heat0, _ = build_localizer(f"heatmap:torchscript:{path}", normalize="none",
                               kwargs={**kwargs, "channel": 0, "activation": "softmax"})(images, ["a", "b"])
    assert heat0[truth > 0].mean() < 0.1 and heat0[truth == 0].mean() > 0.9


def test_torchscript_heatmap_errors_name_the_file(tmp_path):
    missing = str(tmp_path / "nope.pt")
    for call in (lambda: check_localizer_spec(f"heatmap:torchscript:{missing}"),
                 lambda: build_localizer(f"heatmap:torchscript:{missing}")):
        with pytest.raises(SpecError, match=r"nope\.pt.*does not exist.*torch\.jit\.save"):
            call()
    state_dict = str(tmp_path / "weights.pt")
    torch.save(RednessSegmenter().state_dict(), state_dict)
    text = tmp_path / "notes.pt"
    text.write_text("not a model")
    for bad in (state_dict, str(text)):
        with pytest.raises(SpecError, match=r"is not a TorchScript archive"):
            build_localizer(f"heatmap:torchscript:{bad}")
    good = str(tmp_path / "seg.pt")
    torch.jit.save(torch.jit.script(RednessSegmenter()), good)
    for kwargs, match in (({"colour": 1}, "does not accept kwargs"), ({"activation": "relu"}, "activation"),
                          ({"size": [0, 3]}, "size"), ({"std": [1, 0, 1]}, "std"), ({"mean": [1, 2]}, "mean")):
        with pytest.raises(SpecError, match=match):
            check_localizer_spec(f"heatmap:torchscript:{good}", kwargs)
    with pytest.raises(SpecError, match="channel=5 but .* outputs 2 channels"):
        build_localizer(f"heatmap:torchscript:{good}", kwargs={"channel": 5})(torch.rand(1, 3, 8, 8), ["a"])


# ------------------------------------------------------------------------------------------ ONNX box detector
def _red_box_detector(path: str, opset: int = 13):
    """An ONNX graph that finds the bounding box of the red pixels of a (1, 3, H, W) image (xyxy, input pixels,
    label 3, score 0.9) and also outputs two fixed boxes: label 7 score 0.95 at the top-left 8x8 corner, label 3
    score 0.2 at the bottom-right 8x8 corner."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    def const(name, value, dtype=np.float32):
        return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)

    nodes = [
        helper.make_node("Split", ["images"], ["r", "g", "b"], axis=1, num_outputs=3) if opset >= 18 else
        helper.make_node("Split", ["images"], ["r", "g", "b"], axis=1),
        helper.make_node("Add", ["g", "b"], ["gb"]),
        helper.make_node("Mul", ["gb", "half"], ["gb2"]),
        helper.make_node("Sub", ["r", "gb2"], ["redness"]),                      # (1, 1, H, W)
        helper.make_node("Greater", ["redness", "thr"], ["is_red_b"]),
        helper.make_node("Cast", ["is_red_b"], ["is_red"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMax", ["is_red"], ["rows"], axes=[0, 1, 3], keepdims=0),   # (H,)
        helper.make_node("ReduceMax", ["is_red"], ["cols"], axes=[0, 1, 2], keepdims=0),   # (W,)
    ]
    for axis in ("rows", "cols"):   # first index = min(idx + big * (1 - on)), last + 1 = max((idx + 1) * on)
        nodes += [
            helper.make_node("Shape", [axis], [f"{axis}_n"]),
            helper.make_node("ConstantOfShape", [f"{axis}_n"], [f"{axis}_one"],
                             value=numpy_helper.from_array(np.ones(1, np.float32))),
            helper.make_node("CumSum", [f"{axis}_one", "zero_i"], [f"{axis}_idx1"]),          # 1 .. n
            helper.make_node("Mul", [f"{axis}_idx1", axis], [f"{axis}_hi_all"]),
            helper.make_node("ReduceMax", [f"{axis}_hi_all"], [f"{axis}_hi"], keepdims=1),
            helper.make_node("Sub", [f"{axis}_idx1", "one"], [f"{axis}_idx0"]),
            helper.make_node("Sub", ["one", axis], [f"{axis}_off"]),
            helper.make_node("Mul", [f"{axis}_off", "big"], [f"{axis}_pen"]),
            helper.make_node("Add", [f"{axis}_idx0", f"{axis}_pen"], [f"{axis}_lo_all"]),
            helper.make_node("ReduceMin", [f"{axis}_lo_all"], [f"{axis}_lo"], keepdims=1),
        ]
    nodes += [
        helper.make_node("Concat", ["cols_lo", "rows_lo", "cols_hi", "rows_hi"], ["found"], axis=0),
        helper.make_node("Reshape", ["found", "shape_14"], ["found_box"]),
        helper.make_node("Concat", ["found_box", "fixed_boxes"], ["all_boxes"], axis=0),
        helper.make_node("Unsqueeze", ["all_boxes", "zero_i"], ["boxes"]),
    ]
    graph = helper.make_graph(
        nodes, "red_box_detector",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, "height", "width"])],
        [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [1, 3, 4]),
         helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 3]),
         helper.make_tensor_value_info("labels", TensorProto.INT64, [1, 3])],
        [const("half", 0.5), const("thr", 0.4), const("one", 1.0), const("big", 1e6),
         const("zero_i", [0], np.int64), const("shape_14", [1, 4], np.int64),
         const("fixed_boxes", [[0, 0, 8, 8], [24, 24, 32, 32]])])
    graph.node.extend([
        helper.make_node("Constant", [], ["scores"], value=const("s", [[0.9, 0.95, 0.2]])),
        helper.make_node("Constant", [], ["labels"], value=const("l", [[3, 7, 3]], np.int64))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="fnf-test")
    model.ir_version = 7   # readable by old onnxruntime releases too
    onnx.checker.check_model(model)
    onnx.save(model, path)


def test_onnx_box_detector_rasterises_the_chosen_boxes(tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    path = str(tmp_path / "det.onnx")
    _red_box_detector(path)
    # 64x64 images, model input 32x32: the red box (in input pixels) scales by 2 back onto the image
    images, truth = _grey_with_red(64, 64, [(16, 40, 24, 56), (40, 64, 8, 32)])
    kwargs = {"size": 32, "classes": [3], "score_threshold": 0.5}
    check_localizer_spec(f"boxes:{path}", kwargs)
    heat, mask = build_localizer(f"boxes:{path}", kwargs=kwargs, radius=0)(images, ["a", "b"])
    for i in range(2):
        iou = _iou(mask[i, 0], truth[i])
        print(f"onnx boxes image {i}: IoU {iou:.3f}")
        assert iou > 0.9, (i, iou)
    # all classes: the label-7 corner box (input 0..8 -> image 0..16) joins; score 0.2 stays out
    heat_all, _ = build_localizer(f"boxes:{path}", kwargs={"size": 32}, radius=0)(images, ["a", "b"])
    assert heat_all[:, :16, :16].min() == 1 and heat_all[:, 48:, 48:].max() == 0
    # fill=score keeps the scores; a low threshold lets the weak box in
    heat_s, _ = build_localizer(f"boxes:{path}", normalize="none", radius=0,
                                kwargs={"size": 32, "fill": "score", "score_threshold": 0.1})(images, ["a", "b"])
    assert heat_s[0, 20, 30].item() == pytest.approx(0.9) and heat_s[0, 50, 50].item() == pytest.approx(0.2)
    assert heat_s[0, 2, 2].item() == pytest.approx(0.95)
    # read as normalised coordinates, the label-7 box [0, 0, 8, 8] covers the whole image (clipped); with
    # normalize=max (minmax would map a constant heatmap to zeros) the mask is everything
    _, everything = build_localizer(f"boxes:{path}", normalize="max", radius=0,
                                    kwargs={"classes": [7], "normalized": True})(images, ["a", "b"])
    assert everything.sum() == 2 * 64 * 64


def test_onnx_box_detector_errors(tmp_path, monkeypatch):
    path = str(tmp_path / "det.onnx")
    with pytest.raises(SpecError, match=r"det\.onnx.*does not exist"):
        check_localizer_spec(f"boxes:{path}")
    with pytest.raises(SpecError, match="needs a path"):
        check_localizer_spec("boxes:")
    (tmp_path / "det.onnx").write_bytes(b"\x00not onnx")
    for kwargs, match in (({"clases": [1]}, "does not accept kwargs"), ({"classes": "person"}, "classes"),
                          ({"box_format": "yxyx"}, "box_format"), ({"outputs": {"box": "x"}}, "outputs"),
                          ({"score_threshold": "high"}, "score_threshold"), ({"layout": "CHW"}, "layout")):
        with pytest.raises(SpecError, match=match):
            check_localizer_spec(f"boxes:{path}", kwargs)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)   # as if not installed
    with pytest.raises(ImportError, match=r"pip install focus-n-fix\[boxes\]"):
        build_localizer(f"boxes:{path}")
    monkeypatch.undo()
    pytest.importorskip("onnxruntime")
    with pytest.raises(SpecError, match=r"cannot load .*det\.onnx.*with onnxruntime"):
        build_localizer(f"boxes:{path}")
    pytest.importorskip("onnx")
    _red_box_detector(path)
    with pytest.raises(SpecError, match=r"outputs .* do not match"):
        build_localizer(f"boxes:{path}", kwargs={"outputs": ["bbox", "scores", "labels"]})


def test_a_window_reaching_past_the_image_keeps_the_inner_part_of_the_cam():
    """Pad-to-square inputs (HPS): the window (-3, 0, 48, 48) of a 40x48 image; the CAM spans the whole window
    and only its rows 3..42 land on the image (not the whole CAM squeezed into the image)."""
    from fnf.localize import _paste_in_window

    rows = torch.arange(48, dtype=torch.float64).view(1, 1, 48, 1).expand(1, 1, 48, 48)
    out = _paste_in_window(rows, (-3.0, 0.0, 48.0, 48.0), (40, 48))
    assert torch.equal(out[0, :, 0], torch.arange(3, 43, dtype=torch.float64))
    inside = _paste_in_window(rows, (4.0, 0.0, 32.0, 48.0), (40, 48))   # a window inside: resized onto it
    assert inside[0, :4].abs().max() == 0 and inside[0, 36:].abs().max() == 0
