"""Subject-level splits: a single train/validation split, or K-fold cross-validation.

Both work on case names (one case = one subject/volume), so no subject is ever in both the
training and the held-out set. K-fold follows nnU-Net's benchmark practice (5 folds over the
training cases): every subject is held out exactly once across the K folds, so a comparison can
test on all subjects instead of one small split.
"""
from __future__ import annotations

import numpy as np


def split_cases(names: list[str], val_fraction: float = 0.2, seed: int = 0):
    """Volume-level split (no subject in both sets), deterministic in ``seed``."""
    names = sorted(names)
    if len(names) < 2:
        return names, []
    order = np.random.default_rng(seed).permutation(len(names))
    n_val = min(len(names) - 1, max(1, int(round(val_fraction * len(names)))))
    val = sorted(names[i] for i in order[:n_val])
    train = sorted(names[i] for i in order[n_val:])
    return train, val


def kfold_split(names: list[str], folds: int, fold: int, seed: int = 0):
    """(train, held-out) names of fold ``fold`` of ``folds``: the sorted names are shuffled once
    with ``seed`` and dealt into ``folds`` groups whose sizes differ by at most one; fold ``i``
    holds out group ``i``. Independent of the order ``names`` come in."""
    names = sorted(names)
    if folds < 2 or folds > len(names):
        raise ValueError(f"{folds} folds need at least {folds} cases, got {len(names)}")
    if not 0 <= fold < folds:
        raise ValueError(f"fold must be in 0..{folds - 1}, got {fold}")
    order = np.random.default_rng(seed).permutation(len(names))
    held = {names[i] for i in np.array_split(order, folds)[fold]}
    return sorted(n for n in names if n not in held), sorted(held)


__all__ = ["kfold_split", "split_cases"]
