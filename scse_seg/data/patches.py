"""3D patch training (``dim: 3``): random patches with MONAI, half of them centred on
foreground so small structures are seen often enough."""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from .slices import channel_pad_values, pad_value, per_image_label_counts


def pad_volume(image: np.ndarray, label: np.ndarray, shape) -> tuple[np.ndarray, np.ndarray]:
    """Centre-pad a volume smaller than ``shape`` (image with its minimum, each channel of a
    (C, X, Y, Z) image with its own, label with 0: the padding rule of :func:`pad_value`); sizes
    already large enough are left alone."""
    extra = [max(0, int(t) - s) for t, s in zip(shape, image.shape[-3:])]
    if not any(extra):
        return image, label
    pads = [(e // 2, e - e // 2) for e in extra]
    if image.ndim == 4:
        padded = np.stack([np.pad(c, pads, constant_values=f)
                           for c, f in zip(image, channel_pad_values(image))])
    else:
        padded = np.pad(image, pads, constant_values=pad_value(image))
    return padded, np.pad(label, pads, constant_values=0)


class PatchDataset(Dataset):
    """``samples_per_volume`` random ``patch_size`` patches per volume and epoch, as
    ``(image CxDxHxW float, label DxHxW long)``, all channels cropped at one position. Volumes
    smaller than the patch are padded (:func:`pad_volume`), so any patch the network can take is
    accepted."""

    def __init__(self, volumes, patch_size=(32, 32, 32), samples_per_volume: int = 4,
                 seed: int = 0):
        from monai.transforms import RandCropByPosNegLabeld

        self.volumes = volumes
        self.patch_size = tuple(int(p) for p in patch_size)
        self.samples_per_volume = samples_per_volume
        self._padded = [pad_volume(v.image, v.label, self.patch_size) for v in volumes]
        self.transform = RandCropByPosNegLabeld(keys=("image", "label"), label_key="label",
                                                spatial_size=self.patch_size, pos=1, neg=1,
                                                num_samples=1)
        self.transform.set_random_state(seed)

    def set_random_seed(self, seed: int) -> None:
        """Called by the trainer every epoch so patch positions are reproducible."""
        self.transform.set_random_state(seed % 2**32)

    def label_counts(self, num_classes: int) -> np.ndarray:
        """(V, K) class voxel counts of every training volume as padded to the patch size (the
        region patches are drawn from; patch positions are random, so the volume is the sample
        that class weights are computed on)."""
        return np.concatenate([per_image_label_counts(lab[None], num_classes)
                               for _, lab in self._padded]) if self._padded \
            else np.zeros((0, num_classes), np.int64)

    def __len__(self) -> int:
        return len(self.volumes) * self.samples_per_volume

    def __getitem__(self, i: int):
        image, label = self._padded[i // self.samples_per_volume]
        item = {"image": (image if image.ndim == 4 else image[None]).astype(np.float32),
                "label": label[None]}
        out = self.transform(item)[0]
        img = torch.as_tensor(np.asarray(out["image"]), dtype=torch.float32)
        lab = torch.as_tensor(np.asarray(out["label"]), dtype=torch.int64)[0]
        return img, lab
