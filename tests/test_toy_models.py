"""The shipped small toy models: they load, run, beat chance on fresh held-out data, and plug into fnf's
reward / localizer specs."""
import os

import numpy as np
import pytest
import torch

from fnf.toy import ASSETS
from fnf.toy import data as toydata

NAMES = ("defect_classifier", "defect_heatmap", "attribute_classifier")
pytestmark = pytest.mark.skipif(not all(os.path.isfile(os.path.join(ASSETS, n, "model.safetensors")) for n in NAMES),
                                reason="toy small models not trained yet (python -m fnf.toy.train_small)")

FRESH_SEED = 31337   # neither the training (200) nor the shipped evaluation (999) seed


@pytest.fixture(scope="module")
def fresh():
    from fnf.toy.train_small import eval_prompts

    torch.set_num_threads(1)
    ds = toydata.make_dataset(240, FRESH_SEED, prompts=eval_prompts())
    return ds, toydata.to_tensor(ds["images"])


def test_defect_classifier_beats_chance(fresh):
    from fnf.toy.models_small import load

    ds, x = fresh
    pred = (load("defect_classifier")(x) > 0).numpy()
    acc = (pred == ds["defect"]).mean()
    majority = max(ds["defect"].mean(), 1 - ds["defect"].mean())
    assert acc >= 0.9 and acc > majority + 0.1, (acc, majority)


def test_heatmap_iou_on_defect_images(fresh):
    from fnf.toy.rewards import defect_heatmap

    ds, x = fresh
    heat = defect_heatmap()(x)
    assert heat.shape == (x.shape[0], 64, 64) and 0 <= heat.min() and heat.max() <= 1
    pred, m = (heat > 0.5).numpy(), ds["masks"]
    has = m.any(axis=(1, 2))
    iou = ((pred & m).sum((1, 2))[has] / (pred | m).sum((1, 2))[has]).mean()
    assert iou >= 0.5, iou


def test_attribute_classifier_beats_chance(fresh):
    from fnf.toy.rewards import alignment, attribute_probs

    ds, x = fresh
    probs = attribute_probs(x)
    assert probs.shape == (x.shape[0], toydata.N_ATTRS)
    exact = ((probs > 0.5).numpy() == (ds["attrs"] > 0.5)).all(1).mean()
    assert exact >= 0.6, exact
    al = alignment(x, ds["captions"])
    assert al["recall"].mean() >= 0.75
    # a wrong prompt scores lower than the right one
    wrong = [toydata.caption_for([(s, "blue" if c != "blue" else "red") for s, c in toydata.parse_caption(p)])
             for p in ds["captions"]]
    assert alignment(x, wrong)["recall"].mean() < al["recall"].mean() - 0.4


def test_reward_spec_and_gradients(fresh):
    from fnf.rewards import build_reward, prepare_reward, score

    ds, x = fresh
    reward = prepare_reward(build_reward("fnf.toy.rewards:defect_reward"), "cpu")
    xi = x[:16].clone().requires_grad_(True)
    r = score(reward, xi, ds["captions"][:16])
    assert r.shape == (16,) and (r <= 0).all()
    r.sum().backward()
    assert xi.grad is not None and xi.grad.abs().sum() > 0
    d = torch.from_numpy(ds["defect"][:16])
    if d.any() and (~d).any():
        assert r[d].mean() < r[~d].mean()


@pytest.mark.parametrize("spec", ["heatmap:fnf.toy.rewards:defect_heatmap", "heatmap:fnf.toy.rewards:defect_gradcam",
                                  "gradcam:classifier.features"])  # the last: explain=problem by default
def test_localizer_specs_find_the_patch(fresh, spec):
    from fnf.localize import build_localizer
    from fnf.rewards import build_reward

    ds, x = fresh
    idx = np.nonzero(ds["defect"])[0][:12]
    loc = build_localizer(spec, build_reward("fnf.toy.rewards:defect_reward"), threshold=0.5, radius=1)
    heat, mask = loc(x[idx], [ds["captions"][i] for i in idx])
    m = torch.from_numpy(ds["masks"][idx])
    mask = mask[:, 0] > 0.5 if mask.dim() == 4 else mask > 0.5
    hit = (mask & m).flatten(1).any(1).float().mean()          # the mask touches the true patch
    covered = (mask & m).sum() / m.sum()
    assert hit >= 0.75 and covered >= 0.3, (hit, covered)


def test_manifest_matches_and_fits():
    from fnf.toy import manifest

    if not os.path.isfile(os.path.join(ASSETS, manifest.NAME)):
        pytest.skip("no manifest yet (python -m fnf.toy.manifest)")
    assert manifest.check() == []
