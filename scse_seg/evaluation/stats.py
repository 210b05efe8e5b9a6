"""Paired significance of a variant against the vanilla baseline on the same held-out volumes.

The papers compare per-volume mean Dice with a Wilcoxon signed-rank test; a bootstrap over
subjects adds a 95% confidence interval of the mean difference (Efron & Tibshirani 1993), which
says how large the effect may be, not only whether it is non-zero. With several seeds,
each volume's score is first averaged over seeds (the seeds are repeated measurements of one
pair, not extra volumes: counting them as volumes would inflate n and shrink p).
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Mapping

import numpy as np


def paired(a: Mapping[str, float], b: Mapping[str, float]) -> tuple[np.ndarray, np.ndarray]:
    """Values of the volumes present (and finite) in both mappings, in the same order."""
    keys = sorted(k for k in a.keys() & b.keys()
                  if np.isfinite(a[k]) and np.isfinite(b[k]))
    return (np.array([a[k] for k in keys], dtype=np.float64),
            np.array([b[k] for k in keys], dtype=np.float64))


def wilcoxon_p(variant: Mapping[str, float], baseline: Mapping[str, float]) -> float:
    """Two-sided Wilcoxon signed-rank p-value of ``variant - baseline`` over paired volumes.

    NaN when it is undefined: fewer than two pairs, or all differences zero (identical
    predictions), rather than an error or a misleading 1.0.
    """
    from scipy.stats import wilcoxon

    x, y = paired(variant, baseline)
    d = x - y
    if d.size < 2 or np.all(d == 0):
        return math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # small-n normal-approximation notes
        return float(wilcoxon(x, y, alternative="two-sided").pvalue)


def bootstrap_ci(variant: Mapping[str, float], baseline: Mapping[str, float],
                 level: float = 0.95, n_resamples: int = 10000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean paired difference ``variant -
    baseline`` over volumes (subjects are resampled with replacement; scipy.stats.bootstrap).

    (NaN, NaN) with fewer than two pairs; a zero-width interval when every difference is equal.
    Fixed ``seed``: the same report gives the same interval.
    """
    from scipy.stats import bootstrap

    x, y = paired(variant, baseline)
    d = x - y
    if d.size < 2:
        return math.nan, math.nan
    if np.all(d == d[0]):
        return float(d[0]), float(d[0])
    res = bootstrap((d,), np.mean, confidence_level=level, n_resamples=n_resamples,
                    method="percentile", rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


WILCOXON_MIN_N = 6  # the exact two-sided test's smallest p is 2 / 2**n: 0.0625 at n = 5


def small_sample_note(n: int) -> str | None:
    """What a reader must know when ``n`` paired volumes are too few for the Wilcoxon test to
    reach p < 0.05 at all (n <= 5); None otherwise."""
    if n >= WILCOXON_MIN_N:
        return None
    smallest = f"{2.0 ** (1 - n):.3g}" if n >= 1 else "undefined"
    return (f"only {n} paired volume{'s' * (n != 1)}: a two-sided Wilcoxon signed-rank test cannot "
            f"reach p < 0.05 with fewer than {WILCOXON_MIN_N} (its smallest p here is {smallest}), "
            f"and a percentile-bootstrap CI over {n} volume{'s' * (n != 1)} is no significance test "
            "either; test on more volumes (e.g. --folds) before reading Δ as an effect")


def seed_averaged(per_seed: list[Mapping[str, float]]) -> dict[str, float]:
    """Average each volume's score over the seeds that scored it."""
    acc: dict[str, list[float]] = {}
    for scores in per_seed:
        for k, v in scores.items():
            if np.isfinite(v):
                acc.setdefault(k, []).append(float(v))
    return {k: float(np.mean(v)) for k, v in acc.items()}


__all__ = ["WILCOXON_MIN_N", "bootstrap_ci", "paired", "seed_averaged", "small_sample_note",
           "wilcoxon_p"]
