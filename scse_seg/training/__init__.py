"""Training: median-frequency-balanced losses, the epoch loop, crash-safe checkpoints, DDP."""
from ..fileio import atomic_write_text, load_checkpoint, save_checkpoint
from .engine import NumericalError, Trainer, dice_counts, dice_from_counts, prepare_data
from .losses import SegmentationLoss, label_boundaries, median_frequency_weights, soft_dice_loss

__all__ = ["NumericalError", "SegmentationLoss", "Trainer", "atomic_write_text", "dice_counts",
           "dice_from_counts", "label_boundaries", "load_checkpoint", "median_frequency_weights",
           "prepare_data", "save_checkpoint", "soft_dice_loss"]
