"""Multi-channel scans (MSD ``modality`` / nnU-Net ``channel_names``): loading both layouts,
per-channel normalisation, channels carried through slices, patches, augmentation and
resampling, in_channels from the data, training, evaluation and prediction.

The phantom is built so that ONE CHANNEL ALONE CANNOT SOLVE THE TASK: channel A and channel B
each hold an independent random blob pattern, and the label is A AND B. Given one channel, the
other blob pattern is independent of everything that channel shows, so no rule on one channel
beats the best threshold rule on it by more than chance; that bound is computed with numpy on the
held-out volume and the two-channel network must beat it clearly. Expected values are computed
by hand (numpy z-scores, a by-hand forward pass), not with the code under test.
"""
import json
import shutil
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import FAST, ROOT, model_from_checkpoint
from scipy.ndimage import gaussian_filter

sys.path.insert(0, str(ROOT / "eval"))

SHAPE = (32, 16, 32)  # coronal slicing (axis 1): 16 slices of 32 x 32 per case, no padding
VALUE = 7  # label value of the 'both' class (class index 1)
NAMES = ["A", "B"]
N_CASES = 5  # val_fraction 0.2 -> 4 training cases, 1 held out


def _affine():
    a = np.diag([1.5, 2.0, 1.0, 1.0])
    a[:3, 3] = [-10.0, 5.0, 3.0]
    return a


def _case(rng):
    """(channel A, channel B, label) of one case: label = A-blob AND B-blob. Channel A has no
    zeros (z-scored over all voxels) and a scale of ~1000; channel B ~0.02 with a zero slab
    (z-scored over its nonzero voxels): only per-channel normalisation puts both on one scale."""
    a = gaussian_filter(rng.normal(size=SHAPE), 2) > 0
    b = gaussian_filter(rng.normal(size=SHAPE), 2) > 0
    b[:2] = False
    ch_a = (1000 + 400 * a + rng.normal(0, 20, SHAPE)).astype(np.float32)
    ch_b = (0.02 * (1 + b) + rng.normal(0, 0.001, SHAPE)).astype(np.float32)
    ch_b[:2] = 0
    return ch_a, ch_b, ((a & b) * VALUE).astype(np.uint8)


def _cases():
    rng = np.random.default_rng(0)
    return [_case(rng) for _ in range(N_CASES)]


def write_dataset(root, layout, n_channels=2):
    """The phantom as an MSD folder with one 4D file per case and ``modality`` ("4d"), or as
    nnU-Net v2 with ``<case>_0000``/``<case>_0001`` files and ``channel_names`` ("nnunet")."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    names = []
    for i, (a, b, lab) in enumerate(_cases()):
        name = f"mc_{i:03d}"
        names.append(name)
        chans = [a, b][:n_channels]
        if layout == "4d":
            nib.save(nib.Nifti1Image(np.stack(chans, -1), _affine()),
                     str(root / "imagesTr" / f"{name}.nii.gz"))
        else:
            for c, x in enumerate(chans):
                nib.save(nib.Nifti1Image(x, _affine()), str(root / "imagesTr" / f"{name}_{c:04d}.nii.gz"))
        nib.save(nib.Nifti1Image(lab, _affine()), str(root / "labelsTr" / f"{name}.nii.gz"))
    channels = {str(c): n for c, n in enumerate(NAMES[:n_channels])}
    if layout == "4d":
        meta = {"name": "mc", "labels": {"0": "background", str(VALUE): "both"}, "modality": channels,
                "training": [{"image": f"./imagesTr/{n}.nii.gz", "label": f"./labelsTr/{n}.nii.gz"}
                             for n in names]}
    else:
        meta = {"name": "mc", "labels": {"background": 0, "both": VALUE}, "channel_names": channels,
                "file_ending": ".nii.gz", "numTraining": len(names)}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def _zscore(x):
    """The project's normalisation written out: z-score over the nonzero voxels (all if none)."""
    x = x.astype(np.float64)
    fg = x[x != 0] if (x == 0).any() else x.ravel()
    return (x - fg.mean()) / fg.std()


@pytest.fixture(scope="module")
def nnunet(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("mc") / "nnunet", "nnunet")


@pytest.fixture(scope="module")
def run(nnunet, tmp_path_factory):
    from scse_seg.cli import main

    out = tmp_path_factory.mktemp("runs") / "mc"
    assert main(["--data", str(nnunet), "--epochs", "6", "--out", str(out), *FAST,
                 "train.max_steps_per_epoch=8", "train.lr=0.01", "train.threads=1"]) == 0
    return out


# ----------------------------------------------------------------------------- loading


@pytest.mark.parametrize("layout", ["4d", "nnunet"])
def test_both_layouts_load_channels_first_each_normalised_on_its_own(layout, tmp_path):
    from scse_seg.data import load_case, read_msd

    ds = read_msd(write_dataset(tmp_path / layout, layout))
    assert ds.num_channels == 2 and ds.channel_names == NAMES and ds.orphans == []
    vol = load_case(ds.cases[1], ds)
    a, b, lab = _cases()[1]
    assert vol.image.shape == (2, *SHAPE) and vol.image.dtype == np.float32
    np.testing.assert_allclose(vol.image[0], _zscore(a), atol=1e-4)
    np.testing.assert_allclose(vol.image[1], _zscore(b), atol=1e-4)
    assert abs(vol.image[0].mean()) < 1e-4 and abs(vol.image[0].std() - 1) < 1e-4
    fg = vol.image[1][b != 0]  # B: statistics over its nonzero voxels
    assert abs(fg.mean()) < 1e-4 and abs(fg.std() - 1) < 1e-4
    assert vol.image[1][0].max() == vol.image[1][0].min() < -1  # the zero slab, below its blobs
    np.testing.assert_array_equal(vol.label, (lab == VALUE).astype(np.int64))
    np.testing.assert_allclose(vol.affine, _affine())


@pytest.mark.parametrize("kind, needle", [
    ("missing_channel_file", "mc_003_0001.nii.gz"),
    ("too_many_channels", "has 3 channels"),
    ("one_channel_file", "has 1 channel"),
])
def test_bad_channels_are_one_error_line(kind, needle, tmp_path, capsys):
    from scse_seg.cli import main

    layout = "nnunet" if kind == "missing_channel_file" else "4d"
    root = write_dataset(tmp_path / "ds", layout)
    img = root / "imagesTr" / "mc_003.nii.gz"
    if kind == "missing_channel_file":
        (root / "imagesTr" / "mc_003_0001.nii.gz").unlink()
    elif kind == "too_many_channels":
        x = np.asarray(nib.load(str(img)).dataobj)
        nib.save(nib.Nifti1Image(np.concatenate([x, x[..., :1]], -1), _affine()), str(img))
    else:
        nib.save(nib.Nifti1Image(np.asarray(nib.load(str(img)).dataobj)[..., 0], _affine()), str(img))
    out = tmp_path / "run"
    assert main(["--data", str(root), "--epochs", "1", "--out", str(out), *FAST]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and needle in err, err
    assert not out.exists()


def test_undeclared_channel_file_is_reported_not_used(tmp_path):
    from scse_seg.data import read_msd

    root = write_dataset(tmp_path / "ds", "nnunet", n_channels=1)
    shutil.copy(root / "imagesTr/mc_000_0000.nii.gz", root / "imagesTr/mc_000_0001.nii.gz")
    ds = read_msd(root)
    assert ds.num_channels == 1 and ds.cases[0].image_files == [root / "imagesTr/mc_000_0000.nii.gz"]
    assert ds.orphans == ["orphan imagesTr/mc_000_0001.nii.gz: channel 1 is not declared in "
                          "dataset.json ('modality' / 'channel_names'); it is not used"]


# ----------------------------------------------------------------------------- slices, patches


def _volume(image):
    from scse_seg.data import Volume

    label = np.zeros(image.shape[-3:], np.int64)
    label[4:9, 2:6, 3:12] = 1
    return Volume("v", image.astype(np.float32), label, np.eye(4), [0, 1])


def test_slices_and_augmentation_move_all_channels_alike():
    """Channel 1 = 2 * channel 0 + 3: after padding (each channel with its own minimum) and a
    random affine warp, the relation still holds voxel for voxel; one channel stays (1, H, W)."""
    from scse_seg.data import SliceDataset, build_augmentation

    x = np.random.default_rng(0).normal(size=(12, 10, 14)).astype(np.float32)
    two = np.stack([x, 2 * x + 3])
    plain = SliceDataset([_volume(two)], axis="coronal", size=(16, 16))
    img, lab = plain[3]
    assert img.shape == (2, 16, 16) and lab.shape == (16, 16)
    np.testing.assert_array_equal(img[1], 2 * img[0] + 3)
    assert img[0, 0, 0] == x.min() and img[1, 0, 0] == (2 * x + 3).min()  # padded corner
    np.testing.assert_array_equal(img[0, 2:14, 1:15], torch.from_numpy(x[:, 3, :]))
    aug = SliceDataset([_volume(two)], axis="coronal", size=(16, 16),
                       transform=build_augmentation({"affine": 1.0}))
    aug.transform.set_random_seed(0)
    moved, moved_lab = aug[3]
    assert not torch.equal(moved, img)  # the warp did something
    np.testing.assert_allclose(moved[1], 2 * moved[0] + 3, atol=1e-4)
    one = SliceDataset([_volume(x)], axis="coronal", size=(16, 16))
    torch.testing.assert_close(one[3][0], img[:1])


def test_patches_crop_all_channels_at_one_position():
    from scse_seg.data import PatchDataset

    x = np.random.default_rng(1).normal(size=(12, 10, 14)).astype(np.float32)
    ds = PatchDataset([_volume(np.stack([x, 2 * x + 3]))], patch_size=(16, 16, 16),
                      samples_per_volume=3, seed=0)
    for i in range(3):
        img, lab = ds[i]
        assert img.shape == (2, 16, 16, 16) and lab.shape == (16, 16, 16)
        np.testing.assert_array_equal(img[1], 2 * img[0] + 3)  # padding included
        assert img[0].min() == x.min()


def test_resampling_keeps_channels():
    from scse_seg.data import resample_case

    x = np.random.default_rng(2).normal(size=(12, 10, 14)).astype(np.float32)
    two = resample_case(_volume(np.stack([x, 2 * x + 3])), zoom=0.5)
    one = resample_case(_volume(x), zoom=0.5)
    assert two.image.shape == (2, 6, 5, 7) and two.label.shape == one.image.shape == (6, 5, 7)
    np.testing.assert_allclose(two.image[0], one.image, atol=1e-6)
    np.testing.assert_allclose(two.image[1], 2 * one.image + 3, atol=1e-5)  # linear: exact


# ----------------------------------------------------------------------------- train, evaluate


def best_single_channel_dice(x, ref):
    """Best Dice of any threshold rule (x >= t or x < t, 401 quantiles) on one channel."""
    best = 0.0
    for t in np.unique(np.quantile(x, np.linspace(0, 1, 401))):
        for pred in (x >= t, x < t):
            best = max(best, 2 * (pred & ref).sum() / (pred.sum() + ref.sum()))
    return best


def _held_out(run_dir):
    (name,) = json.loads((run_dir / "split.json").read_text())["val"]
    return int(name.split("_")[1])


def _first_conv(model):
    return next(m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d)))


def test_two_channels_beat_the_best_single_channel_rule(run, nnunet):
    """in_channels = 2 from the data, saved and rebuilt; a short run (6 x 8 steps, width 4)
    segments A AND B far better than any rule on one channel can (bound ~0.68 on this volume;
    measured 0.92 for this seed)."""
    from scse_seg import load_model
    from scse_seg.evaluation.runs import evaluate_run

    ck = torch.load(run / "last.pt", weights_only=True)
    assert ck["in_channels"] == 2 and ck["channel_names"] == NAMES
    loaded = load_model(run, device="cpu")
    assert loaded.in_channels == 2 and _first_conv(loaded.model).in_channels == 2
    assert loaded.preprocessing()["in_channels"] == 2
    a, b, lab = _cases()[_held_out(run)]
    ref = lab == VALUE
    bound = max(best_single_channel_dice(a, ref), best_single_channel_dice(b, ref))
    assert 0.5 < bound < 0.75
    (row,) = evaluate_run(run, progress=False, device="cpu").rows
    assert row["dice"] > bound + 0.15, (row["dice"], bound)


def test_one_channel_dataset_builds_in_channels_1_and_cannot_solve_it(tmp_path, capsys):
    """The same phantom with channel A only (a 4D file X x Y x Z x 1, 'modality' of one entry):
    in_channels = 1, and the same training stays at the single-channel bound (measured 0.69 vs
    0.68: a little spatial context, no more). Evaluating the two-channel run on it is refused."""
    from scse_seg.cli import main
    from scse_seg.evaluation.runs import evaluate_run

    root = write_dataset(tmp_path / "one", "4d", n_channels=1)
    out = tmp_path / "run"
    assert main(["--data", str(root), "--epochs", "6", "--out", str(out), *FAST,
                 "train.max_steps_per_epoch=8", "train.lr=0.01", "train.threads=1"]) == 0
    ck = torch.load(out / "last.pt", weights_only=True)
    assert ck["in_channels"] == 1 and ck["channel_names"] == ["A"]
    a, _, lab = _cases()[_held_out(out)]
    bound = best_single_channel_dice(a, lab == VALUE)
    (row,) = evaluate_run(out, progress=False, device="cpu").rows
    assert row["dice"] < bound + 0.05, (row["dice"], bound)


def test_test_set_channel_files_are_evaluated_and_other_channels_refused(run, nnunet, tmp_path):
    """evaluate --test on imagesTs/ (<case>_0000, _0001) + labelsTs/: the same Dice as the
    held-out volume gives; data with one channel is refused by name."""
    from scse_seg.errors import UserError
    from scse_seg.evaluation.runs import evaluate_run

    test = tmp_path / "test"  # the dataset with imagesTs/ + labelsTs/ added
    shutil.copytree(nnunet, test)
    (test / "imagesTs").mkdir()
    (test / "labelsTs").mkdir()
    held = f"mc_{_held_out(run):03d}"
    for c in ("0000", "0001"):
        shutil.copy(nnunet / f"imagesTr/{held}_{c}.nii.gz", test / f"imagesTs/t_{c}.nii.gz")
    shutil.copy(nnunet / f"labelsTr/{held}.nii.gz", test / "labelsTs/t.nii.gz")
    (row,) = evaluate_run(run, test_path=test, progress=False, device="cpu").rows
    (ref,) = evaluate_run(run, progress=False, device="cpu").rows
    assert row["volume"] == "t" and row["dice"] == ref["dice"]

    one = write_dataset(tmp_path / "one", "nnunet", n_channels=1)
    with pytest.raises(UserError, match=r"1 input channel\(s\) \['A'\] but .* trained on 2"):
        evaluate_run(run, data_path=str(one), progress=False, device="cpu")


# ----------------------------------------------------------------------------- predict


def _by_hand(run_dir, a, b):
    """Labels of a 2-channel 2D run on one scan without scse_seg.predictor / inference: each
    channel z-scored by hand, coronal slices (32 x 32: no padding), argmax, label values."""
    model, ck = model_from_checkpoint(run_dir, 2)
    x = np.stack([_zscore(a), _zscore(b)]).astype(np.float32)  # (2, X, Y, Z)
    slices = torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, 2, 0)))  # (Y, 2, X, Z)
    with torch.no_grad():
        classes = model.eval()(slices).argmax(1).numpy()
    return np.array([0, VALUE])[np.moveaxis(classes, 0, 1)]


def test_predict_reads_channel_files_and_4d_files(run, nnunet, tmp_path, capsys):
    import predict

    import scse_seg

    src = tmp_path / "in"
    src.mkdir()
    for c in ("0000", "0001"):
        shutil.copy(nnunet / f"imagesTr/mc_001_{c}.nii.gz", src / f"p_{c}.nii.gz")
    a, b, _ = _cases()[2]
    nib.save(nib.Nifti1Image(np.stack([a, b], -1), _affine()), str(src / "q.nii.gz"))
    out = tmp_path / "out"
    assert predict.main([str(run), str(src), str(out), "--no-progress"]) == 0, capsys.readouterr()
    assert sorted(p.name for p in out.iterdir()) == ["p.nii.gz", "q.nii.gz"]
    for name, case in (("p", 1), ("q", 2)):
        img = nib.load(str(out / f"{name}.nii.gz"))
        labels = np.asarray(img.dataobj)
        np.testing.assert_allclose(img.affine, _affine())
        assert labels.shape == SHAPE and set(np.unique(labels)) <= {0, VALUE}
        expected = _by_hand(run, *_cases()[case][:2])
        assert (labels == expected).mean() > 0.999
    # the Python API: an nnU-Net _0000 path, a list of channel files, an (X, Y, Z, C) array
    first = src / "p_0000.nii.gz"
    by_path = scse_seg.predict(run, first, device="cpu")
    np.testing.assert_array_equal(by_path, np.asarray(nib.load(str(out / "p.nii.gz")).dataobj))
    np.testing.assert_array_equal(scse_seg.predict(run, [first, src / "p_0001.nii.gz"],
                                                   device="cpu"), by_path)
    np.testing.assert_array_equal(scse_seg.predict(run, np.stack([a, b], -1), device="cpu"),
                                  np.asarray(nib.load(str(out / "q.nii.gz")).dataobj))


@pytest.mark.parametrize("kind, needle", [
    ("missing_channel_file", "b_0001.nii.gz not found"),
    ("three_channels", "has 3 channels"),
    ("one_channel", "has 1 channel"),
    ("4d_channel_file", "must hold one 3D volume"),
    ("third_channel_file", "b_0002.nii.gz beyond the 2 channels"),
])
def test_predict_wrong_channels_is_one_error_line_nothing_written(kind, needle, run, nnunet,
                                                                  tmp_path, capsys):
    import predict

    src = tmp_path / "in"
    src.mkdir()
    for case in ("a", "b"):
        for c in ("0000", "0001"):
            shutil.copy(nnunet / f"imagesTr/mc_000_{c}.nii.gz", src / f"{case}_{c}.nii.gz")
    a, b, _ = _cases()[0]
    if kind == "missing_channel_file":
        (src / "b_0001.nii.gz").unlink()
    elif kind == "three_channels":
        nib.save(nib.Nifti1Image(np.stack([a, b, a], -1), _affine()), str(src / "c.nii.gz"))
    elif kind == "third_channel_file":
        shutil.copy(src / "b_0001.nii.gz", src / "b_0002.nii.gz")
    elif kind == "4d_channel_file":
        nib.save(nib.Nifti1Image(np.stack([a, b], -1), _affine()), str(src / "b_0001.nii.gz"))
    else:
        nib.save(nib.Nifti1Image(a, _affine()), str(src / "c.nii.gz"))
    out = tmp_path / "out"
    assert predict.main([str(run), str(src), str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and needle in err, err
    assert not out.exists()


def test_3d_patches_with_resampling_train_and_predict_on_the_original_grid(tmp_path):
    """dim 3 on the MSD 4D layout at half resolution: 2-channel patches train, and a 4D scan
    is predicted back on its own grid."""
    import scse_seg
    from scse_seg.cli import main

    root = write_dataset(tmp_path / "msd", "4d")
    out = tmp_path / "run3d"
    assert main(["--data", str(root), "--dim", "3", "--epochs", "1", "--out", str(out), *FAST,
                 "train.max_steps_per_epoch=1", "data.patch_size=[16,16,16]",
                 "data.zoom=0.5"]) == 0
    loaded = scse_seg.load_model(out, device="cpu")
    assert loaded.in_channels == 2 and isinstance(_first_conv(loaded.model), torch.nn.Conv3d)
    assert _first_conv(loaded.model).in_channels == 2
    labels = scse_seg.predict(loaded, root / "imagesTr/mc_000.nii.gz")
    assert labels.shape == SHAPE and set(np.unique(labels)) <= {0, VALUE}


def test_export_takes_the_run_channels(run, tmp_path):
    from scse_seg import load_model
    from scse_seg.export import export_run

    written = export_run(run, tmp_path / "exp", onnx=False)
    pre = json.loads((tmp_path / "exp/preprocessing.json").read_text())
    assert pre["in_channels"] == 2 and pre["channel_names"] == NAMES and "(N, 2, H, W)" in pre["input"]
    program = torch.export.load(written["program"]).module()
    model = load_model(run, device="cpu").model
    x = torch.randn(3, 2, 32, 48)
    with torch.no_grad():
        torch.testing.assert_close(program(x), model(x), atol=1e-5, rtol=0)
