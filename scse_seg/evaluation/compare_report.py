"""Turn the evaluations of a grid (architectures x attentions x seeds) into the comparison the
papers make: report.md, results.csv and the figures.

Statistics: each variant is scored per held-out volume (mean Dice over the structures present),
averaged over seeds per volume, then summarised as mean +- std over volumes and tested against
the vanilla network (``none``) of the same architecture on the same volumes (Wilcoxon), with a
bootstrap 95% confidence interval of the difference. Under K-fold cross-validation the runs of
the K folds hold out disjoint subjects, so their volumes are pooled: every subject is scored once
per seed.
"""
from __future__ import annotations

import csv
import io
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from ..metrics import mean_std, volume_mean_dice, volume_mean_surface
from .stats import WILCOXON_MIN_N, bootstrap_ci, seed_averaged, small_sample_note, wilcoxon_p

CSV_FIELDS = ["arch", "attention", "seed", "volume", "structure", "class_index", "dice", "hd95",
              "asd", "nsd", "status", "ref_voxels", "pred_voxels", "surface_penalty", "checkpoint"]


def _ordered(results, attr):
    seen = []
    for r in results:
        v = getattr(r, attr)
        if v not in seen:
            seen.append(v)
    return seen


def per_volume_scores(res, metric: str = "dice") -> dict[str, float]:
    """volume -> mean of ``metric`` over its scored structures (absent ones excluded). Surface
    metrics count a missed / false-positive structure at the volume diagonal in mm
    (:func:`scse_seg.metrics.surface_score`), never skip it."""
    by_vol = defaultdict(list)
    for r in res.rows:
        by_vol[r["volume"]].append(r)
    if metric == "dice":
        return {v: volume_mean_dice(rows) for v, rows in by_vol.items()}
    if metric == "nsd":  # defined for missed / false-positive structures too (0)
        return {v: volume_mean_dice([dict(r, dice=r.get("nsd", math.nan)) for r in rows])
                for v, rows in by_vol.items()}
    return {v: volume_mean_surface(rows, metric) for v, rows in by_vol.items()}


def surface_penalised(runs) -> tuple[int, int]:
    """(structures counted at the surface penalty, structures scored), over volumes and seeds."""
    rows = [row for r in runs for row in r.rows if row["status"] != "absent"]
    return sum(row["status"] in ("missed", "false_positive") for row in rows), len(rows)


def _seed_means(runs) -> list[float]:
    """Mean per-volume Dice of each seed, pooling the volumes of that seed's folds."""
    by_seed = defaultdict(dict)
    for r in runs:
        by_seed[r.seed].update(per_volume_scores(r))
    return [mean_std(v.values())[0] for _, v in sorted(by_seed.items())]


def summary_rows(results) -> list[dict]:
    """One dict per (arch, attention): the numbers of the report's main tables."""
    groups = defaultdict(list)
    for r in results:
        groups[(r.arch, r.attention)].append(r)
    surface = any(np.isfinite(row["hd95"]) or np.isfinite(row.get("surface_penalty", math.nan))
                  for r in results for row in r.rows)
    structs = structure_means(results)
    out = []
    for arch in _ordered(results, "arch"):
        base = groups.get((arch, "none"))
        base_scores = seed_averaged([per_volume_scores(r) for r in base]) if base else {}
        base_params = base[0].params if base else None
        base_mean = mean_std(base_scores.values())[0] if base else math.nan
        for attn in _ordered(results, "attention"):
            runs = groups.get((arch, attn))
            if not runs:
                continue
            scores = seed_averaged([per_volume_scores(r) for r in runs])
            m, s, n = mean_std(scores.values())
            compared = attn != "none" and base
            row = dict(arch=arch, attention=attn, dice_mean=m, dice_std=s, volumes=n,
                       seeds=len({r.seed for r in runs}), seed_means=_seed_means(runs),
                       delta=m - base_mean if attn != "none" else 0.0,
                       p=wilcoxon_p(scores, base_scores) if compared else math.nan,
                       ci=bootstrap_ci(scores, base_scores) if compared else (math.nan, math.nan),
                       structures_improved=_improved(structs[arch], attn) if compared else None,
                       volumes_better=_better(scores, base_scores) if compared else None,
                       params=runs[0].params,
                       overhead=(runs[0].params / base_params - 1) if base_params else math.nan,
                       train_s=float(np.mean([r.train_seconds for r in runs])),
                       infer_s=float(np.mean([r.infer_seconds_per_volume for r in runs])))
            if surface:
                for metric in ("hd95", "asd", "nsd"):
                    row[metric] = mean_std(seed_averaged(
                        [per_volume_scores(r, metric) for r in runs]).values())[:2]
                row["penalised"] = surface_penalised(runs)
            out.append(row)
    return out


def _better(scores: dict, base: dict) -> tuple[int, int]:
    """(volumes where the variant's Dice is higher than the vanilla network's, volumes paired):
    the sign count behind the Wilcoxon test, which a reader checks at a glance."""
    common = [v for v in scores if v in base and np.isfinite(scores[v]) and np.isfinite(base[v])]
    return sum(scores[v] > base[v] for v in common), len(common)


def _improved(by_attn: dict, attn: str) -> tuple[int, int]:
    """(structures where ``attn`` has the higher mean Dice than ``none``, structures compared)."""
    pairs = [(v[0], by_attn["none"][s][0]) for s, v in by_attn[attn].items()
             if np.isfinite(v[0]) and np.isfinite(by_attn["none"][s][0])]
    return sum(a > b for a, b in pairs), len(pairs)


def structure_means(results) -> dict[str, dict[str, dict[str, tuple[float, float, int]]]]:
    """arch -> attention -> structure -> (mean, std, n) of Dice over volumes (seed-averaged)."""
    acc = defaultdict(lambda: defaultdict(lambda: defaultdict(lambda: defaultdict(list))))
    for r in results:
        for row in r.rows:
            if row["status"] != "absent":
                acc[r.arch][r.attention][row["structure"]][row["volume"]].append(row["dice"])
    out = {}
    for arch in _ordered(results, "arch"):
        out[arch] = {}
        for attn in _ordered(results, "attention"):
            if attn not in acc[arch]:
                continue
            out[arch][attn] = {s: mean_std([np.mean(v) for v in acc[arch][attn][s].values()])
                               for s in results[0].class_names[1:]}
    return out


def _fmt(x, spec=".4f"):
    return "n/a" if x is None or (isinstance(x, float) and not np.isfinite(x)) else format(x, spec)


def _ci(r) -> str:
    """The CI cell; † marks a comparison on too few volumes for the test (see the note)."""
    small = r["volumes_better"] and r["volumes_better"][1] < WILCOXON_MIN_N
    return f"[{100 * r['ci'][0]:+.2f}, {100 * r['ci'][1]:+.2f}]" + (" †" if small else "")


def small_sample_notes(rows) -> list[str]:
    """One note per distinct number of paired volumes too small for the Wilcoxon test."""
    ns = sorted({r["volumes_better"][1] for r in rows
                 if r["attention"] != "none" and r["volumes_better"]})
    return [n for n in (small_sample_note(k) for k in ns) if n]


def _p(p):
    if not np.isfinite(p):
        return "n/a"
    return f"{p:.2g}" + (" *" if p < 0.05 else "")


def render_markdown(results, spec=None, wall_seconds: float | None = None,
                    rows: list[dict] | None = None) -> str:
    """report.md; ``rows``: :func:`summary_rows` of ``results`` if the caller has them."""
    rows = summary_rows(results) if rows is None else rows
    structs = structure_means(results)
    surface = "hd95" in rows[0]
    r0 = results[0]
    out = io.StringIO()
    w = out.write
    w("# Attention variants vs the vanilla network\n\n")
    first = [r for r in results if (r.arch, r.attention) == (r0.arch, r0.attention)]
    vols = sorted({row["volume"] for r in first for row in r.rows})
    folds = len({r.run_dir for r in first}) // max(1, len({r.seed for r in first}))
    if folds > 1:
        w(f"{folds}-fold cross-validation over subjects: {len(vols)} volumes, each held out once "
          f"and scored once per seed; ")
    elif r0.evaluated_on != "held-out volumes":
        w(f"{len(vols)} {r0.evaluated_on} (the same for every run)"
          + (f", each variant the ensemble of its {len(r0.members)} fold runs (softmax averaged)"
             if r0.members else "") + "; ")
    else:
        w(f"{len(vols)} held-out volumes (the same for every run), ")
    w(f"{len(_ordered(results, 'seed'))} seed(s) per variant, {len(r0.history)} epochs each; last "
      "checkpoint evaluated (no checkpoint selection on the held-out volumes).\n")
    if spec is not None and getattr(spec, "base", None):
        data = (spec.base.get("data") or {}).get("path")
        for o in getattr(spec, "overrides", []):
            data = (o.get("data") or {}).get("path", data)
        if data:
            w(f"Data: `{data}`.\n")
    settings = {f"{r.attention}: {r.setting}" for r in results if r.setting}
    if settings:
        w(f"Attention settings: {'; '.join(sorted(settings))}.\n")
    if wall_seconds is not None:
        w(f"Grid wall time: {wall_seconds / 60:.1f} min (training and evaluation, without writing "
          "this report; summed over the invocations that built this folder).\n")
    w("\nDice: per volume, the mean over the structures present in the reference or the "
      "prediction, averaged over seeds; mean ± std over volumes. Δ: difference to `none` of the "
      "same architecture in Dice points (×100). p: two-sided Wilcoxon signed-rank test vs `none` "
      "on the per-volume Dice (* p < 0.05). 95% CI: percentile bootstrap of the mean Δ over "
      "volumes (10,000 resamples). Volumes better: volumes whose Dice is higher than with `none` "
      "(the sign count behind the Wilcoxon test). Structures improved: structures whose mean "
      "Dice is higher than with `none`, of those scored. Training time: sum of the epochs' training time "
      "(validation excluded), mean over seeds. Inference: whole-volume prediction time.\n")
    if surface:
        w("\nHD95 / ASD (mm): per volume, the mean over the same structures as Dice; a structure "
          "missed, or predicted where the reference has none, has no surface distance and counts "
          "as the volume's diagonal in mm (the largest possible distance), so that missing a "
          "structure never scores better than finding it poorly. missed/FP: how many of the "
          "scored (volume, structure) pairs, over all seeds, got that penalty. NSD: normalised "
          f"surface Dice at {getattr(spec, 'nsd_tolerance', 1.0):g} mm (Nikolov et al. 2021), the "
          "share of both surfaces within that distance of the other; 0 for a missed or "
          "false-positive structure.\n")
    for note in small_sample_notes(rows):
        w(f"\n**† Small sample:** {note}.\n")
    compared = [r for r in rows if r["attention"] != "none"]
    if len({r["arch"] for r in compared}) > 1:  # several networks or settings: one overview
        w("\n## Summary: every variant against its vanilla network\n\n"
          "| network | variant | Dice | Δ vs none | 95% CI of Δ | Wilcoxon p | volumes better | "
          "structures improved |\n|---|---|---|---|---|---|---|---|\n")
        for r in compared:
            imp, bet = r["structures_improved"], r["volumes_better"]
            w(f"| {r['arch']} | {r['attention']} | {_fmt(r['dice_mean'])} | "
              f"{100 * r['delta']:+.2f} | {_ci(r)} | "
              f"{_p(r['p'])} | {f'{bet[0]} of {bet[1]}' if bet else '—'} | "
              f"{f'{imp[0]} of {imp[1]}' if imp else '—'} |\n")
    for arch in _ordered(results, "arch"):
        arows = [r for r in rows if r["arch"] == arch]
        best = max((r["dice_mean"] for r in arows if np.isfinite(r["dice_mean"])), default=None)
        w(f"\n## {arch}\n\n")
        head = ["variant", "Dice mean ± std", "per-seed means", "Δ vs none", "Wilcoxon p",
                "95% CI of Δ", "volumes better", "structures improved", "parameters", "overhead",
                "train time (s)", "inference (s/volume)"]
        if surface:
            head[8:8] = ["HD95 (mm)", "ASD (mm)", "NSD", "missed/FP"]
        w("| " + " | ".join(head) + " |\n|" + "---|" * len(head) + "\n")
        for r in arows:
            dice = f"{_fmt(r['dice_mean'])} ± {_fmt(r['dice_std'])}"
            if best is not None and r["dice_mean"] == best:
                dice = f"**{dice}**"
            cells = [r["attention"], dice, ", ".join(_fmt(x, ".3f") for x in r["seed_means"]),
                     "—" if r["attention"] == "none" else f"{100 * r['delta']:+.2f}",
                     "—" if r["attention"] == "none" else _p(r["p"]),
                     "—" if r["attention"] == "none" else _ci(r),
                     "—" if not r["volumes_better"] else
                     f"{r['volumes_better'][0]} of {r['volumes_better'][1]}",
                     "—" if not r["structures_improved"] else
                     f"{r['structures_improved'][0]} of {r['structures_improved'][1]}",
                     f"{r['params']:,}",
                     "—" if r["attention"] == "none" else f"{100 * r['overhead']:+.2f}%",
                     f"{r['train_s']:.0f}", f"{r['infer_s']:.3f}"]
            if surface:
                cells[8:8] = [f"{_fmt(r['hd95'][0], '.2f')} ± {_fmt(r['hd95'][1], '.2f')}",
                              f"{_fmt(r['asd'][0], '.2f')} ± {_fmt(r['asd'][1], '.2f')}",
                              f"{_fmt(r['nsd'][0], '.3f')} ± {_fmt(r['nsd'][1], '.3f')}",
                              f"{r['penalised'][0]}/{r['penalised'][1]}"]
            w("| " + " | ".join(cells) + " |\n")
    w("\n## Per-structure Dice (mean ± std over volumes)\n")
    for arch, by_attn in structs.items():
        attns = list(by_attn)
        w(f"\n### {arch}\n\n| structure | " + " | ".join(attns) + " |\n|" + "---|" * (len(attns) + 1)
          + "\n")
        for s in results[0].class_names[1:]:
            vals = [by_attn[a][s] for a in attns]
            finite = {round(v[0], 3) for v in vals if np.isfinite(v[0])}
            top = max(v[0] for v in vals if np.isfinite(v[0])) if len(finite) > 1 else None
            cells = []
            for v in vals:
                c = f"{_fmt(v[0], '.3f')} ± {_fmt(v[1], '.3f')}"
                cells.append(f"**{c}**" if top is not None and v[0] == top else c)
            w(f"| {s} | " + " | ".join(cells) + " |\n")
    w("\nFigures: `dice_boxplot.png`, `structures.png`, `overlay.png`, `curves.png`; every "
      "per-volume, per-structure number (and the checkpoint it scored): `results.csv`.\n")
    w("\n## Checkpoints scored\n\n| run | checkpoint |\n|---|---|\n")
    for r in {r.run_dir: r for r in results}.values():
        name = " + ".join(Path(m).name for m in r.members) or Path(r.run_dir).name
        w(f"| {name} | {r.checkpoint or 'n/a'} |\n")
    return out.getvalue()


def write_results_csv(results, path: Path) -> Path:
    from ..fileio import atomic_write_text

    buf = io.StringIO()
    wr = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore")
    wr.writeheader()
    for r in results:
        for row in r.rows:
            wr.writerow(dict(row, arch=r.arch, attention=r.attention, seed=r.seed,
                             checkpoint=r.checkpoint))
    atomic_write_text(path, buf.getvalue())
    return path


def _example_predictions(results, device=None, test_path=None):
    """Re-predict one held-out (or test) volume with the first seed of every variant (cached
    evaluations keep numbers, not volumes). Returns (volume, axis, arch -> attention ->
    prediction)."""
    from ..data import AXIS_INDEX
    from .runs import open_runs

    first = {}
    for r in results:
        first.setdefault((r.arch, r.attention), r)
    preds: dict[str, dict[str, np.ndarray]] = defaultdict(dict)
    vol = axis = None
    for (arch, attn), r in first.items():
        run = open_runs(r.members or [r.run_dir], device=device, test_path=test_path)
        if vol is None:
            vol = run.load(run.val[0])
            axis = AXIS_INDEX[run.cfg.data.axis]
        preds[arch][attn] = np.asarray(run.predict(vol.image, affine=vol.affine))
    return vol, axis, dict(preds)


def write_comparison(results, spec=None, out: str | Path | None = None,
                     wall_seconds: float | None = None, device: str | None = None,
                     test_path: str | Path | None = None, rows: list[dict] | None = None) -> Path:
    """Write report.md, results.csv, dice_boxplot.png, structures.png, overlay.png and curves.png
    into ``out`` (default ``spec.out``); returns the report path. ``test_path``: the results are
    scores on that test set (the overlay shows one of its volumes)."""
    from ..fileio import atomic_write_text
    from . import plots

    if not results:
        raise ValueError("no evaluated runs to compare")
    out = Path(out if out is not None else spec.out)
    out.mkdir(parents=True, exist_ok=True)
    write_results_csv(results, out / "results.csv")

    per_volume: dict[str, dict[str, list[float]]] = defaultdict(dict)
    histories: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    groups = defaultdict(list)
    for r in results:
        groups[(r.arch, r.attention)].append(r)
        histories[r.arch][r.attention].append(r.history)
    for (arch, attn), runs in groups.items():
        per_volume[arch][attn] = list(seed_averaged([per_volume_scores(r) for r in runs]).values())
    plots.dice_boxplot(per_volume, out / "dice_boxplot.png")
    structs = structure_means(results)
    plots.structure_plot({a: {t: {s: v[0] for s, v in d.items()} for t, d in by.items()}
                          for a, by in structs.items()}, out / "structures.png")
    plots.training_curves(histories, out / "curves.png")
    vol, axis, preds = _example_predictions(results, device, test_path)
    from ..data import channels_first

    plots.overlay_plot(channels_first(vol.image)[0], vol.label, preds, axis, len(results[0].class_names),
                       out / "overlay.png", title=f"held-out volume {vol.name}")
    report = out / "report.md"
    atomic_write_text(report, render_markdown(results, spec, wall_seconds, rows))
    return report


__all__ = ["write_comparison", "render_markdown", "summary_rows", "structure_means",
           "per_volume_scores", "write_results_csv"]
