"""Median-frequency balancing and the segmentation loss."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from scse_seg.training.losses import (
    SegmentationLoss,
    label_boundaries,
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


def test_loss_with_dice_adds_soft_dice_once():
    torch.manual_seed(1)
    logits, y = torch.randn(2, 3, 8, 8), torch.randint(0, 3, (2, 8, 8))
    both = SegmentationLoss(None, dice_weight=1.0)(logits, y)
    expected = F.cross_entropy(logits, y) + soft_dice_loss(logits.softmax(1), y)
    torch.testing.assert_close(both, expected)
    # perfect prediction -> dice loss ~ 0
    perfect = F.one_hot(y, 3).movedim(-1, 1).float() * 50
    assert soft_dice_loss(perfect.softmax(1), y) < 1e-4


def test_boundary_weight_increases_loss():
    torch.manual_seed(2)
    logits, y = torch.randn(1, 2, 8, 8), torch.zeros(1, 8, 8, dtype=torch.long)
    y[:, 2:5, 2:5] = 1
    a = SegmentationLoss(None, boundary_weight=0.0, dice_weight=0)(logits, y)
    b = SegmentationLoss(None, boundary_weight=3.0, dice_weight=0)(logits, y)
    assert b > a
