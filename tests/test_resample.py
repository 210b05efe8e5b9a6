"""Resampling with known geometry: voxel centres stay at the same world positions, images are
interpolated exactly for linear intensity ramps, labels by nearest neighbour, and predictions
come back to the original grid through their probabilities."""
import numpy as np
import pytest
import torch

from scse_seg.data.resample import (
    probabilities_to_grid,
    resample_volume,
    target_shape,
    voxel_spacing,
)

# x flipped, anisotropic (1, 1, 2) mm voxels, an offset origin
AFFINE = np.array([[-1.0, 0, 0, 10], [0, 1.0, 0, 20], [0, 0, 2.0, 30], [0, 0, 0, 1]])
SHAPE = (8, 10, 12)


def _world(affine, shape):
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    return ijk @ affine[:3, :3].T + affine[:3, 3]


def _ramp(world):
    return world @ np.array([0.3, -0.7, 0.11]) + 5.0


def test_half_resolution_geometry_and_ramp_are_exact():
    image = _ramp(_world(AFFINE, SHAPE)).astype(np.float32)
    label = np.zeros(SHAPE, np.int64)
    label[2:6, 3:9, 4:10] = 3
    img2, lab2, aff2 = resample_volume(image, label, AFFINE, zoom=0.5)
    assert img2.shape == lab2.shape == (4, 5, 6)
    # by hand: voxel size doubles; new voxel 0 sits half an old voxel into the old grid
    expected = np.array([[-2.0, 0, 0, 10 - 0.5], [0, 2.0, 0, 20 + 0.5], [0, 0, 4.0, 30 + 1.0],
                         [0, 0, 0, 1]])
    np.testing.assert_allclose(aff2, expected)
    assert voxel_spacing(aff2) == (2.0, 2.0, 4.0)
    # trilinear interpolation of a linear function is exact at the new voxel centres
    np.testing.assert_allclose(img2, _ramp(_world(aff2, img2.shape)), atol=1e-4)
    # nearest-exact: new voxel j takes old voxel 2j + 1 on every axis
    np.testing.assert_array_equal(lab2, label[1::2, 1::2, 1::2])
    assert lab2.dtype == np.int64


def test_target_spacing_upsamples_the_coarse_axis_only():
    assert target_shape(SHAPE, AFFINE, target_spacing=(1, 1, 1)) == (8, 10, 24)
    assert target_shape(SHAPE, AFFINE, target_spacing=(2, 2, 2)) == (4, 5, 12)
    image = _ramp(_world(AFFINE, SHAPE)).astype(np.float32)
    img2, _, aff2 = resample_volume(image, None, AFFINE, target_spacing=(1, 1, 1))
    assert voxel_spacing(aff2) == (1.0, 1.0, 1.0)
    inner = (slice(None), slice(None), slice(1, -1))  # border voxels are clamped, not extrapolated
    np.testing.assert_allclose(img2[inner], _ramp(_world(aff2, img2.shape))[inner], atol=1e-4)


def test_nothing_asked_means_nothing_changes():
    image = np.random.default_rng(0).random(SHAPE).astype(np.float32)
    img2, lab2, aff2 = resample_volume(image, None, AFFINE)
    assert img2 is image and lab2 is None and np.array_equal(aff2, AFFINE)
    with pytest.raises(ValueError, match="not both"):
        target_shape(SHAPE, AFFINE, zoom=0.5, target_spacing=(1, 1, 1))


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_predictions_return_to_the_original_grid_through_probabilities(axis):
    # stripes two voxels thick along one axis survive half resolution and the way back exactly:
    # original voxel i maps to small-grid coordinate i/2 - 1/4, weight 3/4 on stripe i // 2
    stripes = np.random.default_rng(axis).integers(0, 4, SHAPE[axis] // 2).repeat(2)
    label = np.broadcast_to(np.expand_dims(stripes, [a for a in range(3) if a != axis]),
                            SHAPE).copy()
    _, small, _ = resample_volume(label.astype(np.float32), label, AFFINE, zoom=0.5)
    np.testing.assert_array_equal(small, np.take(label, range(1, SHAPE[axis], 2), axis=axis)
                                  [tuple(slice(1, None, 2) if a != axis else slice(None)
                                         for a in range(3))])
    probs = np.eye(4, dtype=np.float32)[small].transpose(3, 0, 1, 2)  # (K, x, y, z) one-hot
    back = probabilities_to_grid(probs, SHAPE)
    np.testing.assert_array_equal(back, label)


def test_training_data_is_resampled(tiny_phantom):
    from scse_seg.config import build_config, parse_override
    from scse_seg.data.prepare import prepare_data

    cfg = build_config([], [parse_override(f"data.path={tiny_phantom}"),
                            parse_override("data.zoom=0.5")])
    data = prepare_data(cfg, progress=False)
    assert all(v.image.shape == v.label.shape == (16, 16, 16) for v in data.val_volumes)
    import nibabel as nib

    original = voxel_spacing(nib.load(next((tiny_phantom / "imagesTr").iterdir())).affine)
    doubled = pytest.approx(tuple(2 * s for s in original))
    assert all(voxel_spacing(v.affine) == doubled for v in data.val_volumes)
    assert tuple(data.train_set.images.shape[1:]) == (16, 16)  # coronal slices of 16^3 volumes


class _Echo(torch.nn.Module):
    """Scores class c highest where the input holds value c (see tests/test_inference.py)."""

    size_multiple = 16

    def forward(self, x):
        labels = x[:, 0].round().long().clamp(0, 3)
        return torch.nn.functional.one_hot(labels, 4).movedim(-1, 1).float() * 10


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("how", ["zoom", "target_spacing"])
def test_a_resampled_run_predicts_on_the_original_grid(dim, how):
    from scse_seg.config import build_config, parse_override
    from scse_seg.predictor import LoadedModel

    shape, axis = (32, 48, 36), 0  # stripes 2 voxels thick along x (sagittal)
    affine = np.diag([1.0, 1.0, 0.5, 1.0]) if how == "target_spacing" else AFFINE
    setting = "data.zoom=0.5" if how == "zoom" else "data.target_spacing=[2, 2, 1]"
    cfg = build_config([], [parse_override(setting), parse_override(f"model.dim={dim}"),
                            parse_override("data.axis=coronal")])
    stripes = np.random.default_rng(dim).integers(0, 4, shape[axis] // 2).repeat(2)
    label = np.broadcast_to(stripes[:, None, None], shape).copy()
    loaded = LoadedModel(_Echo(), cfg, ["bg", "a", "b", "c"], [0, 1, 2, 3], torch.device("cpu"),
                         None, "last.pt", {})
    pred = loaded.predict_classes(label.astype(np.float32), affine=affine)
    assert pred.shape == shape
    np.testing.assert_array_equal(pred, label)
    assert loaded.preprocessing()["resample"]["zoom"] == cfg.data.zoom


def test_resampled_training_run_is_evaluated_at_full_resolution(tiny_phantom, tmp_path):
    import nibabel as nib
    from helpers import FAST, run_cli

    from scse_seg.evaluation.runs import evaluate_run

    run = tmp_path / "run"
    r = run_cli(["--data", str(tiny_phantom), "--epochs", "1", "--out", str(run), "data.zoom=0.5",
                 *FAST])
    assert r.returncode == 0, r.stderr
    res = evaluate_run(run, progress=False, save_dir=tmp_path / "pred")
    (saved,) = (tmp_path / "pred").iterdir()
    src = nib.load(tiny_phantom / "labelsTr" / saved.name)
    out = nib.load(saved)
    assert out.shape == src.shape == (32, 32, 32)
    np.testing.assert_allclose(out.affine, src.affine)
    ref_voxels = {row["structure"]: row["ref_voxels"] for row in res.rows}
    truth = np.asarray(src.dataobj)
    assert sum(ref_voxels.values()) == int((truth > 0).sum())  # scored against the original
