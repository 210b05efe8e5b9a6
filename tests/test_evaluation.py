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
    hd, asd, nsd = surface_distances(pred, ref, spacing=(1.0, 1.0, 2.0))
    assert hd == pytest.approx(8.0) and asd == pytest.approx(8.0) and nsd == 0.0  # in mm
    assert surface_distances(pred, ref)[0] == pytest.approx(4.0)  # in voxels
    a = np.zeros((12, 12, 12), bool)
    a[2:8, 2:8, 2:8] = True
    b = np.roll(a, 1, axis=0)  # cube shifted by one voxel
    hd, _, _ = surface_distances(b, a, spacing=(1.5, 1.0, 1.0))
    assert hd == pytest.approx(1.5)


def test_normalised_surface_dice_known_answers():
    """Two voxels 8 mm apart: NSD 0 at 1 mm, 1 at 8.5 mm. A 6^3 cube against itself shifted one
    voxel (1.5 mm) along x, tolerance 1.2 mm: of each cube's 6^3 - 4^3 = 152 surface voxels, the
    36 of the face the other cube left (1.5 mm from its surface) and the 4 centre voxels of the
    face it entered (1.5 mm from the moved face, 2 mm from the side faces) are out; the other 12
    voxels of that face are 1 mm from a side face. NSD = 2 (152 - 40) / (2 * 152) = 14/19."""
    ref = np.zeros((8, 8, 12), bool)
    pred = np.zeros_like(ref)
    ref[2, 2, 2], pred[2, 2, 6] = True, True
    assert surface_distances(pred, ref, (1.0, 1.0, 2.0), nsd_tolerance=1.0)[2] == 0.0
    assert surface_distances(pred, ref, (1.0, 1.0, 2.0), nsd_tolerance=8.5)[2] == 1.0
    a = np.zeros((12, 12, 12), bool)
    a[2:8, 2:8, 2:8] = True
    nsd = surface_distances(np.roll(a, 1, axis=0), a, (1.5, 1.0, 1.0), nsd_tolerance=1.2)[2]
    assert nsd == pytest.approx(14 / 19, abs=1e-6)
    assert surface_distances(a, a, (1.5, 1.0, 1.0))[2] == 1.0


def test_nsd_matches_monai_on_the_whole_volume_of_real_labels(tiny_phantom):
    """Our NSD (computed on the masks' bounding box) equals MONAI's compute_surface_dice on the
    full one-hot volumes, per structure of a phantom label and a perturbed copy of it."""
    import nibabel as nib
    import torch
    from monai.metrics import compute_surface_dice

    ref = np.asarray(nib.load(str(tiny_phantom / "labelsTr/phantom_000.nii.gz")).dataobj).astype(int)
    values = sorted(np.unique(ref))
    ref = np.searchsorted(values, ref)
    pred = np.roll(ref, 1, axis=0)
    pred[::3] = np.roll(ref, -1, axis=1)[::3]
    k, spacing = len(values), (1.0, 1.2, 0.8)
    onehot = lambda a: torch.nn.functional.one_hot(torch.as_tensor(a), k).permute(3, 0, 1, 2)[None]
    theirs = compute_surface_dice(onehot(pred), onehot(ref), [1.5] * (k - 1), spacing=spacing)[0]
    rows = evaluate_volume(pred, ref, k, surface=True, spacing=spacing, nsd_tolerance=1.5)
    present = [r for r in rows if r["status"] == "present"]
    assert len(present) >= 5
    for r in present:
        assert r["nsd"] == pytest.approx(float(theirs[r["class_index"] - 1]), abs=1e-6), r


def test_nsd_of_missed_and_false_positive_structures_is_zero_absent_is_nan():
    ref = np.zeros((10, 10, 10), int)
    pred = np.zeros_like(ref)
    ref[2:5, 2:5, 2:5] = 1  # missed
    pred[6:9, 6:9, 6:9] = 2  # false positive
    rows = {r["class_index"]: r for r in evaluate_volume(pred, ref, 4, surface=True)}
    assert rows[1]["nsd"] == 0.0 and rows[2]["nsd"] == 0.0 and math.isnan(rows[3]["nsd"])


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
            *[a for a in FAST if a != "--no-progress"], "data.val_fraction=0.5", "--no-progress"]
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
    # the settings the scSE runs were trained with: the defaults of configs/default.yaml
    assert "Attention settings: scse: reduction 16, fusion add, min_hidden 1.\n" in report
    rows = list(csv.DictReader((out / "results.csv").open()))
    # 2 held-out volumes of 4 x 10 structures x 2 variants
    assert len(rows) == 2 * 10 * 2
    assert {r["attention"] for r in rows} == {"none", "scse"}
    assert set(rows[0]) >= {"arch", "seed", "volume", "structure", "dice", "hd95", "status"}


def _report_row(report: str, attention: str) -> list[str]:
    line = next(x for x in report.splitlines() if x.startswith(f"| {attention} |"))
    return [c.strip().strip("*") for c in line.strip("|").split("|")]


def test_report_numbers_recomputed_independently(grid):
    """Every number of the report's main table, recomputed here from results.csv with numpy and
    scipy: per volume the mean Dice over the structures not absent, mean ± sample std over
    volumes, Δ in Dice points, two-sided Wilcoxon p, and HD95 with a missed / false-positive
    structure counted at the volume diagonal (the surface_penalty column)."""
    from scipy.stats import wilcoxon

    out, _ = grid
    rows = list(csv.DictReader((out / "results.csv").open()))
    report = (out / "report.md").read_text()
    per_vol, hd95, nsd, penalised = {}, {}, {}, {}
    for attn in ("none", "scse"):
        mine = [r for r in rows if r["attention"] == attn and r["status"] != "absent"]
        vols = sorted({r["volume"] for r in mine})
        per_vol[attn] = np.array([np.mean([float(r["dice"]) for r in mine if r["volume"] == v])
                                  for v in vols])
        surf = [float(r["surface_penalty"]) if r["status"] in ("missed", "false_positive")
                else float(r["hd95"]) for r in mine]
        assert np.all(np.isfinite(surf))
        hd95[attn] = [np.mean([s for s, r in zip(surf, mine) if r["volume"] == v]) for v in vols]
        nsd[attn] = [np.mean([float(r["nsd"]) for r in mine if r["volume"] == v]) for v in vols]
        penalised[attn] = (sum(r["status"] in ("missed", "false_positive") for r in mine),
                           len(mine))
    assert len(per_vol["none"]) == 2
    for attn in ("none", "scse"):
        cells = _report_row(report, attn)
        mean, std = (float(x) for x in cells[1].split("±"))
        assert mean == pytest.approx(per_vol[attn].mean(), abs=6e-5)
        assert std == pytest.approx(per_vol[attn].std(ddof=1), abs=6e-5)
        hd_mean = float(cells[8].split("±")[0])  # after Δ, p, CI, volumes better, structures
        assert hd_mean == pytest.approx(np.mean(hd95[attn]), abs=6e-3)
        assert float(cells[10].split("±")[0]) == pytest.approx(np.mean(nsd[attn]), abs=6e-4)
        assert cells[11] == f"{penalised[attn][0]}/{penalised[attn][1]}"
    cells = _report_row(report, "scse")
    assert cells[6] == f"{int(np.sum(per_vol['scse'] > per_vol['none']))} of 2"  # volumes better
    assert float(cells[3]) == pytest.approx(100 * (per_vol["scse"].mean() - per_vol["none"].mean()),
                                            abs=6e-3)
    d = per_vol["scse"] - per_vol["none"]
    if np.all(d == 0):
        assert cells[4] == "n/a"
    else:
        p = wilcoxon(per_vol["scse"], per_vol["none"]).pvalue
        assert float(cells[4].rstrip(" *")) == pytest.approx(float(f"{p:.2g}"))
    # 2 paired volumes: the CI is marked and the report says the test cannot reach p < 0.05
    assert cells[5].endswith("†") and "**† Small sample:** only 2 paired volumes" in report


def test_surface_means_penalise_missed_structures():
    """A variant that misses a structure must not get a better HD95 than one that finds it
    poorly: the missed one counts at the volume diagonal (surface_penalty)."""
    from scse_seg.evaluation.compare_report import summary_rows
    from scse_seg.evaluation.runs import RunEvaluation

    def run(attn, second):
        rows = []
        for v in ("v1", "v2"):
            rows.append(dict(volume=v, structure="a", class_index=1, dice=0.9, hd95=2.0, asd=1.0,
                             status="present", surface_penalty=50.0))
            rows.append(dict(volume=v, structure="b", class_index=2, **second,
                             surface_penalty=50.0))
        return RunEvaluation(".", "unet", attn, 0, 10, 1.0, 0.1, ["bg", "a", "b"], rows)

    missed = dict(dice=0.0, hd95=math.nan, asd=math.nan, status="missed")
    poor = dict(dice=0.2, hd95=20.0, asd=8.0, status="present")
    rows = {r["attention"]: r for r in summary_rows([run("none", poor), run("scse", missed)])}
    assert rows["none"]["hd95"][0] == pytest.approx((2 + 20) / 2)
    assert rows["scse"]["hd95"][0] == pytest.approx((2 + 50) / 2)  # worse, not 2.0
    assert rows["scse"]["asd"][0] == pytest.approx((1 + 50) / 2)
    assert rows["scse"]["penalised"] == (2, 4) and rows["none"]["penalised"] == (0, 4)
    # evaluations cached before the penalty was recorded: no mean over a subset
    old = run("none", missed)
    for r in old.rows:
        del r["surface_penalty"]
    assert math.isnan(summary_rows([old])[0]["hd95"][0])


def test_tta_only_with_the_flips_training_used(grid, tiny_phantom, tmp_path, capsys):
    import albumentations as A
    import compare
    import evaluate

    from scse_seg.cli import main as train

    out, args = grid
    # the grid trained without flips (data.augment.flip is off by default): --tta is refused
    assert evaluate.main([str(out / "runs" / "unet-scse-s0"), "--tta"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --tta") and "data.augment.flip" in err
    assert compare.main([*args, "--tta"]) == 2  # before training or evaluating anything
    assert "data.augment.flip" in capsys.readouterr().err
    # the flip TTA uses is the one albumentations applied in training
    from scse_seg.data.augment import trained_flip_axes

    assert trained_flip_axes({"flip": False}) == () and trained_flip_axes({"flip": True}, 3) == ()
    (axis,) = trained_flip_axes({"flip": True})
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.testing.assert_array_equal(A.HorizontalFlip(p=1.0)(image=a)["image"], np.flip(a, axis))
    run = tmp_path / "flip"
    assert train(["--data", str(tiny_phantom), "--epochs", "1", "--out", str(run), *FAST,
                  "data.augment={flip: true}"]) == 0
    assert evaluate.main([str(run), "--tta"]) == 0


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
    assert len(files) == 2  # the grid holds out 2 of the 4 phantom volumes
    img = nib.load(str(files[0]))
    values = set(np.unique(np.asarray(img.dataobj)).tolist())
    assert values <= {0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100}  # original label values


def test_evaluate_reports_missing_run(tmp_path, capsys):
    import evaluate

    assert evaluate.main([str(tmp_path / "nope")]) == 2
    assert "not found" in capsys.readouterr().err


@pytest.mark.parametrize("tolerance", ["0", "-1", "nan", "inf"])
def test_nsd_tolerance_must_be_a_positive_distance(tolerance, tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "eval"))
    import evaluate

    assert evaluate.main([str(tmp_path / "run"), "--surface", "--nsd-tolerance", tolerance]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --nsd-tolerance") and len(err.splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == []


def test_small_sample_note_where_the_wilcoxon_test_cannot_reach_significance():
    """scipy's exact test on n differences of one sign gives its smallest p, 2 / 2**n: 0.0625 at
    n = 5 (never < 0.05), 0.03125 at n = 6; the note says so for n <= 5 only."""
    from scipy.stats import wilcoxon

    from scse_seg.evaluation.stats import small_sample_note

    for n, smallest in ((5, 0.0625), (6, 0.03125)):
        assert wilcoxon(np.arange(1.0, n + 1), np.zeros(n)).pvalue == pytest.approx(smallest)
    assert "0.0625" in small_sample_note(5) and "p < 0.05" in small_sample_note(5)
    assert "0.5" in small_sample_note(2)
    assert small_sample_note(6) is None


def test_console_says_when_the_sample_is_too_small(grid, capsys):
    import compare

    _, args = grid
    assert compare.main(args) == 0  # every run and evaluation cached: only the report again
    out = capsys.readouterr().out
    assert "note: only 2 paired volumes: a two-sided Wilcoxon signed-rank test cannot reach" in out
