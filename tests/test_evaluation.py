"""Evaluation: metrics with known answers (including empty structures), the Wilcoxon helper
against scipy, single-run evaluation and the comparison runner end to end."""
import csv
import math
import sys

import nibabel as nib
import numpy as np
import pytest
from helpers import FAST, ROOT

from scse_seg.evaluation.stats import seed_averaged, wilcoxon_p
from scse_seg.metrics import (
    dice_per_class,
    evaluate_volume,
    mean_std,
    surface_distances,
    volume_mean_dice,
)

sys.path.insert(0, str(ROOT / "eval"))


# ------------------------------------------------------------------------------- metrics


def test_dice_known_answers():
    ref = np.array([0, 1, 1, 1, 1, 2, 2, 0])
    pred = np.array([0, 1, 1, 0, 0, 2, 0, 2])
    d = dice_per_class(pred, ref, num_classes=4)
    # class 1: |A∩B| = 2, |A| = 4, |B| = 2 -> 4/6;  class 2: 1 common of 2 and 2 -> 0.5
    assert d[1] == pytest.approx(2 / 3) and d[2] == pytest.approx(0.5)
    assert math.isnan(d[3])  # in neither volume: undefined, not 0 or 1
    assert dice_per_class(ref, ref, 3)[1:] == pytest.approx([1.0, 1.0])


def test_empty_structures_get_a_status_not_a_silent_score():
    ref = np.zeros((6, 6, 6), int)
    pred = np.zeros_like(ref)
    ref[1:3, 1:3, 1:3] = 1  # 1: present in both
    pred[1:3, 1:3, 1:3] = 1
    ref[4, 4, 4] = 2  # 2: missed
    pred[0, 5, 0] = 3  # 3: false positive; 4: absent
    rows = {r["structure"]: r for r in evaluate_volume(pred, ref, 5, ["bg", *"abcd"], surface=True)}
    assert [rows[s]["status"] for s in "abcd"] == ["present", "missed", "false_positive", "absent"]
    assert rows["a"]["dice"] == 1.0 and rows["b"]["dice"] == 0.0 and rows["c"]["dice"] == 0.0
    assert math.isnan(rows["d"]["dice"])
    assert rows["a"]["hd95"] == 0.0 and rows["a"]["asd"] == 0.0
    for s in "bcd":  # surface distance undefined without both surfaces
        assert math.isnan(rows[s]["hd95"]) and math.isnan(rows[s]["asd"])
    assert "bg" not in rows and len(rows) == 4  # background is never scored
    # the volume mean counts missed/false positives as 0 and leaves the absent one out
    assert volume_mean_dice(list(rows.values())) == pytest.approx(1 / 3)


def test_surface_distances_known_answers():
    ref = np.zeros((8, 8, 12), bool)
    pred = np.zeros_like(ref)
    ref[2, 2, 2] = True
    pred[2, 2, 6] = True  # 4 voxels apart along z
    hd, asd = surface_distances(pred, ref, spacing=(1.0, 1.0, 2.0))
    assert hd == pytest.approx(8.0) and asd == pytest.approx(8.0)  # in mm
    assert surface_distances(pred, ref)[0] == pytest.approx(4.0)  # in voxels
    a = np.zeros((12, 12, 12), bool)
    a[2:8, 2:8, 2:8] = True
    b = np.roll(a, 1, axis=0)  # cube shifted by one voxel
    hd, _ = surface_distances(b, a, spacing=(1.5, 1.0, 1.0))
    assert hd == pytest.approx(1.5)


def test_mean_std_ignores_undefined():
    m, s, n = mean_std([0.5, float("nan"), 0.7])
    assert (m, n) == (pytest.approx(0.6), 2) and s == pytest.approx(np.std([0.5, 0.7], ddof=1))
    assert math.isnan(mean_std([float("nan")])[0])


# ------------------------------------------------------------------------------- statistics


def test_wilcoxon_matches_scipy():
    from scipy.stats import wilcoxon

    rng = np.random.default_rng(0)
    base = rng.uniform(0.6, 0.9, 15)
    var = base + rng.normal(0.02, 0.02, 15)
    b = {f"v{i}": x for i, x in enumerate(base)}
    v = {f"v{i}": x for i, x in enumerate(var)}
    v["only_in_variant"] = 0.1  # unpaired volumes are ignored
    assert wilcoxon_p(v, b) == pytest.approx(wilcoxon(var, base).pvalue)


def test_wilcoxon_undefined_cases():
    assert math.isnan(wilcoxon_p({"a": 0.5, "b": 0.6}, {"a": 0.5, "b": 0.6}))  # all ties
    assert math.isnan(wilcoxon_p({"a": 0.5}, {"a": 0.4}))  # one pair
    assert seed_averaged([{"a": 0.4, "b": 1.0}, {"a": 0.6, "b": float("nan")}]) == \
        {"a": pytest.approx(0.5), "b": 1.0}


# ------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def grid(tiny_phantom, tmp_path_factory):
    """2 variants x 1 architecture x 1 seed on the tiny phantom, through the CLI entry point."""
    import compare

    out = tmp_path_factory.mktemp("grid")
    args = ["--data", str(tiny_phantom), "--archs", "unet", "--attns", "none,scse",
            "--seeds", "1", "--epochs", "2", "--out", str(out), "--surface",
            *[a for a in FAST if a != "--no-progress"], "--no-progress"]
    assert compare.main(args) == 0
    return out, args


def test_comparison_writes_every_file(grid):
    out, _ = grid
    for name in ("report.md", "results.csv", "dice_boxplot.png", "structures.png", "overlay.png",
                 "curves.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    assert "## unet" in report and "| none |" in report and "| scse |" in report
    assert "Wilcoxon p" in report and "overhead" in report and "HD95" in report
    assert "Per-structure Dice" in report
    rows = list(csv.DictReader((out / "results.csv").open()))
    # 1 held-out volume of 4 x 10 structures x 2 variants
    assert len(rows) == 1 * 10 * 2
    assert {r["attention"] for r in rows} == {"none", "scse"}
    assert set(rows[0]) >= {"arch", "seed", "volume", "structure", "dice", "hd95", "status"}


def test_comparison_resumes_without_retraining(grid):
    import compare

    out, args = grid
    ckpts = sorted((out / "runs").glob("*/last.pt"))
    assert len(ckpts) == 2
    before = {p: p.stat().st_mtime_ns for p in ckpts}
    (out / "report.md").unlink()
    assert compare.main(args) == 0
    assert {p: p.stat().st_mtime_ns for p in ckpts} == before  # reused, not retrained
    assert (out / "report.md").is_file()


def test_evaluate_single_run(grid, tmp_path, capsys):
    import evaluate

    out, _ = grid
    run = out / "runs" / "unet-scse-s0"
    pred_dir = tmp_path / "pred"
    assert evaluate.main([str(run), "--save-predictions", str(pred_dir)]) == 0
    text = capsys.readouterr().out
    assert "unet + scse" in text and "mean over structures" in text
    files = list(pred_dir.glob("*.nii.gz"))
    assert len(files) == 1
    img = nib.load(str(files[0]))
    values = set(np.unique(np.asarray(img.dataobj)).tolist())
    assert values <= {0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100}  # original label values


def test_evaluate_reports_missing_run(tmp_path, capsys):
    import evaluate

    assert evaluate.main([str(tmp_path / "nope")]) == 2
    assert "not found" in capsys.readouterr().err
