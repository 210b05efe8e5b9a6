"""Per-volume, per-structure segmentation metrics: 3D Dice from one confusion count, and (via
MONAI) the 95% Hausdorff distance, the symmetric average surface distance in millimetres and the
normalised surface Dice (NSD: the share of both surfaces within a tolerance of the other, Nikolov
et al. 2021, the Medical Segmentation Decathlon's second metric).

A structure can be absent from the reference, the prediction, or both; each row carries a
``status`` so that an empty structure is never silently scored as 0 or 1:

=============  =================  =============================================
status         Dice               surface distances
=============  =================  =============================================
present        2|A∩B| / (|A|+|B|) finite
missed         0 (reference only) HD95/ASD NaN (no predicted surface), NSD 0
false_positive 0 (prediction only) HD95/ASD NaN (no reference surface), NSD 0
absent         NaN                NaN (nothing to score; excluded from means)
=============  =================  =============================================

Surface-distance means never skip a missed structure (that would let a network that misses a
structure score better than one that finds it poorly): :func:`surface_score` counts a missed or
false-positive structure at ``surface_penalty``, the volume's diagonal in mm (the largest distance
two voxels of it can have), as some challenges do.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np

STATUSES = ("present", "missed", "false_positive", "absent")


def confusion_counts(pred: np.ndarray, ref: np.ndarray, num_classes: int) -> np.ndarray:
    """(K, K) voxel counts, rows = reference class, columns = predicted class, in one pass."""
    pred = np.asarray(pred, dtype=np.int64).ravel()
    ref = np.asarray(ref, dtype=np.int64).ravel()
    if pred.shape != ref.shape:
        raise ValueError(f"prediction has {pred.size} voxels but the reference has {ref.size}")
    for name, a in (("prediction", pred), ("reference", ref)):
        if a.size and (a.min() < 0 or a.max() >= num_classes):
            raise ValueError(f"{name} holds class indices outside 0..{num_classes - 1}")
    return np.bincount(ref * num_classes + pred, minlength=num_classes ** 2).reshape(
        num_classes, num_classes)


def dice_per_class(pred: np.ndarray, ref: np.ndarray, num_classes: int) -> np.ndarray:
    """Dice of every class index (background included at index 0); NaN where the class is in
    neither volume."""
    return _dice(confusion_counts(pred, ref, num_classes))


def dice_from_counts(counts: np.ndarray) -> np.ndarray:
    """counts[..., k, (intersection, pred, ref)] -> Dice per class (NaN where absent in both).
    The one Dice formula: validation during training sums these counts across ranks first."""
    inter, pred, ref = counts[..., 0], counts[..., 1], counts[..., 2]
    denom = pred + ref
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, 2 * inter / np.maximum(denom, 1e-12), np.nan)


def dice_counts(pred, ref, num_classes: int):
    """(K, 3) float64 tensor of intersection, predicted and reference voxel counts per class, on
    the tensors' device (training validation sums them across DDP ranks)."""
    import torch

    pred, ref = pred.reshape(-1), ref.reshape(-1)
    k = num_classes
    inter = torch.bincount(ref[pred == ref], minlength=k)[:k]
    return torch.stack([inter, torch.bincount(pred, minlength=k)[:k],
                        torch.bincount(ref, minlength=k)[:k]], dim=1).double()


def _dice(cm: np.ndarray) -> np.ndarray:
    return dice_from_counts(np.stack([np.diag(cm), cm.sum(0), cm.sum(1)], -1).astype(np.float64))


def _status(in_ref: bool, in_pred: bool) -> str:
    return {(True, True): "present", (True, False): "missed", (False, True): "false_positive",
            (False, False): "absent"}[(in_ref, in_pred)]


NSD_TOLERANCE_MM = 1.0


def check_nsd_tolerance(value) -> float:
    """--nsd-tolerance / compare.nsd_tolerance: a distance in mm, > 0."""
    try:
        tol = float(value)
    except (TypeError, ValueError):
        tol = float("nan")
    if not tol > 0 or tol == float("inf"):
        from .errors import ConfigError

        raise ConfigError(f"--nsd-tolerance {value!r}: the normalised surface Dice's tolerance is "
                          "a distance in mm greater than 0, e.g. 1 or 2")
    return tol


def surface_distances(pred_mask: np.ndarray, ref_mask: np.ndarray,
                      spacing: Sequence[float] | None = None,
                      nsd_tolerance: float = NSD_TOLERANCE_MM) -> tuple[float, float, float]:
    """(HD95, symmetric average surface distance, NSD at ``nsd_tolerance``) of two non-empty
    binary masks, in the units of ``spacing`` (voxels if None). Computed by MONAI on the masks'
    joint bounding box (plus a one-voxel margin), which gives the same values at a fraction of
    the cost on large volumes."""
    import torch
    from monai.metrics import (
        compute_average_surface_distance,
        compute_hausdorff_distance,
        compute_surface_dice,
    )

    both = np.logical_or(pred_mask, ref_mask)
    idx = np.nonzero(both)
    box = tuple(slice(max(int(i.min()) - 1, 0), int(i.max()) + 2) for i in idx)
    p = torch.as_tensor(np.ascontiguousarray(pred_mask[box]))[None, None]
    r = torch.as_tensor(np.ascontiguousarray(ref_mask[box]))[None, None]
    sp = None if spacing is None else [float(s) for s in spacing]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI's deprecation / "empty" warnings
        hd = compute_hausdorff_distance(p, r, include_background=True, percentile=95, spacing=sp)
        asd = compute_average_surface_distance(p, r, include_background=True, symmetric=True,
                                               spacing=sp)
        nsd = compute_surface_dice(p, r, [float(nsd_tolerance)], include_background=True,
                                   spacing=sp)
    return float(hd.item()), float(asd.item()), float(nsd.item())


def evaluate_volume(pred: np.ndarray, ref: np.ndarray, num_classes: int,
                    class_names: Sequence[str] | None = None,
                    spacing: Sequence[float] | None = None, surface: bool = False,
                    nsd_tolerance: float = NSD_TOLERANCE_MM) -> list[dict]:
    """One row per foreground structure: structure, class_index, dice, hd95, asd, nsd, status,
    ref_voxels, pred_voxels. Background (index 0) is excluded."""
    pred = np.asarray(pred)
    ref = np.asarray(ref)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference {ref.shape}")
    names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
    cm = confusion_counts(pred, ref, num_classes)
    dice = _dice(cm)
    sp = np.ones(ref.ndim) if spacing is None else np.asarray(spacing, dtype=np.float64)
    penalty = float(np.linalg.norm(np.asarray(ref.shape) * sp)) if surface else math.nan
    rows = []
    for c in range(1, num_classes):
        n_ref, n_pred = int(cm[c].sum()), int(cm[:, c].sum())
        status = _status(n_ref > 0, n_pred > 0)
        hd95 = asd = nsd = math.nan
        if surface and status == "present":
            hd95, asd, nsd = surface_distances(pred == c, ref == c, spacing, nsd_tolerance)
        elif surface and status != "absent":
            nsd = 0.0  # no surface of one side lies within any tolerance of the other
        rows.append(dict(structure=names[c], class_index=c, dice=float(dice[c]), hd95=hd95,
                         asd=asd, nsd=nsd, status=status, ref_voxels=n_ref, pred_voxels=n_pred,
                         surface_penalty=penalty))
    return rows


def surface_score(row: dict, metric: str) -> float:
    """``row[metric]`` (hd95 or asd) with the stated rule for undefined distances: a structure
    ``missed`` or ``false_positive`` scores its ``surface_penalty`` (the volume diagonal in mm);
    ``absent`` is NaN (left out). NaN also where no penalty was recorded (old evaluations), so a
    mean over it is refused rather than computed without the missed structures."""
    if row["status"] in ("missed", "false_positive"):
        return float(row.get("surface_penalty", math.nan))
    return float(row[metric])


def volume_mean_surface(rows: Sequence[dict], metric: str) -> float:
    """Mean of :func:`surface_score` over the structures of one volume that are not ``absent``;
    NaN if none, or if any of them has no value (never a mean over a subset)."""
    vals = [surface_score(r, metric) for r in rows if r["status"] != "absent"]
    return float(np.mean(vals)) if vals and np.all(np.isfinite(vals)) else math.nan


def volume_mean_dice(rows: Sequence[dict]) -> float:
    """Mean Dice over the structures of one volume that are not ``absent`` (NaN if none)."""
    vals = [r["dice"] for r in rows if r["status"] != "absent"]
    return float(np.mean(vals)) if vals else math.nan


def mean_std(values) -> tuple[float, float, int]:
    """(mean, sample std, n) over the finite values; NaNs (absent structures) are left out."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return math.nan, math.nan, 0
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0, int(v.size)


def summarise(rows: Sequence[dict], metric: str = "dice") -> dict[str, tuple[float, float, int]]:
    """Per structure: (mean, std, n volumes scored) of ``metric`` over volumes."""
    out: dict[str, list[float]] = {}
    for r in rows:
        out.setdefault(r["structure"], []).append(r.get(metric, math.nan))
    return {k: mean_std(v) for k, v in out.items()}


__all__ = ["NSD_TOLERANCE_MM", "STATUSES", "check_nsd_tolerance", "confusion_counts", "dice_counts",
           "dice_from_counts", "dice_per_class",
           "surface_distances", "evaluate_volume", "volume_mean_dice", "mean_std", "summarise",
           "surface_score", "volume_mean_surface"]
