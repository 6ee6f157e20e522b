"""fnf.toy.sepen_demo: the statistics of the loss-gap diagnosis and the evaluation, and run_sepen's bookkeeping."""
import json
import os

import numpy as np
import pytest
import torch

from fnf.toy import ASSETS
from fnf.toy import data as toydata
from fnf.toy import sepen_demo

SD = os.path.join(ASSETS, "sd")
HAS_TOY = os.path.isfile(os.path.join(SD, "model_index.json")) and os.path.isfile(
    os.path.join(ASSETS, "attribute_classifier", "model.safetensors"))


def _auroc_loops(scores, positive):
    pos = [s for s, p in zip(scores, positive) if p]
    neg = [s for s, p in zip(scores, positive) if not p]
    total = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in pos for b in neg)
    return total / (len(pos) * len(neg))


def test_auroc_matches_counting_pairs():
    seed = 11
    print("seed", seed)
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 5, size=40).astype(float)       # many ties
    positive = rng.random(40) < 0.4
    assert sepen_demo.auroc(scores, positive) == pytest.approx(_auroc_loops(scores, positive), abs=1e-12)
    assert sepen_demo.auroc([1, 2, 3, 4], [False, False, True, True]) == 1.0
    assert sepen_demo.auroc([1, 2, 3, 4], [True, True, False, False]) == 0.0
    assert np.isnan(sepen_demo.auroc([1, 2], [True, True]))
    with pytest.raises(ValueError, match="same length"):
        sepen_demo.auroc([1, 2, 3], [True, False])


def test_group_gap_intervals_match_an_independent_bootstrap():
    """Means, the failure - success difference and the AUROC, each with its interval, against a direct numpy
    computation: each group resampled within itself (success: seed, failure: seed + 1), percentiles 2.5 / 97.5."""
    seed, resamples = 3, 200
    print("seed", seed)
    rng = np.random.default_rng(seed)
    values = rng.normal(size=23)
    failed = rng.random(23) < 0.4
    values[failed] += 0.7
    got = sepen_demo.group_gap(values, failed, resamples=resamples, seed=5)
    ok_v, bad_v = values[~failed], values[failed]
    i_ok = np.random.default_rng(5).integers(0, ok_v.size, size=(resamples, ok_v.size))
    i_bad = np.random.default_rng(6).integers(0, bad_v.size, size=(resamples, bad_v.size))
    diffs = [bad_v[b].mean() - ok_v[a].mean() for a, b in zip(i_ok, i_bad)]
    aucs = [_auroc_loops(np.r_[bad_v[b], ok_v[a]], np.r_[np.ones(b.size, bool), np.zeros(a.size, bool)])
            for a, b in zip(i_ok, i_bad)]
    assert got["difference"]["mean"] == pytest.approx(bad_v.mean() - ok_v.mean(), abs=1e-12)
    assert [got["difference"]["ci_low"], got["difference"]["ci_high"]] == pytest.approx(
        np.percentile(diffs, [2.5, 97.5]), abs=1e-12)
    assert got["auroc"]["value"] == pytest.approx(_auroc_loops(values, failed), abs=1e-12)
    assert [got["auroc"]["ci_low"], got["auroc"]["ci_high"]] == pytest.approx(np.percentile(aucs, [2.5, 97.5]),
                                                                              abs=1e-12)
    ok_means = ok_v[np.random.default_rng(5).integers(0, ok_v.size, size=(resamples, ok_v.size))].mean(1)
    assert got["success"]["mean"] == pytest.approx(ok_v.mean()) and got["success"]["n"] == ok_v.size
    assert [got["success"]["ci_low"], got["success"]["ci_high"]] == pytest.approx(
        np.percentile(ok_means, [2.5, 97.5]), abs=1e-12)
    assert got["failure"]["n"] == bad_v.size


def test_group_gap_with_one_empty_group_is_nan():
    got = sepen_demo.group_gap([0.1, 0.2, 0.3], [False, False, False])
    assert got["success"]["n"] == 3 and got["failure"]["n"] == 0
    assert np.isnan(got["difference"]["mean"]) and np.isnan(got["auroc"]["value"])


def _marked(ok):
    """Images whose top-left red pixel says whether the stand-in classifier finds every pair."""
    images = torch.zeros(len(ok), 3, 4, 4)
    images[:, 0, 0, 0] = torch.tensor(ok, dtype=torch.float32)
    return images


def _found(images):
    return [set(toydata.PAIRS) if img[0, 0, 0] > 0.5 else set() for img in images]


def test_evaluate_counts_fixed_broken_and_paired_intervals():
    seed = 7
    print("seed", seed)
    rng = np.random.default_rng(seed)
    prompts = toydata.heldout_prompts()[:15] + [toydata.caption_for([p]) for p in toydata.PAIRS[:6]]
    b_ok, t_ok = rng.random(21) < 0.5, rng.random(21) < 0.6
    base, tuned = _marked(b_ok), _marked(t_ok)
    tuned[:, 1] += 0.1 * torch.arange(21, dtype=torch.float32)[:, None, None]    # known per-image change
    r = sepen_demo.evaluate(base, tuned, prompts, found=_found)
    two, one = slice(0, 15), slice(15, 21)
    assert r["n_two_object"] == 15 and r["n_single_object"] == 6
    assert r["fixed"] == int((~b_ok[two] & t_ok[two]).sum()) and r["broken"] == int((b_ok[two] & ~t_ok[two]).sum())
    assert r["single_fixed"] == int((~b_ok[one] & t_ok[one]).sum())
    assert r["single_broken"] == int((b_ok[one] & ~t_ok[one]).sum())
    assert r["base"] == pytest.approx(b_ok[two].mean()) and r["gain"] == pytest.approx(t_ok[two].mean()
                                                                                       - b_ok[two].mean())
    diff = t_ok[two].astype(float) - b_ok[two].astype(float)
    idx = np.random.default_rng(0).integers(0, 15, size=(1000, 15))   # fnf.metrics' draws: B = 1000, seed 0
    gain = r["intervals"]["gain"]
    assert [gain["ci_low"], gain["ci_high"]] == pytest.approx(np.percentile(diff[idx].mean(1), [2.5, 97.5]))
    change = (tuned.double() - base.double()).pow(2).mean((1, 2, 3)).numpy()
    assert r["single_change_mse"] == pytest.approx(change[15:].mean())
    assert r["intervals"]["two_object_change_mse"]["mean"] == pytest.approx(change[:15].mean())
    with pytest.raises(ValueError, match="expected 21 images"):
        sepen_demo.evaluate(base[:20], tuned[:20], prompts, found=_found)


@pytest.fixture(scope="module")
def toy_model():
    if not HAS_TOY:
        pytest.skip("toy assets not trained yet")
    from fnf.families.registry import load_model

    torch.set_num_threads(1)
    return load_model(SD)


def test_capturing_unet_maps_the_conditional_rows_in_one_call(toy_model):
    """One UNet call on [cond; uncond] (the CFG batch reordered) gives the same output as the plain call and the
    same losses as capturing the conditional rows on their own."""
    import fnf_kernels

    from fnf.encoding import encode_prompts
    from fnf.sepen.capture import capture, install_capture, remove_capture
    from fnf.sepen.tokens import token_weights, word_positions

    m, seed = toy_model, 2
    print("seed", seed)
    prompts = toydata.heldout_prompts()[:3]
    tok = m.tokenizers[0]
    weights = token_weights([word_positions(tok, p, [f"{c} {s}" for s, c in toydata.parse_caption(p)])
                             for p in prompts], tok.model_max_length)
    cond = encode_prompts(m, prompts, height=64, width=64).hidden
    uncond = encode_prompts(m, [""] * 3, height=64, width=64).hidden
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 4, 16, 16, generator=g)
    t = torch.tensor(500)
    install_capture(m.denoiser)
    try:
        with torch.no_grad():
            plain = m.denoiser(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond, cond]),
                           return_dict=False)[0]
            wrapped = sepen_demo._CapturingUNet(m.denoiser, weights, (16, 16), 4)
            out = wrapped(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond, cond]),
                          return_dict=False)[0]
            with capture(m.denoiser, weights, (16, 16), 4) as store:
                m.denoiser(x, t, encoder_hidden_states=cond, return_dict=False)
            sep, en = fnf_kernels.separate_enhance_losses(store.maps().float())
    finally:
        remove_capture(m.denoiser)
    torch.testing.assert_close(out, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(wrapped.separate[0], sep, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(wrapped.enhance[0], en, atol=1e-6, rtol=1e-5)


def test_run_sepen_quick_bookkeeping(toy_model, tmp_path):
    """A 1-step run on 4 images: the counts agree with successes counted here on the returned images, the loss
    gap covers every two-object image, the capture check passes and the result (less _tuned) is JSON."""
    from fnf.toy.evaluate_sd import sample

    prompts = toydata.heldout_prompts()[:3] + [toydata.caption_for([toydata.PAIRS[0]])]
    seeds = [10_500 + k for k in range(4)]
    kw = {"steps": 4, "guidance": 1.5}
    base = sample(toy_model, prompts, seeds, **kw)
    checks = {}
    res = sepen_demo.run_sepen(SD, str(tmp_path / "sepen"), prompts, seeds, base, kw, 1, 1, checks, quick=True)
    tuned = res.pop("_tuned")
    assert tuned.shape == base.shape
    ok_b, ok_t = sepen_demo.successes(base[:3], prompts[:3]), sepen_demo.successes(tuned[:3], prompts[:3])
    assert res["fixed"] == int((~ok_b & ok_t).sum()) and res["broken"] == int((ok_b & ~ok_t).sum())
    assert res["base"] == pytest.approx(ok_b.float().mean().item())
    g = res["loss_gap"]
    assert g["n_success"] == int(ok_b.sum()) and g["n_success"] + g["n_failure"] == 3
    assert g["separate"]["success"]["n"] + g["separate"]["failure"]["n"] == 3
    assert all(c["ok"] for c in checks.values()) and len(checks) == 1
    assert {"base", "sepen", "gain", "single_base", "single_sepen", "single_change", "loss_gap", "intervals",
            "fixed", "broken", "n_two_object", "n_single_object"} <= set(res)
    json.dumps(res)
    lines = sepen_demo.sepen_report(res)
    assert any(line.startswith("| Separate |") for line in lines) and any("AUROC" in line for line in lines)
    with pytest.raises(ValueError, match="one seed and one base image per prompt"):
        sepen_demo.run_sepen(SD, str(tmp_path / "x"), prompts, seeds[:3], base, kw, 1, 1, {}, quick=True)
