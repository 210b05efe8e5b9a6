"""End-to-end training: a run writes its folder, resumes exactly, and is deterministic."""
import csv
import random
import signal
import time

import pytest
import torch
import yaml
from helpers import FAST, phantom_args, run_cli

from scse_seg.cli import main
from scse_seg.fileio import load_checkpoint


def _weights(run_dir):
    return load_checkpoint(run_dir / "last.pt")["model"]


def _assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _log(run_dir):
    with open(run_dir / "log.csv") as f:
        return list(csv.DictReader(f))


def test_two_epochs_then_resume(tiny_phantom, tmp_path):
    out = tmp_path / "run"
    assert main([*phantom_args(tiny_phantom), "--epochs", "1", "--out", str(out), *FAST]) == 0
    for name in ("config.yaml", "split.json", "class_weights.json", "log.csv", "last.pt",
                 "best.pt"):
        assert (out / name).is_file(), name
    ck = load_checkpoint(out / "last.pt")
    assert ck["epoch"] == 1 and ck["class_names"][0] == "background" and "optimizer" in ck
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["epochs"] == 1
    # resume and extend to 2 epochs
    assert main(["--resume", str(out), "--epochs", "2", "--no-progress"]) == 0
    assert [int(r["epoch"]) for r in _log(out)] == [1, 2]
    # a straight 2-epoch run ends with the same weights as 1 + resumed 1
    ref = tmp_path / "ref"
    assert main([*phantom_args(tiny_phantom), "--epochs", "2", "--out", str(ref), *FAST]) == 0
    _assert_same_weights(_weights(out), _weights(ref))
    assert _log(out)[-1]["val_dice"] == _log(ref)[-1]["val_dice"]


def test_same_seed_same_metrics(tiny_phantom, tmp_path):
    """Determinism: same seed, same machine -> identical weights and metrics."""
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        assert main([*phantom_args(tiny_phantom), "--epochs", "2", "--out", str(out), *FAST]) == 0
        runs.append(out)
    _assert_same_weights(_weights(runs[0]), _weights(runs[1]))
    keep = ("train_loss", "val_dice")
    assert [{k: r[k] for k in keep} for r in _log(runs[0])] == \
        [{k: r[k] for k in keep} for r in _log(runs[1])]
    c = tmp_path / "c"
    assert main([*phantom_args(tiny_phantom), "--epochs", "2", "--seed", "1", "--out", str(c),
                 *FAST]) == 0
    assert not torch.equal(_weights(c)["classifier.weight"], _weights(runs[0])["classifier.weight"])


def _reference(tiny_phantom, tmp_path, epochs=3):
    ref = tmp_path / "ref"
    assert main([*phantom_args(tiny_phantom), "--epochs", str(epochs), "--out", str(ref),
                 *FAST]) == 0
    return _weights(ref)


def test_sigkill_during_checkpoint_write_then_resume(tiny_phantom, tmp_path):
    ref = _reference(tiny_phantom, tmp_path)
    out = tmp_path / "killed"
    # write 1 = epoch 1 best.pt, 2 = epoch 1 last.pt, 3 = epoch 2 best.pt (or last.pt if epoch 2
    # did not improve): die half-way through it
    r = run_cli([*phantom_args(tiny_phantom), "--epochs", "3", "--out", str(out), *FAST],
                env={"SCSE_SEG_FAILPOINT": "checkpoint_write:3"})
    assert r.returncode == -signal.SIGKILL
    assert load_checkpoint(out / "last.pt")["epoch"] == 1  # previous good checkpoint survived
    assert list(out.glob(".*.pt.*.tmp"))  # the half-written temp file is there ...
    r = run_cli(["--resume", str(out), "--no-progress"])
    assert r.returncode == 0, r.stderr
    assert not list(out.glob(".*.tmp"))  # ... and cleaned up on resume
    _assert_same_weights(_weights(out), ref)
    # best.pt too: the epoch whose best.pt write was cut short is redone, so nothing is lost
    best, ref_best = load_checkpoint(out / "best.pt"), load_checkpoint(tmp_path / "ref" / "best.pt")
    assert best["epoch"] == ref_best["epoch"]
    _assert_same_weights(best["model"], ref_best["model"])


def test_sigkill_at_random_time_then_resume(tiny_phantom, tmp_path):
    import os
    import subprocess
    import sys

    from helpers import ROOT

    ref = _reference(tiny_phantom, tmp_path)
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(ROOT / "train_seg.py"), *phantom_args(tiny_phantom),
                             "--epochs", "3", "--out", str(out), *FAST], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})
    deadline = time.time() + 120
    while not (out / "last.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert (out / "last.pt").exists(), "no checkpoint within 120 s"
    # a seeded moment within the second epoch (an epoch takes seconds): reproducible, and the
    # run still has two epochs to go, so the kill lands before it ends, as asserted below
    time.sleep(random.Random(24).uniform(0.0, 0.3))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before the kill"
    assert load_checkpoint(out / "last.pt")["epoch"] < 3
    r = run_cli(["--resume", str(out), "--no-progress"])
    assert r.returncode == 0, r.stderr
    _assert_same_weights(_weights(out), ref)


def test_nan_loss_stops_with_step_and_keeps_checkpoint(tiny_phantom, tmp_path, capsys):
    out = tmp_path / "nan"
    assert main([*phantom_args(tiny_phantom), "--epochs", "1", "--out", str(out), *FAST]) == 0
    before = _weights(out)
    code = main(["--resume", str(out), "--epochs", "2", "train.lr=1e38", "train.grad_clip=null",
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "epoch 2, step" in err and "last good checkpoint" in err, err
    _assert_same_weights(_weights(out), before)
    # skip policy: bad batches are skipped instead of stopping
    code = main(["--resume", str(out), "--epochs", "2", "train.lr=1e38", "train.grad_clip=null",
                 "train.nan_policy=skip", "--no-progress"])
    assert code == 0
    assert int(_log(out)[-1]["skipped_batches"]) >= 1


def _learns(out, floor):
    """Training made progress: the loss fell from the first to the last epoch and the validation
    Dice (mean over the ten phantom structures) ended above ``floor`` (chance is ~0)."""
    log = _log(out)
    loss = [float(r["train_loss"]) for r in log]
    dice = [float(r["val_dice"]) for r in log]
    assert loss[-1] < loss[0], loss
    assert dice[-1] > floor, dice


@pytest.mark.parametrize("arch", ["densenet", "sdnet"])
def test_other_archs_train(tiny_phantom, tmp_path, arch):
    out = tmp_path / arch
    assert main([*phantom_args(tiny_phantom), "--arch", arch, "--attn", "cse", "--epochs", "6",
                 "--out", str(out), *FAST, "train.max_steps_per_epoch=6", "train.lr=1e-2"]) == 0
    _learns(out, floor=0.1)  # measured: densenet 0.023 -> 0.155, sdnet 0.060 -> 0.125


def test_3d_patch_training(tiny_phantom, tmp_path):
    out = tmp_path / "3d"
    assert main([*phantom_args(tiny_phantom), "--dim", "3", "--epochs", "10", "--out", str(out),
                 "data.patch_size=[16,16,16]", "data.samples_per_volume=8", *FAST,
                 "model.width=8", "train.max_steps_per_epoch=6", "train.lr=1e-2"]) == 0
    _learns(out, floor=0.1)  # measured: 0.000 -> 0.154


def test_class_weights_counted_on_samples_as_fed(tiny_phantom, tmp_path):
    """With data.skip_empty the loss sees only slices with foreground: the median-frequency
    weights must come from those slices' voxels (recomputed here with numpy), not whole volumes."""
    import json

    import numpy as np

    from scse_seg.data import load_case, read_msd

    out = tmp_path / "skip"
    assert main([*phantom_args(tiny_phantom), "--epochs", "1", "--out", str(out), *FAST,
                 "data.skip_empty=true"]) == 0
    saved = json.loads((out / "class_weights.json").read_text())
    ds = read_msd(tiny_phantom)
    train = json.loads((out / "split.json").read_text())["train"]
    counts = np.zeros(11)
    for case in ds.cases:
        if case.name in train:
            lab = np.moveaxis(load_case(case, ds).label, 1, 0)  # coronal slices (32 x 32: no pad)
            keep = lab.reshape(len(lab), -1).any(1)
            counts += np.bincount(lab[keep].ravel(), minlength=11)
    np.testing.assert_array_equal(saved["voxel_counts"], counts)
    f = counts / counts.sum()
    np.testing.assert_allclose(saved["weights"], np.median(f) / f, rtol=1e-6)


def test_sigkill_before_first_checkpoint_then_resume(tiny_phantom, tmp_path):
    """Killed during the very first checkpoint write: no last.pt yet, --resume starts the run
    again from epoch 1 instead of refusing, and ends where an uninterrupted run ends."""
    ref = _reference(tiny_phantom, tmp_path)
    out = tmp_path / "killed"
    r = run_cli([*phantom_args(tiny_phantom), "--epochs", "3", "--out", str(out), *FAST],
                env={"SCSE_SEG_FAILPOINT": "checkpoint_write:1"})
    assert r.returncode == -signal.SIGKILL and not (out / "last.pt").exists()
    r = run_cli(["--resume", str(out), "--no-progress"])
    assert r.returncode == 0, r.stderr
    assert "starting it from epoch 1" in r.stdout
    assert not list(out.glob(".*.tmp"))
    _assert_same_weights(_weights(out), ref)


def test_a_last_batch_of_one_sample_is_dropped_not_crashed(tiny_phantom, tmp_path):
    """3 training volumes x 3 patches = 9 samples, batch 8: the second batch holds one 16^3
    patch, whose 1-voxel bottleneck BatchNorm cannot normalise in training mode."""
    r = run_cli(["--data", str(tiny_phantom), "--dim", "3", "--epochs", "1", "--out",
                 str(tmp_path / "r"), "data.patch_size=[16,16,16]", "data.samples_per_volume=3",
                 *FAST])
    assert r.returncode == 0, r.stderr[-2000:]
