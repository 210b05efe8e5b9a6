"""Checkpoints: atomic replacement, ENOSPC keeps the previous file, unsafe pickles are refused."""
import errno
import os
import pickle
import subprocess
import sys

import pytest
import torch

from scse_seg import fileio as ck
from scse_seg.errors import UserError


def test_roundtrip(tmp_path):
    state = {"model": {"w": torch.arange(4.0)}, "epoch": 3, "names": ["bg", "a"]}
    ck.save_checkpoint(state, tmp_path / "last.pt")
    back = ck.load_checkpoint(tmp_path / "last.pt")
    assert back["epoch"] == 3 and torch.equal(back["model"]["w"], torch.arange(4.0))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left


def test_enospc_keeps_previous(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    ck.save_checkpoint({"epoch": 1}, path)

    real_write = ck.atomic_write_bytes

    def full_disk(p, writer):
        def failing(f):
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(p, failing)

    monkeypatch.setattr(ck, "atomic_write_bytes", full_disk)
    with pytest.raises(UserError, match="No space left.*previous checkpoint was kept"):
        ck.save_checkpoint({"epoch": 2}, path)
    assert ck.load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_malicious_pickle_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": Evil()}, path)
    with pytest.raises(UserError, match="cannot be loaded safely"):
        ck.load_checkpoint(path)
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(UserError, match="raw.pt"):
        ck.load_checkpoint(raw)


def test_corrupt_and_missing(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="bad.pt"):
        ck.load_checkpoint(bad)
    with pytest.raises(UserError, match="not found"):
        ck.load_checkpoint(tmp_path / "nope.pt")


def test_sigkill_during_write_keeps_previous(tmp_path):
    """The failpoint kills the writer after half the temp file is written."""
    path = tmp_path / "last.pt"
    ck.save_checkpoint({"epoch": 1}, path)
    code = (f"import torch; from scse_seg.fileio import save_checkpoint; "
            f"save_checkpoint({{'epoch': 2, 'w': torch.zeros(100000)}}, {str(path)!r})")
    env = {**os.environ, "SCSE_SEG_FAILPOINT": "checkpoint_write:1"}
    r = subprocess.run([sys.executable, "-c", code], env=env)
    assert r.returncode == -9
    assert ck.load_checkpoint(path)["epoch"] == 1


def test_written_files_get_the_usual_permissions(tmp_path):
    """Atomic writes go through mkstemp (mode 0600); the result must be readable like any file
    open() creates (0666 minus the umask), e.g. predictions shared on a cluster."""
    old = os.umask(0o022)
    try:
        ck.atomic_write_text(tmp_path / "a.txt", "x")
        ck.save_checkpoint({"epoch": 1}, tmp_path / "last.pt")
        with open(tmp_path / "plain.txt", "w") as f:
            f.write("x")
    finally:
        os.umask(old)
    expected = (tmp_path / "plain.txt").stat().st_mode & 0o777
    assert expected == 0o644
    for name in ("a.txt", "last.pt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == expected, name
