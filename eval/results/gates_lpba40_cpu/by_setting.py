"""The four gate reports of this folder side by side (issue 27 item 3): per network and scSE
setting, the cSE gate's mean and change over inputs, the sSE contrast, and the Dice lost when
each block is removed; writes by_setting.png and prints the Markdown table.

    python eval/results/gates_lpba40_cpu/by_setting.py
"""
import csv
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RUNS = {"unet-tmi": "U-Net, TMI (r=2, max)", "unet-default": "U-Net, default (r=16, add)",
        "densenet-tmi": "FC-DenseNet, TMI (r=2, max)", "densenet-default": "FC-DenseNet, default (r=16, add)"}


def rows(path):
    return list(csv.DictReader(open(path)))


def main():
    print("| network, setting | Dice (fold 0) | cSE gate mean | cSE change over inputs (max) | "
          "sSE contrast (max) | Δ Dice when a block is removed: mean (worst) |")
    print("|---|---|---|---|---|---|")
    removed = {}
    for run, label in RUNS.items():
        blocks = rows(HERE / run / "blocks.csv")
        ko = [r for r in rows(HERE / run / "knockout.csv") if r["gate"] == "block"]
        removed[run] = [100 * float(r["delta"]) for r in ko]
        dice = float(next(ln for ln in (HERE / run / "summary.md").read_text().splitlines()
                          if "mean Dice of the intact network" in ln).split("network ")[1].split()[0])
        cse = [float(b["cse_mean"]) for b in blocks]
        change = [float(b["cse_input_std"]) for b in blocks]
        contrast = [float(b["sse_contrast"]) for b in blocks]
        print(f"| {label} | {dice:.4f} | {min(cse):.2f}–{max(cse):.2f} | {max(change):.3f} | "
              f"{max(contrast):+.2f} | {np.mean(removed[run]):+.2f} ({min(removed[run]):+.2f}) |")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4), sharey=True)
    for ax, net in zip(axes, ("unet", "densenet")):
        for j, setting in enumerate(("tmi", "default")):
            d = removed[f"{net}-{setting}"]
            ax.bar(np.arange(len(d)) + (j - 0.5) * 0.4, d, 0.4, label=RUNS[f"{net}-{setting}"].split(", ")[1])
        ax.axhline(0, color="k", lw=0.6)
        ax.set_xticks(range(len(d)), ["enc1", "enc2", "enc3", "enc4", "bottleneck", "dec1", "dec2", "dec3",
                                      "dec4"], rotation=45, fontsize=7)
        ax.set_title("U-Net" if net == "unet" else "FC-DenseNet", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("Δ Dice when the block is removed (points)")
    fig.suptitle("LPBA40 fold 0, 6 epochs: which scSE blocks the network depends on", fontsize=9)
    fig.tight_layout()
    fig.savefig(HERE / "by_setting.png", dpi=110)


if __name__ == "__main__":
    main()
