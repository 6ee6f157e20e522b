"""fnf.toy.judges (defect judges the reward never sees) and fnf.toy.draw.outline."""
import numpy as np
import pytest
import torch

from fnf.toy import data as toydata
from fnf.toy.draw import outline
from fnf.toy.judges import DARK_MIN_PIXELS, best_threshold, dark_counts, pixel_judge


def test_dark_counts_counts_pixels_whose_brightest_channel_is_below_dark():
    img = torch.full((2, 3, 8, 8), 0.8)
    img[0, :, 1, 1:4] = 0.05                              # 3 dark pixels
    img[0, 0, 5, 5] = 0.0                                 # one dark channel of three: not dark
    img[1, :, 2, 2] = toydata.DARK + 1e-3                 # just above the bound: not dark
    img[1, :, 3, 3] = toydata.DARK - 1e-3                 # just below: dark
    assert dark_counts(img).tolist() == [3, 1]


def test_pixel_judge_reproduces_the_ground_truth_labels_on_rendered_images():
    """Rendered (not generated) images: the rule must find every scratch and nothing else."""
    seed = 31
    print(f"data seed {seed}")
    ds = toydata.make_dataset(96, seed)
    labels = torch.from_numpy(ds["defect"])
    assert 0 < int(labels.sum()) < 96
    counts = dark_counts(toydata.to_tensor(ds["images"]))
    assert int(counts[~labels].max()) == 0
    assert int(counts[labels].min()) >= DARK_MIN_PIXELS
    assert torch.equal(pixel_judge(toydata.to_tensor(ds["images"])), labels)


def test_best_threshold_picks_the_smallest_count_with_the_best_balanced_accuracy():
    counts = np.array([0, 0, 1, 3, 5, 9, 12, 2])
    labels = np.array([0, 0, 0, 1, 1, 1, 1, 0], bool)
    best = best_threshold(counts, labels)
    assert best["threshold"] == 3 and best["balanced_accuracy"] == 1.0        # t = 3 separates; 4, 5 miss "3"
    best = best_threshold(np.array([0, 4, 4, 6]), np.array([0, 0, 1, 1], bool))
    assert best["threshold"] == 1 and best["balanced_accuracy"] == 0.75        # ties with t = 5: the smallest wins
    assert best["recall"] == 1.0 and best["false_positive_rate"] == 0.5
    with pytest.raises(ValueError, match="both classes"):
        best_threshold(np.array([1, 2]), np.array([1, 1], bool))


def test_outline_draws_a_ring_just_outside_the_mask_and_keeps_the_region():
    img = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(1, 8, 8, dtype=torch.bool)
    mask[0, 3:5, 3:5] = True
    out = outline(img, mask, color=(0.0, 1.0, 0.0), scale=1)
    ring = torch.zeros(8, 8, dtype=torch.bool)
    ring[2:6, 2:6] = True
    ring[3:5, 3:5] = False                                  # the 4x4 square minus the 2x2 region: 12 pixels
    assert torch.equal(out[0, :, ring], torch.tensor([0.0, 1.0, 0.0])[:, None].expand(3, 12))
    assert torch.equal(out[0, :, ~ring], img[0, :, ~ring])  # inside and far outside unchanged
    big = outline(img, mask, scale=4)
    assert big.shape == (1, 3, 32, 32)
    assert torch.equal(big[0, :, 12:20, 12:20], img[0, :, 3:5, 3:5].repeat_interleave(4, 1).repeat_interleave(4, 2))
    with pytest.raises(ValueError, match="masks"):
        outline(img, mask[:, :4], scale=1)
    with pytest.raises(ValueError, match="images"):
        outline(img[:, :1], mask, scale=1)
