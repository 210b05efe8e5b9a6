"""Evaluate a finished training run on its held-out volumes (the split saved in the run folder)."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..config import config_from_dict
from ..errors import UserError


@dataclass
class RunEvaluation:
    run_dir: str
    arch: str
    attention: str
    seed: int
    params: int
    train_seconds: float
    infer_seconds_per_volume: float
    class_names: list[str]
    rows: list[dict] = field(default_factory=list)  # per volume x structure
    history: list[dict] = field(default_factory=list)
    example: dict | None = None  # one volume's image/reference/prediction for overlays


def load_run(run_dir: str | Path, checkpoint: str = "last.pt", device: str | torch.device = "cpu"):
    """(model in eval mode, checkpoint dict, config) of a run folder."""
    from ..training.checkpoint import load_checkpoint

    run_dir = Path(run_dir)
    ckpt = load_checkpoint(run_dir / checkpoint)
    cfg = config_from_dict(ckpt["config"])
    model = cfg.model.build(1, int(ckpt["num_classes"]))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt, cfg


def evaluate_run(run_dir: str | Path, data_path: str | None = None, checkpoint: str = "last.pt",
                 tta_flip: bool = False, surface: bool = False, device: str | None = None,
                 keep_example: bool = False, progress: bool = True) -> RunEvaluation:
    """Predict every held-out volume of ``run_dir`` and compute per-structure metrics.

    The last checkpoint is evaluated by default: the comparison trains on a fixed schedule and
    the held-out volumes are never used to pick a checkpoint, so the numbers are not optimistic.
    """
    from tqdm.auto import tqdm

    from .. import data as D
    from ..training.engine import AXES, resolve_device
    from .inference import predict_volume_2d, predict_volume_3d
    from .metrics import evaluate_volume

    run_dir = Path(run_dir)
    dev = resolve_device(device or "auto")
    model, ckpt, cfg = load_run(run_dir, checkpoint, dev)
    split_file = run_dir / "split.json"
    if not split_file.is_file():
        raise UserError(f"{split_file} not found; {run_dir} is not a complete scse_seg run folder")
    split = json.loads(split_file.read_text())
    root = Path(data_path or split.get("dataset_root") or cfg.data.path or "")
    if not str(root) or not root.is_dir():
        raise UserError(f"dataset of {run_dir} not found at '{root}'; pass --data PATH")
    ds = D.read_msd(root)
    if list(ds.class_names) != list(ckpt["class_names"]):
        raise UserError(f"dataset {root} has classes {ds.class_names} but the run was trained on "
                        f"{ckpt['class_names']}; pass the run's dataset with --data")
    by_name = {c.name: c for c in ds.cases}
    missing = [n for n in split["val"] if n not in by_name]
    if missing:
        raise UserError(f"held-out volumes {missing[:5]} of {run_dir} are not in {root}")
    k = int(ckpt["num_classes"])
    rows, times, example = [], [], None
    for name in tqdm(split["val"], desc=f"evaluating {run_dir.name}", leave=False,
                     disable=not progress):
        vol = D.load_case(by_name[name], ds)
        t0 = time.perf_counter()
        if cfg.model.dim == 2:
            pred = predict_volume_2d(model, vol.image, AXES[cfg.data.axis], batch_size=32,
                                     tta_flip=tta_flip, device=dev)
        else:
            pred = predict_volume_3d(model, vol.image, roi_size=tuple(cfg.data.patch_size),
                                     tta_flip=tta_flip, device=dev)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        pred = np.asarray(pred)
        spacing = tuple(float(s) for s in np.linalg.norm(vol.affine[:3, :3], axis=0))
        for r in evaluate_volume(pred, vol.label, k, ds.class_names, spacing=spacing,
                                 surface=surface):
            rows.append(dict(r, volume=name))
        if keep_example and example is None:
            example = dict(name=name, image=vol.image, label=vol.label, pred=pred,
                           axis=AXES[cfg.data.axis])
    hist = list(ckpt.get("history", []))
    return RunEvaluation(
        run_dir=str(run_dir), arch=cfg.model.arch, attention=cfg.model.attention, seed=cfg.seed,
        params=sum(p.numel() for p in model.parameters()),
        train_seconds=float(sum(h.get("seconds", 0.0) for h in hist)),
        infer_seconds_per_volume=float(np.mean(times)) if times else float("nan"),
        class_names=list(ds.class_names), rows=rows, history=hist, example=example)
