"""Median-frequency-balanced cross-entropy (+ optional boundary weighting and Dice), as in
QuickNAT and Roy et al.: rare structures (under 1% of voxels) would otherwise be ignored.

Class weights are computed from the voxel counts of the training samples as the loss sees them
(``loss.class_weighting``, see :data:`CLASS_WEIGHTINGS`)."""
from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def median_frequency_weights(counts: np.ndarray | list[int]) -> np.ndarray:
    """QuickNAT's median frequency balancing (Roy et al., NeuroImage 2019, eq. 1):
    alpha_c = median_c(f_c) / f_c with f_c = voxels of class c / all voxels.

    ``counts``: (K,) voxel counts, or (N, K) per training sample (summed).
    Classes absent from the training labels (f_c = 0) cannot be balanced: they get weight 0 (no
    voxel of theirs is ever a target), are left out of the median, and a warning names them.
    """
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim == 2:
        counts = counts.sum(0)
    if counts.ndim != 1 or counts.size < 2:
        raise ValueError("need voxel counts for at least two classes")
    if counts.sum() <= 0:
        raise ValueError("the training labels contain no voxels")
    return _balance(counts / counts.sum())


def median_frequency_present_weights(sample_counts: np.ndarray) -> np.ndarray:
    """Eigen & Fergus (ICCV 2015) median frequency balancing: alpha_c = median_c(f_c) / f_c with
    f_c = voxels of class c / all voxels of the images (training samples) where c is present.

    ``sample_counts``: (N, K) voxel counts of each class in each training sample. Unlike
    QuickNAT's f_c it does not penalise a class for being absent from most images, only for being
    small where it occurs. Absent classes: weight 0 and a warning, as above.
    """
    n = np.asarray(sample_counts, dtype=np.float64)
    if n.ndim != 2 or n.shape[1] < 2:
        raise ValueError("need (samples, classes) voxel counts for at least two classes")
    if n.sum() <= 0:
        raise ValueError("the training labels contain no voxels")
    pixels = n.sum(1)  # voxels of each sample
    where = (n > 0) * pixels[:, None]  # a sample's voxels count for c only where c is present
    denom = where.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        freq = np.where(denom > 0, n.sum(0) / np.maximum(denom, 1), 0.0)
    return _balance(freq)


CLASS_WEIGHTINGS = {
    "median_frequency": median_frequency_weights,
    "median_frequency_present": median_frequency_present_weights,
}


def class_weights(sample_counts: np.ndarray, method: str) -> np.ndarray | None:
    """Weights by name (``loss.class_weighting``) from (N, K) per-sample voxel counts; ``none``
    -> None (plain cross-entropy)."""
    if method == "none":
        return None
    if method not in CLASS_WEIGHTINGS:
        raise ValueError(f"unknown class weighting {method!r}; valid: "
                         f"{', '.join([*CLASS_WEIGHTINGS, 'none'])}")
    return CLASS_WEIGHTINGS[method](np.asarray(sample_counts))


def _balance(freq: np.ndarray) -> np.ndarray:
    """median(f) / f over the classes present; 0 (and a warning) for the absent ones."""
    present = freq > 0
    weights = np.zeros_like(freq)
    weights[present] = np.median(freq[present]) / freq[present]
    absent = np.flatnonzero(~present)
    if absent.size:
        warnings.warn(f"classes {absent.tolist()} never occur in the training labels; their "
                      "median-frequency weight is set to 0", stacklevel=2)
    return weights


def label_boundaries(target: torch.Tensor) -> torch.Tensor:
    """Boolean mask of voxels whose label differs from a face neighbour (any spatial dim)."""
    edge = torch.zeros_like(target, dtype=torch.bool)
    for axis in range(1, target.dim()):
        diff = torch.diff(target, dim=axis) != 0
        n = diff.shape[axis]
        edge.narrow(axis, 0, n).logical_or_(diff)
        edge.narrow(axis, 1, n).logical_or_(diff)
    return edge


def soft_dice_loss(probs: torch.Tensor, target: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """1 - mean of the batch soft Dice over the classes in the batch's reference or its (argmax)
    prediction.

    A class in neither is left out: its soft Dice would be ~0 whatever the network does (the
    small probabilities it keeps everywhere add up), a constant ~1/K loss with no useful gradient.
    A class predicted but absent from the reference stays in, so false positives still cost.
    """
    k = probs.shape[1]
    onehot = F.one_hot(target, k).movedim(-1, 1).to(probs.dtype)
    dims = (0, *range(2, probs.dim()))
    inter = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    dice = (2 * inter + eps) / (denom + eps)
    with torch.no_grad():
        predicted = torch.bincount(probs.argmax(1).reshape(-1), minlength=k)[:k] > 0
        scored = (onehot.sum(dims) > 0) | predicted
    return 1.0 - dice[scored].mean()


class SegmentationLoss(nn.Module):
    """Pixel-weighted cross-entropy (class weight of the true label + boundary bonus), averaged over
    pixels, plus ``dice_weight`` x soft Dice. Softmax is computed once, from the logits."""

    def __init__(self, class_weights: torch.Tensor | None = None, boundary_weight: float = 0.0,
                 dice_weight: float = 1.0):
        super().__init__()
        self.register_buffer("class_weights", None if class_weights is None
                             else torch.as_tensor(class_weights, dtype=torch.float32))
        self.boundary_weight = float(boundary_weight)
        self.dice_weight = float(dice_weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        log_probs = F.log_softmax(logits, dim=1)
        ce = F.nll_loss(log_probs, target, reduction="none")
        w = None
        if self.class_weights is not None:
            w = self.class_weights[target]
        if self.boundary_weight > 0:
            b = label_boundaries(target).float() * self.boundary_weight
            w = b + (w if w is not None else 1.0)
        loss = (ce * w).mean() if w is not None else ce.mean()
        if self.dice_weight > 0:
            loss = loss + self.dice_weight * soft_dice_loss(log_probs.exp(), target)
        return loss
