"""fnf.sepen.evaluate: success counting with a stand-in attribute classifier."""
import pytest
import torch

from fnf.sepen.evaluate import compare, success, success_rate


def test_success_rules():
    assert success({("circle", "red"), ("square", "blue")}, [("circle", "red"), ("square", "blue")])
    assert not success({("circle", "red"), ("square", "red")}, [("circle", "red"), ("square", "blue")])
    assert success({("circle", "green")}, [("circle", None)])


def test_success_rate_batches_and_compare():
    images = torch.zeros(5, 3, 4, 4)
    images[:3, 0] = 1.0  # "red" images contain both objects
    both, one = {("circle", "red"), ("square", "red")}, {("circle", "red")}
    classify = lambda x: [both if img[0].mean() > 0.5 else one for img in x]  # noqa: E731
    wanted = [[("circle", "red"), ("square", "red")]] * 5
    r = success_rate(images, wanted, classify, batch_size=2)
    assert r["success_rate"] == 0.6 and r["per_prompt"] == [True] * 3 + [False] * 2
    summary = compare({"success_rate": 0.2}, r, {"success_rate": 1.0}, {"success_rate": 0.9})
    assert summary["gain"] == pytest.approx(0.4) and summary["single_change"] == pytest.approx(-0.1)
    with pytest.raises(ValueError, match="5 images but 4"):
        success_rate(images, wanted[:4], classify)
