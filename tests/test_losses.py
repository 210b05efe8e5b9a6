"""Median-frequency balancing and the segmentation loss."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from scse_seg.training.losses import (
    SegmentationLoss,
    class_weights,
    label_boundaries,
    median_frequency_present_weights,
    median_frequency_weights,
    soft_dice_loss,
)


def test_mfb_weights_by_hand():
    # f = [.9, .06, .03, .01]; median = (.06 + .03) / 2 = .045; alpha = .045 / f
    w = median_frequency_weights([900, 60, 30, 10])
    np.testing.assert_allclose(w, [0.05, 0.75, 1.5, 4.5], rtol=1e-12)
    assert w[0] > 0  # background never zero


def test_mfb_absent_class_is_explicit():
    with pytest.warns(UserWarning, match=r"\[2\]"):
        w = median_frequency_weights([80, 20, 0])
    # median over present classes only: median(.8, .2) = .5
    np.testing.assert_allclose(w, [0.625, 2.5, 0.0])


def test_two_weightings_by_hand_where_they_differ():
    """Two 2x2 label images: A = [0 0 / 0 1], B = [0 2 / 2 2] (voxel counts per class below).

    QuickNAT: f = voxels of c / all 8 voxels = [4/8, 1/8, 3/8]; median 3/8 -> [0.75, 3, 1].
    Eigen & Fergus: f = voxels of c / voxels of the images holding c = [4/8, 1/4, 3/4];
    median 1/2 -> [1, 2, 2/3]."""
    counts = np.array([[3, 1, 0], [1, 0, 3]])
    np.testing.assert_allclose(median_frequency_weights(counts), [0.75, 3.0, 1.0], rtol=1e-12)
    np.testing.assert_allclose(median_frequency_present_weights(counts), [1.0, 2.0, 2 / 3],
                               rtol=1e-12)
    np.testing.assert_allclose(class_weights(counts, "median_frequency"), [0.75, 3.0, 1.0])
    np.testing.assert_allclose(class_weights(counts, "median_frequency_present"), [1, 2, 2 / 3])
    assert class_weights(counts, "none") is None
    # a class in no image: weight 0, named in a warning; f = [7/8, 1/4], median 9/16
    with pytest.warns(UserWarning, match=r"\[2\]"):
        np.testing.assert_allclose(median_frequency_present_weights([[3, 1, 0], [4, 0, 0]]),
                                   [9 / 14, 9 / 4, 0.0], rtol=1e-12)


def test_mfb_rejects_empty():
    with pytest.raises(ValueError):
        median_frequency_weights([0, 0])


def test_boundaries():
    y = torch.zeros(1, 5, 5, dtype=torch.long)
    y[0, 2, 2] = 1
    b = label_boundaries(y)[0]
    assert b.sum() == 5 and b[2, 2] and b[1, 2] and b[2, 1] and not b[0, 0]


def test_loss_without_dice_is_weighted_ce():
    torch.manual_seed(0)
    logits, y = torch.randn(2, 3, 8, 8), torch.randint(0, 3, (2, 8, 8))
    w = torch.tensor([0.5, 1.0, 2.0])
    loss = SegmentationLoss(w, dice_weight=0.0)(logits, y)
    ce = F.cross_entropy(logits, y, reduction="none")
    torch.testing.assert_close(loss, (ce * w[y]).mean())
    plain = SegmentationLoss(None, dice_weight=0.0)(logits, y)
    torch.testing.assert_close(plain, F.cross_entropy(logits, y))


def test_loss_with_dice_by_hand_2x2():
    """Target [0 1 / 1 1]; logits give p(class 1) = 3/4 at every pixel (logit gap ln 3).

    weighted CE (w = [2, 1]), averaged over the 4 pixels: (2 ln 4 + 3 ln 4/3) / 4.
    soft Dice: class 0: 2 * 1/4 / (4 * 1/4 + 1) = 1/4; class 1: 2 * 9/4 / (4 * 3/4 + 3) = 3/4;
    loss 1 - (1/4 + 3/4) / 2 = 1/2."""
    y = torch.tensor([[[0, 1], [1, 1]]])
    logits = torch.zeros(1, 2, 2, 2)
    logits[:, 1] = math.log(3)
    ce = (2 * math.log(4) + 3 * math.log(4 / 3)) / 4
    loss = SegmentationLoss(torch.tensor([2.0, 1.0]), dice_weight=1.0)(logits, y)
    assert loss.item() == pytest.approx(ce + 0.5, abs=1e-5)
    loss = SegmentationLoss(torch.tensor([2.0, 1.0]), dice_weight=0.5)(logits, y)
    assert loss.item() == pytest.approx(ce + 0.25, abs=1e-5)


def test_soft_dice_ignores_classes_absent_from_batch_and_prediction():
    """A perfect prediction of a batch that lacks class 2 costs ~0 (it used to cost ~1/K)."""
    y = torch.zeros(2, 8, 8, dtype=torch.long)
    y[:, 2:5, 2:5] = 1
    perfect = F.one_hot(y, 3).movedim(-1, 1).float() * 10
    assert soft_dice_loss(perfect.softmax(1), y) < 1e-3
    assert SegmentationLoss(None, dice_weight=1.0)(perfect, y) < 2e-3
    # predicting the absent class somewhere is still penalised: its Dice is 0, scored
    wrong = perfect.clone()
    wrong[0, 2, 0, 0] = 30
    assert soft_dice_loss(wrong.softmax(1), y) > 0.3


def test_boundary_weight_by_hand():
    """A 3x3 square of class 1 in an 8x8 image: the boundary is its 8 rim pixels (not the centre)
    and the 12 background pixels sharing a face with it; each gets 1 + 3 times its CE."""
    torch.manual_seed(2)
    logits, y = torch.randn(1, 2, 8, 8), torch.zeros(1, 8, 8, dtype=torch.long)
    y[:, 2:5, 2:5] = 1
    edge = torch.zeros(8, 8)
    edge[2:5, 2:5] = 1
    edge[3, 3] = 0
    for i in (2, 3, 4):
        edge[1, i] = edge[5, i] = edge[i, 1] = edge[i, 5] = 1
    assert edge.sum() == 20
    ce = F.cross_entropy(logits, y, reduction="none")[0]
    got = SegmentationLoss(None, boundary_weight=3.0, dice_weight=0)(logits, y)
    torch.testing.assert_close(got, (ce * (1 + 3 * edge)).mean())
