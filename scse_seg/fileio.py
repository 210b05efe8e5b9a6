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


def file_sha256(path: str | Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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


# ----------------------------------------------------------------------------- outputs
# The rules every command follows (README "Outputs: overwriting and locking"):
# 1. nothing is written into a dataset's folders (a folder holding dataset.json, or its
#    images*/labels* folders) and no existing file is replaced, unless the user passes --overwrite;
# 2. outputs are checked before any work starts, written to a staging folder beside their final
#    place and moved there only when every one succeeded: an error or a kill leaves no half output;
# 3. a run folder is locked for the life of the process writing it (RunLock).


def dataset_folder(path: str | Path) -> Path | None:
    """The dataset folder ``path`` belongs to (it holds dataset.json, or is one of its
    images*/labels* folders), else None."""
    p = Path(os.path.abspath(path))
    if (p / "dataset.json").is_file():
        return p
    if p.name.startswith(("images", "labels")) and (p.parent / "dataset.json").is_file():
        return p.parent
    return None


def check_can_write(files: list[Path], overwrite: bool = False, option: str = "--overwrite",
                    what: str = "output") -> None:
    """Refuse, before any work, outputs that would land in a dataset's folders or replace an
    existing file (unless ``overwrite``), or whose folder cannot be created or written."""
    folders = {Path(f).parent for f in files}
    for folder in sorted(folders):
        ds = dataset_folder(folder)
        if ds is not None and not overwrite:
            raise UserError(f"{what} folder {folder} is inside the dataset {ds}; writing there "
                            f"would mix predictions with its images and labels. Pass another folder "
                            f"(or {option} if you mean it)")
        check_writable_folder(folder, what)
    if not overwrite:
        existing = [str(f) for f in files if Path(f).exists() or Path(f).is_symlink()]
        if existing:
            more = f" and {len(existing) - 1} more" if len(existing) > 1 else ""
            raise UserError(f"{what} {existing[0]}{more} already exists; nothing was written. Pass "
                            f"another folder, or {option} to replace it")


def check_writable_folder(folder: str | Path, what: str = "output") -> None:
    """``folder`` exists as a writable folder or can be created (checked, not created)."""
    folder = Path(folder)
    p = folder
    while not p.exists():
        p = p.parent
    if not p.is_dir():
        raise UserError(f"cannot write {what} to {folder}: {p} is a file, not a folder; pass "
                        "another folder")
    if not os.access(p, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {what} to {folder}: {p} is not writable; pass a folder "
                        "you can write to")


def os_error_text(e: OSError) -> str:
    return e.strerror or str(e) or type(e).__name__


class StagedFiles:
    """Write files under their final names only at the end: ``path(final)`` is where to write
    now (a staging folder in ``folder``, or in its nearest existing parent, so that a failure
    creates nothing); ``commit()`` moves every file into place; leaving the ``with`` block
    without ``commit()`` removes the staging folder."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self._stage: Path | None = None
        self._files: list[tuple[Path, Path]] = []

    def __enter__(self):
        return self

    def path(self, final: str | Path) -> Path:
        final = Path(final)
        if self._stage is None:
            near = self.folder
            while not near.exists():
                near = near.parent
            self._stage = Path(tempfile.mkdtemp(prefix=".staging-", dir=near))
        tmp = self._stage / f"{len(self._files)}-{final.name}"
        self._files.append((tmp, final))
        return tmp

    def commit(self) -> None:
        for tmp, final in self._files:
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, final)
        self._files = []

    def __exit__(self, *exc):
        if self._stage is not None:
            import shutil

            shutil.rmtree(self._stage, ignore_errors=True)
        return False


def stage_folder(out: str | Path) -> Path:
    """A new empty folder beside ``out`` to build it in; :func:`publish_folder` renames it to
    ``out`` (a kill in between leaves ``out`` untouched, never half written)."""
    out = Path(os.path.abspath(out))
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))


def publish_folder(stage: Path, out: str | Path) -> None:
    out = Path(out)
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()  # an empty folder the user made for it
    os.rename(stage, out)


class RunLock:
    """Exclusive lock on a run folder for the life of the process writing it (``flock`` on
    ``RUN/.lock``): a second process writing the same folder gets one error naming the first.
    The kernel drops the lock when its process dies, so a killed run never blocks --resume."""

    NAME = ".lock"

    def __init__(self, folder: str | Path, what: str = "run folder"):
        self.folder, self.what = Path(folder), what
        self._fd: int | None = None

    def __enter__(self):
        import fcntl
        import socket
        import sys

        check_writable_folder(self.folder, f"the {self.what}")
        self._created = not self.folder.exists()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.folder / self.NAME, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(f"cannot write to {self.what} {self.folder} ({os_error_text(e)}); pass "
                            "a folder you can write to") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            self._created = False
            raise UserError(f"{self.what} {self.folder} is in use by {holder}; wait for it to "
                            "finish or pass another folder") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()} "
                      f"({' '.join(sys.argv)[:200]})\n".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc):
        if self._fd is not None:
            if self._created and [p.name for p in self.folder.iterdir()] == [self.NAME]:
                (self.folder / self.NAME).unlink()  # failed before writing anything: leave
                self.folder.rmdir()  # no empty folder behind
            os.close(self._fd)  # releases the flock; the file stays (harmless, reused)
            self._fd = None
        return False
