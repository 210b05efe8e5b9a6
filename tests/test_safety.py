"""Data safety (issue 24): no command writes into a dataset or over a file it did not create
without --overwrite, a run folder has one writer, outputs appear whole or not at all, and every
bad input is one ``error:`` line, exit 2, with the folder tree byte-identical before and after.

One parametrised bad-input test per command (train, predict, evaluate, export, compare), each
case of the issue a row; expected values are written by hand (label edges, the dataset's files).
"""
import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest
from helpers import FAST, ROOT, run_cli

sys.path.insert(0, str(ROOT / "eval"))

ROOT_USER = os.geteuid() == 0  # root ignores permission bits: read-only folders need a non-root user


def tree(folder):
    """{relative path: md5} of every file under ``folder`` (the byte-identical check)."""
    return {str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def one_error_line(err: str, needle: str) -> None:
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err and needle in err, err


@pytest.fixture(scope="module")
def dataset(tiny_phantom, tmp_path_factory):
    root = tmp_path_factory.mktemp("ds") / "Phantom"
    shutil.copytree(tiny_phantom, root)
    return root


@pytest.fixture(scope="module")
def run(dataset, tmp_path_factory):
    from scse_seg.cli import main

    out = tmp_path_factory.mktemp("runs") / "tiny"
    assert main(["--data", str(dataset), "--epochs", "1", "--out", str(out), *FAST]) == 0
    return out


@pytest.fixture
def work(tmp_path):
    """A scratch folder whose whole tree is compared before and after each bad command."""
    return tmp_path


# ------------------------------------------------------------------------------ predict

def _predict_case(kind, run, dataset, tmp):
    """(argv, text the error must name) for each bad predict.py input."""
    src = tmp / "in"
    src.mkdir()
    good = dataset / "imagesTr/phantom_000.nii.gz"
    if kind == "into_dataset_labels":  # defect 1: predictions over the reference labels
        ds = tmp / "ds"
        shutil.copytree(dataset, ds)
        return [str(run), str(ds / "imagesTr"), str(ds / "labelsTr")], "inside the dataset"
    if kind == "over_an_existing_file":
        shutil.copy(good, src / "a.nii.gz")
        (tmp / "out").mkdir()
        (tmp / "out/a.nii.gz").write_bytes(b"the user's own file")
        return [str(run), str(src), str(tmp / "out")], "already exists"
    if kind == "nan_in_second_scan":  # defect 7: the first scan's output must not be left
        shutil.copy(good, src / "a.nii.gz")
        img = nib.load(str(good))
        x = np.asarray(img.dataobj).astype(np.float32)
        x[3, 3, 3] = np.nan
        nib.save(nib.Nifti1Image(x, img.affine), str(src / "b.nii.gz"))
        return [str(run), str(src), str(tmp / "out")], "NaN"
    if kind == "header_claims_huge_volume":  # defect 12: MemoryError before
        hdr = nib.Nifti1Header()
        hdr.set_data_shape((20000, 20000, 20000))
        hdr.set_data_dtype(np.float32)
        (src / "huge.nii").write_bytes(hdr.binaryblock + b"\0" * (100 - 4))
        return [str(run), str(src / "huge.nii"), str(tmp / "out")], "header claims"
    if kind == "complex_scan":
        img = nib.load(str(good))
        x = np.asarray(img.dataobj).astype(np.complex64)
        nib.save(nib.Nifti1Image(x, img.affine), str(src / "c.nii.gz"))
        return [str(run), str(src / "c.nii.gz"), str(tmp / "out")], "complex"
    raise AssertionError(kind)


PREDICT = ["into_dataset_labels", "over_an_existing_file", "nan_in_second_scan",
           "header_claims_huge_volume", "complex_scan"]


@pytest.mark.parametrize("kind", PREDICT)
def test_predict_refuses(kind, run, dataset, work, capsys):
    import predict

    argv, needle = _predict_case(kind, run, dataset, work)
    before = tree(work)
    assert predict.main(argv + ["--no-progress"]) == 2
    one_error_line(capsys.readouterr().err, needle)
    assert tree(work) == before
    assert not (work / "out").exists() or kind == "over_an_existing_file"


def test_predict_overwrite_flag_replaces_and_stages(run, dataset, work, capsys):
    """--overwrite replaces an existing output; no staging folder is left behind."""
    import predict

    (work / "out").mkdir()
    (work / "out/phantom_000.nii.gz").write_bytes(b"old")
    src = work / "in"
    src.mkdir()
    shutil.copy(dataset / "imagesTr/phantom_000.nii.gz", src)
    assert predict.main([str(run), str(src), str(work / "out"), "--overwrite", "--no-progress"]) == 0
    assert [p.name for p in (work / "out").iterdir()] == ["phantom_000.nii.gz"]
    assert nib.load(str(work / "out/phantom_000.nii.gz")).shape == (32, 32, 32)


# ------------------------------------------------------------------------------ evaluate

def _evaluate_case(kind, run, dataset, tmp):
    if kind == "save_into_dataset_labels":  # defect 1 (evaluate): Dice 1.0 on the next run
        return [str(run), "--data", str(dataset), "--save-predictions",
                str(dataset / "labelsTr")], "inside the dataset"
    if kind == "save_predictions_is_a_file":  # defect 13: raised after predicting everything
        (tmp / "file").write_text("x")
        return [str(run), "--save-predictions", str(tmp / "file")], "is a file"
    if kind == "save_over_existing_prediction":
        (tmp / "pred").mkdir()
        split = json.loads((run / "split.json").read_text())
        (tmp / "pred" / f"{split['val'][0]}.nii.gz").write_bytes(b"mine")
        return [str(run), "--save-predictions", str(tmp / "pred")], "already exists"
    if kind == "truncated_split_json":  # defect 16: JSONDecodeError before
        r = tmp / "run"
        shutil.copytree(run, r)
        (r / "split.json").write_text((r / "split.json").read_text()[:20])
        return [str(r), "--csv", str(tmp / "r.csv")], "split.json is truncated"
    if kind == "split_json_without_val":  # KeyError before
        r = tmp / "run"
        shutil.copytree(run, r)
        (r / "split.json").write_text(json.dumps({"train": []}))
        return [str(r), "--csv", str(tmp / "r.csv")], "split.json is truncated"
    raise AssertionError(kind)


EVALUATE = ["save_into_dataset_labels", "save_predictions_is_a_file",
            "save_over_existing_prediction", "truncated_split_json", "split_json_without_val"]


@pytest.mark.parametrize("kind", EVALUATE)
def test_evaluate_refuses(kind, run, dataset, work, capsys):
    import evaluate

    argv, needle = _evaluate_case(kind, run, dataset, work)
    before, labels = tree(work), tree(dataset)
    assert evaluate.main(argv + ["--no-progress"]) == 2
    one_error_line(capsys.readouterr().err, needle)
    assert tree(work) == before and tree(dataset) == labels


def test_evaluate_writes_every_prediction_or_none(run, dataset, work, monkeypatch, capsys):
    """A full disk on the second prediction leaves no first one in the folder."""
    import evaluate

    from scse_seg import fileio

    real, calls = fileio.atomic_write_bytes, []

    def full_disk(path, writer):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, writer)

    monkeypatch.setattr(fileio, "atomic_write_bytes", full_disk)
    split = json.loads((run / "split.json").read_text())
    assert len(split["val"]) >= 2 or pytest.skip("needs two held-out volumes")
    assert evaluate.main([str(run), "--save-predictions", str(work / "pred"), "--csv",
                          str(work / "r.csv"), "--no-progress"]) == 2
    one_error_line(capsys.readouterr().err, "No space left")
    assert not (work / "pred").exists() or not any((work / "pred").iterdir())


# ------------------------------------------------------------------------------ export

def test_export_killed_after_the_program_leaves_no_half_folder(run, work):
    """Defect 8: SIGKILL after model.pt2 is written; the rerun of the same command works."""
    env = {**os.environ, "SCSE_SEG_FAILPOINT": "export_written"}
    cmd = [sys.executable, str(ROOT / "eval/export.py"), str(run), str(work / "exp"), "--no-onnx"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == -9, r.stderr  # killed at the failpoint
    assert not (work / "exp").exists()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (work / "exp").iterdir()) == ["model.pt2", "preprocessing.json"]


def _export_case(kind, run, tmp, monkeypatch):
    if kind == "full_disk":  # defect 15: SIGABRT (exit 134) before
        from pathlib import Path

        def no_space(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(Path, "write_bytes", no_space)
        return [str(run), str(tmp / "exp"), "--no-onnx"], "No space left"
    if kind == "under_a_file":
        (tmp / "f").write_text("x")
        return [str(run), str(tmp / "f" / "exp"), "--no-onnx"], "is a file"
    if kind == "proc":  # defect 14: export to /proc/x
        return [str(run), "/proc/scse_seg_export_test", "--no-onnx"], "/proc/scse_seg_export_test"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["full_disk", "under_a_file", "proc"])
def test_export_refuses(kind, run, work, monkeypatch, capsys):
    import export

    argv, needle = _export_case(kind, run, work, monkeypatch)
    before = tree(work)
    assert export.main(argv) == 2
    monkeypatch.undo()
    one_error_line(capsys.readouterr().err, needle)
    assert tree(work) == before
    assert not [p for p in work.iterdir() if p.name.startswith(".exp")]  # no staging left


# ------------------------------------------------------------------------------ train

def _train_case(kind, run, dataset, tmp):
    if kind == "resume_with_another_block":  # defect 9: RuntimeError from load_state_dict
        r = tmp / "run"
        shutil.copytree(run, r)
        return ["--resume", str(r), "--block", "sk"], "model.block"
    if kind == "resume_another_checkpoint_version":  # CHECKPOINT_VERSION was written, never read
        import torch

        r = tmp / "run"
        shutil.copytree(run, r)
        ckpt = torch.load(r / "last.pt", weights_only=True)
        ckpt["version"] = 99
        torch.save(ckpt, r / "last.pt")
        return ["--resume", str(r)], "checkpoint version 99"
    if kind == "config_base_names_itself":  # defect 11: RecursionError
        (tmp / "loop.yaml").write_text("base: loop.yaml\n")
        return ["--config", str(tmp / "loop.yaml"), "--out", str(tmp / "o")], "loops"
    if kind == "config_base_cycle_of_two":
        (tmp / "a.yaml").write_text("base: b.yaml\n")
        (tmp / "b.yaml").write_text("base: a.yaml\n")
        return ["--config", str(tmp / "a.yaml"), "--out", str(tmp / "o")], "loops"
    if kind == "binary_config":  # defect 11: UnicodeDecodeError
        (tmp / "c.yaml").write_bytes(bytes(range(128, 256)))
        return ["--config", str(tmp / "c.yaml"), "--out", str(tmp / "o")], "not a text file"
    if kind == "out_under_a_file":  # defect 14
        (tmp / "f").write_text("x")
        return ["--data", str(dataset), "--out", str(tmp / "f" / "run"), *FAST], "is a file"
    if kind == "duplicate_case":  # defect 6: train/validation leakage
        ds = tmp / "ds"
        shutil.copytree(dataset, ds)
        meta = json.loads((ds / "dataset.json").read_text())
        meta["training"].append(dict(meta["training"][0]))
        (ds / "dataset.json").write_text(json.dumps(meta))
        return ["--data", str(ds), "--out", str(tmp / "o"), *FAST], "both use the image file"
    if kind == "file_ending_escapes":  # defect 4
        ds = tmp / "ds"
        shutil.copytree(dataset, ds)
        meta = json.loads((ds / "dataset.json").read_text())
        del meta["training"]
        meta["file_ending"] = "/../../../OUTSIDE.nii.gz"
        (ds / "dataset.json").write_text(json.dumps(meta))
        return ["--data", str(ds), "--out", str(tmp / "o"), *FAST], "file_ending"
    raise AssertionError(kind)


TRAIN = ["resume_with_another_block", "resume_another_checkpoint_version",
         "config_base_names_itself", "config_base_cycle_of_two", "binary_config",
         "out_under_a_file", "duplicate_case", "file_ending_escapes"]


@pytest.mark.parametrize("kind", TRAIN)
def test_train_refuses(kind, run, dataset, work, capsys):
    from scse_seg.cli import main

    argv, needle = _train_case(kind, run, dataset, work)
    before = tree(work)
    assert main(argv) == 2
    one_error_line(capsys.readouterr().err, needle)
    assert tree(work) == before
    assert not (work / "o").exists()


@pytest.mark.parametrize("dataset_json", [
    {"file_ending": None},
    {"labels": {"0": "background", "1": "a", "Infinity": "b"}},
    {"labels": {"background": 0, "a": 1.5}},
    "nested"])
def test_malformed_dataset_json_is_one_error(dataset_json, dataset, work):
    """Defect 10: TypeError, RecursionError, OverflowError before."""
    from scse_seg.data import read_msd
    from scse_seg.errors import DataError

    ds = work / "ds"
    shutil.copytree(dataset, ds)
    meta = json.loads((ds / "dataset.json").read_text())
    if dataset_json == "nested":
        (ds / "dataset.json").write_text('{"labels": ' + "[" * 100_000 + "]" * 100_000 + "}")
    else:
        if "labels" in dataset_json:  # JSON has no Infinity literal: Python writes one
            meta["labels"] = {k if k != "Infinity" else "Infinity": v
                              for k, v in dataset_json["labels"].items()}
            text = json.dumps(meta).replace('"Infinity": "b"', '"b": Infinity')
        else:
            meta.update(dataset_json)
            text = json.dumps(meta)
        (ds / "dataset.json").write_text(text)
    with pytest.raises(DataError, match="dataset.json"):
        read_msd(ds)


def test_label_value_of_a_trillion_maps_without_a_huge_table():
    """Defect 10: remap_labels sized a lookup table by the largest value (7.28 TiB)."""
    from scse_seg.data import remap_labels

    label = np.array([[0, 10**12], [7, 0]])
    t0 = time.perf_counter()
    np.testing.assert_array_equal(remap_labels(label, [0, 7, 10**12]), [[0, 2], [1, 0]])
    assert time.perf_counter() - t0 < 1.0
    np.testing.assert_array_equal(remap_labels(np.array([5]), [0, 7]), [-1])  # undeclared


@pytest.mark.parametrize("top, dtype", [(255, np.uint8), (256, np.uint16), (32767, np.uint16),
                                        (32768, np.uint16), (40000, np.uint16),
                                        (65535, np.uint16), (65536, np.uint32),
                                        (2**31, np.uint32), (2**32, np.int64)])
def test_predictions_keep_large_label_values(top, dtype, work):
    """Defect 3: a value >= 32768 was written as int16 and wrapped (40000 -> -25536)."""
    from scse_seg.inference import save_prediction_nifti

    classes = np.array([0, 1, 2, 1]).reshape(1, 2, 2)
    save_prediction_nifti(classes, np.eye(4), [0, 7, top], work / "p.nii.gz")
    img = nib.load(str(work / "p.nii.gz"))
    assert img.get_data_dtype() == dtype
    np.testing.assert_array_equal(np.asarray(img.dataobj).ravel(), [0, 7, top, 7])


def test_negative_label_values_use_a_signed_type():
    from scse_seg.inference import label_dtype

    assert label_dtype([-1, 0, 127]) == np.int8
    assert label_dtype([-1, 0, 128]) == np.int16
    assert label_dtype([-1, 40000]) == np.int32


def test_full_disk_while_writing_the_log_is_one_line(dataset, work, monkeypatch, capsys):
    """Defect 15: OSError traceback from log.csv; the checkpoint of the epoch is kept."""
    from scse_seg.cli import main
    from scse_seg.training import engine

    def full(path, history):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(engine, "_write_csv", full)
    assert main(["--data", str(dataset), "--epochs", "1", "--out", str(work / "r"), *FAST]) == 2
    one_error_line(capsys.readouterr().err, "log.csv")
    assert (work / "r/last.pt").is_file() and not (work / "r/log.csv").exists()


def test_full_disk_while_drawing_curves_is_one_line(dataset, work, monkeypatch, capsys):
    from scse_seg import fileio
    from scse_seg.cli import main

    real = fileio.atomic_write_bytes

    def full(path, writer):
        if str(path).endswith(".png"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, writer)

    monkeypatch.setattr(fileio, "atomic_write_bytes", full)
    assert main(["--data", str(dataset), "--epochs", "1", "--out", str(work / "r"), *FAST]) == 2
    one_error_line(capsys.readouterr().err, "curves.png")
    assert (work / "r/last.pt").is_file() and not (work / "r/curves.png").exists()
    assert not list((work / "r").glob(".curves*"))


def test_two_trainings_on_one_out_leave_one_run_and_one_error(dataset, work):
    """Defect 2: both printed done: and the folder held one run. Two real processes."""
    args = ["--data", str(dataset), "--epochs", "2", "--out", str(work / "r"), *FAST]
    env = {"OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(ROOT / "train_seg.py"), *args, "--seed", s],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd=ROOT, env={**os.environ, **env}) for s in ("1", "2")]
    outs = [p.communicate(timeout=600) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], outs
    err = next(e for p, (_, e) in zip(procs, outs) if p.returncode == 2)
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "in use by process" in err or "already holds a run" in err, err
    winner = next(p for p in procs if p.returncode == 0)
    seed = "1" if winner is procs[0] else "2"
    assert f"seed: {seed}" in (work / "r/config.yaml").read_text()


def test_lock_names_the_holder_and_a_dead_holder_does_not_block(work):
    from scse_seg.errors import UserError
    from scse_seg.fileio import RunLock

    with RunLock(work / "r"):
        with pytest.raises(UserError, match=f"in use by process {os.getpid()}"):
            with RunLock(work / "r"):
                pass
    # a process killed while holding the lock: the kernel released it, the file stays
    p = subprocess.run([sys.executable, "-c", "import os, signal, sys; sys.path.insert(0, sys.argv[1]);"
                        "from scse_seg.fileio import RunLock; l = RunLock(sys.argv[2]).__enter__();"
                        "(l.folder / 'x').write_text('x'); os.kill(os.getpid(), signal.SIGKILL)",
                        str(ROOT), str(work / "k")], timeout=60)
    assert p.returncode == -9 and (work / "k/.lock").is_file()
    with RunLock(work / "k"):
        pass


def test_resume_after_a_stale_lock_file(run, work):
    r = work / "run"
    shutil.copytree(run, r)
    (r / ".lock").write_text("process 99999 on elsewhere (killed)\n")
    res = run_cli(["--resume", str(r), "--epochs", "2"])
    assert res.returncode == 0, res.stderr


@pytest.mark.skipif(ROOT_USER, reason="root ignores permission bits")
def test_read_only_out_folder(dataset, work, capsys):
    from scse_seg.cli import main

    (work / "ro").mkdir()
    os.chmod(work / "ro", 0o555)
    try:
        assert main(["--data", str(dataset), "--out", str(work / "ro/run"), *FAST]) == 2
        one_error_line(capsys.readouterr().err, "not writable")
    finally:
        os.chmod(work / "ro", 0o755)


# ------------------------------------------------------------------------------ compare

def test_grid_cache_is_keyed_on_the_checkpoint(run, work):
    """Defect 5: a run resumed to more epochs kept its old eval.json; a truncated one crashed."""
    from scse_seg.grid import _load_eval, _save_eval, eval_key

    class Spec:
        tta, surface = False, False

    r = work / "run"
    shutil.copytree(run, r)
    from scse_seg.evaluation.runs import evaluate_run

    ev = evaluate_run(r, progress=False)
    assert ev.checkpoint.startswith("last.pt (epoch 1, sha256 ")
    key = eval_key(r, Spec)
    _save_eval(r / "eval.json", ev, key, 0.0)
    cached = _load_eval(r / "eval.json", eval_key(r, Spec))
    assert [(x["volume"], x["dice"]) for x in cached.rows] == \
        [(x["volume"], x["dice"]) for x in ev.rows]
    assert run_cli(["--resume", str(r), "--epochs", "2"]).returncode == 0
    assert _load_eval(r / "eval.json", eval_key(r, Spec)) is None  # stale: re-evaluated
    Spec.tta = True
    assert _load_eval(r / "eval.json", eval_key(r, Spec)) is None
    (r / "eval.json").write_text((r / "eval.json").read_text()[:30])
    assert _load_eval(r / "eval.json", key) is None  # truncated: re-evaluated, no crash


def test_compare_out_under_a_file_fails_before_training(dataset, work, capsys):
    import compare

    (work / "f").write_text("x")
    before = tree(work)
    code = compare.main(["--data", str(dataset), "--out", str(work / "f" / "cmp"),
                         "--archs", "unet", "--attns", "none", "--epochs", "1", "--no-progress"])
    assert code == 2
    one_error_line(capsys.readouterr().err, "is a file")
    assert tree(work) == before
