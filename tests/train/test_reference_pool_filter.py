"""train.pool_reward_below: the reference pool keeps only the entries whose I0 scores a reward below the bound."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fnf_tiny_models import cached_model, one_torch_thread, tiny_config  # noqa: E402,F401


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return cached_model("sd", str(tmp_path_factory.getbasetemp()))


def test_pool_reward_below_keeps_the_low_reward_entries_with_their_own_seeds(sd, tmp_path):
    from fnf.train import trainer as train_mod
    from fnf.rewards import build_reward, score

    extra = dict(localize={"spec": "saliency"}, train={"seeds_per_prompt": 4, "batch_size": 3})
    full = train_mod.Session(tiny_config(sd, str(tmp_path / "all"), **extra)).objective.pool
    assert full.size == 8 and full.reward0 is None
    reward = build_reward("brightness")
    scores = score(reward, full.ref, ["x"] * full.size)
    below = float(scores.median())                     # about half the entries lie below the median
    want = (scores < below).nonzero()[:, 0]
    print(f"pool rewards {scores.tolist()}, bound {below}")
    cfg = tiny_config(sd, str(tmp_path / "low"), **extra)
    cfg.train.pool_reward_below = below
    low = train_mod.Session(cfg).objective.pool
    assert 0 < low.size == len(want) < full.size
    assert low.entry.tolist() == want.tolist()         # the kept entries keep their noise seeds and prompts
    assert low.prompt_index.tolist() == full.prompt_index[want].tolist()
    torch.testing.assert_close(low.ref, full.ref[want], rtol=0, atol=1e-6)
    torch.testing.assert_close(low.mask, full.mask[want], rtol=0, atol=0)
    assert bool((low.reward0 < below).all())
    k = torch.tensor([0, len(want) - 1])               # pool index k draws the latent of entry want[k]
    torch.testing.assert_close(low.latents(k, "cpu"), full.latents(want[k], "cpu"), rtol=0, atol=0)


def test_pool_reward_below_with_no_entry_below_is_refused(sd, tmp_path):
    from fnf.train import trainer as train_mod

    cfg = tiny_config(sd, str(tmp_path / "none"), localize={"spec": "saliency"},
                      train={"seeds_per_prompt": 1, "batch_size": 2})
    cfg.train.pool_reward_below = -1e9                 # brightness is never below this
    with pytest.raises(ValueError, match="pool_reward_below"):
        train_mod.Session(cfg)
