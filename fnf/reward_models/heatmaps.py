"""Localizer models loaded from local files: a TorchScript heatmap / segmentation model
(``heatmap:torchscript:PATH``) and an ONNX box detector (``boxes:PATH.onnx``, needs onnxruntime).

Both run on the pretrained image I0 under ``torch.no_grad()``: they need no gradient, so any exported model
works (a perceptual-artifact segmenter, a nudity / object detector...). Each returns (B, H, W) at the image size.
"""
from __future__ import annotations

import importlib.util
import inspect
import os
import zipfile

import torch
import torch.nn.functional as F

from ..core import SpecError

ACTIVATIONS = ("none", "sigmoid", "softmax")
BOX_FORMATS = ("xyxy", "xywh", "cxcywh")


# ------------------------------------------------------------------------------------------ shared
def _size_pair(size, what: str):
    if size is None:
        return None
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return (size, size)
    if (isinstance(size, (list, tuple)) and len(size) == 2
            and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)):
        return (int(size[0]), int(size[1]))
    raise SpecError(f"{what}: size must be a positive integer or [height, width], got {size!r}")


def _channel_stats(values, what: str, name: str):
    if values is None:
        return None
    vals = [values] if isinstance(values, (int, float)) else values
    if (not isinstance(vals, (list, tuple)) or len(vals) not in (1, 3)
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals)):
        raise SpecError(f"{what}: {name} must be a number or 3 numbers (one per RGB channel), got {values!r}")
    if name == "std" and any(v == 0 for v in vals):
        raise SpecError(f"{what}: std must not contain 0, got {values!r}")
    return torch.tensor([float(v) for v in vals]).view(1, -1, 1, 1)


def _model_input(images: torch.Tensor, size, mean, std, scale: float = 1.0) -> torch.Tensor:
    """Images (B, 3, H, W) in [0, 1] -> resized (bilinear, antialiased when shrinking), scaled, normalised."""
    x = images.detach().float()
    if size is not None and tuple(x.shape[-2:]) != size:
        shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrink)
    x = x * scale
    if mean is not None:
        x = x - mean.to(x.device)
    if std is not None:
        x = x / std.to(x.device)
    return x


def _existing_file(path: str, what: str, expected: str) -> str:
    if not path:
        raise SpecError(f"{what} needs a path: {expected}")
    if not os.path.isfile(path):
        raise SpecError(f"{what}: file {path!r} does not exist (expected {expected})")
    return path


# ------------------------------------------------------------------------------------------ torchscript
TS_EXPECTED = "a TorchScript archive written by torch.jit.save(torch.jit.script(model) or torch.jit.trace(...))"


class TorchScriptHeatmap:
    """``heatmap:torchscript:PATH``: a TorchScript model (B, 3, h, w) -> (B, C, h', w') (or (B, h', w'), a tuple
    or a dict with key ``out``, as torchvision segmenters return), loaded on the CPU and moved to the images'
    device. Images are resized to ``size`` (int or [h, w]; default as they are), multiplied by ``scale``,
    normalised by ``mean`` / ``std``; then ``activation`` (none, sigmoid, or softmax over channels) and
    output ``channel``; the map is resized bilinearly to the image size."""

    def __init__(self, path: str, size=None, mean=None, std=None, scale: float = 1.0, channel: int = 0,
                 activation: str = "none"):
        check_torchscript(path, size=size, mean=mean, std=std, scale=scale, channel=channel, activation=activation)
        self.path, self.size = path, _size_pair(size, "heatmap:torchscript")
        self.mean = _channel_stats(mean, "heatmap:torchscript", "mean")
        self.std = _channel_stats(std, "heatmap:torchscript", "std")
        self.scale, self.channel, self.activation = float(scale), int(channel), activation
        try:
            self.model = torch.jit.load(path, map_location="cpu").eval()
        except Exception as e:  # noqa: BLE001  (torch raises RuntimeError / ValueError / pickle errors)
            raise SpecError(f"heatmap:torchscript: cannot load {path!r} with torch.jit.load (expected "
                            f"{TS_EXPECTED}): {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
        self._device = torch.device("cpu")

    def __call__(self, images: torch.Tensor, prompts=None) -> torch.Tensor:
        if images.device != self._device:
            self.model = self.model.to(images.device)
            self._device = images.device
        with torch.no_grad():
            out = self.model(_model_input(images, self.size, self.mean, self.std, self.scale))
        if isinstance(out, dict):
            out = out["out"] if "out" in out else next(iter(out.values()))
        if isinstance(out, (tuple, list)):
            out = out[0]
        if not isinstance(out, torch.Tensor) or out.dim() not in (3, 4) or out.shape[0] != images.shape[0]:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise SpecError(f"heatmap:torchscript {self.path!r} returned {shape}; expected (B, C, h, w) or "
                            f"(B, h, w) with B={images.shape[0]}")
        out = out.float()
        if out.dim() == 3:
            out = out[:, None]
        if not -out.shape[1] <= self.channel < out.shape[1]:
            raise SpecError(f"heatmap:torchscript: channel={self.channel} but {self.path!r} outputs "
                            f"{out.shape[1]} channels")
        if self.activation == "sigmoid":
            out = torch.sigmoid(out)
        elif self.activation == "softmax":
            out = torch.softmax(out, dim=1)
        heat = out[:, self.channel:self.channel + 1] if self.channel >= 0 else out[:, self.channel][:, None]
        if heat.shape[-2:] != images.shape[-2:]:
            heat = F.interpolate(heat, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return heat[:, 0]


def check_torchscript(path: str, **kwargs) -> None:
    """Cheap preflight of ``heatmap:torchscript:PATH``: the file is a TorchScript archive, the kwargs are known."""
    what = "heatmap:torchscript"
    _bind(TorchScriptHeatmap, (path,), kwargs, what)
    _existing_file(path, what, TS_EXPECTED)
    if not _is_torchscript_archive(path):
        raise SpecError(f"{what}: {path!r} is not a TorchScript archive (expected {TS_EXPECTED}; a state dict or "
                        "pickled model from torch.save cannot be loaded without its Python class)")
    _size_pair(kwargs.get("size"), what)
    _channel_stats(kwargs.get("mean"), what, "mean")
    _channel_stats(kwargs.get("std"), what, "std")
    if kwargs.get("activation", "none") not in ACTIVATIONS:
        raise SpecError(f"{what}: activation must be one of {list(ACTIVATIONS)}, got {kwargs['activation']!r}")
    channel = kwargs.get("channel", 0)
    if isinstance(channel, bool) or not isinstance(channel, int):
        raise SpecError(f"{what}: channel must be an integer, got {channel!r}")


def _is_torchscript_archive(path: str) -> bool:
    """torch.jit.save writes a zip with a code/ folder; torch.save's zip (state dicts, pickled models) has none."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in n or n.startswith("code/") for n in archive.namelist())


def _bind(cls, args, kwargs, what):
    try:
        inspect.signature(cls).bind(*args, **kwargs)
    except TypeError as e:
        known = [p for p in inspect.signature(cls).parameters if p != "path"]
        raise SpecError(f"{what} does not accept kwargs {sorted(kwargs)} ({e}); it takes {known}") from None


def torchscript_heatmap(path: str, **kwargs) -> TorchScriptHeatmap:
    return TorchScriptHeatmap(path, **kwargs)


# ------------------------------------------------------------------------------------------ boxes
ONNX_EXPECTED = "an ONNX model file (.onnx) of a box detector"
ORT_HINT = "boxes:PATH.onnx needs onnxruntime: pip install focus-n-fix[boxes]"


class BoxDetectorHeatmap:
    """``boxes:PATH.onnx``: an ONNX box detector run with onnxruntime, one image at a time; the kept boxes are
    filled with 1 (``fill="score"``: with their score, the max where boxes overlap) on a (B, H, W) map.

    Input: the images resized to ``size`` (int or [h, w]; default as they are), times ``scale`` (255 for
    0..255 models), minus ``mean``, over ``std``, as float32 NCHW (``layout="NHWC"`` for channels-last), fed to
    ``input_name`` (default: the model's first input). Outputs: ``outputs`` names {boxes, scores, labels}
    (a dict, or a list in that order; default: outputs called boxes/scores/labels, else the first three in
    order). boxes (N, 4) or (1, N, 4) in ``box_format`` (xyxy, xywh, cxcywh), in pixels of the model input or
    ``normalized`` to [0, 1]; scores (N,) or per-class (N, K) (then labels = argmax); labels (N,). Boxes with
    score >= ``score_threshold`` and label in ``classes`` (default: all) are kept."""

    def __init__(self, path: str, classes=None, score_threshold: float = 0.5, outputs=None,
                 box_format: str = "xyxy", normalized: bool = False, size=None, mean=None, std=None,
                 scale: float = 1.0, layout: str = "NCHW", input_name: str | None = None, fill: str = "one",
                 providers=None):
        check_boxes(path, classes=classes, score_threshold=score_threshold, outputs=outputs, box_format=box_format,
                    normalized=normalized, size=size, mean=mean, std=std, scale=scale, layout=layout,
                    input_name=input_name, fill=fill, providers=providers, need_runtime=False)
        ort = _import_onnxruntime()
        self.path = path
        try:
            self.session = ort.InferenceSession(path, providers=list(providers or ["CPUExecutionProvider"]))
        except Exception as e:  # noqa: BLE001  (onnxruntime raises its own InvalidProtobuf / Fail ...)
            raise SpecError(f"boxes: cannot load {path!r} with onnxruntime (expected {ONNX_EXPECTED}): "
                            f"{type(e).__name__}: {e}") from e
        self.input_name = input_name or self.session.get_inputs()[0].name
        names = [i.name for i in self.session.get_inputs()]
        if self.input_name not in names:
            raise SpecError(f"boxes: {path!r} has no input {self.input_name!r}; its inputs are {names}")
        self.output_names = self._resolve_outputs(outputs)
        self.classes = None if classes is None else {int(c) for c in classes}
        self.score_threshold, self.box_format, self.normalized = float(score_threshold), box_format, bool(normalized)
        self.size = _size_pair(size, "boxes")
        self.mean, self.std = _channel_stats(mean, "boxes", "mean"), _channel_stats(std, "boxes", "std")
        self.scale, self.layout, self.fill = float(scale), layout, fill

    def _resolve_outputs(self, outputs) -> dict:
        available = [o.name for o in self.session.get_outputs()]
        roles = ("boxes", "scores", "labels")
        if outputs is None:
            if "boxes" in available:
                chosen = {r: r for r in roles if r in available}
            else:
                chosen = dict(zip(roles, available))
        elif isinstance(outputs, dict):
            chosen = dict(outputs)
        else:
            chosen = dict(zip(roles, outputs))
        missing = [n for n in chosen.values() if n not in available]
        if "boxes" not in chosen or missing:
            raise SpecError(f"boxes: outputs {chosen} do not match {self.path!r}'s outputs {available} "
                            "(set localize.kwargs outputs: {boxes: NAME, scores: NAME, labels: NAME})")
        return chosen

    def __call__(self, images: torch.Tensor, prompts=None) -> torch.Tensor:
        b, _, height, width = images.shape
        heat = torch.zeros(b, height, width)
        x = _model_input(images.cpu(), self.size, self.mean, self.std, self.scale)
        in_h, in_w = x.shape[-2:]
        if self.layout == "NHWC":
            x = x.permute(0, 2, 3, 1)
        roles = list(self.output_names)
        for i in range(b):
            values = self.session.run([self.output_names[r] for r in roles],
                                      {self.input_name: x[i:i + 1].contiguous().numpy()})
            got = {r: torch.as_tensor(v).float() for r, v in zip(roles, values)}
            boxes, scores, labels = self._parse(got)
            keep = scores >= self.score_threshold
            if self.classes is not None:
                keep &= torch.tensor([int(c) in self.classes for c in labels.tolist()], dtype=torch.bool)
            sx, sy = (width, height) if self.normalized else (width / in_w, height / in_h)
            for (x0, y0, x1, y1), s in zip(boxes[keep].tolist(), scores[keep].tolist()):
                c0, c1 = max(0, int(round(x0 * sx))), min(width, int(round(x1 * sx)))
                r0, r1 = max(0, int(round(y0 * sy))), min(height, int(round(y1 * sy)))
                if c1 > c0 and r1 > r0:
                    value = s if self.fill == "score" else 1.0
                    heat[i, r0:r1, c0:c1] = heat[i, r0:r1, c0:c1].clamp_min(value)
        return heat.to(images.device)

    def _parse(self, got: dict):
        """One image's raw outputs -> boxes (N, 4) xyxy, scores (N,), labels (N,)."""
        boxes = got["boxes"]
        if boxes.dim() == 3 and boxes.shape[0] == 1:
            boxes = boxes[0]
        if boxes.dim() != 2 or boxes.shape[-1] != 4:
            raise SpecError(f"boxes: {self.path!r} output {self.output_names['boxes']!r} has shape "
                            f"{tuple(got['boxes'].shape)}; expected (N, 4) or (1, N, 4)")
        n = boxes.shape[0]
        scores = got.get("scores", torch.ones(n))
        labels = got.get("labels")
        if scores.dim() >= 2 and scores.shape[0] == 1 and scores.shape[1] == n:
            scores = scores[0]
        if scores.dim() == 2 and labels is None:
            scores, labels = scores.max(dim=1)
        scores = scores.reshape(-1)
        labels = torch.zeros(n) if labels is None else labels.reshape(-1)
        if scores.shape[0] != n or labels.shape[0] != n:
            raise SpecError(f"boxes: {self.path!r} gave {n} boxes but {scores.shape[0]} scores and "
                            f"{labels.shape[0]} labels")
        if self.box_format == "xywh":
            boxes = torch.cat([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], dim=1)
        elif self.box_format == "cxcywh":
            boxes = torch.cat([boxes[:, :2] - boxes[:, 2:] / 2, boxes[:, :2] + boxes[:, 2:] / 2], dim=1)
        return boxes, scores, labels.round().long()


def _import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as e:
        raise ImportError(ORT_HINT) from e
    return onnxruntime


def _have_onnxruntime() -> bool:
    try:
        return importlib.util.find_spec("onnxruntime") is not None
    except ValueError:   # in sys.modules as None (blocked)
        return False


def check_boxes(path: str, need_runtime: bool = True, **kwargs) -> None:
    """Cheap preflight of ``boxes:PATH.onnx``: the file exists, the kwargs are known and well-typed, and
    (``need_runtime``) onnxruntime is installed; nothing is loaded."""
    what = "boxes"
    _bind(BoxDetectorHeatmap, (path,), kwargs, what)
    _existing_file(path, what, ONNX_EXPECTED)
    if need_runtime and not _have_onnxruntime():
        raise SpecError(ORT_HINT)
    classes = kwargs.get("classes")
    if classes is not None and (not isinstance(classes, (list, tuple))
                                or not all(isinstance(c, int) and not isinstance(c, bool) for c in classes)):
        raise SpecError(f"{what}: classes must be a list of integer labels, got {classes!r}")
    thr = kwargs.get("score_threshold", 0.5)
    if isinstance(thr, bool) or not isinstance(thr, (int, float)):
        raise SpecError(f"{what}: score_threshold must be a number, got {thr!r}")
    outputs = kwargs.get("outputs")
    if outputs is not None:
        names = list(outputs.values()) if isinstance(outputs, dict) else outputs
        if (not isinstance(outputs, (dict, list, tuple)) or not all(isinstance(n, str) for n in names)
                or (isinstance(outputs, dict) and not set(outputs) <= {"boxes", "scores", "labels"})):
            raise SpecError(f"{what}: outputs must be a dict with keys boxes/scores/labels or a list of output "
                            f"names in that order, got {outputs!r}")
    for key, allowed in (("box_format", BOX_FORMATS), ("layout", ("NCHW", "NHWC")), ("fill", ("one", "score"))):
        if key in kwargs and kwargs[key] not in allowed:
            raise SpecError(f"{what}: {key} must be one of {list(allowed)}, got {kwargs[key]!r}")
    _size_pair(kwargs.get("size"), what)
    _channel_stats(kwargs.get("mean"), what, "mean")
    _channel_stats(kwargs.get("std"), what, "std")
