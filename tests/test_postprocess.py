"""Largest-connected-component postprocessing and the nnU-Net-style choice of the classes it
helps, on hand-built volumes whose components and Dice are counted by hand (scipy's labelling as
the independent reference of connectivity)."""
import numpy as np
import pytest
from scipy import ndimage

from scse_seg.postprocess import choose_classes, keep_largest_component


def _blobs():
    a = np.zeros((12, 12, 12), np.int64)
    a[1:3, 1:3, 1:3] = 1      # class 1: 8 voxels
    a[3, 3, 3] = 1            # touches the cube only at a corner: the same component
    a[9, 9, 9] = 1            # isolated: removed
    a[6:8, 1:3, 1:3] = 2      # class 2: two pieces of 8 and 1
    a[10, 1, 1] = 2
    return a


def test_keeps_the_largest_component_of_the_chosen_classes_only():
    a = _blobs()
    out = keep_largest_component(a, [1])
    assert (out == 1).sum() == 9 and out[9, 9, 9] == 0 and out[3, 3, 3] == 1
    assert np.array_equal(out == 2, a == 2)  # class 2 untouched
    full = ndimage.generate_binary_structure(3, 3)  # face, edge and corner neighbours
    labels, n = ndimage.label(a == 1, structure=full)
    sizes = np.bincount(labels.ravel())[1:]
    assert n == 2 and np.array_equal(out == 1, labels == 1 + sizes.argmax())
    both = keep_largest_component(a, [1, 2])
    assert (both == 2).sum() == 8 and both[10, 1, 1] == 0
    assert np.array_equal(keep_largest_component(a, []), a)


def test_chooses_the_classes_whose_mean_dice_rises():
    """Class 1: the reference is one cube, the prediction adds a far voxel: Dice 2*8/17 -> 1.
    Class 2: the reference is two cubes and the prediction finds both: Dice 1 -> 2*8/24."""
    ref = np.zeros((12, 12, 12), np.int64)
    ref[1:3, 1:3, 1:3] = 1
    ref[6:8, 1:3, 1:3] = 2
    ref[6:8, 8:10, 8:10] = 2
    pred = ref.copy()
    pred[10, 10, 1] = 1
    chosen, means = choose_classes([(pred, ref)], 4)
    assert chosen == [1]
    assert means[1] == pytest.approx((16 / 17, 1.0))
    assert means[2] == pytest.approx((1.0, 16 / 24))
    assert 3 not in means  # absent from both: nothing to decide
