"""Training: median-frequency-balanced losses, the epoch loop, crash-safe checkpoints, DDP."""
from .engine import NumericalError, Trainer
from .losses import SegmentationLoss, label_boundaries, median_frequency_weights, soft_dice_loss

__all__ = ["NumericalError", "SegmentationLoss", "Trainer", "label_boundaries",
           "median_frequency_weights", "soft_dice_loss"]
