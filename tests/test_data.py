"""Data loading: MSD reader (labels, orphans, bad files), phantom, slices, patches, augmentation."""
import gzip
import json

import nibabel as nib
import numpy as np
import pytest

from scse_seg.data import (
    PatchDataset,
    SliceDataset,
    build_augmentation,
    class_frequencies,
    generate_phantom,
    load_case,
    read_msd,
    remap_labels,
    restore_labels,
    split_cases,
)
from scse_seg.errors import DataError


def write_case(root, name, image, label, affine=None, label_affine=None):
    affine = np.eye(4) if affine is None else affine
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    if image is not None:
        nib.save(nib.Nifti1Image(image, affine), str(root / "imagesTr" / f"{name}.nii.gz"))
    if label is not None:
        nib.save(nib.Nifti1Image(label, affine if label_affine is None else label_affine),
                 str(root / "labelsTr" / f"{name}.nii.gz"))


def write_json(root, names, labels=None, **extra):
    meta = {"name": "tiny", "labels": labels or {"0": "background", "21": "a", "166": "b"},
            "training": [{"image": f"./imagesTr/{n}.nii.gz", "label": f"./labelsTr/{n}.nii.gz"}
                         for n in names], **extra}
    (root / "dataset.json").write_text(json.dumps(meta))


@pytest.fixture
def tiny(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(3):
        lab = np.zeros((8, 10, 6), np.uint8)
        lab[2:5, 3:6, 1:4] = 21
        lab[5:7, 6:9, 2:5] = 166
        write_case(tmp_path, f"c{i}", rng.normal(100, 20, (8, 10, 6)).astype(np.float32), lab)
    write_json(tmp_path, ["c0", "c1", "c2"])
    return tmp_path


def test_noncontiguous_labels_remapped(tiny):
    ds = read_msd(tiny)
    assert ds.label_values == [0, 21, 166] and ds.class_names == ["background", "a", "b"]
    v = load_case(ds.cases[0], ds)
    assert set(np.unique(v.label)) == {0, 1, 2}
    assert v.image.dtype == np.float32 and abs(float(v.image.mean())) < 1e-4
    np.testing.assert_array_equal(restore_labels(v.label, ds.label_values)[v.label == 2], 166)
    np.testing.assert_array_equal(remap_labels(np.array([0, 166, 21]), [0, 21, 166]), [0, 2, 1])


def test_orphans_reported_by_name(tiny):
    lab = np.zeros((8, 10, 6), np.uint8)
    write_case(tiny, "lonely_image", np.ones((8, 10, 6), np.float32), None)
    write_case(tiny, "lonely_label", None, lab)
    ds = read_msd(tiny)
    text = "\n".join(ds.orphans)
    assert "imagesTr/lonely_image.nii.gz: has no label" in text
    assert "labelsTr/lonely_label.nii.gz: has no image" in text
    assert len(ds.cases) == 3


def test_nnunet_v2_convention(tmp_path):
    lab = np.zeros((8, 8, 8), np.uint8)
    lab[2:4, 2:4, 2:4] = 1
    write_case(tmp_path, "x_0000", np.ones((8, 8, 8), np.float32), None)
    write_case(tmp_path, "x", None, lab)
    (tmp_path / "dataset.json").write_text(json.dumps(
        {"labels": {"background": 0, "tumour": 1}, "channel_names": {"0": "T1"},
         "file_ending": ".nii.gz"}))
    ds = read_msd(tmp_path)
    assert [c.name for c in ds.cases] == ["x"] and ds.class_names == ["background", "tumour"]
    assert ds.orphans == []


def test_symlinked_files_and_folders_are_followed(tiny, tmp_path_factory):
    """Datasets linked in from shared storage (per file or per folder) load like copies; a path
    written in dataset.json that leaves the folder (absolute, '../') is still refused."""
    store = tmp_path_factory.mktemp("store")
    per_file = tmp_path_factory.mktemp("per_file")
    (per_file / "imagesTr").mkdir()
    (per_file / "labelsTr").mkdir()
    for sub in ("imagesTr", "labelsTr"):
        for f in (tiny / sub).iterdir():
            target = store / f"{sub}_{f.name}"
            f.rename(target)
            (per_file / sub / f.name).symlink_to(target)
    (per_file / "dataset.json").symlink_to(tiny / "dataset.json")
    per_folder = tmp_path_factory.mktemp("per_folder")
    for sub in ("imagesTr", "labelsTr"):
        (per_folder / sub).symlink_to(per_file / sub, target_is_directory=True)
    (per_folder / "dataset.json").write_text((tiny / "dataset.json").read_text())
    for root in (per_file, per_folder):
        ds = read_msd(root)
        assert [c.name for c in ds.cases] == ["c0", "c1", "c2"] and ds.orphans == []
        assert set(np.unique(load_case(ds.cases[1], ds).label)) == {0, 1, 2}
    for bad in (str(store / "imagesTr_c0.nii.gz"), "imagesTr/../../x.nii.gz", ".."):
        meta = json.loads((per_folder / "dataset.json").read_text())
        meta["training"][0]["image"] = bad
        (per_folder / "dataset.json").write_text(json.dumps(meta))
        with pytest.raises(DataError, match="outside the dataset folder"):
            read_msd(per_folder)


@pytest.mark.parametrize("breakage, needle", [
    ("no_folder", "not found"),
    ("no_json", "dataset.json not found"),
    ("bad_json", "not valid JSON"),
    ("missing_file", "missing image file"),
    ("escape", "outside the dataset"),
    ("empty", "no image/label pairs"),
])
def test_dataset_level_errors(tiny, tmp_path, breakage, needle):
    root = tiny
    if breakage == "no_folder":
        root = tmp_path / "absent"
    elif breakage == "no_json":
        (tiny / "dataset.json").unlink()
    elif breakage == "bad_json":
        (tiny / "dataset.json").write_text("{not json")
    elif breakage == "missing_file":
        (tiny / "imagesTr" / "c1.nii.gz").unlink()
    elif breakage == "escape":
        meta = json.loads((tiny / "dataset.json").read_text())
        meta["training"][0]["image"] = "../../etc/passwd"
        (tiny / "dataset.json").write_text(json.dumps(meta))
    elif breakage == "empty":
        write_json(tiny, [])
    with pytest.raises(DataError, match=needle):
        read_msd(root)


def _one_bad_case(root, image, label, affine=None, label_affine=None, labels=None):
    write_case(root, "bad", image, label, affine, label_affine)
    write_json(root, ["bad"], labels)
    ds = read_msd(root)
    return lambda: load_case(ds.cases[0], ds)


def test_corrupt_gz_names_file(tmp_path):
    load = _one_bad_case(tmp_path, np.ones((6, 6, 6), np.float32), np.zeros((6, 6, 6), np.uint8),
                         labels={"0": "bg"})
    p = tmp_path / "imagesTr" / "bad.nii.gz"
    p.write_bytes(p.read_bytes()[:40])  # truncated download
    with pytest.raises(DataError, match="bad.nii.gz.*(truncated|corrupt|not a readable)"):
        load()
    p.write_bytes(gzip.compress(b"garbage" * 10))
    with pytest.raises(DataError, match="bad.nii.gz"):
        load()


@pytest.mark.parametrize("case, needle", [
    ("shape", "same voxel grid"),
    ("affine", "affine differs"),
    ("undeclared", r"label values \[7\]"),
    ("nan", "NaN/Inf"),
    ("4d", "2 channels"),
])
def test_case_level_errors(tmp_path, case, needle):
    img = np.ones((6, 6, 6), np.float32)
    lab = np.zeros((6, 6, 6), np.uint8)
    aff, laff = np.eye(4), None
    if case == "shape":
        lab = np.zeros((6, 6, 5), np.uint8)
    elif case == "affine":
        laff = np.diag([1.0, 1.0, 2.0, 1.0])
    elif case == "undeclared":
        lab[0, 0, 0] = 7
    elif case == "nan":
        img[1, 1, 1] = np.nan
    elif case == "4d":
        img = np.ones((6, 6, 6, 2), np.float32)
    load = _one_bad_case(tmp_path, img, lab, aff, laff, labels={"0": "bg", "1": "a"})
    with pytest.raises(DataError, match=needle):
        load()


def test_4d_single_channel_is_squeezed(tmp_path):
    load = _one_bad_case(tmp_path, np.ones((6, 6, 6, 1), np.float32), np.zeros((6, 6, 6), np.uint8),
                         labels={"0": "bg"})
    assert load().image.shape == (6, 6, 6)


def test_phantom_is_deterministic_and_reused(tmp_path):
    a = generate_phantom(tmp_path / "a", n_cases=3, shape=(32, 32, 24), seed=1)
    b = generate_phantom(tmp_path / "b", n_cases=3, shape=(32, 32, 24), seed=1)
    ds_a, ds_b = read_msd(a), read_msd(b)
    va, vb = load_case(ds_a.cases[2], ds_a), load_case(ds_b.cases[2], ds_b)
    np.testing.assert_array_equal(va.label, vb.label)
    np.testing.assert_allclose(va.image, vb.image)
    assert ds_a.label_values[:3] == [0, 10, 20] and len(ds_a.class_names) == 11
    mtime = (a / "imagesTr" / "phantom_000.nii.gz").stat().st_mtime_ns
    generate_phantom(a, n_cases=3, shape=(32, 32, 24), seed=1)
    assert (a / "imagesTr" / "phantom_000.nii.gz").stat().st_mtime_ns == mtime
    freq = class_frequencies([va], 11) / va.label.size
    assert (freq[1:] > 0).sum() >= 9 and freq[1:].min() < 0.01  # small structures exist


def test_slices_along_each_axis(tiny):
    ds = read_msd(tiny)
    vols = [load_case(c, ds) for c in ds.cases]
    for axis, n in (("sagittal", 8), ("coronal", 10), ("axial", 6)):
        s = SliceDataset(vols, axis=axis, size=(16, 16))
        assert len(s) == 3 * n
        x, y = s[0]
        assert x.shape == (1, 16, 16) and y.shape == (16, 16) and y.dtype.is_floating_point is False
    crop = SliceDataset(vols, axis="axial", size=(4, 16))
    assert crop[0][0].shape == (1, 4, 16)
    nonempty = SliceDataset(vols, axis="axial", size=(16, 16), skip_empty=True)
    assert len(nonempty) < 3 * 6 and all(nonempty[i][1].any() for i in range(len(nonempty)))
    vi, si = nonempty.index[0]
    assert vols[vi].label[:, :, si].any()


def test_split_is_volume_level_and_deterministic():
    names = [f"c{i}" for i in range(10)]
    tr, va = split_cases(names, 0.2, seed=3)
    assert (tr, va) == split_cases(list(reversed(names)), 0.2, seed=3)
    assert len(va) == 2 and not set(tr) & set(va) and set(tr) | set(va) == set(names)
    assert split_cases(names, 0.2, seed=4) != (tr, va)


def test_augmentation_keeps_labels(tiny):
    aug = build_augmentation({"affine": 1, "elastic": 1, "flip": True, "brightness_contrast": 1,
                              "noise": 1})
    ds = read_msd(tiny)
    s = SliceDataset([load_case(ds.cases[0], ds)], "coronal", (16, 16), transform=aug)
    for i in range(len(s)):
        x, y = s[i]
        assert x.shape == (1, 16, 16) and set(y.unique().tolist()) <= {0, 1, 2}
    assert build_augmentation({}) is None
    with pytest.raises(Exception, match="rotate"):
        build_augmentation({"rotate": 1})


def test_patches(tiny):
    ds = read_msd(tiny)
    vols = [load_case(c, ds) for c in ds.cases]
    p = PatchDataset(vols, patch_size=(16, 16, 16), samples_per_volume=2, seed=0)
    assert len(p) == 6
    x, y = p[0]
    assert x.shape == (1, 16, 16, 16) and y.shape == (16, 16, 16)


def test_real_hippocampus(shared_data):
    ds = read_msd(shared_data / "Task04_Hippocampus")
    text = "\n".join(ds.orphans)
    for name in ("hippocampus_118", "hippocampus_010", "hippocampus_281"):
        assert name in text
    assert len(ds.cases) == 260 and ds.class_names[0] == "background"
    by_dtype = {}
    for case in ds.cases:
        by_dtype.setdefault(str(nib.load(str(case.image)).get_data_dtype()), case)
        if len(by_dtype) >= 2:
            break
    assert {"uint8", "float32"} <= set(by_dtype), by_dtype.keys()  # mixed exports, as documented
    means = []
    for case in by_dtype.values():
        v = load_case(case, ds)
        assert v.image.ndim == 3 and v.image.dtype == np.float32
        assert set(np.unique(v.label)) <= {0, 1, 2}
        means.append(float(v.image[v.image != v.image.min()].std()))
    assert all(0.5 < m < 2.0 for m in means)  # both normalised to one scale


def test_real_lpba40_remaps(shared_data):
    ds = read_msd(shared_data / "LPBA40")
    assert ds.label_values[1] == 21 and ds.label_values[-1] == 166 and len(ds.class_names) == 55
    v = load_case(ds.cases[0], ds)
    assert v.label.max() <= 54 and v.label.min() == 0 and v.image.shape == (160, 192, 160)
