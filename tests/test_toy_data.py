"""The toy world's procedural data and tokenizer."""
import numpy as np

from fnf.toy import data
from fnf.toy.tokenizer import toy_tokenizer


def test_deterministic_from_seed():
    a, b = data.make_dataset(20, seed=3), data.make_dataset(20, seed=3)
    assert np.array_equal(a["images"], b["images"]) and np.array_equal(a["masks"], b["masks"])
    assert a["captions"] == b["captions"]
    c = data.make_dataset(20, seed=4)
    assert not np.array_equal(a["images"], c["images"])
    assert a["images"].shape == (20, 64, 64, 3) and a["images"].dtype == np.float32
    assert 0 <= a["images"].min() and a["images"].max() <= 1


def test_defect_rate_about_30_percent():
    d = data.make_dataset(600, seed=11)
    assert 0.24 <= d["defect"].mean() <= 0.36
    assert np.array_equal(d["defect"], d["masks"].any(axis=(1, 2)))


def test_masks_match_the_drawn_scratch():
    n = 0
    for i in range(200):
        s = data.render(5, i)
        dark = s["image"].max(axis=-1) < data.DARK
        if not s["defect"]:
            assert not dark.any() and not s["mask"].any()                  # nothing else in the world is dark
            continue
        n += 1
        assert dark.sum() >= 15 and (dark <= s["mask"]).all()             # every dark pixel is masked ...
        assert np.array_equal(data.dilate(dark, 1), s["mask"])            # ... and the mask is the scratch + 1 px
        assert s["mask"].sum() <= 400                                      # local: at most ~10% of the image
        ys, xs = np.nonzero(dark)
        assert max(ys.max() - ys.min(), xs.max() - xs.min()) >= 8          # a stroke, not a dot
        # near an object: some object pixel within 8 px of the scratch
        obj = np.zeros((64, 64), bool)
        for shape, colour in s["objects"]:
            obj |= np.all(np.abs(s["image"] - np.float32(data.COLOURS[colour])) < 0.2, axis=-1)
        assert (data.dilate(s["mask"], 8) & obj).any()
        # not a tint over the object: most of the scratch lies off the objects
        assert (s["mask"] & obj).sum() < 0.5 * s["mask"].sum()
    assert n >= 40
    assert data.dark_pixels(data.make_dataset(50, seed=5)["images"]).shape == (50,)


def test_captions_match_labels_and_pixels():
    d = data.make_dataset(100, seed=2)
    for img, cap, attrs in zip(d["images"], d["captions"], d["attrs"]):
        objs = data.parse_caption(cap)
        assert data.caption_for(objs) == cap
        assert np.array_equal(attrs, data.attrs_for(objs)) and 1 <= attrs.sum() <= 2
        for shape, colour in objs:  # every named colour is drawn (a good number of pixels)
            close = np.all(np.abs(img - np.float32(data.COLOURS[colour])) < 0.12, axis=-1)
            assert close.sum() >= 40


def test_heldout_prompts_never_in_training():
    held, train = set(data.heldout_prompts()), set(data.train_prompts())
    assert held and not held & train
    assert not set(data.make_dataset(300, seed=0)["captions"]) & held


def test_tokenizer_one_token_per_word():
    tok = toy_tokenizer()
    for w in data.WORDS:
        assert len(tok.tokenize(w)) == 1, w
    for cap in data.train_prompts() + data.heldout_prompts():
        ids = tok(cap).input_ids
        assert len(ids) == len(cap.split()) + 2 <= tok.model_max_length
        assert tok.decode(ids, skip_special_tokens=True).strip() == cap
