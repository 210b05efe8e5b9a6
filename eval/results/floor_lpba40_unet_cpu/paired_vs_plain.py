"""scSE (r=16, add) with a floor on cSE's hidden width vs the same setting without one, paired
over the 20 LPBA40 subjects (issue 27 item 1).

The baseline runs (vanilla, and scSE without a floor) are those of
eval/results/sweep_lpba40_unet_smp_cpu: identical configs, and CPU training is bit-reproducible,
which the first check below confirms on the vanilla runs both grids trained.

    python eval/results/floor_lpba40_unet_cpu/paired_vs_plain.py \
        eval/results/floor_lpba40_unet_cpu/results.csv eval/results/sweep_lpba40_unet_smp_cpu/results.csv
"""
import csv
import sys
from collections import defaultdict

import numpy as np

from scse_seg.evaluation.stats import bootstrap_ci, wilcoxon_p


def per_volume(path):
    """{(arch label, attention): {volume: mean Dice over structures not absent}}, as report.md."""
    rows = defaultdict(lambda: defaultdict(list))
    for r in csv.DictReader(open(path)):
        if r["status"] != "absent":
            rows[(r["arch"], r["attention"])][r["volume"]].append(float(r["dice"]))
    return {k: {v: float(np.mean(d)) for v, d in vols.items()} for k, vols in rows.items()}


floor, plain = per_volume(sys.argv[1]), per_volume(sys.argv[2])
none_new = next(v for (a, t), v in floor.items() if t == "none")
none_old = next(v for (a, t), v in plain.items() if t == "none")
same = none_new == none_old
print(f"vanilla runs identical in both grids: {same} ({len(none_new)} subjects)")
base = next(v for (a, t), v in plain.items() if t == "scse")
mean = {}
print("| scSE r=16, add | Dice | Δ vs none | Δ vs no floor (points) | 95% CI | Wilcoxon p | better |")
print("|---|---|---|---|---|---|---|")
variants = [("no floor (C // 16)", base)] + [
    (f"hidden ≥ {a.split('model.min_hidden=')[1].rstrip(']')}", v)
    for (a, t), v in sorted(floor.items()) if t == "scse"]
for label, v in variants:
    m, m_base, m_none = (np.mean(list(x.values())) for x in (v, base, none_old))
    lo, hi = bootstrap_ci(v, base)
    paired = "— | — | — | —" if v is base else (
        f"{100 * (m - m_base):+.2f} | [{100 * lo:+.2f}, {100 * hi:+.2f}] | {wilcoxon_p(v, base):.2g} | "
        f"{sum(v[k] > base[k] for k in v)} of {len(v)}")
    print(f"| {label} | {m:.4f} | {100 * (m - m_none):+.2f} | {paired} |")
