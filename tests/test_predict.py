"""Using a trained run: predict.py / scse_seg.predict on new scans, evaluate.py --test on a
separate labelled set, export.py, and their bad input (one ``error:`` line, exit 2, nothing
written). One tiny run (width 4, one short epoch on the phantom) is trained once for the module.

Expected predictions are computed by hand from the checkpoint (torch.load + create_model, the
slices cut with numpy, the label values read from dataset.json), not with scse_seg.predictor."""
import csv
import hashlib
import json
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import FAST, ROOT, model_from_checkpoint

sys.path.insert(0, str(ROOT / "eval"))

VALUES = [0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100]  # the phantom's dataset.json


@pytest.fixture(scope="module")
def dataset(tiny_phantom, tmp_path_factory):
    """The phantom with its last case also as a labelled test set (imagesTs/ + labelsTs/)."""
    root = tmp_path_factory.mktemp("ds") / "Phantom"
    shutil.copytree(tiny_phantom, root)
    (root / "imagesTs").mkdir()
    (root / "labelsTs").mkdir()
    shutil.copy(root / "imagesTr/phantom_003.nii.gz", root / "imagesTs/phantom_003_0000.nii.gz")
    shutil.copy(root / "labelsTr/phantom_003.nii.gz", root / "labelsTs/phantom_003.nii.gz")
    return root


@pytest.fixture(scope="module")
def run(dataset, tmp_path_factory):
    from scse_seg.cli import main

    out = tmp_path_factory.mktemp("runs") / "tiny"
    assert main(["--data", str(dataset), "--epochs", "1", "--out", str(out), *FAST,
                 "data.augment={flip: true}"]) == 0  # flips, so that --tta is allowed
    return out


def _by_hand(run_dir, image_path):
    """Prediction of a 2D run on one NIfTI without scse_seg.predictor or scse_seg.inference."""
    model, ck = model_from_checkpoint(run_dir, 1)
    x = np.asarray(nib.load(str(image_path)).dataobj).astype(np.float32)
    x = x[..., 0] if x.ndim == 4 else x
    fg = x[x != 0]
    x = (x - fg.mean()) / fg.std()
    assert ck["config"]["data"]["axis"] == "coronal" and x.shape == (32, 32, 32)  # no padding
    slices = torch.from_numpy(np.moveaxis(x, 1, 0)[:, None].copy())
    with torch.no_grad():
        classes = model.eval()(slices).argmax(1).numpy()
    return np.asarray(VALUES)[np.moveaxis(classes, 0, 1)]


def _digest(folder):
    return {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


# ------------------------------------------------------------------------------- predict


def test_predict_folder_original_values_header_and_channel_suffix(run, dataset, tmp_path, capsys):
    import predict

    src = tmp_path / "in"
    src.mkdir()
    img = nib.load(str(dataset / "imagesTr/phantom_000.nii.gz"))
    hdr = img.header.copy()
    hdr["descrip"] = b"scan a"
    aff = img.affine @ np.diag([0.9, 1.1, 1.3, 1.0])
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[..., None], aff, hdr), str(src / "a.nii"))  # 4D, 1 ch
    shutil.copy(dataset / "imagesTr/phantom_001.nii.gz", src / "b_0000.nii.gz")
    before = _digest(src)
    assert predict.main([str(run), str(src), str(tmp_path / "out"), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "predicted 2 volumes" in text and "s/volume" in text
    assert _digest(src) == before  # inputs untouched
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.nii", "b.nii.gz"]
    a = nib.load(str(tmp_path / "out/a.nii"))
    assert a.shape == (32, 32, 32) and np.allclose(a.affine, aff)
    assert a.header["descrip"].tobytes().rstrip(b"\0") == b"scan a"
    assert np.allclose(a.header.get_zooms()[:3], np.abs(np.diag(aff))[:3], atol=1e-5)
    expected = _by_hand(run, src / "a.nii")
    got = np.asarray(a.dataobj)
    assert got.dtype == np.uint8 and set(np.unique(got)) <= set(VALUES)
    assert (got == expected).mean() > 0.999  # argmax ties of float sums may differ on a voxel
    b = np.asarray(nib.load(str(tmp_path / "out/b.nii.gz")).dataobj)
    assert (b == _by_hand(run, src / "b_0000.nii.gz")).mean() > 0.999


def test_predict_prints_seconds_per_volume(run, dataset, tmp_path, capsys):
    import predict

    out = tmp_path / "seg.nii.gz"
    assert predict.main([str(run), str(dataset / "imagesTr/phantom_002.nii.gz"), str(out),
                         "--no-progress", "--tta", "--checkpoint", "best.pt", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "predicted 1 volume" in text and "s/volume" in text and str(out) in text
    assert "best.pt" in text and set(np.unique(np.asarray(nib.load(str(out)).dataobj))) <= set(VALUES)


def test_python_api_matches_the_command(run, dataset, tmp_path):
    import predict

    import scse_seg

    path = dataset / "imagesTs/phantom_003_0000.nii.gz"
    assert predict.main([str(run), str(dataset), str(tmp_path / "out"), "--no-progress"]) == 0
    written = np.asarray(nib.load(str(tmp_path / "out/phantom_003.nii.gz")).dataobj)  # imagesTs
    loaded = scse_seg.load_model(run, checkpoint="last.pt", device="cpu")
    raw = np.asarray(nib.load(str(path)).dataobj)
    for labels in (scse_seg.predict(run, path), scse_seg.predict(loaded, raw),
                   scse_seg.predict(loaded, nib.load(str(path)))):
        assert labels.shape == raw.shape and np.array_equal(labels, written)
    assert loaded.label_values == VALUES and loaded.class_names[1] == "cortex"


def _softmax_by_hand(run_dir, image_path):
    """(K, X, Y, Z) softmax of a 2D run on one NIfTI, without scse_seg.predictor/inference."""
    model, _ = model_from_checkpoint(run_dir, 1)
    x = np.asarray(nib.load(str(image_path)).dataobj).astype(np.float32)
    fg = x[x != 0]
    x = (x - fg.mean()) / fg.std()
    slices = torch.from_numpy(np.moveaxis(x, 1, 0)[:, None].copy())  # coronal, no padding
    with torch.no_grad():
        p = torch.softmax(model.eval()(slices), 1).numpy()  # (Y, K, X, Z)
    return np.moveaxis(p, 0, 2)  # (K, X, Y, Z)


@pytest.fixture(scope="module")
def run2(dataset, tmp_path_factory):
    """A second run on the same data (another seed): the other member of an ensemble."""
    from scse_seg.cli import main

    out = tmp_path_factory.mktemp("runs") / "tiny_s1"
    assert main(["--data", str(dataset), "--epochs", "1", "--out", str(out), *FAST, "seed=1"]) == 0
    return out


def test_ensemble_averages_probabilities_and_saves_them(run, run2, dataset, tmp_path, capsys):
    """Two runs: argmax of the mean of their softmax maps (recomputed by hand); the saved
    probabilities are that mean in float16, with the class names."""
    import predict

    scan = dataset / "imagesTr/phantom_000.nii.gz"
    out = tmp_path / "out"
    assert predict.main([str(run), str(run2), str(scan), str(out), "--save-probabilities",
                         "--no-progress"]) == 0
    assert "an ensemble of 2 runs" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["phantom_000.nii.gz", "phantom_000.npz"]
    mean = 0.5 * (_softmax_by_hand(run, scan) + _softmax_by_hand(run2, scan))
    got = np.asarray(nib.load(str(out / "phantom_000.nii.gz")).dataobj)
    assert (got == np.asarray(VALUES)[mean.argmax(0)]).mean() > 0.999
    alone = _by_hand(run, scan)
    assert (got != alone).any()  # the second run changed something: a real ensemble
    saved = np.load(out / "phantom_000.npz")
    probs = saved["probabilities"]
    assert probs.dtype == np.float16 and probs.shape == (len(VALUES), 32, 32, 32)
    assert np.abs(probs.astype(np.float32) - mean).max() < 2e-3  # float16 rounding
    assert list(saved["class_names"])[3] == "ventricles" and list(saved["label_values"]) == VALUES


def test_ensemble_of_runs_with_other_classes_is_one_error(run, dataset, tmp_path, capsys):
    import predict

    other = tmp_path / "other"
    shutil.copytree(run, other)
    ckpt = torch.load(other / "last.pt", weights_only=True)
    ckpt["class_names"] = [*ckpt["class_names"][:-1], "something else"]
    torch.save(ckpt, other / "last.pt")
    out = tmp_path / "out"
    assert predict.main([str(run), str(other), str(dataset / "imagesTs"), str(out),
                         "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"run {other} cannot join an ensemble" in err, err
    assert "class_names" in err and not out.exists()


def test_predict_takes_several_inputs_and_glob_patterns(run, dataset, tmp_path):
    import predict

    src = dataset / "imagesTr"
    out = tmp_path / "out"
    assert predict.main([str(run), str(src / "phantom_000.nii.gz"), str(src / "phantom_002.nii.gz"),
                         str(out), "--no-progress"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["phantom_000.nii.gz", "phantom_002.nii.gz"]
    assert predict.main([str(run), str(src / "phantom_00[13].nii.gz"), str(tmp_path / "g"),
                         "--no-progress"]) == 0
    assert sorted(p.name for p in (tmp_path / "g").iterdir()) == ["phantom_001.nii.gz",
                                                                   "phantom_003.nii.gz"]
    got = np.asarray(nib.load(str(tmp_path / "g/phantom_001.nii.gz")).dataobj)
    assert (got == _by_hand(run, src / "phantom_001.nii.gz")).mean() > 0.999


@pytest.mark.parametrize("kind", ["pattern_matches_nothing", "two_inputs_one_file_name",
                                  "probabilities_exist"])
def test_several_inputs_bad_input(kind, run, dataset, tmp_path, capsys):
    import predict

    src = dataset / "imagesTr"
    if kind == "pattern_matches_nothing":
        argv, needle = [str(run), str(tmp_path / "*.nii.gz"), str(tmp_path / "o")], "matches no file"
    elif kind == "two_inputs_one_file_name":
        argv = [str(run), str(src / "phantom_000.nii.gz"), str(src / "phantom_001.nii.gz"),
                str(tmp_path / "o.nii.gz")]
        needle = "is a file name but the inputs are 2 scans"
    else:
        (tmp_path / "o").mkdir()
        (tmp_path / "o/phantom_000.npz").write_bytes(b"keep")
        argv = [str(run), str(src / "phantom_000.nii.gz"), str(tmp_path / "o"), "--save-probabilities"]
        needle = "phantom_000.npz"
    assert predict.main([*argv, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and needle in err, err
    assert not (tmp_path / "o.nii.gz").exists()
    if kind == "probabilities_exist":
        assert [p.name for p in (tmp_path / "o").iterdir()] == ["phantom_000.npz"]
        assert (tmp_path / "o/phantom_000.npz").read_bytes() == b"keep"


def test_postprocessing_is_chosen_on_held_out_volumes_and_applied_by_predict(run, dataset,
                                                                             tmp_path, capsys):
    """eval/postprocess.py writes the choice (per class: mean held-out Dice without and with the
    largest component only); predict.py applies exactly that choice and says so; evaluate.py
    --postprocess scores it; an existing choice is kept without --overwrite."""
    import evaluate
    import postprocess
    import predict

    from scse_seg.postprocess import keep_largest_component

    r = tmp_path / "run"
    shutil.copytree(run, r)
    assert postprocess.main([str(r), "--no-progress"]) == 0
    text = capsys.readouterr().out
    choice = json.loads((r / "postprocessing.json").read_text())
    assert set(choice["mean_dice"]) <= set(json.loads((r / "class_weights.json").read_text())["class_names"])
    for name, d in choice["mean_dice"].items():
        assert (name in choice["keep_largest_component"]) == (d["with_largest_component"] > d["without"])
    assert "keep the largest component of:" in text
    # a fixed choice, to see its effect: cortex and ventricles
    choice["keep_largest_component"] = ["cortex", "ventricles"]
    (r / "postprocessing.json").write_text(json.dumps(choice))
    scan = dataset / "imagesTr/phantom_000.nii.gz"
    assert predict.main([str(r), str(scan), str(tmp_path / "raw.nii.gz"), "--no-postprocessing",
                         "--no-progress"]) == 0
    assert "largest connected component" not in capsys.readouterr().out
    assert predict.main([str(r), str(scan), str(tmp_path / "pp.nii.gz"), "--no-progress"]) == 0
    assert "kept the largest connected component of cortex, ventricles" in capsys.readouterr().out
    raw = np.asarray(nib.load(str(tmp_path / "raw.nii.gz")).dataobj)
    classes = np.searchsorted(VALUES, raw)
    expected = np.asarray(VALUES)[keep_largest_component(classes, [1, 3])]
    assert np.array_equal(np.asarray(nib.load(str(tmp_path / "pp.nii.gz")).dataobj), expected)
    assert evaluate.main([str(r), "--postprocess", "--no-progress"]) == 0
    assert (r / "evaluation-heldout-last-postprocessed.csv").is_file()
    capsys.readouterr()
    assert postprocess.main([str(r), "--no-progress"]) == 2
    assert "postprocessing.json" in capsys.readouterr().err
    assert json.loads((r / "postprocessing.json").read_text())["keep_largest_component"] == \
        ["cortex", "ventricles"]


def test_evaluate_scores_an_ensemble_on_a_test_set(run, run2, dataset, capsys):
    import evaluate

    assert evaluate.main([str(run), str(run2), "--test", str(dataset), "--no-progress"]) == 0
    path = run / "evaluation-test-Phantom-last-ensemble2.csv"
    rows = [r for r in csv.DictReader(path.open()) if r["volume"] == "phantom_003"]
    mean = 0.5 * (_softmax_by_hand(run, dataset / "imagesTs/phantom_003_0000.nii.gz")
                  + _softmax_by_hand(run2, dataset / "imagesTs/phantom_003_0000.nii.gz"))
    ref = np.searchsorted(VALUES, np.asarray(nib.load(str(dataset / "labelsTs/phantom_003.nii.gz")).dataobj))
    pred = mean.argmax(0)
    assert len(rows) == len(VALUES) - 1
    for r in rows:
        a, b = pred == int(r["class_index"]), ref == int(r["class_index"])
        if a.sum() + b.sum():
            assert float(r["dice"]) == pytest.approx(2 * (a & b).sum() / (a.sum() + b.sum()), abs=2e-3)
    capsys.readouterr()
    assert evaluate.main([str(run), str(run2), "--no-progress"]) == 2
    assert "only on a test set" in capsys.readouterr().err


# ------------------------------------------------------------------------------- evaluate --test


def _dice(a, b):
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def test_evaluate_test_set_writes_csv_matching_hand_dice(run, dataset, tmp_path, capsys):
    import evaluate
    import predict

    csv_path = tmp_path / "res.csv"
    assert evaluate.main([str(run), "--test", str(dataset), "--csv", str(csv_path)]) == 0
    text = capsys.readouterr().out
    assert "1 test volumes in" in text and "imagesTs" in text and str(csv_path) in text
    rows = list(csv.DictReader(csv_path.open()))
    assert len(rows) == 10 and {r["volume"] for r in rows} == {"phantom_003"}
    assert predict.main([str(run), str(dataset / "imagesTs"), str(tmp_path / "p"), "--no-progress"]) == 0
    pred = np.asarray(nib.load(str(tmp_path / "p/phantom_003.nii.gz")).dataobj)
    ref = np.asarray(nib.load(str(dataset / "labelsTs/phantom_003.nii.gz")).dataobj)
    for r in rows:
        v = VALUES[int(r["class_index"])]
        if (pred == v).any() or (ref == v).any():
            assert float(r["dice"]) == pytest.approx(_dice(pred == v, ref == v), abs=1e-6)


def test_evaluate_default_csv_in_run_folder(run, dataset, capsys):
    import evaluate

    assert evaluate.main([str(run), "--test", str(dataset / "imagesTs")]) == 0
    assert (run / "evaluation-test-Phantom-last.csv").is_file()
    assert evaluate.main([str(run)]) == 0  # the held-out split, CSV beside it
    assert len(list(csv.DictReader((run / "evaluation-heldout-last.csv").open()))) == 10


def test_evaluate_another_dataset_with_other_class_names(run, dataset, tmp_path, capsys):
    import evaluate

    other = tmp_path / "Other"
    shutil.copytree(dataset, other, ignore=shutil.ignore_patterns("*Ts"))
    meta = json.loads((other / "dataset.json").read_text())
    meta["labels"]["30"] = "csf"
    meta["labels"]["110"] = "extra"
    (other / "dataset.json").write_text(json.dumps(meta))
    assert evaluate.main([str(run), "--test", str(other)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1
    assert "class 3: 'ventricles' in the run, 'csf' in the test set" in err
    assert "class 11 'extra' only in the test set" in err
    assert not list(other.rglob("*.csv")) and not list(run.glob("evaluation-test-Other*"))
    meta["labels"]["30"] = "ventricles"
    del meta["labels"]["110"]
    (other / "dataset.json").write_text(json.dumps(meta))
    assert evaluate.main([str(run), "--test", str(other), "--csv", str(tmp_path / "o.csv")]) == 0
    assert "4 test volumes" in capsys.readouterr().out  # every imagesTr/labelsTr pair


def test_evaluate_refuses_the_training_set_as_test_set(run, dataset, capsys):
    import evaluate

    shutil.move(dataset / "labelsTs", dataset / "labelsTs.off")
    try:
        assert evaluate.main([str(run), "--test", str(dataset)]) == 2
    finally:
        shutil.move(dataset / "labelsTs.off", dataset / "labelsTs")
    assert "trained on" in capsys.readouterr().err


def test_evaluate_lists_every_missing_volume(run, tmp_path, capsys):
    import evaluate

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    split = json.loads((copy / "split.json").read_text())
    split["val"] = [f"case_{i:02d}" for i in range(13)]
    (copy / "split.json").write_text(json.dumps(split))
    assert evaluate.main([str(copy)]) == 2
    err = capsys.readouterr().err
    assert "case_00" in err and "case_09" in err and "and 3 more" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_evaluate_device_error_names_the_flag(run, capsys):
    import evaluate

    assert evaluate.main([str(run), "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "--device is 'cuda'" in err and "train.device" not in err


# ------------------------------------------------------------------------------- bad input


def _bad(kind, run, dataset, tmp):
    """(argv for predict.py, paths that must not appear) for each kind of bad input."""
    out = tmp / "out"
    if kind == "not_nifti":
        (tmp / "notes.nii.gz").write_text("not an image")
        return [str(run), str(tmp / "notes.nii.gz"), str(out)], "not a readable NIfTI"
    if kind == "not_nifti_name":
        (tmp / "notes.txt").write_text("hello")
        return [str(run), str(tmp / "notes.txt"), str(out)], "not a NIfTI file"
    if kind == "empty_folder":
        (tmp / "empty").mkdir()
        return [str(run), str(tmp / "empty"), str(out)], "holds no NIfTI files"
    if kind == "wrong_channels":
        src = tmp / "in"
        src.mkdir()
        shutil.copy(dataset / "imagesTr/phantom_000.nii.gz", src / "ok.nii.gz")  # checked first
        a = nib.load(str(dataset / "imagesTr/phantom_001.nii.gz"))
        x = np.asarray(a.dataobj)
        nib.save(nib.Nifti1Image(np.stack([x, x], -1), a.affine), str(src / "two.nii.gz"))
        return [str(run), str(src), str(out)], "2 channels"
    if kind == "channel_files":
        src = tmp / "in"
        src.mkdir()
        for c in ("0000", "0001"):
            shutil.copy(dataset / "imagesTr/phantom_000.nii.gz", src / f"case_{c}.nii.gz")
        return [str(run), str(src), str(out)], "case_0001.nii.gz"
    if kind == "unwritable_output":
        (tmp / "file").write_text("x")
        return [str(run), str(dataset / "imagesTs"), str(tmp / "file" / "out")], "cannot write"
    if kind == "no_checkpoint":
        (tmp / "run").mkdir()
        (tmp / "run/config.yaml").write_text("{}")
        return [str(tmp / "run"), str(dataset / "imagesTs"), str(out)], "last.pt not found"
    if kind == "no_run_folder":
        return [str(tmp / "nope"), str(dataset / "imagesTs"), str(out)], "not found"
    if kind == "output_is_input_folder":
        src = tmp / "in"
        shutil.copytree(dataset / "imagesTs", src)
        return [str(run), str(src), str(src)], "same as INPUT"
    if kind == "output_is_input_file":
        shutil.copy(dataset / "imagesTr/phantom_000.nii.gz", tmp / "x.nii.gz")
        return [str(run), str(tmp / "x.nii.gz"), str(tmp / "x.nii.gz")], "same as INPUT"
    if kind == "output_overwrites_input":
        src = tmp / "in"
        src.mkdir()
        shutil.copy(dataset / "imagesTr/phantom_000.nii.gz", src / "x.nii.gz")
        return [str(run), str(src / "x.nii.gz"), str(src)], "would overwrite the input"
    if kind == "bad_checkpoint_name":
        return [str(run), str(dataset / "imagesTs"), str(out), "--checkpoint", "final.pt"], \
            "pass --checkpoint"
    raise AssertionError(kind)


BAD = ["not_nifti", "not_nifti_name", "empty_folder", "wrong_channels", "channel_files",
       "unwritable_output", "no_checkpoint", "no_run_folder", "output_is_input_folder",
       "output_is_input_file", "output_overwrites_input", "bad_checkpoint_name"]


@pytest.mark.parametrize("kind", BAD)
def test_predict_bad_input(kind, run, dataset, tmp_path, capsys):
    import predict

    argv, needle = _bad(kind, run, dataset, tmp_path)
    before = {p: hashlib.md5(p.read_bytes()).hexdigest() for p in tmp_path.rglob("*") if p.is_file()}
    assert predict.main(argv + ["--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert needle in err, err
    after = {p: hashlib.md5(p.read_bytes()).hexdigest() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before  # nothing written, nothing changed
    assert not (tmp_path / "out").exists()


def test_bad_input_as_a_user_sees_it(run, tmp_path):
    """The real command line: exit status 2, one line, no traceback."""
    (tmp_path / "x.nii.gz").write_text("not an image")
    for script, args in (("predict.py", [str(run), str(tmp_path / "x.nii.gz"), str(tmp_path / "o")]),
                         ("export.py", [str(tmp_path / "nope"), str(tmp_path / "e")]),
                         ("evaluate.py", [str(run), "--test", str(tmp_path / "none")])):
        r = subprocess.run([sys.executable, str(ROOT / "eval" / script), *args], capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 2 and r.stderr.startswith("error:"), (script, r.stderr)
        assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists() and not (tmp_path / "e").exists()


def test_export_refuses_non_empty_output_and_missing_checkpoint(run, tmp_path, capsys):
    import export

    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    assert export.main([str(run), str(tmp_path / "full")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]
    assert export.main([str(run), str(tmp_path / "e"), "--checkpoint", "best2.pt"]) == 2
    assert "best2.pt not found" in capsys.readouterr().err and not (tmp_path / "e").exists()


# ------------------------------------------------------------------------------- export

ARCHS = ["unet", "densenet", "sdnet", "smp_unet"]
ATTNS = ["none", "cse", "sse", "scse", "cbam"]


def _tiny(arch, attention, dim=2):
    from scse_seg import create_model

    torch.manual_seed(0)
    kw = dict(encoder_name="resnet18") if arch == "smp_unet" else dict(width=4)
    model = create_model(arch, 1, 3, attention, dim, **kw).eval()
    return model, model.size_multiple  # 32 for smp_unet (5 downsamplings), 16 for the others


# every architecture vanilla and with scSE; every attention on the cheapest architecture (an
# attention block exports the same way in any network): 11 exports instead of the 20 of the full
# cross product, which cost about a minute of CI for no new code path
EXPORT_CASES = [(a, t) for a in ARCHS for t in ("none", "scse")] + \
    [("unet", t) for t in ATTNS if t not in ("none", "scse")]


@pytest.mark.parametrize("arch,attention", EXPORT_CASES)
def test_exported_program_matches_eager(arch, attention):
    from scse_seg.export import export_program

    model, m = _tiny(arch, attention)
    program = export_program(model, 2, m).module()
    for shape in ((1, 1, 2 * m, 2 * m), (3, 1, 3 * m, 4 * m)):  # other batch and sizes than traced
        x = torch.randn(*shape)
        with torch.no_grad():
            assert torch.allclose(program(x), model(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["unet", "densenet"])
def test_exported_3d_program_matches_eager(arch):
    from scse_seg.export import export_program

    model, m = _tiny(arch, "scse", dim=3)
    x = torch.randn(1, 1, 2 * m, 3 * m, 2 * m)
    with torch.no_grad():
        assert torch.allclose(export_program(model, 3, m).module()(x), model(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["densenet"])  # max-unpool; unet's ONNX export: README test
def test_onnx_matches_eager(arch, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from scse_seg.export import export_onnx, export_program, onnx_available

    if onnx_available():
        pytest.skip(onnx_available())
    model, m = _tiny(arch, "scse")
    export_onnx(export_program(model, 2, m), tmp_path / "m.onnx", 2, m)
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"))
    x = torch.randn(2, 1, 3 * m, 2 * m)
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        assert np.allclose(got, model(x).numpy(), atol=1e-5, rtol=0)


# eval/apply_exported.py, the README's reference for the exported program, with scse_seg unimportable
STANDALONE = """
import runpy, sys
sys.modules["scse_seg"] = None  # prove the artefact needs none of this package
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_export_runs_without_the_package(run, dataset, tmp_path, capsys):
    import export
    import predict

    out = tmp_path / "exported"
    assert export.main([str(run), str(out), "--no-onnx"]) == 0
    assert "ONNX skipped: not requested" in capsys.readouterr().out
    pre = json.loads((out / "preprocessing.json").read_text())
    assert pre["label_values"] == VALUES and pre["class_names"][3] == "ventricles"
    assert pre["slice_axis"] == "coronal" and pre["size_multiple"] >= 16 and pre["dim"] == 2
    image = dataset / "imagesTs/phantom_003_0000.nii.gz"
    r = subprocess.run([sys.executable, "-c", STANDALONE, str(ROOT / "eval/apply_exported.py"),
                        str(out), str(image), str(tmp_path / "s.nii.gz")],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert predict.main([str(run), str(image), str(tmp_path / "p.nii.gz"), "--no-progress"]) == 0
    ours = nib.load(str(tmp_path / "p.nii.gz"))
    theirs = nib.load(str(tmp_path / "s.nii.gz"))
    assert np.array_equal(theirs.affine, ours.affine)
    assert np.array_equal(np.asarray(theirs.dataobj), np.asarray(ours.dataobj))


# ------------------------------------------------------------------------------- README


def _readme_blocks(lang):
    text = (ROOT / "README.md").read_text()
    section = text.split("## Use a trained model", 1)[1].split("\n## ", 1)[0]
    return [b.split("```", 1)[0] for b in section.split(f"```{lang}\n")[1:]]


def test_readme_use_a_trained_model_runs_as_written(run, dataset, tmp_path):
    """The section's commands and Python, verbatim, in a folder laid out as they assume:
    runs/hippo (the tiny run), ../shared/data/Task04_Hippocampus with imagesTs/ (the phantom),
    path/to/TestSet (a labelled test set), scan.nii.gz."""
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "eval").symlink_to(ROOT / "eval")
    (proj / "runs").mkdir()
    shutil.copytree(run, proj / "runs/hippo")
    shutil.copytree(run, proj / "runs/hippo-s1")  # the ensemble's second member
    (proj / "scans").mkdir()
    for name in ("phantom_000", "phantom_001"):
        shutil.copy(dataset / f"imagesTr/{name}.nii.gz", proj / "scans")
    (tmp_path / "shared/data").mkdir(parents=True)
    (tmp_path / "shared/data/Task04_Hippocampus").symlink_to(dataset)
    (proj / "path/to").mkdir(parents=True)
    (proj / "path/to/TestSet").symlink_to(dataset)
    shutil.copy(dataset / "imagesTr/phantom_000.nii.gz", proj / "scan.nii.gz")
    commands = [line for line in _readme_blocks("bash")[0].splitlines() if line.strip()]
    assert [c.split()[1] for c in commands] == ["eval/predict.py", "eval/predict.py", "eval/postprocess.py",
                                                "eval/evaluate.py", "eval/export.py",
                                                "eval/apply_exported.py"]
    env = {**__import__("os").environ, "PYTHONPATH": str(ROOT)}
    for cmd in commands:
        r = subprocess.run(["bash", "-c", cmd], cwd=proj, env=env, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, (cmd, r.stderr[-2000:])
    assert (proj / "preds/hippo/phantom_003.nii.gz").is_file()
    assert sorted(p.name for p in (proj / "preds/ensemble").iterdir()) == [
        "phantom_000.nii.gz", "phantom_000.npz", "phantom_001.nii.gz", "phantom_001.npz"]
    assert (proj / "runs/hippo/evaluation-test-TestSet-last.csv").is_file()
    assert (proj / "exported/hippo/model.pt2").is_file()
    assert (proj / "exported/hippo/preprocessing.json").is_file()
    assert (proj / "runs/hippo-s1/postprocessing.json").is_file()
    assert set(np.unique(nib.load(str(proj / "scan_labels.nii.gz")).dataobj)) <= set(VALUES)
    code = _readme_blocks("python")[0]
    check = f"\nprint(labels.shape, set(labels.ravel().tolist()) <= set({VALUES}), callable(net))"
    r = subprocess.run([sys.executable, "-c", code + check], cwd=proj, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.splitlines()[-1] == "(32, 32, 32) True True"


def test_predict_3d_model_keeps_shape_and_label_values():
    """A 3D model: sliding-window prediction of an odd-sized volume, padded and cropped back."""
    from scse_seg.config import build_config, parse_override
    from scse_seg.predictor import LoadedModel

    cfg = build_config([], [parse_override(o) for o in
                            ("model.dim=3", "model.width=4", "data.patch_size=[16,16,16]")])
    torch.manual_seed(0)
    loaded = LoadedModel(cfg.model.build(1, 3).eval(), cfg, ["bg", "a", "b"], [0, 7, 300],
                         torch.device("cpu"), None, "last.pt", {})
    image = np.random.default_rng(0).normal(size=(20, 23, 18)).astype(np.float32)
    import scse_seg

    labels = scse_seg.predict(loaded, image)
    assert labels.shape == image.shape and set(np.unique(labels)) <= {0, 7, 300}
    assert loaded.preprocessing()["sliding_window"]["roi_size"] == [16, 16, 16]


def test_four_digit_case_numbers_are_not_channels(tmp_path):
    """case_0001 is a second channel only beside case_0000 (nnU-Net); subj_0001, subj_0002 alone
    are cases, written under their own names."""
    from predict import plan_outputs

    for name in ("subj_0001.nii.gz", "subj_0002.nii.gz", "b_0000.nii"):
        (tmp_path / name).write_bytes(b"")
    pairs = plan_outputs(tmp_path, tmp_path / "out")
    assert sorted(o.name for _, o in pairs) == ["b.nii", "subj_0001.nii.gz", "subj_0002.nii.gz"]
