"""Does the default scSE's gain over vanilla U-Net survive longer training? (issue 27 item 3)

The 6-epoch runs are those of the floor grid (its min_hidden=1 rows: the default setting), the
15-epoch ones this folder's; both are the LPBA40 CPU setting, 4-fold CV over subjects 1-20, one
seed, scored on each fold's held-out subjects. Compared on the subjects both have:

    python eval/results/longer_lpba40_unet_cpu/by_epochs.py                 # table + by_epochs.png
    python eval/results/longer_lpba40_unet_cpu/by_epochs.py --collect runs/longer_lpba40_unet_cpu/runs
      # first writes results.csv here from the finished runs' eval.json (while the grid is partial)
"""
import argparse
import csv
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from scse_seg.evaluation.compare_report import write_results_csv
from scse_seg.evaluation.runs import RunEvaluation
from scse_seg.evaluation.stats import bootstrap_ci, wilcoxon_p

HERE = Path(__file__).resolve().parent
SIX = HERE.parent / "floor_lpba40_unet_cpu" / "results.csv"


def per_volume(path, keep=lambda arch: True):
    """{attention: {volume: mean Dice over the structures not absent}}, as report.md computes it."""
    rows = defaultdict(lambda: defaultdict(list))
    for r in csv.DictReader(open(path)):
        if keep(r["arch"]) and r["status"] != "absent":
            rows[r["attention"]][r["volume"]].append(float(r["dice"]))
    return {a: {v: float(np.mean(d)) for v, d in vols.items()} for a, vols in rows.items()}


def collect(runs_dir: Path) -> None:
    """results.csv from every finished run's cached evaluation, curves.csv (validation Dice per
    epoch) from their log.csv."""
    results, curves = [], []
    for ev in sorted(runs_dir.glob("*/eval.json")):
        results.append(RunEvaluation(**json.loads(ev.read_text())["result"]))
        for r in csv.DictReader(open(ev.parent / "log.csv")):
            curves.append(dict(run=ev.parent.name, epoch=int(r["epoch"]), val_dice=float(r["val_dice"])))
    write_results_csv(results, HERE / "results.csv")
    with open(HERE / "curves.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["run", "epoch", "val_dice"])
        w.writeheader()
        w.writerows(curves)
    print(f"{len(results)} runs -> {HERE / 'results.csv'}, {HERE / 'curves.csv'}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--collect", type=Path, metavar="RUNS_DIR")
    args = p.parse_args()
    if args.collect:
        collect(args.collect)
    six = per_volume(SIX, lambda a: a.endswith("model.min_hidden=1]"))
    fifteen = per_volume(HERE / "results.csv")
    subjects = sorted(set(fifteen["none"]) & set(fifteen["scse"]))
    print(f"{len(subjects)} subjects: {', '.join(subjects)}\n")
    print("| epochs | vanilla U-Net | scSE (r=16, add) | Δ (points) | 95% CI | Wilcoxon p | "
          "subjects better |")
    print("|---|---|---|---|---|---|---|")
    deltas = {}
    for epochs, s in (("6", six), ("15", fifteen)):
        none = {v: s["none"][v] for v in subjects}
        scse = {v: s["scse"][v] for v in subjects}
        lo, hi = bootstrap_ci(scse, none)
        d = 100 * (np.mean(list(scse.values())) - np.mean(list(none.values())))
        deltas[epochs] = [100 * (scse[v] - none[v]) for v in subjects]
        print(f"| {epochs} | {np.mean(list(none.values())):.4f} | {np.mean(list(scse.values())):.4f} | "
              f"{d:+.2f} | [{100 * lo:+.2f}, {100 * hi:+.2f}] | {wilcoxon_p(scse, none):.2g} | "
              f"{sum(scse[v] > none[v] for v in subjects)} of {len(subjects)} |")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for epochs, s in (("6", six), ("15", fifteen)):
        axes[0].plot([0, 1], [[s["none"][v] for v in subjects], [s["scse"][v] for v in subjects]],
                     color="tab:blue" if epochs == "6" else "tab:orange", alpha=0.6, marker="o", ms=3)
        axes[0].plot([], [], color="tab:blue" if epochs == "6" else "tab:orange", label=f"{epochs} epochs")
    axes[0].set_xticks([0, 1], ["vanilla", "scSE"])
    axes[0].set_ylabel("per-subject mean Dice")
    axes[0].legend(fontsize=8)
    axes[1].boxplot([deltas["6"], deltas["15"]], tick_labels=["6 epochs", "15 epochs"])
    axes[1].axhline(0, color="k", lw=0.6)
    axes[1].set_ylabel("scSE − vanilla (Dice points)")
    curves = defaultdict(list)
    for r in csv.DictReader(open(HERE / "curves.csv")):
        curves[r["run"]].append((int(r["epoch"]), float(r["val_dice"])))
    for run, pts in sorted(curves.items()):
        e, d = zip(*sorted(pts))
        axes[2].plot(e, d, color="tab:green" if "-scse-" in run else "tab:gray",
                     ls="-" if "-f0-" in run else "--", label=run.replace("unet-", "").replace("-s0", ""))
    axes[2].axvline(6, color="k", lw=0.5, ls=":")
    axes[2].set_xlabel("epoch (15-epoch schedule)")
    axes[2].set_ylabel("validation Dice (slices)")
    axes[2].legend(fontsize=7)
    fig.suptitle("LPBA40 U-Net, held-out subjects of 4-fold CV", fontsize=9)
    fig.tight_layout()
    fig.savefig(HERE / "by_epochs.png", dpi=110)


if __name__ == "__main__":
    main()
