"""Evaluate a finished training run on its held-out volumes (the split saved in the run folder)."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..predictor import tta_flip_axes
from ..runtime import show_progress


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
    evaluated_on: str = "held-out volumes"  # or "test volumes in PATH"
    checkpoint: str = ""  # which weights were scored: "last.pt (epoch 6, sha256 1a2b3c4d5e6f)"
    members: list[str] = field(default_factory=list)  # an ensemble's runs (run_dir: the first)
    setting: str = ""  # the attention's options as trained, e.g. "reduction 16, fusion add"


@dataclass
class _OpenRun:
    loaded: object  # scse_seg.predictor.LoadedModel
    dataset: object  # MSDDataset
    val: list[str]  # volumes to evaluate, in order (the held-out split, or every test volume)
    evaluated_on: str = "held-out volumes"
    ensemble: object = None  # scse_seg.predictor.Ensemble predicting instead of ``loaded``

    model = property(lambda self: self.loaded.model)
    ckpt = property(lambda self: self.loaded.ckpt)
    cfg = property(lambda self: self.loaded.cfg)
    device = property(lambda self: self.loaded.device)

    def load(self, name: str):
        from .. import data as D

        return D.load_case(next(c for c in self.dataset.cases if c.name == name), self.dataset)

    def predict(self, image: np.ndarray, tta_flip: bool = False,
                affine: np.ndarray | None = None) -> np.ndarray:
        return (self.ensemble or self.loaded).predict_classes(image, tta_flip, affine)


def open_runs(run_dirs: list, checkpoint: str = "last.pt", device: str | None = None,
              test_path: str | Path | None = None, device_option: str = "--device") -> _OpenRun:
    """One run (see :func:`open_run`), or several on one test set as an ensemble (their softmax
    averaged, e.g. the folds of a cross-validation); the first run stands for the metadata."""
    from ..predictor import Ensemble

    runs = [open_run(d, None, checkpoint, device, test_path, device_option) for d in run_dirs]
    if len(runs) > 1:
        if test_path is None:
            raise UserError("several runs are scored together only on a test set (--test): "
                            "their held-out volumes differ")
        runs[0].ensemble = Ensemble([r.loaded for r in runs])
    return runs[0]


def _some(items, limit: int = 10) -> str:
    items = [str(i) for i in items]
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")


def class_differences(run_names: list[str], test_names: list[str]) -> list[str]:
    """Human-readable differences between two class lists compared by class index."""
    out = []
    for i in range(max(len(run_names), len(test_names))):
        a = run_names[i] if i < len(run_names) else None
        b = test_names[i] if i < len(test_names) else None
        if a != b:
            out.append(f"class {i}: {a!r} in the run, {b!r} in the test set" if a and b else
                       f"class {i} {a or b!r} only in the {'run' if a else 'test set'}")
    return out


def open_run(run_dir: str | Path, data_path: str | None = None, checkpoint: str = "last.pt",
             device: str | None = None, test_path: str | Path | None = None,
             device_option: str = "--device") -> _OpenRun:
    """Model, checkpoint, config and the volumes to evaluate, checked against each other (same
    classes, volumes present): the run's held-out split of the dataset it was trained on, or
    with ``test_path`` every labelled volume of a test set (``read_test_set``)."""
    from .. import data as D
    from ..predictor import load_model

    run_dir = Path(run_dir)
    loaded = load_model(run_dir, checkpoint, device or "auto", device_option=device_option)
    ckpt = loaded.ckpt
    split_file = run_dir / "split.json"
    if not split_file.is_file():
        raise UserError(f"{split_file} not found; {run_dir} is not a complete scse_seg run folder")
    split = read_split(split_file)
    if test_path is not None:
        from ..data.msd import read_test_set

        ds, which = read_test_set(test_path)
        trained_on = split.get("dataset_root")
        if which == "imagesTr" and trained_on and Path(ds.root).resolve() == Path(trained_on).resolve():
            raise UserError(f"--test {test_path} is the dataset {run_dir} was trained on: its labelled "
                            "volumes include the training volumes; evaluate the held-out ones without "
                            "--test, or add imagesTs/ + labelsTs/ test volumes")
        _check_channels(loaded, ds, f"--test {test_path}")
        diff = class_differences(list(ckpt["class_names"]), list(ds.class_names))
        if diff:
            raise UserError(f"--test {test_path}: its classes differ from those {run_dir} was trained "
                            f"on ({_some(diff)}); the structures must be the same, in the same order "
                            "of label values (see 'labels' in its dataset.json)")
        return _OpenRun(loaded, ds, [c.name for c in ds.cases], f"test volumes in {ds.root / which}")
    root = Path(data_path or split.get("dataset_root") or loaded.cfg.data.path or "")
    if not str(root) or not root.is_dir():
        raise UserError(f"dataset of {run_dir} not found at '{root}'; pass --data PATH")
    ds = D.read_msd(root)
    if list(ds.class_names) != list(ckpt["class_names"]):
        raise UserError(f"dataset {root} has classes {ds.class_names} but the run was trained on "
                        f"{ckpt['class_names']}; pass the run's dataset with --data")
    _check_channels(loaded, ds, f"dataset {root}")
    names = {c.name for c in ds.cases}
    missing = [n for n in split["val"] if n not in names]
    if missing:
        raise UserError(f"held-out volumes {_some(missing)} of {run_dir} are not in {root}; pass "
                        "the dataset it was trained on with --data, or a separate labelled test set "
                        "with --test")
    return _OpenRun(loaded, ds, list(split["val"]))


def read_split(path: Path) -> dict:
    """A run's split.json, checked: a truncated or hand-edited file is one clear error."""
    try:
        split = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        split = None
    if not isinstance(split, dict) or not isinstance(split.get("val"), list) or \
            not all(isinstance(v, str) for v in split["val"]):
        raise UserError(f"{path} is truncated or not a split written by train_seg.py (it needs a "
                        "'val' list of volume names); resume the run with train_seg.py --resume "
                        f"{path.parent} to rewrite it, or pass --test PATH")
    return split


def _check_channels(loaded, ds, what: str) -> None:
    """The volumes must hold the channels the model was trained on (dataset.json's)."""
    if ds.num_channels != loaded.in_channels:
        raise UserError(f"{what} has {ds.num_channels} input channel(s) {ds.channel_names} but "
                        f"{loaded.run_dir} was trained on {loaded.in_channels} "
                        f"{loaded.channel_names}; pass data with the same channels ('modality' / "
                        "'channel_names' in its dataset.json)")


def evaluate_run(run_dir: str | Path, data_path: str | None = None, checkpoint: str = "last.pt",
                 tta_flip: bool = False, surface: bool = False, device: str | None = None,
                 keep_example: bool = False, progress: bool = True,
                 save_dir: str | Path | None = None, test_path: str | Path | None = None,
                 device_option: str = "--device", overwrite: bool = False,
                 nsd_tolerance: float = 1.0, postprocess: bool = False) -> RunEvaluation:
    """Predict every held-out volume of ``run_dir`` and compute per-structure metrics.
    A list of run folders with ``test_path`` is scored as one ensemble (:func:`open_runs`).

    The last checkpoint is evaluated by default: the comparison trains on a fixed schedule and
    the held-out volumes are never used to pick a checkpoint, so the numbers are not optimistic.
    ``save_dir`` also writes each prediction as NIfTI (original label values, source affine).
    ``test_path``: evaluate every labelled volume of that test set instead (see ``open_run``).
    ``surface`` adds HD95, ASD and the normalised surface Dice at ``nsd_tolerance`` mm.
    ``postprocess`` applies the run's ``postprocessing.json`` (eval/postprocess.py) first.
    Predictions are checked writable before the first volume and moved into ``save_dir`` only
    when every volume succeeded; an existing file is replaced only with ``overwrite``.
    """
    from ..fileio import StagedFiles, check_can_write

    dirs = [Path(d) for d in ([run_dir] if isinstance(run_dir, (str, Path)) else run_dir)]
    run_dir = dirs[0]
    run = open_run(run_dir, data_path, checkpoint, device, test_path, device_option) \
        if len(dirs) == 1 else open_runs(dirs, checkpoint, device, test_path, device_option)
    if tta_flip:
        tta_flip_axes(run.cfg, run_dir)  # refuse before predicting anything
    keep = []
    if postprocess:
        from ..postprocess import FILE, read_choice

        keep = read_choice(run_dir, run.loaded.class_names)
        if keep is None:
            raise UserError(f"--postprocess: {run_dir / FILE} not found; choose it first with "
                            f"eval/postprocess.py {run_dir}")
    saved = {}
    if save_dir is not None:
        saved = {name: Path(save_dir) / f"{name}.nii.gz" for name in run.val}
        check_can_write(list(saved.values()), overwrite, what="--save-predictions")
    with StagedFiles(save_dir or ".") as staged:
        rows, times, example = _evaluate_volumes(run, run_dir, tta_flip, surface, keep_example,
                                                 progress, saved, staged, nsd_tolerance, keep)
        try:
            staged.commit()
        except OSError as e:
            raise UserError(f"could not write the predictions into {save_dir} ({e.strerror or e}); "
                            "pass another --save-predictions folder") from None
    hist = list(run.ckpt.get("history", []))
    cfg = run.cfg
    return RunEvaluation(
        run_dir=str(run_dir), arch=cfg.model.arch, attention=cfg.model.attention, seed=cfg.seed,
        params=sum(p.numel() for p in run.model.parameters()),
        train_seconds=float(sum(h.get("seconds", 0.0) for h in hist)),
        infer_seconds_per_volume=float(np.mean(times)) if times else float("nan"),
        class_names=list(run.dataset.class_names), rows=rows, history=hist, example=example,
        evaluated_on=run.evaluated_on,
        checkpoint="; ".join(checkpoint_identity(m) for m in
                             (run.ensemble.members if run.ensemble else [run.loaded])),
        members=[str(d) for d in dirs] if len(dirs) > 1 else [], setting=attention_setting(cfg.model))


def attention_setting(model_cfg) -> str:
    """The options of ``model_cfg``'s attention that shaped its blocks ("reduction 16, fusion
    add, min_hidden 1" for scSE; "" for none), so a report says which setting it measured."""
    import inspect

    from ..blocks.registry import ATTENTIONS, accepted_options

    options = {"reduction": model_cfg.reduction, "fusion": model_cfg.fusion,
               "min_hidden": model_cfg.min_hidden}
    accepted = accepted_options(model_cfg.attention)
    if options["reduction"] is None and "reduction" in accepted:  # the attention's own default
        cls = ATTENTIONS.get(model_cfg.attention)
        options["reduction"] = inspect.signature(cls).parameters["reduction"].default
    return ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}"
                     for k, v in options.items() if k in accepted)


def checkpoint_identity(loaded) -> str:
    from ..fileio import file_sha256

    sha = file_sha256(Path(loaded.run_dir) / loaded.checkpoint)[:12]
    return f"{loaded.checkpoint} (epoch {int(loaded.ckpt.get('epoch', 0))}, sha256 {sha})"


def _evaluate_volumes(run, run_dir: Path, tta_flip: bool, surface: bool, keep_example: bool,
                      progress: bool, saved: dict, staged, nsd_tolerance: float = 1.0,
                      keep_largest: list[int] | None = None):
    """Predict and score each volume; predictions go to ``staged`` paths for ``saved``."""
    from tqdm.auto import tqdm

    from .. import data as D
    from ..data import AXIS_INDEX
    from ..inference import save_prediction_nifti
    from ..metrics import evaluate_volume

    k = int(run.ckpt["num_classes"])
    rows, times, example = [], [], None
    for name in tqdm(run.val, desc=f"evaluating {run_dir.name}", leave=False,
                     disable=not show_progress(progress)):
        vol = run.load(name)
        t0 = time.perf_counter()
        pred = run.predict(vol.image, tta_flip, vol.affine)
        if run.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        pred = np.asarray(pred)
        if keep_largest:
            from ..postprocess import keep_largest_component

            pred = keep_largest_component(pred, keep_largest)
        spacing = tuple(float(s) for s in np.linalg.norm(vol.affine[:3, :3], axis=0))
        for r in evaluate_volume(pred, vol.label, k, run.dataset.class_names, spacing=spacing,
                                 surface=surface, nsd_tolerance=nsd_tolerance):
            rows.append(dict(r, volume=name))
        if name in saved:
            try:
                save_prediction_nifti(pred, vol.affine, vol.label_values, staged.path(saved[name]))
            except OSError as e:
                raise UserError(f"could not write {saved[name]} ({e.strerror or e}); nothing was "
                                "saved: pass another --save-predictions folder") from None
        if keep_example and example is None:
            example = dict(name=name, image=D.channels_first(vol.image)[0], label=vol.label,
                           pred=pred, axis=AXIS_INDEX[run.cfg.data.axis])
    return rows, times, example


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
    nsd = summarise(res.rows, "nsd") if surface else {}
    head = f"{'structure':<24} {'Dice mean +- std':>18} {'n':>4}"
    if surface:
        head += f" {'HD95':>16} {'ASD':>16} {'NSD':>16}"
    head += "  " + " ".join(f"{s:>8}" for s in STATUSES[1:])
    lines = [f"{res.run_dir}: {res.arch} + {res.attention} (seed {res.seed}), {len(vols)} "
             f"{res.evaluated_on}, {res.params:,} parameters, "
             f"{res.infer_seconds_per_volume:.3f} s/volume", head]

    def pm(t):
        return f"{t[0]:.4f} +- {t[1]:.4f}" if t[2] else "n/a"

    for name in res.class_names[1:]:
        rows = [r for r in res.rows if r["structure"] == name]
        line = f"{name:<24} {pm(dice[name]):>18} {dice[name][2]:>4}"
        if surface:
            line += f" {pm(hd[name]):>16} {pm(asd[name]):>16} {pm(nsd[name]):>16}"
        counts = [sum(r["status"] == s for r in rows) for s in STATUSES[1:]]
        lines.append(line + "  " + " ".join(f"{c:>8}" for c in counts))
    per_vol = [volume_mean_dice([r for r in res.rows if r["volume"] == v]) for v in vols]
    lines.append(f"{'mean over structures':<24} {pm(mean_std(per_vol)):>18} "
                 f"{mean_std(per_vol)[2]:>4}")
    lines.append("(missed: in reference, not predicted; false_positive: predicted, not in "
                 "reference; absent structures are excluded from means"
                 + ("; HD95/ASD count missed and false_positive at the volume diagonal in mm, "
                    "NSD at 0)" if surface else ")"))
    return "\n".join(lines)
