"""The figures of a variant comparison, written as PNG (matplotlib, headless Agg backend).

Inputs are plain nested dicts so the functions are usable on their own:
``per_volume[arch][attention] -> list of per-volume mean Dice``.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _colours(n: int):
    plt = _plt()
    cmap = plt.get_cmap("tab10")
    return [cmap(i % 10) for i in range(n)]


def dice_boxplot(per_volume: Mapping[str, Mapping[str, Sequence[float]]], path: str | Path,
                 title: str = "Per-volume mean Dice on held-out volumes") -> Path:
    """One panel per architecture, one box per attention variant (points overlaid)."""
    plt = _plt()
    archs = list(per_volume)
    fig, axes = plt.subplots(1, len(archs), figsize=(3.2 * len(archs) + 1, 3.8), squeeze=False,
                             sharey=True)
    for ax, arch in zip(axes[0], archs):
        variants = list(per_volume[arch])
        data = [np.asarray([v for v in per_volume[arch][a] if np.isfinite(v)]) for a in variants]
        box = ax.boxplot(data, patch_artist=True, widths=0.6, showfliers=False)
        ax.set_xticks(range(1, len(variants) + 1), variants)
        for patch, colour in zip(box["boxes"], _colours(len(variants))):
            patch.set_facecolor(colour)
            patch.set_alpha(0.45)
        rng = np.random.default_rng(0)
        for i, d in enumerate(data, start=1):
            ax.scatter(i + rng.uniform(-0.12, 0.12, d.size), d, s=8, c="k", alpha=0.6, zorder=3)
        ax.set_title(arch)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("Dice")
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def structure_plot(per_structure: Mapping[str, Mapping[str, Mapping[str, float]]],
                   path: str | Path) -> Path:
    """Per-structure mean Dice, variants side by side; one panel per architecture.
    ``per_structure[arch][attention][structure] -> mean Dice``."""
    plt = _plt()
    archs = list(per_structure)
    structures = list(next(iter(next(iter(per_structure.values())).values())))
    height = max(2.5, 0.28 * len(structures) + 1.2)
    fig, axes = plt.subplots(1, len(archs), figsize=(4.2 * len(archs), height), squeeze=False,
                             sharey=True)
    y = np.arange(len(structures))
    for ax, arch in zip(axes[0], archs):
        variants = list(per_structure[arch])
        w = 0.8 / len(variants)
        for i, (attn, colour) in enumerate(zip(variants, _colours(len(variants)))):
            vals = [per_structure[arch][attn].get(s, np.nan) for s in structures]
            ax.barh(y + (i - (len(variants) - 1) / 2) * w, vals, height=w, color=colour,
                    label=attn)
        ax.set_yticks(y, structures, fontsize=7 if len(structures) > 20 else 9)
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.set_xlabel("mean Dice")
        ax.set_title(arch)
        ax.grid(axis="x", alpha=0.3)
    axes[0][-1].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def best_slice(label: np.ndarray, axis: int) -> int:
    """Index along ``axis`` of the slice with the most foreground (the most informative view)."""
    fg = (np.asarray(label) > 0).sum(axis=tuple(i for i in range(label.ndim) if i != axis))
    return int(np.argmax(fg))


def overlay_plot(image: np.ndarray, reference: np.ndarray,
                 predictions: Mapping[str, Mapping[str, np.ndarray]], axis: int, num_classes: int,
                 path: str | Path, title: str = "") -> Path:
    """One slice: image, reference and each variant's prediction overlaid.
    ``predictions[arch][attention] -> (X, Y, Z) class indices``; one row per architecture."""
    plt = _plt()
    from matplotlib.colors import ListedColormap

    k = best_slice(reference, axis)

    def cut(v):
        return np.rot90(np.take(np.asarray(v), k, axis=axis))

    base = plt.get_cmap("tab20" if num_classes > 10 else "tab10")
    cmap = ListedColormap([base(i % base.N) for i in range(max(num_classes - 1, 1))])
    archs = list(predictions)
    n_var = max(len(predictions[a]) for a in archs)
    fig, axes = plt.subplots(len(archs), n_var + 2, figsize=(2.3 * (n_var + 2), 2.5 * len(archs)),
                             squeeze=False)
    img = cut(image)

    def show(ax, lab, name):
        ax.imshow(img, cmap="gray")
        if lab is not None:
            lab = cut(lab).astype(float)
            ax.imshow(np.ma.masked_where(lab == 0, lab - 1), cmap=cmap, vmin=0,
                      vmax=max(num_classes - 2, 1), alpha=0.55, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.axis("off")

    for row, arch in zip(axes, archs):
        show(row[0], None, f"{arch}: image")
        show(row[1], reference, "reference")
        for ax, (attn, pred) in zip(row[2:], predictions[arch].items()):
            show(ax, pred, attn)
        for ax in row[2 + len(predictions[arch]):]:
            ax.axis("off")
    fig.suptitle(title or f"slice {k} along axis {axis}", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def training_curves(histories: Mapping[str, Mapping[str, Sequence[Sequence[dict]]]],
                    path: str | Path) -> Path:
    """Training loss (top) and validation Dice (bottom) per epoch; one column per architecture,
    one line per variant (mean over seeds, band = min..max).
    ``histories[arch][attention] -> list over seeds of the run's per-epoch history rows``."""
    plt = _plt()
    archs = list(histories)
    fig, axes = plt.subplots(2, len(archs), figsize=(4 * len(archs), 6), squeeze=False,
                             sharex="col")
    for col, arch in enumerate(archs):
        for (attn, runs), colour in zip(histories[arch].items(), _colours(len(histories[arch]))):
            for row, key in enumerate(("train_loss", "val_dice")):
                n = min((len(h) for h in runs), default=0)
                if n == 0:
                    continue
                vals = np.array([[float(h[e][key]) for e in range(n)] for h in runs])
                ep = np.arange(1, n + 1)
                ax = axes[row][col]
                ax.plot(ep, np.nanmean(vals, 0), color=colour, label=attn, marker="o", ms=3)
                if len(runs) > 1:
                    ax.fill_between(ep, np.nanmin(vals, 0), np.nanmax(vals, 0), color=colour,
                                    alpha=0.15)
        axes[0][col].set_title(arch)
        axes[0][col].set_ylabel("training loss")
        axes[1][col].set_ylabel("validation Dice")
        axes[1][col].set_xlabel("epoch")
        axes[1][col].xaxis.get_major_locator().set_params(integer=True)
        for r in range(2):
            axes[r][col].grid(alpha=0.3)
    axes[1][-1].legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path) -> Path:
    plt = _plt()
    import io

    from ..fileio import atomic_write_bytes

    path = Path(path)
    buf = io.BytesIO()  # rendered in memory, then written atomically: never half a PNG on disk
    fig.savefig(buf, dpi=110, format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
    atomic_write_bytes(path, lambda f: f.write(buf.getbuffer()))
    return path


__all__ = ["dice_boxplot", "structure_plot", "overlay_plot", "training_curves", "best_slice"]
