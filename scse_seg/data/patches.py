"""3D patch training (``dim: 3``): random patches with MONAI, half of them centred on
foreground so small structures are seen often enough."""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset


class PatchDataset(Dataset):
    """``samples_per_volume`` random ``patch_size`` patches per volume and epoch, as
    ``(image 1xDxHxW float, label DxHxW long)``. Volumes smaller than the patch are padded."""

    def __init__(self, volumes, patch_size=(32, 32, 32), samples_per_volume: int = 4,
                 seed: int = 0):
        from monai.transforms import Compose, RandCropByPosNegLabeld, SpatialPadd

        self.volumes = volumes
        self.samples_per_volume = samples_per_volume
        self.transform = Compose([
            SpatialPadd(keys=("image", "label"), spatial_size=tuple(patch_size), mode="constant"),
            RandCropByPosNegLabeld(keys=("image", "label"), label_key="label",
                                   spatial_size=tuple(patch_size), pos=1, neg=1, num_samples=1),
        ])
        self.transform.set_random_state(seed)

    def set_random_seed(self, seed: int) -> None:
        """Called by the trainer every epoch so patch positions are reproducible."""
        self.transform.set_random_state(seed % 2**32)

    def __len__(self) -> int:
        return len(self.volumes) * self.samples_per_volume

    def __getitem__(self, i: int):
        vol = self.volumes[i // self.samples_per_volume]
        item = {"image": vol.image[None].astype(np.float32), "label": vol.label[None]}
        out = self.transform(item)[0]
        img = torch.as_tensor(np.asarray(out["image"]), dtype=torch.float32)
        lab = torch.as_tensor(np.asarray(out["label"]), dtype=torch.int64)[0]
        return img, lab
