"""Use a trained run: load a run folder into a model plus everything needed to apply it, predict
a scan with the same preprocessing as in training, write the labels as NIfTI.

Shared by evaluation (held-out and test sets), prediction (``eval/predict.py``,
``scse_seg.predict``) and export. What the model needs is read from the run folder's checkpoint
(its saved config, class names and original label values), never re-specified by the user:
a model trained on coronal slices is applied to coronal slices, LPBA40's class 1 is written as
label value 21, a model trained on T2 + ADC reads both channels of every scan (one 4D file with
the channels on its last axis, or nnU-Net's ``<case>_0000``, ``<case>_0001``... files).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .data.nifti import channel_files, open_scan, read_scan
from .errors import DataError, UserError
from .runtime import show_progress


@dataclass
class LoadedModel:
    """A trained model in eval mode with the metadata that says how to apply it."""

    model: torch.nn.Module
    cfg: Any  # scse_seg.config.Config saved with the run
    class_names: list[str]
    label_values: list[int]  # original label value of each class index (0 = background)
    device: torch.device
    run_dir: Path
    checkpoint: str
    ckpt: dict  # the raw checkpoint (history, epoch, best_dice...)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def in_channels(self) -> int:
        """Input channels the model was trained on (runs older than multi-channel support: 1)."""
        return int(self.ckpt.get("in_channels", 1))

    @property
    def channel_names(self) -> list[str]:
        return [str(c) for c in self.ckpt.get("channel_names") or []]

    def _channels_text(self) -> str:
        names = self.channel_names
        return f"{self.in_channels} channel{'s' * (self.in_channels != 1)}" + \
            (f" ({', '.join(names)})" if names and self.in_channels > 1 else "")

    @property
    def size_multiple(self) -> int:
        """Inputs are padded to a multiple of this (the network's total downsampling)."""
        from .inference import size_multiple

        return size_multiple(self.model)

    def preprocessing(self) -> dict:
        """What an input needs before the network, as plain JSON-able values."""
        cfg = self.cfg
        out = dict(normalisation="zscore_nonzero", dim=cfg.model.dim, size_multiple=self.size_multiple,
                   in_channels=self.in_channels, channel_names=self.channel_names,
                   num_classes=self.num_classes, class_names=list(self.class_names),
                   label_values=[int(v) for v in self.label_values], arch=cfg.model.arch,
                   attention=cfg.model.attention)
        if self.resampled:  # predicted on the resampled grid, probabilities brought back
            out["resample"] = dict(zoom=cfg.data.zoom, target_spacing=cfg.data.target_spacing,
                                   image="trilinear, voxel centres aligned",
                                   back="probabilities trilinear to the input grid, then argmax")
        if cfg.model.dim == 2:
            from .data import AXIS_INDEX

            out.update(slice_axis=cfg.data.axis, slice_axis_index=AXIS_INDEX[cfg.data.axis])
        else:
            out.update(patch_size=list(cfg.data.patch_size),  # predict_volume_3d's settings
                       sliding_window=dict(roi_size=list(cfg.data.patch_size), overlap=0.25,
                                           blend="gaussian"))
        return out

    @property
    def resampled(self) -> bool:
        """Whether the run was trained on resampled volumes (data.zoom / data.target_spacing)."""
        return self.cfg.data.zoom is not None or self.cfg.data.target_spacing is not None

    def predict_classes(self, image: np.ndarray, tta: bool = False,
                        affine: np.ndarray | None = None) -> np.ndarray:
        """Class indices (X, Y, Z) of an already normalised (X, Y, Z) float32 volume (or
        (C, X, Y, Z) for a multi-channel model, each channel normalised), on its own grid. A run
        trained on resampled volumes predicts on the resampled grid and its class probabilities
        are brought back (``affine``: the volume's, needed for target_spacing)."""
        if self.resampled:
            return self.probabilities(image, tta, affine).argmax(0)
        return self._predict(image, tta, probabilities=False)

    def probabilities(self, image: np.ndarray, tta: bool = False,
                      affine: np.ndarray | None = None) -> np.ndarray:
        """Softmax probabilities (K, X, Y, Z), float32, of the same input on its own grid."""
        if not self.resampled:
            return self._predict(image, tta, probabilities=True)
        from .data.resample import probabilities_on_grid, resample_volume

        dc = self.cfg.data
        if dc.target_spacing is not None and affine is None:
            raise UserError("this run was trained at data.target_spacing "
                            f"{dc.target_spacing}; predicting needs the scan's affine")
        shape = image.shape[-3:]
        image, _, _ = resample_volume(image, None, np.eye(4) if affine is None else affine,
                                      dc.zoom, dc.target_spacing)
        return probabilities_on_grid(self._predict(image, tta, probabilities=True), shape)

    def _predict(self, image: np.ndarray, tta: bool, probabilities: bool) -> np.ndarray:
        from .inference import predict_volume_2d, predict_volume_3d

        flip_axis = tta_flip_axes(self.cfg, self.run_dir or "this run")[0] if tta else -1
        dc = self.cfg.data
        if self.cfg.model.dim == 2:
            from .data import AXIS_INDEX

            return predict_volume_2d(self.model, image, AXIS_INDEX[dc.axis], batch_size=32,
                                     tta_flip=tta, device=self.device, flip_axis=flip_axis,
                                     multiple=self.size_multiple, return_probs=probabilities)
        return predict_volume_3d(self.model, image, roi_size=tuple(dc.patch_size), tta_flip=tta,
                                 device=self.device, multiple=self.size_multiple,
                                 return_probs=probabilities)

    def predict(self, image: np.ndarray, tta: bool = False,
                affine: np.ndarray | None = None) -> np.ndarray:
        """Original label values (X, Y, Z) of a raw (X, Y, Z) volume, or (X, Y, Z, C) for a
        model of C channels (the 4D NIfTI layout), normalised here as in training."""
        from .data import normalise_channels

        image = np.asarray(image)
        if image.ndim == 4 and image.shape[3] == 1:
            image = image[..., 0]
        have = image.shape[3] if image.ndim == 4 else 1
        if image.ndim not in (3, 4) or have != self.in_channels:
            want = "a 3D volume" if self.in_channels == 1 else \
                f"(X, Y, Z, {self.in_channels}): the channels on the last axis"
            raise DataError(f"image has shape {image.shape}; the model takes "
                            f"{self._channels_text()}, so {want} is expected")
        if image.ndim == 4:
            image = np.moveaxis(image, -1, 0)
        classes = self.predict_classes(normalise_channels(image), tta, affine)
        return np.asarray(self.label_values, dtype=np.int64)[classes]


def tta_flip_axes(cfg, run: str | Path = "this run") -> tuple[int, ...]:
    """The flips test-time augmentation may use: those training used (``data.augment.flip``).
    A run trained without flips is refused (UserError) rather than shown images it never saw."""
    from .data.augment import trained_flip_axes

    axes = trained_flip_axes(cfg.data.augment, cfg.model.dim)
    if not axes:
        why = "3D patch training does not flip" if cfg.model.dim != 2 else \
            "it was trained with data.augment.flip off"
        raise UserError(f"--tta: {run} cannot use flip test-time augmentation: {why}, so a "
                        "flipped image is one the model never saw; train with "
                        "data.augment.flip=true (2D) or evaluate without --tta")
    return axes


class Ensemble:
    """Several trained runs applied as one model: their softmax probabilities are averaged
    before the argmax, as nnU-Net ensembles its cross-validation folds (Isensee et al. 2021).
    Each member keeps its own preprocessing (slice axis, patch, resampling) and brings its
    probabilities back to the scan's grid; the sum is accumulated one member at a time, so K
    runs hold two probability volumes at once, not K. The members must be trained on the same
    classes, label values and channels."""

    def __init__(self, members: list[LoadedModel]):
        if not members:
            raise UserError("an ensemble needs at least one run")
        first = members[0]
        for m in members[1:]:
            for what in ("class_names", "label_values", "in_channels", "channel_names"):
                if getattr(m, what) != getattr(first, what):
                    raise UserError(f"run {m.run_dir} cannot join an ensemble with {first.run_dir}: "
                                    f"its {what} are {getattr(m, what)!r}, not "
                                    f"{getattr(first, what)!r}; ensemble runs trained on the same "
                                    "labels and channels")
        self.members = members

    # what every member shares (checked above), and the device they run on
    class_names = property(lambda self: self.members[0].class_names)
    label_values = property(lambda self: self.members[0].label_values)
    in_channels = property(lambda self: self.members[0].in_channels)
    channel_names = property(lambda self: self.members[0].channel_names)
    num_classes = property(lambda self: self.members[0].num_classes)
    device = property(lambda self: self.members[0].device)

    def probabilities(self, image: np.ndarray, tta: bool = False,
                      affine: np.ndarray | None = None) -> np.ndarray:
        total = None
        for m in self.members:
            p = m.probabilities(image, tta, affine)
            total = p if total is None else np.add(total, p, out=total)
            del p
        return total / len(self.members)

    def predict_classes(self, image: np.ndarray, tta: bool = False,
                        affine: np.ndarray | None = None) -> np.ndarray:
        return self.probabilities(image, tta, affine).argmax(0)


def load_ensemble(run_dirs: list, checkpoint: str = "last.pt", device=None,
                  device_option: str = "device") -> LoadedModel | Ensemble:
    """One run folder: its model; several: an :class:`Ensemble` of them."""
    members = [load_model(r, checkpoint, device, device_option) for r in run_dirs]
    return members[0] if len(members) == 1 else Ensemble(members)


def find_checkpoint(run_dir: str | Path, checkpoint: str = "last.pt") -> Path:
    """The checkpoint file of a run folder, or a UserError saying what is missing."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run folder {run_dir} not found; pass a folder written by train_seg.py "
                        "(it holds config.yaml, last.pt and best.pt)")
    path = run_dir / checkpoint
    if not path.is_file():
        others = sorted(p.name for p in run_dir.glob("*.pt"))
        hint = f"it has {', '.join(others)}: pass --checkpoint {others[0]}" if others else \
            "train it with train_seg.py first (checkpoints are written at the end of each epoch)"
        raise UserError(f"{path} not found; {run_dir} holds no finished checkpoint {checkpoint} "
                        f"({hint})")
    return path


def load_model(run_dir: str | Path, checkpoint: str = "last.pt", device: str | torch.device | None = None,
               device_option: str = "device") -> LoadedModel:
    """Load a run folder's checkpoint into a model in eval mode with its preprocessing metadata.

    ``checkpoint``: ``last.pt`` (the end of training, default) or ``best.pt`` (best validation
    Dice). ``device``: ``auto`` (default), ``cpu``, ``cuda`` or ``cuda:N``; ``device_option``
    is the flag named in the error when that device does not exist.
    """
    from .config import config_from_dict
    from .fileio import load_checkpoint
    from .runtime import resolve_device

    run_dir = Path(run_dir)
    path = find_checkpoint(run_dir, checkpoint)
    dev = device if isinstance(device, torch.device) else resolve_device(device, option=device_option)
    ckpt = load_checkpoint(path)
    try:
        cfg = config_from_dict(ckpt["config"])
        k = int(ckpt["num_classes"])
        model = cfg.model.build(int(ckpt.get("in_channels", 1)), k)
        model.load_state_dict(ckpt["model"])
    except (KeyError, RuntimeError) as e:
        raise UserError(f"{path} is not a checkpoint of a compatible scse_seg run ({type(e).__name__}"
                        f": {str(e).splitlines()[0] if str(e) else e}); retrain it with this "
                        "version") from None
    names = list(ckpt.get("class_names") or [f"class_{i}" for i in range(k)])
    values = [int(v) for v in (ckpt.get("label_values") or range(k))]
    return LoadedModel(model.to(dev).eval(), cfg, names, values, dev, run_dir, checkpoint, ckpt)


# ----------------------------------------------------------------------------- files in, files out


def probability_file(label_file: str | Path) -> Path:
    """Where ``--save-probabilities`` writes a scan's probabilities: ``CASE.npz`` beside
    ``CASE.nii.gz`` (nnU-Net's layout)."""
    from .data.nifti import strip_ending

    label_file = Path(label_file)
    return label_file.with_name(strip_ending(label_file.name) + ".npz")


def predict_files(loaded, pairs: list[tuple[Path, Path]], tta: bool = False,
                  progress: bool = True, save_probabilities: bool = False,
                  keep_largest: list[int] | None = None) -> list[dict]:
    """Predict every (input, output) pair with a :class:`LoadedModel` or an :class:`Ensemble`;
    headers are checked for all inputs before the first prediction, and the outputs are moved
    into place only once every scan succeeded (a bad second scan leaves no first output behind).
    ``save_probabilities`` also writes each scan's class probabilities, float16 (K, X, Y, Z)
    with the class names, to :func:`probability_file` (before postprocessing); ``keep_largest``:
    classes reduced to their largest connected component (:mod:`scse_seg.postprocess`). Returns
    one record per file."""
    from tqdm.auto import tqdm

    from .data import normalise_channels
    from .inference import save_prediction_nifti

    c = loaded.in_channels
    opened = []  # every scan's headers checked: fail before writing anything
    for src, dst in pairs:
        files = channel_files(src, c)
        opened.append((open_scan(files, c), files, src, dst))
    from .fileio import StagedFiles

    records = []
    with StagedFiles(pairs[0][1].parent) as staged:
        for imgs, files, src, dst in tqdm(opened, desc="predicting", unit="volume",
                                          disable=not show_progress(progress)):
            img = imgs[0]
            t0 = time.perf_counter()
            image = normalise_channels(read_scan(imgs, files))
            if save_probabilities:
                probs = loaded.probabilities(image, tta, img.affine)
                classes = probs.argmax(0)
            else:
                classes = loaded.predict_classes(image, tta, img.affine)
            if keep_largest:
                from .postprocess import keep_largest_component

                classes = keep_largest_component(classes, keep_largest)
            seconds = time.perf_counter() - t0  # returned on the CPU: synchronised
            try:
                save_prediction_nifti(classes, img.affine, loaded.label_values, staged.path(dst),
                                      like=img)
                if save_probabilities:
                    with open(staged.path(probability_file(dst)), "wb") as f:
                        np.savez_compressed(f, probabilities=probs.astype(np.float16),
                                            class_names=np.asarray(loaded.class_names),
                                            label_values=np.asarray(loaded.label_values))
                    del probs
            except OSError as e:
                raise UserError(f"could not write {dst} ({e.strerror or e}); nothing was written: "
                                "pass another OUTPUT") from None
            records.append(dict(input=str(src), output=str(dst), seconds=seconds,
                                shape=list(classes.shape)))
        try:
            staged.commit()
        except OSError as e:
            raise UserError(f"could not move the predictions into {pairs[0][1].parent} "
                            f"({e.strerror or e}); pass another OUTPUT") from None
    return records


def predict(run: str | Path | LoadedModel, image, checkpoint: str = "last.pt",
            device: str | torch.device | None = None, tta: bool = False) -> np.ndarray:
    """Segment one scan with a trained run: ``image`` is a NIfTI path (for a multi-channel model:
    a 4D file, an nnU-Net ``<case>_0000`` file whose siblings hold the other channels, or a list
    of channel files), a nibabel image or a raw (X, Y, Z) array ((X, Y, Z, C) for C channels);
    returns the dataset's original label values, shape (X, Y, Z).

    ``run`` is a run folder (loaded on each call) or ``load_model(run_dir)`` (load once, predict
    many)."""
    loaded = run if isinstance(run, LoadedModel) else load_model(run, checkpoint, device)
    affine = None
    if isinstance(image, (str, Path)) or (isinstance(image, (list, tuple)) and image and
                                          all(isinstance(f, (str, Path)) for f in image)):
        from .data import normalise_channels

        files = channel_files(Path(image), loaded.in_channels) if isinstance(image, (str, Path)) \
            else [Path(f) for f in image]
        imgs = open_scan(files, loaded.in_channels)
        classes = loaded.predict_classes(normalise_channels(read_scan(imgs, files)), tta,
                                         imgs[0].affine)
        return np.asarray(loaded.label_values, dtype=np.int64)[classes]
    if hasattr(image, "dataobj"):
        image, affine = np.asanyarray(image.dataobj), image.affine
    return loaded.predict(np.asarray(image), tta, affine)
