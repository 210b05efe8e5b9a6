"""Whole-volume inference reassembles exactly: a model that echoes its input as class scores must
return the input's labels voxel for voxel, slice-wise along every axis (2D) and with sliding
windows (3D), on sizes that need padding."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from scse_seg.inference import predict_volume_2d, predict_volume_3d

K = 5


class Echo(torch.nn.Module):
    """Scores class c highest where the input holds value c; refuses sizes it cannot take."""

    def __init__(self, multiple=16):
        super().__init__()
        self.size_multiple = multiple

    def forward(self, x):
        assert all(s % self.size_multiple == 0 for s in x.shape[2:]), x.shape
        labels = x[:, 0].round().long().clamp(0, K - 1)
        return F.one_hot(labels, K).movedim(-1, 1).float() * 10


@pytest.fixture
def labels():
    return np.random.default_rng(0).integers(0, K, size=(35, 51, 19))


@pytest.mark.parametrize("multiple", [16, 32])
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_2d_reassembly_every_axis(labels, axis, multiple):
    model = Echo(multiple)
    pred = predict_volume_2d(model, labels.astype(np.float32), axis, batch_size=7)
    assert pred.dtype == np.int64
    np.testing.assert_array_equal(pred, labels)
    probs = predict_volume_2d(model, labels.astype(np.float32), axis, return_probs=True)
    assert probs.shape == (K, *labels.shape)
    np.testing.assert_array_equal(probs.argmax(0), labels)


@pytest.mark.parametrize("roi", [(16, 16, 16), (32, 16, 48), (64, 64, 64)])
def test_3d_reassembly(labels, roi):
    pred = predict_volume_3d(Echo(), labels.astype(np.float32), roi_size=roi, sw_batch_size=3)
    np.testing.assert_array_equal(pred, labels)
    probs = predict_volume_3d(Echo(), labels.astype(np.float32), roi_size=roi, return_probs=True)
    assert probs.shape == (K, *labels.shape)
