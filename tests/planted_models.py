"""Hand-set networks with a known answer, loaded by spec in the config tests (no training, same on every CPU)."""
import torch


class PlantedUnsafe(torch.nn.Module):
    """A 2-class "safety classifier": logit 1 (unsafe) is the mean magenta response of ``layer4``, a 1x1 conv +
    ReLU on ImageNet-normalised pixels; logit 0 is constant. Grad-CAM of the unsafe logit is the magenta patch."""

    def __init__(self):
        super().__init__()
        conv = torch.nn.Conv2d(3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225])
        mean = torch.tensor([0.485, 0.456, 0.406])
        w = torch.tensor([1.0, -2.0, 1.0])            # R + B - 2 G on raw pixels ...
        with torch.no_grad():
            conv.weight.copy_((w * std).view(1, 3, 1, 1))  # ... undone from the normalisation
            conv.bias.copy_((w * mean).sum() - 1.0)        # fires only where R + B - 2 G > 1 (magenta)
        self.layer4 = torch.nn.Sequential(conv, torch.nn.ReLU())

    def forward(self, x):
        unsafe = self.layer4(x).mean(dim=(1, 2, 3))
        return torch.stack([torch.zeros_like(unsafe), unsafe], dim=1)


def planted_unsafe():
    return PlantedUnsafe()


class BlueHeatmap(torch.nn.Module):
    """An "artifact heatmap model" for export tests: per-pixel blueness (B, H, W)."""

    def forward(self, images):
        return images[:, 2] - 0.5 * (images[:, 0] + images[:, 1])
