"""Data: MSD/nnU-Net datasets, the built-in phantom, 2D slices, 3D patches, augmentation."""
from .augment import build_augmentation
from .msd import (
    CaseRef,
    MSDDataset,
    Volume,
    channels_first,
    load_case,
    normalise,
    normalise_channels,
    num_channels,
    read_msd,
    remap_labels,
    restore_labels,
)
from .patches import PatchDataset
from .phantom import generate_phantom
from .prepare import PreparedData, prepare_data
from .resample import probabilities_to_grid, resample_case, resample_volume
from .slices import AXIS_INDEX, SliceDataset, class_frequencies, pad_or_crop
from .splits import kfold_split, split_cases

__all__ = ["AXIS_INDEX", "CaseRef", "MSDDataset", "PatchDataset", "PreparedData", "SliceDataset", "Volume",
           "build_augmentation", "channels_first", "class_frequencies", "generate_phantom",
           "kfold_split", "load_case", "normalise", "normalise_channels", "num_channels",
           "pad_or_crop", "prepare_data", "probabilities_to_grid", "read_msd", "remap_labels",
           "resample_case", "resample_volume", "restore_labels", "split_cases"]
