"""Evaluation: a trained run on its held-out volumes, paired statistics, figures and the
comparison report. Volume inference and metrics live below it (``scse_seg.inference``,
``scse_seg.metrics``) and are re-exported here."""
from ..inference import predict_volume_2d, predict_volume_3d, save_prediction_nifti
from ..metrics import dice_per_class, evaluate_volume, mean_std, summarise, surface_distances
from .runs import RunEvaluation, evaluate_run, format_run_summary, open_run
from .stats import wilcoxon_p

__all__ = ["RunEvaluation", "dice_per_class", "evaluate_run", "evaluate_volume", "format_run_summary",
           "mean_std", "open_run", "predict_volume_2d", "predict_volume_3d", "save_prediction_nifti",
           "summarise", "surface_distances", "wilcoxon_p"]
