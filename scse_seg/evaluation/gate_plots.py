"""The figures of the gate inspector (``eval/gates.py``), as PNG beside its CSV files."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from .plots import _plt, _save

HEATMAP_COLUMNS = {  # statistic -> column title
    "cse_mean": "cSE mean", "cse_channel_spread": "cSE spread\nover channels",
    "cse_near0": "cSE <0.1", "cse_near1": "cSE >0.9", "cse_input_std": "cSE change\nover inputs",
    "cse_structure_std": "cSE change\nover structures", "sse_mean": "sSE mean",
    "sse_in_structures": "sSE in\nstructures", "sse_background": "sSE in\nbackground",
    "sse_contrast": "sSE\ncontrast",
}


def gate_heatmap(blocks: Sequence[dict], path: str | Path, title: str = "") -> Path:
    """Blocks (rows, in forward order) x statistics (columns), each cell annotated; statistics a
    network's blocks lack (sSE's for a cSE network) are left out."""
    plt = _plt()
    cols = [c for c in HEATMAP_COLUMNS if any(c in b for b in blocks)]
    values = np.array([[float(b.get(c, np.nan)) for c in cols] for b in blocks])
    fig, ax = plt.subplots(figsize=(1.0 * len(cols) + 2.6, 0.42 * len(blocks) + 1.6))
    ax.imshow(np.ma.masked_invalid(values), cmap="viridis", vmin=0, vmax=1, aspect="auto")
    for (r, c), v in np.ndenumerate(values):
        if np.isfinite(v):
            ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if v < 0.6 else "black")
    ax.set_xticks(range(len(cols)), [HEATMAP_COLUMNS[c] for c in cols], fontsize=7)
    ax.set_yticks(range(len(blocks)), [f"{b['order']}. {b['block']}" for b in blocks], fontsize=7)
    ax.xaxis.tick_top()
    ax.set_title(title, fontsize=9, pad=30)
    fig.tight_layout()
    return _save(fig, path)


def knockout_bars(knockouts: Sequence[dict], order: Sequence[str], path: str | Path,
                  title: str = "") -> Path:
    """Change in mean Dice (points) per block when a gate is replaced by its mean or the block is
    removed; one group of bars per block, in forward order."""
    plt = _plt()
    kinds = sorted({(k["gate"], k["replacement"]) for k in knockouts},
                   key=lambda t: ("cse", "sse", "block").index(t[0]))
    fig, ax = plt.subplots(figsize=(0.55 * len(order) * max(len(kinds), 1) / 2 + 3, 3.4))
    width = 0.8 / max(len(kinds), 1)
    for j, (gate, rep) in enumerate(kinds):
        d = {k["block"]: 100 * k["delta"] for k in knockouts if (k["gate"], k["replacement"]) == (gate, rep)}
        xs = [i + (j - (len(kinds) - 1) / 2) * width for i in range(len(order))]
        ax.bar(xs, [d.get(b, np.nan) for b in order], width,
               label="block removed" if gate == "block" else f"{gate} gate -> its mean")
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xticks(range(len(order)), [f"{i + 1}" for i in range(len(order))])
    ax.set_xlabel("block (forward order, see the table)")
    ax.set_ylabel("change in mean Dice (points)")
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def sse_structure_bars(rows: Sequence[dict], order: Sequence[str], class_names: Sequence[str],
                       path: str | Path, title: str = "") -> Path:
    """One panel per sSE block: its mean gate in each structure, a line at the background's
    (``class_names[0]``)."""
    plt = _plt()
    blocks = [b for b in order if any(r["block"] == b for r in rows)]
    ncol = min(3, len(blocks))
    nrow = -(-len(blocks) // ncol)
    background, structures = class_names[0], list(class_names[1:])
    fig, axes = plt.subplots(nrow, ncol, figsize=(max(3.2, 0.09 * len(structures) + 1.5) * ncol, 2.3 * nrow),
                             squeeze=False, sharey=True)
    for ax, b in zip(axes.flat, blocks):
        m = {r["structure"]: r["mean_gate"] for r in rows if r["block"] == b}
        ax.bar(range(len(structures)), [m.get(s, np.nan) for s in structures], color="tab:orange")
        if background in m:
            ax.axhline(m[background], color="k", ls="--", lw=0.8, label="background")
        ax.set_title(f"{order.index(b) + 1}. {b}", fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_xticks(range(len(structures)), structures if len(structures) <= 12 else [""] * len(structures),
                      rotation=90, fontsize=6)
    for ax in list(axes.flat)[len(blocks):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    axes.flat[0].set_ylabel("mean sSE gate")
    fig.suptitle(title or "sSE gate inside each structure", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def gate_overlays(overlays: Mapping[str, tuple], order: Sequence[str], path: str | Path,
                  title: str = "") -> Path:
    """The example slice with each sSE block's gate map over it (same extent whatever its
    resolution), structure outlines in white."""
    plt = _plt()
    blocks = [b for b in order if b in overlays]
    ncol = min(4, len(blocks))
    nrow = -(-len(blocks) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(2.6 * ncol, 2.6 * nrow), squeeze=False)
    for ax, b in zip(axes.flat, blocks):
        image, gate, label = overlays[b]
        h, w = image.shape
        extent = (0, w, h, 0)
        ax.imshow(image, cmap="gray", extent=extent)
        im = ax.imshow(gate, cmap="magma", vmin=0, vmax=1, alpha=0.6, extent=extent,
                       interpolation="nearest")
        ax.contour(np.linspace(0, w, label.shape[1]), np.linspace(0, h, label.shape[0]), label > 0,
                   levels=[0.5], colors="white", linewidths=0.5)
        ax.set_title(f"{order.index(b) + 1}. {b}", fontsize=8)
        ax.axis("off")
    for ax in list(axes.flat)[len(blocks):]:
        ax.axis("off")
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.7, label="sSE gate")
    fig.suptitle(title, fontsize=9)
    return _save(fig, path)


__all__ = ["gate_heatmap", "gate_overlays", "knockout_bars", "sse_structure_bars"]
