"""scse_seg: squeeze-and-excitation recalibration (cSE, sSE, scSE) for medical image segmentation."""
from .blocks import attention_names, block_names, create_attention, create_block
from .models import create_model, model_names
from .predictor import load_model, predict

__version__ = "0.1.0"
__all__ = ["attention_names", "block_names", "create_attention", "create_block", "create_model",
           "load_model", "model_names", "predict", "__version__"]
