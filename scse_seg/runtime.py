"""Where and how a model runs: the device named in a config or on a command line.

Shared by training, evaluation and prediction so that every command understands the same names
(``auto``, ``cpu``, ``cuda``, ``cuda:N``)."""
from __future__ import annotations

import torch

from .errors import ConfigError


def resolve_device(name: str | None, option: str = "config key 'train.device'") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; an unavailable CUDA device is a user error that
    names ``option`` (the flag or key the user set)."""
    name = name or "auto"
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"{option} is {name!r} but no CUDA device is available; use cpu or auto")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"{option} is {name!r}; use auto, cpu, cuda or cuda:N") from None


def show_progress(wanted: bool) -> bool:
    """Progress bars only where someone watches them: on a terminal. Redirected to a log file
    they are carriage-return noise (a 2-epoch run wrote 208 KB of bars) and run into an error line."""
    import sys

    return bool(wanted) and sys.stderr.isatty()
