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


def test_toy_attribute_classifier_counts_rendered_images():
    """On rendered toy images (ground truth) the toy success counter finds the caption's objects, and a wrong
    caption fails: the demo's success rate measures the images, not the prompts."""
    from fnf.toy import data as toydata
    from fnf.toy.sepen_demo import found_pairs, successes

    prompts = toydata.heldout_prompts()[:12]
    items = [toydata.render(7, i, [p], defect=False) for i, p in enumerate(prompts)]
    images = toydata.to_tensor(__import__("numpy").stack([it["image"] for it in items]))
    ok = successes(images, prompts)
    assert ok.float().mean() >= 0.9
    assert all(set(it["objects"]) <= f or not o for it, f, o in zip(items, found_pairs(images), ok))
    shifted = prompts[1:] + prompts[:1]
    assert successes(images, shifted).float().mean() <= 0.2
