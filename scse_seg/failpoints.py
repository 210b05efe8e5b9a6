"""Fault injection for crash-safety tests (like etcd/FreeBSD "failpoints").

``SCSE_SEG_FAILPOINT=checkpoint_write:N`` kills the process with SIGKILL in the middle of the
N-th checkpoint write (after part of the temp file is on disk, before the rename);
``export_written`` once an export's program is written, before preprocessing.json. Unset in
normal use, where :func:`hit` costs one dictionary lookup.
"""
from __future__ import annotations

import os
import signal

_counts: dict[str, int] = {}


def hit(name: str) -> None:
    spec = os.environ.get("SCSE_SEG_FAILPOINT")
    if not spec:
        return
    target, _, n = spec.partition(":")
    if target != name:
        return
    _counts[name] = _counts.get(name, 0) + 1
    if _counts[name] == int(n or 1):
        os.kill(os.getpid(), signal.SIGKILL)
