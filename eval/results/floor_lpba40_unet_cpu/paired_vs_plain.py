"""scSE (r=16, add) with a floor on cSE's hidden width vs the same setting without one
(min_hidden 1), paired over the 20 LPBA40 subjects of this grid (issue 27 item 1). report.md
compares every variant with vanilla; this compares the floors with each other.

    python eval/results/floor_lpba40_unet_cpu/paired_vs_plain.py \
        eval/results/floor_lpba40_unet_cpu/results.csv
"""
import csv
import sys
from collections import defaultdict

import numpy as np

from scse_seg.evaluation.stats import bootstrap_ci, wilcoxon_p


def per_volume(path):
    """{min_hidden: {volume: mean Dice over the structures not absent}} of the scSE runs, as
    report.md computes a volume's Dice."""
    rows = defaultdict(lambda: defaultdict(list))
    for r in csv.DictReader(open(path)):
        if r["attention"] == "scse" and r["status"] != "absent":
            floor = int(r["arch"].split("model.min_hidden=")[1].rstrip("]"))
            rows[floor][r["volume"]].append(float(r["dice"]))
    return {k: {v: float(np.mean(d)) for v, d in vols.items()} for k, vols in sorted(rows.items())}


scores = per_volume(sys.argv[1])
base = scores[1]
print("| cSE hidden width | Dice | Δ vs no floor (points) | 95% CI | Wilcoxon p | subjects better |")
print("|---|---|---|---|---|---|")
for floor, v in scores.items():
    m = np.mean(list(v.values()))
    if floor == 1:
        print(f"| C // 16 (no floor) | {m:.4f} | — | — | — | — |")
        continue
    lo, hi = bootstrap_ci(v, base)
    d = 100 * (m - np.mean(list(base.values())))
    print(f"| max(C // 16, {floor}) | {m:.4f} | {d:+.2f} | [{100 * lo:+.2f}, {100 * hi:+.2f}] | "
          f"{wilcoxon_p(v, base):.2g} | {sum(v[k] > base[k] for k in v)} of {len(v)} |")
