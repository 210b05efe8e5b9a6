"""From a config to training samples: read the dataset (or make the phantom), split it, build the set.

Kept apart from the training loop so that a user can inspect exactly what a run will train and
validate on (``prepare_data(cfg)``) without building a model.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from ..errors import ConfigError, DataError
from ..runtime import show_progress
from .augment import build_augmentation
from .msd import load_case, read_msd
from .patches import PatchDataset
from .phantom import generate_phantom
from .resample import resample_case
from .slices import AXIS_INDEX, SliceDataset
from .splits import kfold_split, split_cases

if TYPE_CHECKING:
    from ..config import Config


@dataclass
class PreparedData:
    train_set: torch.utils.data.Dataset
    val_volumes: list
    class_names: list[str]
    label_values: list[int]
    class_counts: np.ndarray  # (K,) voxels of each class in the training samples as fed
    split: dict = field(default_factory=dict)
    dataset_root: str = ""
    sample_class_counts: np.ndarray | None = None  # (samples, K): what class weights come from
    channel_names: list[str] = field(default_factory=list)  # dataset.json's; [] = one channel

    @property
    def in_channels(self) -> int:
        """The network's input channels: the dataset's (each case is checked to hold them)."""
        return max(1, len(self.channel_names))

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def dataset_root(cfg: Config, is_main: bool = True, barrier: Callable[[], None] | None = None
                 ) -> Path:
    """``data.path``, or the built-in phantom (generated once, by the main process)."""
    dc = cfg.data
    if dc.path is not None:
        return Path(dc.path)
    root = Path(dc.phantom_dir) if dc.phantom_dir else \
        Path.home() / ".cache" / "scse_seg" / \
        f"phantom_n{dc.phantom_cases}_{'x'.join(map(str, dc.phantom_shape))}_s{dc.phantom_seed}"
    if is_main:
        generate_phantom(root, n_cases=dc.phantom_cases, shape=tuple(dc.phantom_shape),
                         seed=dc.phantom_seed)
    if barrier is not None:
        barrier()
    return root


def prepare_data(cfg: Config, is_main: bool = True, progress: bool = True,
                 multiple: int | None = None, barrier: Callable[[], None] | None = None
                 ) -> PreparedData:
    """Read the dataset, split volumes into train/val (or the k-fold split), build the train set.

    Slices are padded to a multiple of ``multiple`` (default: the model's ``size_multiple``); 3D
    volumes smaller than the patch are padded. Class voxel counts are taken on the training
    samples as the loss sees them (after skip_empty and pad/crop, before random augmentation).
    Under DDP every rank calls this; ``barrier`` lets the others wait for the main one's phantom."""
    dc = cfg.data
    multiple = multiple or cfg.model.size_multiple()
    check_sizes(cfg, multiple)
    root = dataset_root(cfg, is_main, barrier)
    ds = read_msd(root)
    if is_main:
        for w in ds.orphans:
            print(f"warning: {w}", file=sys.stderr)
    cases = list(ds.cases)[: dc.max_cases]
    if len(cases) < 2:
        raise DataError(f"dataset {root} has {len(cases)} usable case(s); training needs at least "
                        "2 (one for validation)")
    names = [c.name for c in cases]
    if dc.folds is not None:
        if len(names) < dc.folds:
            raise ConfigError(f"config key 'data.folds': {dc.folds} folds need at least {dc.folds} "
                              f"cases, dataset {root} has {len(names)}")
        train_names, val_names = kfold_split(names, dc.folds, dc.fold, dc.split_seed)
    else:
        train_names, val_names = split_cases(names, dc.val_fraction, dc.split_seed)
    by_name = {c.name: c for c in cases}
    from tqdm.auto import tqdm

    def load(names, what):
        it = tqdm(names, desc=f"loading {what} volumes", leave=False,
                  disable=not show_progress(progress and is_main))
        return [resample_case(load_case(by_name[n], ds), dc.zoom, dc.target_spacing) for n in it]

    train_vols, val_vols = load(train_names, "train"), load(val_names, "val")
    if cfg.model.dim == 2:
        size = tuple(dc.slice_size) if dc.slice_size else \
            fit_size(train_vols + val_vols, dc.axis, multiple)
        train_set = SliceDataset(train_vols, axis=dc.axis, size=size,
                                 transform=build_augmentation(dc.augment), skip_empty=dc.skip_empty)
    else:
        train_set = PatchDataset(train_vols, patch_size=tuple(dc.patch_size),
                                 samples_per_volume=dc.samples_per_volume, seed=cfg.seed)
    if len(train_set) == 0:
        raise DataError(f"no training samples left from {root} after filtering "
                        "(data.skip_empty / data.max_cases); relax the filters")
    sample_counts = train_set.label_counts(len(ds.class_names))
    split = {"train": train_names, "val": val_names}
    if dc.folds is not None:
        split.update(folds=dc.folds, fold=dc.fold)
    return PreparedData(train_set, val_vols, list(ds.class_names), list(ds.label_values),
                        sample_counts.sum(0).astype(np.float64), split, str(root), sample_counts,
                        list(ds.channel_names))


def check_sizes(cfg: Config, multiple: int) -> None:
    """data.slice_size (2D) / data.patch_size (3D) must be sizes the network can take."""
    dc, key = cfg.data, "data.slice_size" if cfg.model.dim == 2 else "data.patch_size"
    sizes = dc.slice_size if cfg.model.dim == 2 else dc.patch_size
    if sizes and any(s % multiple for s in sizes):
        fixed = [int(math.ceil(s / multiple) * multiple) for s in sizes]
        raise ConfigError(f"config key '{key}' {list(sizes)}: {cfg.model.arch} needs sizes that "
                          f"are multiples of {multiple} (it downsamples {multiple}x); use e.g. "
                          f"{fixed}")


def fit_size(volumes, axis: str, multiple: int = 16) -> tuple[int, int]:
    """Smallest in-plane size that holds every slice and is a multiple of ``multiple``."""
    a = AXIS_INDEX[axis]
    inplane = [[s for i, s in enumerate(v.image.shape[-3:]) if i != a] for v in volumes]
    h = max(p[0] for p in inplane)
    w = max(p[1] for p in inplane)
    return (int(math.ceil(h / multiple) * multiple), int(math.ceil(w / multiple) * multiple))
