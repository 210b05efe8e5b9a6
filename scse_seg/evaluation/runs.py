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
    from ..fileio import load_checkpoint

    run_dir = Path(run_dir)
    ckpt = load_checkpoint(run_dir / checkpoint)
    cfg = config_from_dict(ckpt["config"])
    model = cfg.model.build(1, int(ckpt["num_classes"]))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt, cfg


@dataclass
class _OpenRun:
    model: torch.nn.Module
    ckpt: dict
    cfg: object
    device: torch.device
    dataset: object  # MSDDataset
    val: list[str]  # held-out volume names, in split order

    def load(self, name: str):
        from .. import data as D

        return D.load_case(next(c for c in self.dataset.cases if c.name == name), self.dataset)

    def predict(self, image: np.ndarray, tta_flip: bool = False) -> np.ndarray:
        from ..data import AXIS_INDEX
        from ..inference import predict_volume_2d, predict_volume_3d

        if tta_flip:
            (flip_axis,) = tta_flip_axes(self.cfg)
        if self.cfg.model.dim == 2:
            return predict_volume_2d(self.model, image, AXIS_INDEX[self.cfg.data.axis], batch_size=32,
                                     tta_flip=tta_flip, device=self.device,
                                     flip_axis=flip_axis if tta_flip else -1)
        return predict_volume_3d(self.model, image, roi_size=tuple(self.cfg.data.patch_size),
                                 tta_flip=tta_flip, device=self.device)


def tta_flip_axes(cfg, run: str | Path = "this run") -> tuple[int, ...]:
    """The flips test-time augmentation may use: those training used (``data.augment.flip``).
    A run trained without flips is refused (UserError) rather than shown images it never saw."""
    from ..data.augment import trained_flip_axes

    axes = trained_flip_axes(cfg.data.augment, cfg.model.dim)
    if not axes:
        why = "3D patch training does not flip" if cfg.model.dim != 2 else \
            "it was trained with data.augment.flip off"
        raise UserError(f"--tta: {run} cannot use flip test-time augmentation: {why}, so a "
                        "flipped image is one the model never saw; train with "
                        "data.augment.flip=true (2D) or evaluate without --tta")
    return axes


def open_run(run_dir: str | Path, data_path: str | None = None, checkpoint: str = "last.pt",
             device: str | None = None) -> _OpenRun:
    """Model, checkpoint, config and the dataset a run folder was trained on, checked against
    each other (same classes, held-out volumes present)."""
    from .. import data as D
    from ..runtime import resolve_device

    run_dir = Path(run_dir)
    if not (run_dir / checkpoint).is_file():
        raise UserError(f"{run_dir / checkpoint} not found; is {run_dir} a finished scse_seg run "
                        "folder? (train it with train_seg.py, or pass --checkpoint best.pt)")
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
    names = {c.name for c in ds.cases}
    missing = [n for n in split["val"] if n not in names]
    if missing:
        raise UserError(f"held-out volumes {missing[:5]} of {run_dir} are not in {root}")
    return _OpenRun(model, ckpt, cfg, dev, ds, list(split["val"]))


def evaluate_run(run_dir: str | Path, data_path: str | None = None, checkpoint: str = "last.pt",
                 tta_flip: bool = False, surface: bool = False, device: str | None = None,
                 keep_example: bool = False, progress: bool = True,
                 save_dir: str | Path | None = None) -> RunEvaluation:
    """Predict every held-out volume of ``run_dir`` and compute per-structure metrics.

    The last checkpoint is evaluated by default: the comparison trains on a fixed schedule and
    the held-out volumes are never used to pick a checkpoint, so the numbers are not optimistic.
    ``save_dir`` also writes each prediction as NIfTI (original label values, source affine).
    """
    from tqdm.auto import tqdm

    from ..data import AXIS_INDEX
    from ..inference import save_prediction_nifti
    from ..metrics import evaluate_volume

    run_dir = Path(run_dir)
    run = open_run(run_dir, data_path, checkpoint, device)
    if tta_flip:
        tta_flip_axes(run.cfg, run_dir)  # refuse before predicting anything
    k = int(run.ckpt["num_classes"])
    rows, times, example = [], [], None
    for name in tqdm(run.val, desc=f"evaluating {run_dir.name}", leave=False,
                     disable=not progress):
        vol = run.load(name)
        t0 = time.perf_counter()
        pred = run.predict(vol.image, tta_flip)
        if run.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        pred = np.asarray(pred)
        spacing = tuple(float(s) for s in np.linalg.norm(vol.affine[:3, :3], axis=0))
        for r in evaluate_volume(pred, vol.label, k, run.dataset.class_names, spacing=spacing,
                                 surface=surface):
            rows.append(dict(r, volume=name))
        if save_dir is not None:
            save_prediction_nifti(pred, vol.affine, vol.label_values,
                                  Path(save_dir) / f"{name}.nii.gz")
        if keep_example and example is None:
            example = dict(name=name, image=vol.image, label=vol.label, pred=pred,
                           axis=AXIS_INDEX[run.cfg.data.axis])
    hist = list(run.ckpt.get("history", []))
    cfg = run.cfg
    return RunEvaluation(
        run_dir=str(run_dir), arch=cfg.model.arch, attention=cfg.model.attention, seed=cfg.seed,
        params=sum(p.numel() for p in run.model.parameters()),
        train_seconds=float(sum(h.get("seconds", 0.0) for h in hist)),
        infer_seconds_per_volume=float(np.mean(times)) if times else float("nan"),
        class_names=list(run.dataset.class_names), rows=rows, history=hist, example=example)


def format_run_summary(res: RunEvaluation) -> str:
    """Plain-text table: per structure mean +- std over held-out volumes, and the overall mean."""
    from ..metrics import STATUSES, mean_std, summarise, surface_score, volume_mean_dice

    vols = sorted({r["volume"] for r in res.rows})
    surface = any(np.isfinite(r["hd95"]) or np.isfinite(r.get("surface_penalty", np.nan))
                  for r in res.rows)
    dice = summarise(res.rows, "dice")
    # surface means: missed / false-positive structures count at the volume diagonal (mm)
    scored = [dict(r, hd95=surface_score(r, "hd95"), asd=surface_score(r, "asd"))
              for r in res.rows]
    hd = summarise(scored, "hd95") if surface else {}
    asd = summarise(scored, "asd") if surface else {}
    head = f"{'structure':<24} {'Dice mean +- std':>18} {'n':>4}"
    if surface:
        head += f" {'HD95':>16} {'ASD':>16}"
    head += "  " + " ".join(f"{s:>8}" for s in STATUSES[1:])
    lines = [f"{res.run_dir}: {res.arch} + {res.attention} (seed {res.seed}), {len(vols)} held-out "
             f"volumes, {res.params:,} parameters, {res.infer_seconds_per_volume:.3f} s/volume", head]

    def pm(t):
        return f"{t[0]:.4f} +- {t[1]:.4f}" if t[2] else "n/a"

    for name in res.class_names[1:]:
        rows = [r for r in res.rows if r["structure"] == name]
        line = f"{name:<24} {pm(dice[name]):>18} {dice[name][2]:>4}"
        if surface:
            line += f" {pm(hd[name]):>16} {pm(asd[name]):>16}"
        counts = [sum(r["status"] == s for r in rows) for s in STATUSES[1:]]
        lines.append(line + "  " + " ".join(f"{c:>8}" for c in counts))
    per_vol = [volume_mean_dice([r for r in res.rows if r["volume"] == v]) for v in vols]
    lines.append(f"{'mean over structures':<24} {pm(mean_std(per_vol)):>18} "
                 f"{mean_std(per_vol)[2]:>4}")
    lines.append("(missed: in reference, not predicted; false_positive: predicted, not in "
                 "reference; absent structures are excluded from means"
                 + ("; HD95/ASD count missed and false_positive at the volume diagonal in mm)"
                    if surface else ")"))
    return "\n".join(lines)
