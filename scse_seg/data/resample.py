"""Resampling volumes to a common voxel spacing (or by a zoom factor) and bringing predictions
back to the original grid.

Why: real collections mix resolutions (anisotropic cine MRI, several scanners), and a CPU
comparison on LPBA40 is only affordable at half resolution; yet every metric must be computed
against the reference on its original grid. Images are resampled linearly, labels by nearest
neighbour, and predictions are returned by interpolating class probabilities back to the original
grid and taking the argmax (nnU-Net's rule: never interpolate label indices).

Convention: voxel centres are aligned (``align_corners=False``), so output voxel ``j`` of an axis
resized from ``n`` to ``m`` voxels lies at input coordinate ``(j + 0.5) * n / m - 0.5``; the new
affine places it at the same world position, so images stay registered to their labels and to
the original scan in any viewer.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F


def voxel_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size along each array axis (mm): the column norms of the affine's 3x3 part."""
    return tuple(float(s) for s in np.linalg.norm(np.asarray(affine)[:3, :3], axis=0))


def target_shape(shape: Sequence[int], affine: np.ndarray, zoom: float | None = None,
                 target_spacing: Sequence[float] | None = None) -> tuple[int, ...]:
    """Grid size after resampling by ``zoom`` (e.g. 0.5 = half resolution) or to
    ``target_spacing`` (mm per axis); the input shape when neither is given."""
    if zoom is not None and target_spacing is not None:
        raise ValueError("give zoom or target_spacing, not both")
    if target_spacing is not None:
        factors = [s / t for s, t in zip(voxel_spacing(affine), target_spacing)]
    elif zoom is not None:
        factors = [zoom] * len(shape)
    else:
        return tuple(int(s) for s in shape)
    return tuple(max(1, int(round(n * f))) for n, f in zip(shape, factors))


def resampled_affine(affine: np.ndarray, shape: Sequence[int], new_shape: Sequence[int]) -> np.ndarray:
    """Affine of the resampled grid: voxel size scaled by n/m, origin moved to the new first
    voxel centre (input coordinate 0.5 * n / m - 0.5)."""
    scale = np.array([n / m for n, m in zip(shape, new_shape)], dtype=np.float64)
    step = np.eye(4)
    step[:3, :3] = np.diag(scale)
    step[:3, 3] = 0.5 * scale - 0.5
    return np.asarray(affine, dtype=np.float64) @ step


def resize(array: np.ndarray, shape: Sequence[int], mode: str) -> np.ndarray:
    """Resize the last three axes of ``array`` to ``shape``: ``mode`` "linear" (images and
    probabilities; leading axes are channels) or "nearest" (labels)."""
    shape = tuple(int(s) for s in shape)
    if tuple(array.shape[-3:]) == shape:
        return array
    lead = array.shape[:-3]
    t = torch.as_tensor(np.ascontiguousarray(array)).reshape(1, -1, *array.shape[-3:])
    if mode == "linear":
        out = F.interpolate(t.float() if not t.is_floating_point() else t, size=shape,
                            mode="trilinear", align_corners=False)
    elif mode == "nearest":
        out = F.interpolate(t.double(), size=shape, mode="nearest-exact").to(t.dtype)
    else:
        raise ValueError(f"mode must be 'linear' or 'nearest', got {mode!r}")
    return out.reshape(*lead, *shape).numpy()


def resample_volume(image: np.ndarray, label: np.ndarray | None, affine: np.ndarray,
                    zoom: float | None = None, target_spacing: Sequence[float] | None = None):
    """(image, label, affine) on the resampled grid; unchanged when no resampling is asked."""
    new = target_shape(image.shape[-3:], affine, zoom, target_spacing)
    if new == tuple(image.shape[-3:]):
        return image, label, np.asarray(affine, dtype=np.float64)
    img = resize(image.astype(np.float32, copy=False), new, "linear")
    lab = None if label is None else resize(label, new, "nearest")
    return img, lab, resampled_affine(affine, image.shape[-3:], new)


def resample_case(vol, zoom: float | None = None, target_spacing: Sequence[float] | None = None):
    """A loaded :class:`~scse_seg.data.msd.Volume` on the resampled grid (the same object when
    nothing is asked)."""
    from dataclasses import replace

    if zoom is None and target_spacing is None:
        return vol
    image, label, affine = resample_volume(vol.image, vol.label, vol.affine, zoom, target_spacing)
    return replace(vol, image=image, label=label, affine=affine)


def probabilities_on_grid(probs: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """(K, x, y, z) probabilities on the resampled grid -> (K, *shape) on the original one,
    interpolated linearly (float32)."""
    return resize(probs, shape, "linear").astype(np.float32, copy=False)


def probabilities_to_grid(probs: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Class labels on the original grid from (K, x, y, z) probabilities on the resampled one:
    interpolate the probabilities linearly, then take the argmax."""
    return probabilities_on_grid(probs, shape).argmax(0).astype(np.int64)


__all__ = ["probabilities_on_grid", "probabilities_to_grid", "resample_case", "resample_volume",
           "resampled_affine", "resize", "target_shape", "voxel_spacing"]
