"""Moved to :mod:`scse_seg.fileio` (shared by training and evaluation); kept for old imports."""
from ..fileio import atomic_write_bytes, atomic_write_text, load_checkpoint, save_checkpoint  # noqa: F401
