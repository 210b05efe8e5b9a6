"""Benchmark-grade comparisons: K-fold cross-validation over subjects, bootstrap confidence
intervals, attention placement and config sweeps in the comparison grid."""
import csv
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from helpers import FAST, ROOT

from scse_seg import create_model
from scse_seg.config import build_config, parse_override
from scse_seg.data import kfold_split
from scse_seg.errors import ConfigError
from scse_seg.evaluation.stats import bootstrap_ci

sys.path.insert(0, str(ROOT / "eval"))

NAMES = [f"case_{i:02d}" for i in range(11)]


def test_kfold_holds_out_every_subject_exactly_once():
    held = []
    for fold in range(4):
        train, val = kfold_split(NAMES, 4, fold, seed=3)
        assert not set(train) & set(val)
        assert sorted(train + val) == sorted(NAMES)
        held.append(val)
    assert sorted(n for v in held for n in v) == sorted(NAMES)  # each exactly once
    assert sorted(len(v) for v in held) == [2, 3, 3, 3]  # 11 = 3 + 3 + 3 + 2
    # deterministic, independent of the input order, and the seed matters
    assert kfold_split(list(reversed(NAMES)), 4, 1, seed=3) == kfold_split(NAMES, 4, 1, seed=3)
    assert any(kfold_split(NAMES, 4, f, seed=4) != kfold_split(NAMES, 4, f, seed=3)
               for f in range(4))


def test_kfold_rejects_impossible_splits():
    with pytest.raises(ValueError, match="at least 12 cases"):
        kfold_split(NAMES, 12, 0)
    with pytest.raises(ValueError, match="fold must be in 0..3"):
        kfold_split(NAMES, 4, 4)
    with pytest.raises(ConfigError, match="data.fold"):
        build_config([], [parse_override("data.folds=4"), parse_override("data.fold=4")])
    with pytest.raises(ConfigError, match="data.folds"):
        build_config([], [parse_override("data.folds=1")])


def _numpy_percentile_bootstrap(d, n=20000, level=0.95, seed=123):
    """Independent reference: resample the differences with replacement, take percentiles."""
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(n, len(d)))].mean(axis=1)
    return np.percentile(means, [100 * (1 - level) / 2, 100 * (1 + level) / 2])


def test_bootstrap_ci_matches_a_plain_numpy_bootstrap():
    rng = np.random.default_rng(0)
    base = rng.normal(0.80, 0.05, 25)
    var = base + rng.normal(0.01, 0.02, 25)
    keys = [f"v{i}" for i in range(25)]
    lo, hi = bootstrap_ci(dict(zip(keys, var)), dict(zip(keys, base)))
    ref_lo, ref_hi = _numpy_percentile_bootstrap(var - base)
    d = var - base
    se = d.std(ddof=1) / np.sqrt(len(d))
    assert lo < d.mean() < hi
    # two Monte-Carlo estimates of the same percentiles agree to a small fraction of the SE
    assert abs(lo - ref_lo) < 0.1 * se and abs(hi - ref_hi) < 0.1 * se
    # and the interval is roughly mean +- 1.96 SE for a near-normal sample
    assert hi - lo == pytest.approx(2 * 1.96 * se * np.sqrt((len(d) - 1) / len(d)), rel=0.15)


def test_bootstrap_ci_undefined_and_degenerate_cases():
    assert all(np.isnan(bootstrap_ci({"a": 0.5}, {"a": 0.4})))
    assert bootstrap_ci({"a": 0.5, "b": 0.7}, {"a": 0.4, "b": 0.6}) == pytest.approx((0.1, 0.1))
    assert all(np.isnan(bootstrap_ci({"a": 0.5}, {"b": 0.4})))  # no common volume


@pytest.mark.parametrize("arch", ["unet", "densenet", "sdnet"])
def test_attention_placement(arch):
    def kinds(**kw):
        m = create_model(arch, 1, 3, "cse", 2, width=4, **kw)
        return [type(a).__name__ for a in m.attention_modules()]

    assert kinds() == ["ChannelSE"] * 9
    assert kinds(placement="encoder") == ["ChannelSE"] * 5 + ["NoAttention"] * 4
    assert kinds(placement="decoder") == ["NoAttention"] * 4 + ["ChannelSE"] * 5
    assert kinds(placement="decoder", bottleneck_attention=False) == \
        ["NoAttention"] * 5 + ["ChannelSE"] * 4
    with pytest.raises(ValueError, match="placement must be one of all, encoder, decoder"):
        kinds(placement="middle")
    with pytest.raises(ConfigError, match="model.placement"):
        build_config([], [parse_override("model.placement=middle")])


def _per_volume(rows):
    """(arch, attention) -> volume -> mean Dice over scored structures, from results.csv."""
    acc = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r["status"] != "absent":
            acc[(r["arch"], r["attention"])][r["volume"]].append(float(r["dice"]))
    return {k: {v: float(np.mean(d)) for v, d in vols.items()} for k, vols in acc.items()}


def test_crossvalidated_grid_tests_every_subject_once(tiny_phantom, tmp_path):
    import compare
    from scipy.stats import wilcoxon

    out = tmp_path / "cv"
    args = ["--data", str(tiny_phantom), "--archs", "unet", "--attns", "none,scse", "--seeds", "1",
            "--folds", "2", "--epochs", "1", "--out", str(out), *FAST]
    assert compare.main(args) == 0
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert runs == ["unet-none-f0-s0", "unet-none-f1-s0", "unet-scse-f0-s0", "unet-scse-f1-s0"]
    held = [json.loads((out / "runs" / r / "split.json").read_text())["val"] for r in runs[:2]]
    assert not set(held[0]) & set(held[1])
    assert sorted(held[0] + held[1]) == sorted(p.name.removesuffix(".nii.gz")
                                               for p in (tiny_phantom / "labelsTr").iterdir())
    rows = list(csv.DictReader((out / "results.csv").open()))
    per_vol = _per_volume(rows)
    assert set(per_vol[("unet", "none")]) == set(held[0] + held[1])  # all 4 subjects, pooled
    report = (out / "report.md").read_text()
    assert "2-fold cross-validation over subjects: 4 volumes" in report
    # the report's Δ and p, recomputed here from results.csv with scipy
    none, scse = per_vol[("unet", "none")], per_vol[("unet", "scse")]
    vols = sorted(none)
    d = np.array([scse[v] - none[v] for v in vols])
    line = next(ln for ln in report.splitlines() if ln.startswith("| scse |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert float(cells[3]) == pytest.approx(100 * d.mean(), abs=0.006)
    if np.any(d != 0):
        p = wilcoxon([scse[v] for v in vols], [none[v] for v in vols]).pvalue
        assert cells[4].rstrip(" *") == f"{p:.2g}"
    lo, hi = map(float, re.match(r"\[(\S+), (\S+)\]", cells[5]).groups())
    assert lo <= 100 * d.mean() + 0.006 and 100 * d.mean() - 0.006 <= hi
    assert cells[6] == f"{int(np.sum(d > 0))} of 4"  # volumes better: the sign count
    assert re.fullmatch(r"\d+ of 10", cells[7])  # structures improved
    _external_test_set_scores_the_fold_ensembles(args, out, tmp_path)


def _external_test_set_scores_the_fold_ensembles(args, out, tmp_path):
    """compare.py --test: each variant is the ensemble of its 2 fold runs, scored on another
    dataset; its Dice is recomputed here from the two networks' softmax maps averaged by hand."""
    import compare
    import nibabel as nib
    import torch
    from helpers import model_from_checkpoint

    from scse_seg.data import generate_phantom

    test = generate_phantom(tmp_path / "Other", n_cases=2, shape=(32, 32, 32), seed=7)
    before = {p.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*/last.pt")}
    assert compare.main([*args, "--test", str(test)]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*/last.pt")} == before
    report = (out / "test-Other/report.md").read_text()
    assert "2 test volumes in" in report and "ensemble of its 2 fold runs" in report
    rows = [r for r in csv.DictReader((out / "test-Other/results.csv").open())
            if r["attention"] == "none" and r["volume"] == "phantom_000"]
    assert len(rows) == 10  # every structure of the ensemble's prediction on one test volume
    x = np.asarray(nib.load(str(test / "imagesTr/phantom_000.nii.gz")).dataobj).astype(np.float32)
    fg = x[x != 0]
    x = torch.from_numpy(np.moveaxis((x - fg.mean()) / fg.std(), 1, 0)[:, None].copy())
    probs = 0
    for fold in ("f0", "f1"):
        model, ck = model_from_checkpoint(out / f"runs/unet-none-{fold}-s0", 1)
        with torch.no_grad():
            probs = probs + torch.softmax(model(x), 1).numpy() / 2
    pred = np.moveaxis(probs.argmax(1), 0, 1)
    values = ck["label_values"]
    ref = np.searchsorted(values, np.asarray(nib.load(str(test / "labelsTr/phantom_000.nii.gz")).dataobj))
    scored = 0
    for r in rows:
        c = int(r["class_index"])
        a, b = pred == c, ref == c
        if a.sum() + b.sum():
            scored += 1
            assert float(r["dice"]) == pytest.approx(2 * (a & b).sum() / (a.sum() + b.sum()), abs=1e-4)
    assert scored >= 5


def test_sweep_crosses_values_and_reuses_the_vanilla_run(tiny_phantom, tmp_path):
    import compare

    out = tmp_path / "sweep"
    args = ["--data", str(tiny_phantom), "--archs", "unet", "--attns", "none,cse", "--seeds", "1",
            "--epochs", "1", "--out", str(out), *FAST, "--sweep", "model.reduction=2,4"]
    assert compare.main(args) == 0
    runs = sorted(p.name for p in (out / "runs").iterdir())
    # reduction changes only the attention: one vanilla run serves both settings
    assert runs == ["unet-cse-reduction=2-s0", "unet-cse-reduction=4-s0", "unet-none-s0"]
    from scse_seg.fileio import load_checkpoint

    cfgs = {r: load_checkpoint(out / "runs" / r / "last.pt")["config"]["model"] for r in runs}
    assert cfgs["unet-cse-reduction=4-s0"]["reduction"] == 4
    report = (out / "report.md").read_text()
    assert "## unet [model.reduction=2]" in report and "## unet [model.reduction=4]" in report
    archs = {r["arch"] for r in csv.DictReader((out / "results.csv").open())}
    assert archs == {"unet [model.reduction=2]", "unet [model.reduction=4]"}


def test_sweep_syntax_errors():
    import compare

    from scse_seg.grid import GridSpec

    with pytest.raises(ConfigError, match="key=v1,v2"):
        GridSpec.from_args(compare.build_parser().parse_args(["--sweep", "model.reduction"]))
    with pytest.raises(ConfigError, match="model.reduktion"):
        GridSpec.from_args(compare.build_parser().parse_args(["--sweep", "model.reduktion=2,4"]))


def test_data_folds_in_the_config_makes_the_grid_cross_validate(tmp_path):
    """A compare config that sets data.folds (and not compare.folds) must run every fold, not
    silently only fold 0 under fold-less run names."""
    import compare

    from scse_seg.grid import GridSpec

    cfg = tmp_path / "cv.yaml"
    cfg.write_text("data:\n  folds: 3\ncompare:\n  archs: [unet]\n  attns: [none, scse]\n")
    parse = compare.build_parser().parse_args
    spec = GridSpec.from_args(parse(["--config", str(cfg), "--out", str(tmp_path / "o")]))
    assert spec.folds == 3
    assert sorted({run[3] for run in spec.runs()}) == [0, 1, 2]  # (arch, attn, seed, fold, ...)
    assert Path(spec.config("unet", "scse", 0, 2).out).name == "unet-scse-f2-s0"
    # an override on the command line counts too, and --folds still wins
    spec = GridSpec.from_args(parse(["--out", str(tmp_path / "o"), "data.folds=2"]))
    assert spec.folds == 2
    spec = GridSpec.from_args(parse(["--config", str(cfg), "--folds", "4", "--out", str(tmp_path)]))
    assert spec.folds == 4
    assert GridSpec.from_args(parse(["--out", str(tmp_path)])).folds is None


def test_ablation_changes_one_key_at_a_time_and_reuses_the_vanilla_run(tiny_phantom, tmp_path):
    import compare

    from scse_seg.fileio import load_checkpoint

    out = tmp_path / "ablate"
    args = ["--data", str(tiny_phantom), "--archs", "unet", "--attns", "none,scse", "--seeds", "1",
            "--epochs", "1", "--out", str(out), *FAST,
            "--ablate", "model.reduction=4", "model.fusion=max"]
    assert compare.main(args) == 0
    runs = sorted(p.name for p in (out / "runs").iterdir())
    # the configured setting plus one run per ablated value, never crossed; one vanilla run
    assert runs == ["unet-none-s0", "unet-scse-fusion=max-s0", "unet-scse-reduction=4-s0",
                    "unet-scse-s0"]
    model = {r: load_checkpoint(out / "runs" / r / "last.pt")["config"]["model"] for r in runs}
    def red_fus(run):
        return model[run]["reduction"], model[run]["fusion"]
    assert red_fus("unet-scse-reduction=4-s0") == (4, "add")
    assert red_fus("unet-scse-fusion=max-s0") == (None, "max")  # None: scSE's own reduction, 16
    report = (out / "report.md").read_text()
    for label in ("unet", "unet [model.reduction=4]", "unet [model.fusion=max]"):
        assert f"\n## {label}\n" in report
    # the summary's Δ of each setting is the one in that setting's own section
    summary = {ln.split("|")[1].strip(): ln.split("|")[4].strip() for ln in report.splitlines()
               if ln.startswith("| unet") and "| scse |" in ln}
    assert set(summary) == {"unet", "unet [model.reduction=4]", "unet [model.fusion=max]"}
    for label, delta in summary.items():
        section = report.split(f"\n## {label}\n")[1]
        row = next(ln for ln in section.splitlines() if ln.startswith("| scse |"))
        assert row.split("|")[4].strip() == delta


def test_ablation_is_crossed_with_a_sweep_and_refuses_a_key_in_both():
    import compare

    from scse_seg.grid import GridSpec

    parse = compare.build_parser().parse_args
    spec = GridSpec.from_args(parse(["--ablate", "model.reduction=4,8",
                                     "--sweep", "model.width=4,8"]))
    assert spec.settings() == [
        {"model.width": 4}, {"model.width": 4, "model.reduction": 4},
        {"model.width": 4, "model.reduction": 8},
        {"model.width": 8}, {"model.width": 8, "model.reduction": 4},
        {"model.width": 8, "model.reduction": 8}]
    with pytest.raises(ConfigError, match="both swept and ablated"):
        GridSpec.from_args(parse(["--ablate", "model.reduction=4", "--sweep", "model.reduction=2,4"]))
    with pytest.raises(ConfigError, match="model.reduktion"):
        GridSpec.from_args(parse(["--ablate", "model.reduktion=4"]))


def test_shards_split_a_grid_and_the_report_reuses_every_run(tiny_phantom, tmp_path, capsys):
    import compare

    from scse_seg.errors import ConfigError
    from scse_seg.grid import parse_shard

    out = tmp_path / "sh"
    base = ["--data", str(tiny_phantom), "--archs", "unet", "--attns", "none,cse,scse",
            "--seeds", "1", "--epochs", "1", "--out", str(out), *FAST]
    trained = []
    for shard in ("0/2", "1/2"):
        before = set((out / "runs").iterdir()) if (out / "runs").is_dir() else set()
        assert compare.main([*base, "--shard", shard]) == 0
        new = set((out / "runs").iterdir()) - before
        assert all((d / "eval.json").is_file() for d in new)  # each shard evaluates its runs
        trained.append(sorted(d.name for d in new))
        assert not (out / "report.md").exists()
    assert trained == [["unet-none-s0", "unet-scse-s0"], ["unet-cse-s0"]]  # runs 0, 2 | 1
    stamps = {d.name: (d / "last.pt").stat().st_mtime_ns for d in (out / "runs").iterdir()}
    assert compare.main(base) == 0  # the report: nothing trained again
    assert stamps == {d.name: (d / "last.pt").stat().st_mtime_ns for d in (out / "runs").iterdir()}
    assert (out / "report.md").is_file() and "report:" in capsys.readouterr().out
    timing = json.loads((out / "timing.json").read_text())  # both shards' time, then the report's
    assert len(timing["invocations_s"]) == 3 and timing["invocations_s"][0] > 0
    assert parse_shard("1/3") == (1, 3)
    for bad in ("3/3", "1", "a/b", "0/0", "-1/2"):
        with pytest.raises(ConfigError, match="--shard"):
            parse_shard(bad)
