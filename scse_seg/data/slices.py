"""2D training on slices (the papers' setting): extract once, cache in memory, pad/crop to a
fixed size, remember where every slice came from so volumes can be reassembled."""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

# Array axes of a volume read from NIfTI (RAS-like voxel order): 0 = x (left-right, sagittal
# slices), 1 = y (posterior-anterior, coronal slices), 2 = z (inferior-superior, axial slices).
AXIS_INDEX = {"sagittal": 0, "coronal": 1, "axial": 2}


def axis_index(axis: str | int) -> int:
    if isinstance(axis, int) and axis in (0, 1, 2):
        return axis
    if axis not in AXIS_INDEX:
        raise ValueError(f"slice axis must be sagittal, coronal, axial or 0-2, got {axis!r}")
    return AXIS_INDEX[axis]


def pad_value(image: np.ndarray) -> float:
    """The one padding rule, used by 2D slices, 3D patches and whole-volume inference alike: pad
    an image with its volume's minimum (the normalised background), labels with 0 (background).
    A network then never sees a border at training time that differs from the one at test time."""
    return float(np.min(image)) if np.size(image) else 0.0


def channel_pad_values(image: np.ndarray) -> list[float]:
    """:func:`pad_value` of each channel of a loaded (X, Y, Z) or (C, X, Y, Z) image: channels
    are normalised apart, so each is padded with its own background."""
    return [pad_value(c) for c in image] if image.ndim == 4 else [pad_value(image)]


def pad_or_crop_channels(a: np.ndarray, size: tuple[int, int], fills: list[float]) -> np.ndarray:
    """:func:`pad_or_crop` of (N, H, W) slices with ``fills[0]``, or of (N, C, H, W) slices
    with each channel's own fill."""
    if a.ndim == 3:
        return pad_or_crop(a, size, fills[0])
    return np.stack([pad_or_crop(a[:, c], size, f) for c, f in enumerate(fills)], axis=1)


def per_image_label_counts(labels: np.ndarray, num_classes: int, chunk: int = 256) -> np.ndarray:
    """(N, K) voxel count of every class in each of the N label images ``labels[i]`` (chunked,
    so the temporary index array stays small on large slice stacks)."""
    labels = np.asarray(labels)
    n = labels.shape[0]
    out = np.zeros((n, num_classes), dtype=np.int64)
    for start in range(0, n, chunk):
        block = labels[start:start + chunk].reshape(min(chunk, n - start), -1).astype(np.int64)
        offs = (np.arange(block.shape[0], dtype=np.int64) * num_classes)[:, None]
        counts = np.bincount((block + offs).ravel(), minlength=block.shape[0] * num_classes)
        out[start:start + block.shape[0]] = counts.reshape(block.shape[0], num_classes)
    return out


def pad_or_crop(a: np.ndarray, size: tuple[int, int], fill: float) -> np.ndarray:
    """Centre-pad with ``fill`` or centre-crop the last two axes to ``size``."""
    out = a
    for ax, target in zip((-2, -1), size):
        n = out.shape[ax]
        if n < target:
            before = (target - n) // 2
            pad = [(0, 0)] * out.ndim
            pad[ax] = (before, target - n - before)
            out = np.pad(out, pad, constant_values=fill)
        elif n > target:
            start = (n - target) // 2
            out = np.take(out, range(start, start + target), axis=ax)
    return out


class SliceDataset(Dataset):
    """Slices of ``volumes`` along ``axis`` as ``(image CxHxW float, label HxW long)``.

    ``transform(image=HxW(xC) float32, mask=HxW int) -> dict`` (an albumentations pipeline; its
    spatial transforms move all channels alike) is applied per item; ``index[i] = (volume index,
    slice index)`` maps items back to volumes. Volumes hold (X, Y, Z) or (C, X, Y, Z) images.
    """

    def __init__(self, volumes, axis: str | int = "coronal", size: tuple[int, int] = (64, 64),
                 transform=None, skip_empty: bool = False):
        self.axis, self.size, self.transform = axis_index(axis), tuple(size), transform
        images, labels, self.index = [], [], []
        for vi, vol in enumerate(volumes):
            img = np.moveaxis(vol.image, self.axis - 3, 0)  # (S, a, b) or (S, C, a, b)
            lab = np.moveaxis(vol.label, self.axis, 0)
            keep = np.arange(img.shape[0])
            if skip_empty:
                keep = keep[lab.reshape(lab.shape[0], -1).any(axis=1)]
            if keep.size == 0:
                continue
            images.append(pad_or_crop_channels(img[keep], self.size, channel_pad_values(vol.image)))
            labels.append(pad_or_crop(lab[keep], self.size, 0))
            self.index += [(vi, int(s)) for s in keep]
        self.images = np.concatenate(images).astype(np.float32) if images else \
            np.zeros((0, *self.size), np.float32)
        self.labels = np.concatenate(labels).astype(np.int64) if labels else \
            np.zeros((0, *self.size), np.int64)

    def __len__(self) -> int:
        return len(self.index)

    def label_counts(self, num_classes: int) -> np.ndarray:
        """(N, K) class voxel counts of every sample as fed to the network (after skip_empty and
        pad/crop, before random augmentation): what class weights are computed on."""
        return per_image_label_counts(self.labels, num_classes)

    def __getitem__(self, i: int):
        img, lab = self.images[i], self.labels[i]
        several = img.ndim == 3  # (C, H, W)
        if self.transform is not None:
            out = self.transform(image=np.moveaxis(img, 0, -1) if several else img, mask=lab)
            img, lab = out["image"], out["mask"]
            img = np.moveaxis(img, -1, 0) if several else img
        img = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))
        return (img if several else img[None],
                torch.from_numpy(np.ascontiguousarray(lab, dtype=np.int64)))


def class_frequencies(volumes, num_classes: int) -> np.ndarray:
    """Voxel count of every class over the given volumes' labels."""
    counts = np.zeros(num_classes, dtype=np.int64)
    for v in volumes:
        counts += np.bincount(v.label.ravel(), minlength=num_classes)[:num_classes]
    return counts
