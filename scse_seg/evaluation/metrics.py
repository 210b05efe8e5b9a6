"""Moved to :mod:`scse_seg.metrics` (shared by training and evaluation); kept for old imports."""
from ..metrics import *  # noqa: F401,F403
