"""What a checkpoint holds, how a run continues from one, and when it must not.

A checkpoint is everything an uninterrupted run would have in memory at that point: weights,
optimizer, schedule, loss scaler, history and (mid-epoch) every random generator's state, so
that ``--resume`` ends with exactly the weights of a run that was never stopped (deterministic
CPU mode). Files are written and read through :mod:`scse_seg.fileio` (atomic, weights-only).
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from ..config import Config, config_from_dict
from ..data.prepare import PreparedData
from ..errors import ConfigError

VERSION = 1  # bumped when the layout changes; a checkpoint of another version is refused


def training_state(model, opt, sched, scaler, cfg: Config, data: PreparedData, epoch_done: int,
                   best: float, history: list[dict], **extra) -> dict:
    """The checkpoint after ``epoch_done`` epochs (``extra``: step, partial stats, rng)."""
    return dict(version=VERSION, model=model.state_dict(), optimizer=opt.state_dict(),
                scheduler=sched.state_dict(),
                scaler=scaler.state_dict() if scaler.is_enabled() else {},
                epoch=epoch_done, best_dice=best, config=cfg.to_dict(),
                class_names=data.class_names, label_values=data.label_values, history=history,
                arch=cfg.model.arch, attention=cfg.model.attention, num_classes=data.num_classes,
                in_channels=data.in_channels, channel_names=data.channel_names, **extra)


def check_compatible(ckpt: dict, cfg: Config, data: PreparedData, run_dir: Path) -> None:
    """--resume must continue the same model on the same label set: the checkpoint's version,
    the whole saved model config (any key changes what the weights mean), the optimizer and the
    fold are compared with this run's, and a difference is one error line naming the key."""
    if ckpt.get("version") != VERSION:
        raise ConfigError(f"--resume {run_dir}: last.pt has checkpoint version "
                          f"{ckpt.get('version')!r}, this scse_seg writes version {VERSION}; "
                          "resume it with the scse_seg that wrote it or start a new run with --out")
    have = dict(num_classes=ckpt.get("num_classes"), in_channels=ckpt.get("in_channels"))
    for key, value in dict(num_classes=data.num_classes, in_channels=data.in_channels).items():
        if have[key] != value:
            raise ConfigError(f"--resume {run_dir}: the checkpoint has {key}={have[key]!r} "
                              f"but this run's data has {key}={value!r}; resume with the original "
                              "data or start a new run with --out")
    saved, now = config_from_dict(ckpt["config"]).to_dict(), cfg.to_dict()
    keys = [("model", k) for k in sorted(set(saved["model"]) | set(now["model"]))] + \
        [("train", "optimizer"), ("data", "folds"), ("data", "fold")]
    for section, key in keys:
        old, new = saved[section].get(key), now[section].get(key)
        if old != new:
            raise ConfigError(f"--resume {run_dir}: {section}.{key} was {old!r} in the checkpoint "
                              f"but is {new!r} now; resume with the original setting or start a "
                              "new run with --out")


def restore(ckpt: dict, model, opt, sched, scaler) -> None:
    """Load the weights, optimizer, schedule and loss-scaler state saved in ``ckpt``."""
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    sched.load_state_dict(ckpt["scheduler"])
    if ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])


def rng_state() -> dict:
    """Every global random generator's state, in types ``torch.load(weights_only=True)`` reads."""
    np_state = np.random.get_state(legacy=False)
    out = dict(torch=torch.get_rng_state(), python=list(random.getstate()[1]),
               numpy=dict(key=torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                          pos=int(np_state["state"]["pos"]), has_gauss=int(np_state["has_gauss"]),
                          gauss=float(np_state["gauss"])))
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(st: dict) -> None:
    """Inverse of :func:`rng_state`."""
    torch.set_rng_state(st["torch"])
    random.setstate((3, tuple(int(v) for v in st["python"]), None))
    n = st["numpy"]
    np.random.set_state(dict(bit_generator="MT19937", state=dict(
        key=n["key"].numpy().astype(np.uint32), pos=n["pos"]), has_gauss=n["has_gauss"],
        gauss=n["gauss"]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])
