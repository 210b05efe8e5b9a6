"""Bad input is rejected with one clear line naming the file or key, exit status 2, no
traceback, and nothing written over earlier results (README "Troubleshooting" lists these)."""
import json
import shutil

import nibabel as nib
import numpy as np
import pytest
from helpers import FAST, run_cli

from scse_seg.cli import main


@pytest.fixture
def data(tiny_phantom, tmp_path):
    dst = tmp_path / "data"
    shutil.copytree(tiny_phantom, dst)
    return dst


def _edit_json(root, fn):
    meta = json.loads((root / "dataset.json").read_text())
    fn(meta)
    (root / "dataset.json").write_text(json.dumps(meta))


def _rewrite(path, fn):
    img = nib.load(str(path))
    arr, aff = fn(np.asarray(img.dataobj), img.affine.copy())
    nib.save(nib.Nifti1Image(arr, aff), str(path))


IMG = "imagesTr/phantom_001.nii.gz"
LAB = "labelsTr/phantom_001.nii.gz"


def _break(kind, root, tmp_path):
    """Apply breakage ``kind``; return (extra CLI args, text the error must contain)."""
    if kind == "folder_missing":
        return ["--data", str(tmp_path / "nowhere")], "nowhere not found"
    if kind == "json_missing":
        (root / "dataset.json").unlink()
        return [], "dataset.json not found"
    if kind == "json_invalid":
        (root / "dataset.json").write_text("{'labels': ")
        return [], "not valid JSON"
    if kind == "entry_missing_file":
        (root / IMG).unlink()
        return [], "phantom_001.nii.gz"
    if kind == "truncated_nifti":
        p = root / IMG
        p.write_bytes(p.read_bytes()[:200])
        return [], "phantom_001.nii.gz"
    if kind == "shape_mismatch":
        _rewrite(root / LAB, lambda a, f: (a[:, :, :-2], f))
        return [], "same voxel grid"
    if kind == "affine_mismatch":
        _rewrite(root / LAB, lambda a, f: (a, f @ np.diag([1, 1, 2.0, 1])))
        return [], "affine differs"
    if kind == "undeclared_label":
        _rewrite(root / LAB, lambda a, f: (np.where(a == 10, 13, a).astype(np.uint8), f))
        return [], "label values [13]"
    if kind == "nan_voxels":
        _rewrite(root / IMG, lambda a, f: (np.where(a > a.mean(), np.nan, a).astype(np.float32), f))
        return [], "NaN/Inf"
    if kind == "multichannel_4d":
        _rewrite(root / IMG, lambda a, f: (np.stack([a, a], -1), f))
        return [], "2 channels"
    if kind == "empty_dataset":
        _edit_json(root, lambda m: m.update(training=[]))
        return [], "no image/label pairs"
    if kind == "path_escapes":
        _edit_json(root, lambda m: m["training"][0].update(image="../../../etc/hosts"))
        return [], "outside the dataset folder"
    if kind == "unknown_config_key":
        return ["train.epocs=3"], "train.epocs"
    if kind == "negative_epochs":
        return ["train.epochs=-2"], "train.epochs"
    if kind == "wrong_type":
        return ["train.lr=fast"], "train.lr"
    if kind == "unknown_attention_key":
        return ["model.attention=se"], "model.attention"
    if kind == "patch_not_multiple":  # the 3D U-Net pools 4 times: sizes must be multiples of 16
        return ["--dim", "3", "data.patch_size=[24,32,32]"], "data.patch_size"
    if kind == "slice_size_not_multiple":  # smp's resnet34 needs multiples of 32, not 16
        return ["--arch", "smp_unet", "data.slice_size=[48,48]"], "data.slice_size"
    if kind == "bad_override_syntax":
        return ["train.lr"], "key=value"
    if kind == "config_file_missing":
        return ["--config", str(tmp_path / "nope.yaml")], "nope.yaml"
    raise AssertionError(kind)


KINDS = ["folder_missing", "json_missing", "json_invalid", "entry_missing_file", "truncated_nifti",
         "shape_mismatch", "affine_mismatch", "undeclared_label", "nan_voxels", "multichannel_4d",
         "empty_dataset", "path_escapes", "unknown_config_key", "negative_epochs", "wrong_type",
         "unknown_attention_key", "patch_not_multiple", "slice_size_not_multiple",
         "bad_override_syntax", "config_file_missing"]


@pytest.mark.parametrize("kind", KINDS)
def test_bad_input_rejected(kind, data, tmp_path, capsys):
    extra, needle = _break(kind, data, tmp_path)
    out = tmp_path / "run"
    args = ["--data", str(data), "--epochs", "1", "--out", str(out), *FAST, *extra]
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert needle in err, err
    assert not (out / "last.pt").exists()


def test_resume_guards(data, tmp_path, capsys, tiny_phantom):
    out = tmp_path / "run"
    assert main(["--data", str(data), "--epochs", "1", "--out", str(out), *FAST]) == 0
    before = (out / "last.pt").read_bytes()
    capsys.readouterr()
    # a second run into the same folder must not overwrite it
    assert main(["--data", str(data), "--epochs", "1", "--out", str(out), *FAST]) == 2
    assert "already holds a run" in capsys.readouterr().err
    # resume with another architecture
    assert main(["--resume", str(out), "--arch", "sdnet", "--epochs", "2", "--no-progress"]) == 2
    assert "arch" in capsys.readouterr().err
    # resume on a dataset with a different number of classes
    other = tmp_path / "other"
    shutil.copytree(data, other)
    _edit_json(other, lambda m: m["labels"].update({"200": "extra"}))
    assert main(["--resume", str(out), "--data", str(other), "--epochs", "2",
                 "--no-progress"]) == 2
    assert "num_classes" in capsys.readouterr().err
    # resume from a folder without a checkpoint / with a corrupt one
    assert main(["--resume", str(tmp_path / "empty"), "--no-progress"]) == 2
    assert "config.yaml not found" in capsys.readouterr().err
    assert (out / "last.pt").read_bytes() == before
    (out / "last.pt").write_bytes(b"garbage")
    assert main(["--resume", str(out), "--epochs", "2", "--no-progress"]) == 2
    assert "last.pt cannot be loaded safely" in capsys.readouterr().err


def test_unknown_arch_flag_and_no_traceback(tmp_path):
    """As a user sees it: a subprocess, exit 2, one line on stderr, no traceback."""
    r = run_cli(["--data", str(tmp_path / "missing"), "--out", str(tmp_path / "r"), *FAST])
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [f"error: dataset folder {tmp_path / 'missing'} not "
                                             "found; pass the folder that holds dataset.json, "
                                             "imagesTr/ and labelsTr/ (--data PATH or data.path)"]
    r = run_cli(["--arch", "vnet"])
    from scse_seg.models import model_names

    assert {"densenet", "sdnet", "smp_unet", "unet", "smp:FPN", "monai:DynUNet"} <= set(model_names())
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"error: --arch: unknown architecture 'vnet'; valid: {', '.join(model_names())} "
        "(case-insensitive)"]
