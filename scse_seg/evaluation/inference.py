"""Moved to :mod:`scse_seg.inference` (shared by training and evaluation); kept for old imports."""
from ..inference import predict_volume_2d, predict_volume_3d, save_prediction_nifti  # noqa: F401
