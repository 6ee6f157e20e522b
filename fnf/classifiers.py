"""Image classifiers loaded from local files, for the ``classifier`` reward and Grad-CAM.

:func:`resnet` builds a ResNet-18/34/50/101 whose parameter names are torchvision's (``conv1``, ``bn1``,
``layer1.0.conv1``, ..., ``fc``), so a safety or artifact classifier fine-tuned with torchvision loads from its
state dict without torchvision installed. Grad-CAM's usual layer is ``classifier.layer4`` (the reward wraps the
network as ``classifier``).
"""
from __future__ import annotations

import os

import torch
from torch import nn

from .core import SpecError

ARCHS = {"resnet18": ("basic", (2, 2, 2, 2)), "resnet34": ("basic", (3, 4, 6, 3)),
         "resnet50": ("bottleneck", (3, 4, 6, 3)), "resnet101": ("bottleneck", (3, 4, 23, 3))}


class _Basic(nn.Module):
    expansion = 1

    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=False)
        self.downsample = _shortcut(cin, width, stride)

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + (x if self.downsample is None else self.downsample(x)))


class _Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        out = width * 4
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=False)
        self.downsample = _shortcut(cin, out, stride)

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + (x if self.downsample is None else self.downsample(x)))


def _shortcut(cin: int, cout: int, stride: int):
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class ResNet(nn.Module):
    """torchvision's ResNet layout (v1.5: stride in the 3x3 conv of a bottleneck)."""

    def __init__(self, arch: str = "resnet50", num_classes: int = 2, width: int = 64):
        super().__init__()
        kind, depths = ARCHS[arch]
        block = _Basic if kind == "basic" else _Bottleneck
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=False)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = width
        for i, depth in enumerate(depths):
            w = width * 2 ** i
            blocks = []
            for j in range(depth):
                blocks.append(block(cin, w, 2 if (j == 0 and i > 0) else 1))
                cin = w * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a torch file (``weights_only=True``; a ``state_dict`` / ``model``
    entry and DataParallel's ``module.`` prefix are unwrapped)."""
    if not os.path.isfile(path):
        raise SpecError(f"classifier checkpoint {path!r} does not exist (expected a .safetensors or .pt/.pth "
                        "state dict)")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - rewrapped with the path
        raise SpecError(f"classifier checkpoint {path!r} could not be read as a state dict: "
                        f"{type(e).__name__}: {e}") from e
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SpecError(f"classifier checkpoint {path!r} holds no tensor state dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


def resnet(arch: str = "resnet50", num_classes: int = 2, checkpoint: str = "", width: int = 64,
           random_init: bool = False) -> ResNet:
    """A torchvision-format ResNet classifier loaded from a local ``checkpoint`` (``random_init=True`` skips
    the weights: for tests only)."""
    if arch not in ARCHS:
        raise SpecError(f"resnet: arch must be one of {', '.join(ARCHS)}, got {arch!r}")
    if not checkpoint and not random_init:
        raise SpecError("resnet: needs checkpoint = the path of a local state dict (.safetensors or .pt)")
    net = ResNet(arch, int(num_classes), int(width))
    if checkpoint:
        state, own = read_state_dict(checkpoint), net.state_dict()
        missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
        unexpected = [k for k in state if k not in own]
        shapes = [f"{k} {tuple(state[k].shape)} (expected {tuple(own[k].shape)})" for k in own
                  if k in state and state[k].shape != own[k].shape]
        if missing or unexpected or shapes:
            raise SpecError(f"classifier checkpoint {checkpoint!r} does not fit {arch} with {num_classes} classes "
                            f"(width {width}): missing {missing[:3]}, unexpected {unexpected[:3]}, other shapes "
                            f"{shapes[:3]}")
        net.load_state_dict(state, strict=False)
    return net.eval()


def check_resnet(arch: str = "resnet50", num_classes: int = 2, checkpoint: str = "", width: int = 64,
                 random_init: bool = False) -> None:
    """The cheap part of :func:`resnet`'s checks (argument values, the file exists), for preflight."""
    if arch not in ARCHS:
        raise SpecError(f"resnet: arch must be one of {', '.join(ARCHS)}, got {arch!r}")
    if not checkpoint and not random_init:
        raise SpecError("resnet: needs checkpoint = the path of a local state dict (.safetensors or .pt)")
    if checkpoint and not os.path.isfile(checkpoint):
        raise SpecError(f"classifier checkpoint {checkpoint!r} does not exist (expected a .safetensors or .pt/.pth "
                        "state dict)")


resnet.check = check_resnet


def exported(path: str = "") -> nn.Module:
    """A network saved by the user with ``torch.export.save`` (``.pt2``) or ``torch.jit.save``, loaded without
    its Python code (e.g. an artifact heatmap model: images (B, 3, H, W) -> (B, H, W))."""
    check_exported(path)
    try:
        net = torch.export.load(path).module() if path.endswith(".pt2") else torch.jit.load(path, map_location="cpu")
    except Exception as e:  # noqa: BLE001 - rewrapped with the path
        raise SpecError(f"{path!r} could not be loaded as a torch.export (.pt2) or TorchScript file: "
                        f"{type(e).__name__}: {e}") from e
    return ImagesOnly(net)


class ImagesOnly(nn.Module):
    """Calls a loaded network with the images only (reward and heatmap callers also pass prompts); the
    network is ``self.net``, so Grad-CAM layer names start with ``net.``."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, images, prompts=None):
        return self.net(images)


def check_exported(path: str = "") -> None:
    if not path:
        raise SpecError("exported: needs path = a local torch.export (.pt2) or TorchScript (.pt) file")
    if not os.path.isfile(path):
        raise SpecError(f"exported: {path!r} does not exist (expected a torch.export .pt2 or TorchScript .pt file)")


exported.check = check_exported
