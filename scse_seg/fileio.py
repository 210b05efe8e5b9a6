"""File I/O shared by training, evaluation and prediction.

Crash-safe checkpoints: temp file in the same folder, fsync, atomic rename, fsync the folder.

A SIGKILL or a full disk (ENOSPC) during a write leaves the previous good checkpoint in place.
Checkpoints are loaded with ``torch.load(weights_only=True)``: they hold only tensors and plain
Python values, so a malicious pickle is refused instead of executed.
"""
from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from . import failpoints
from .errors import UserError


def atomic_write_bytes(path: str | Path, writer) -> None:
    """Call ``writer(fileobj)`` on a temp file next to ``path``, then atomically replace ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give what open() would give
        with os.fdopen(fd, "wb") as f:
            writer(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, lambda f: f.write(text.encode()))


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write ``state`` atomically; on a failed write (e.g. ENOSPC) the old file stays intact."""

    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getbuffer()
    half = len(data) // 2

    def write(f):
        f.write(data[:half])
        failpoints.hit("checkpoint_write")  # crash tests: die with half a temp file on disk
        f.write(data[half:])

    try:
        atomic_write_bytes(path, write)
    except OSError as e:
        raise UserError(f"could not write checkpoint {path} ({e.strerror or e}); the previous "
                        "checkpoint was kept. Free disk space and resume with --resume") from None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``); errors name the file and the fix."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found; pass the run folder of an earlier run to "
                        "--resume")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # UnpicklingError for foreign objects, RuntimeError for corrupt zips
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"checkpoint {path} cannot be loaded safely ({first}); it is corrupt or "
                        "holds arbitrary Python objects, which are refused. Use a checkpoint "
                        "written by scse_seg") from None
