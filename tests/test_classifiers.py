"""fnf.classifiers: torchvision-format ResNets from local state dicts, exported networks, clear errors."""
import pytest
import torch
from safetensors.torch import save_file

from fnf.classifiers import ResNet, exported, resnet
from fnf.rewards import SpecError


def test_resnet_round_trips_state_dicts_in_both_formats(tmp_path):
    torch.manual_seed(0)
    net = ResNet("resnet18", 3, width=8).eval()
    x = torch.rand(2, 3, 64, 64)
    st, pt = str(tmp_path / "w.safetensors"), str(tmp_path / "w.pt")
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, st)
    torch.save({"state_dict": {"module." + k: v for k, v in net.state_dict().items()}}, pt)  # DataParallel-style
    for path in (st, pt):
        loaded = resnet("resnet18", 3, checkpoint=path, width=8)
        torch.testing.assert_close(loaded(x), net(x), rtol=0, atol=0)
    # torchvision's parameter names (what a torchvision checkpoint holds)
    names = set(ResNet("resnet50", 2).state_dict())
    assert {"conv1.weight", "bn1.running_mean", "layer1.0.conv3.weight", "layer1.0.downsample.1.weight",
            "layer4.2.bn3.bias", "fc.weight", "fc.bias"} <= names
    assert len([n for n in names if not n.endswith("num_batches_tracked")]) == 267


def test_resnet_errors_name_the_problem(tmp_path):
    with pytest.raises(SpecError, match="needs checkpoint"):
        resnet("resnet50")
    with pytest.raises(SpecError, match="arch must be one of"):
        resnet("resnet7", random_init=True)
    with pytest.raises(SpecError, match="does not exist"):
        resnet(checkpoint=str(tmp_path / "missing.safetensors"))
    path = str(tmp_path / "r18.safetensors")
    save_file({k: v.contiguous() for k, v in ResNet("resnet18", 2, width=8).state_dict().items()}, path)
    with pytest.raises(SpecError, match="does not fit resnet50"):
        resnet("resnet50", 2, checkpoint=path)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(SpecError, match="could not be read"):
        resnet(checkpoint=str(bad))


def test_exported_networks_take_images_only(tmp_path):
    class Net(torch.nn.Module):
        def forward(self, images):
            return images.mean(dim=1)

    path = str(tmp_path / "net.pt")
    torch.jit.save(torch.jit.script(Net()), path)
    net = exported(path)
    x = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(net(x, ["a", "b"]), x.mean(dim=1))
    with pytest.raises(SpecError, match="does not exist"):
        exported(str(tmp_path / "nope.pt2"))
