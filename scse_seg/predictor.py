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

from .errors import DataError, UserError
from .runtime import show_progress

NIFTI_ENDINGS = (".nii.gz", ".nii")
CHANNEL_SUFFIX = "_0000"  # nnU-Net: case_0000.nii.gz is channel 0 of case


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
        from .inference import predict_volume_2d, predict_volume_3d

        flip_axis = tta_flip_axes(self.cfg, self.run_dir or "this run")[0] if tta else -1
        dc = self.cfg.data
        if self.resampled:
            from .data.resample import probabilities_to_grid, resample_volume

            if dc.target_spacing is not None and affine is None:
                raise UserError("this run was trained at data.target_spacing "
                                f"{dc.target_spacing}; predicting needs the scan's affine")
            shape = image.shape[-3:]
            image, _, _ = resample_volume(image, None, np.eye(4) if affine is None else affine,
                                          dc.zoom, dc.target_spacing)
        if self.cfg.model.dim == 2:
            from .data import AXIS_INDEX

            out = predict_volume_2d(self.model, image, AXIS_INDEX[dc.axis], batch_size=32,
                                    tta_flip=tta, device=self.device, flip_axis=flip_axis,
                                    multiple=self.size_multiple, return_probs=self.resampled)
        else:
            out = predict_volume_3d(self.model, image, roi_size=tuple(dc.patch_size),
                                    tta_flip=tta, device=self.device, multiple=self.size_multiple,
                                    return_probs=self.resampled)
        return probabilities_to_grid(out, shape) if self.resampled else out

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


# ----------------------------------------------------------------------------- NIfTI files


def is_nifti(path: Path) -> bool:
    return path.name.endswith(NIFTI_ENDINGS)


def case_name(path: Path) -> str:
    """``case_0000.nii.gz`` -> ``case`` (nnU-Net channel suffix), ``case.nii`` -> ``case``."""
    name = path.name
    for ext in NIFTI_ENDINGS:
        if name.endswith(ext):
            name = name[: -len(ext)]
            break
    return name[: -len(CHANNEL_SUFFIX)] if name.endswith(CHANNEL_SUFFIX) else name


def open_nifti(path: Path, channels: int | None = 1):
    """nibabel image of ``path`` (header only, data read lazily) with its checks: a NIfTI file,
    3D or 4D with ``channels`` channels on its last axis (or one; None: not checked here)."""
    from .data.nifti import open_nifti as open_checked

    img = open_checked(path)
    shape = img.shape
    if channels is not None and len(shape) == 4 and shape[3] not in (1, channels):
        fix = "keep the modality it was trained on" if channels == 1 else \
            f"pass {channels} channels on the last axis, or one file per channel"
        raise DataError(f"{path} has {shape[3]} channels (shape {shape}); the model takes "
                        f"{'one single-channel 3D image' if channels == 1 else f'{channels}'}: {fix}")
    if len(shape) not in (3, 4):
        raise DataError(f"{path} has shape {shape}; a 3D volume is expected")
    return img


def read_image(img, path: Path) -> np.ndarray:
    """The voxels of ``img`` (opened with ``open_nifti``) as a 3D array, or (C, X, Y, Z) for a
    4D file of C > 1 channels, checked finite."""
    from .data.nifti import read_voxels

    data = read_voxels(img, path)
    if data.ndim == 4:
        data = data[..., 0] if data.shape[3] == 1 else np.moveaxis(data, -1, 0)
    return data


def channel_files(path: Path, channels: int = 1) -> list[Path]:
    """The files holding scan ``path``: itself (3D, or 4D with every channel), or for a model of
    several channels and an nnU-Net ``<case>_0000`` file, ``<case>_0000`` ... ``<case>_{C-1}``
    (the order of ``channel_names``)."""
    path = Path(path)
    if channels == 1 or _channel(path) != 0:
        return [path]
    return [path.with_name(_with_channel(path.name, 0, c)) for c in range(channels)]


def _check_channel_files_present(files: list[Path], channels: int) -> None:
    for f in files[1:]:
        if not f.is_file():
            raise DataError(f"channel file {f} not found: the model takes {channels} channels and "
                            f"{files[0].name} is channel 0; add {f.name} beside it (nnU-Net: "
                            "<case>_0000, <case>_0001...) or pass one 4D file with all channels")


def open_scan(files: list[Path], channels: int = 1) -> list:
    """nibabel images of one scan's files (see :func:`channel_files`), checked before any voxel
    is read: present, ``channels`` channels in all, one voxel grid."""
    from .data.msd import AFFINE_TOLERANCE

    _check_channel_files_present(files, channels)
    imgs = [open_nifti(f, channels if len(files) == 1 else None) for f in files]
    for f, img in zip(files, imgs):
        if len(files) > 1 and len(img.shape) == 4 and img.shape[3] != 1:
            raise DataError(f"{f} has {img.shape[3]} channels (shape {img.shape}); each channel "
                            f"file (<case>_0000 ... <case>_{channels - 1:04d}) must hold one 3D "
                            "volume")
    if len(files) == 1:
        shape = imgs[0].shape
        have = shape[3] if len(shape) == 4 else 1
        if have != channels:
            raise DataError(f"{files[0]} has {have} channel{'s' * (have != 1)} (shape {shape}); "
                            f"the model takes {channels}: pass one 4D file with the channels on "
                            "its last axis, or one file per channel (<case>_0000, <case>_0001...)")
    for f, img in zip(files[1:], imgs[1:]):
        if img.shape[:3] != imgs[0].shape[:3]:
            raise DataError(f"{f} has shape {img.shape[:3]} but {files[0].name} has "
                            f"{imgs[0].shape[:3]}; all channels of a scan must share one voxel grid")
        if not np.allclose(img.affine, imgs[0].affine, atol=AFFINE_TOLERANCE):
            raise DataError(f"{f}: its affine differs from {files[0].name}'s; resample every "
                            "channel onto one grid")
    return imgs


def read_scan(imgs: list, files: list[Path]) -> np.ndarray:
    """The voxels of one scan opened with :func:`open_scan`: (X, Y, Z) for one channel,
    (C, X, Y, Z) for several."""
    if len(imgs) == 1:
        return read_image(imgs[0], files[0])
    parts = [read_image(img, f) for img, f in zip(imgs, files)]
    dtype = np.result_type(*parts)
    return np.stack([a.astype(dtype, copy=False) for a in parts])


# ----------------------------------------------------------------------------- files in, files out


def plan_outputs(inputs: str | Path, output: str | Path, channels: int = 1,
                 overwrite: bool = False) -> list[tuple[Path, Path]]:
    """(input file, output file) pairs for ``predict.py INPUT OUTPUT``, checked before anything
    is read or written: INPUT a NIfTI file, a folder of them or a dataset folder with
    ``imagesTs/``; OUTPUT a file (for one input ending in .nii/.nii.gz) or a folder; no output
    may be an input, land in a dataset's folders or replace an existing file (unless
    ``overwrite``; never an input). For a model of several ``channels`` an nnU-Net scan is
    planned once, by its ``<case>_0000`` file (:func:`channel_files` lists the others,
    checked present here)."""
    src, dst = Path(inputs), Path(output)
    if not src.exists():
        raise UserError(f"input {src} not found; pass a NIfTI file or a folder of them")
    if src.resolve() == dst.resolve():
        raise UserError(f"OUTPUT {dst} is the same as INPUT; pass another folder for the "
                        "predictions (inputs are never overwritten)")
    if src.is_file():
        if not is_nifti(src):
            raise DataError(f"{src} is not a NIfTI file (.nii or .nii.gz)")
        files = [src]
    else:
        folder = src
        if not any(is_nifti(p) for p in folder.iterdir()) and (folder / "imagesTs").is_dir():
            folder = folder / "imagesTs"  # a dataset folder: predict its test images
        files = sorted(p for p in folder.iterdir() if is_nifti(p) and not p.name.startswith("."))
        if not files:
            raise DataError(f"input folder {folder} holds no NIfTI files (.nii, .nii.gz); pass a "
                            "folder of images, e.g. a dataset's imagesTs/")
        names = {p.name for p in files}  # case_0001 beside case_0000: a second channel
        extra = sorted(p.name for p in files if _channel(p) not in (None, 0) and
                       _with_channel(p.name, _channel(p), 0) in names)
        if extra and channels == 1:
            raise DataError(f"{folder} holds channel files {_names(extra)} besides _0000; the model "
                            "takes one channel: keep only the _0000 files of each case")
        files = [p for p in files if p.name not in extra]  # read with their _0000 file
        beyond = [n for n in extra if _channel(Path(n)) >= channels]
        if beyond and channels > 1:
            raise DataError(f"{folder} holds channel files {_names(beyond)} beyond the "
                            f"{channels} channels the model takes (_0000 to _{channels - 1:04d}); "
                            "remove them or predict with a run trained on those channels")
    for f in files:
        _check_channel_files_present(channel_files(f, channels), channels)
    if src.is_dir() and is_nifti(dst):
        raise UserError(f"OUTPUT {dst} is a file name but INPUT {src} is a folder; pass a folder "
                        "for the predictions")
    single_file = src.is_file() and is_nifti(dst)
    if single_file:
        pairs = [(src, dst)]
    else:
        if dst.exists() and not dst.is_dir():
            raise UserError(f"OUTPUT {dst} exists and is not a folder; pass a folder (or a .nii.gz "
                            "file name for a single input)")
        ending = lambda p: ".nii" if p.name.endswith(".nii") else ".nii.gz"  # noqa: E731
        pairs = [(f, dst / f"{case_name(f)}{ending(f)}") for f in files]
    by_out: dict[Path, Path] = {}
    ins = {c.resolve() for f in files for c in channel_files(f, channels)}
    for f, o in pairs:
        if o.resolve() in ins:
            raise UserError(f"OUTPUT {o} would overwrite the input {f}; pass another folder")
        if o in by_out:
            raise UserError(f"inputs {by_out[o].name} and {f.name} would both be written to {o}")
        by_out[o] = f
    from .fileio import check_can_write

    check_can_write([o for _, o in pairs], overwrite, what="OUTPUT")
    return pairs


def _channel(path: Path) -> int | None:
    name = path.name
    for ext in NIFTI_ENDINGS:
        if name.endswith(ext):
            name = name[: -len(ext)]
            break
    tail = name.rsplit("_", 1)
    return int(tail[1]) if len(tail) == 2 and len(tail[1]) == 4 and tail[1].isdigit() else None


def _with_channel(name: str, channel: int, new: int) -> str:
    i = name.rindex(f"_{channel:04d}")
    return f"{name[:i]}_{new:04d}{name[i + 5:]}"


def _names(items: list[str], limit: int = 10) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def predict_files(loaded: LoadedModel, pairs: list[tuple[Path, Path]], tta: bool = False,
                  progress: bool = True) -> list[dict]:
    """Predict every (input, output) pair; headers are checked for all inputs before the first
    prediction, and the outputs are moved into place only once every scan succeeded (a bad
    second scan leaves no first output behind). Returns one record per file (seconds, shape)."""
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
            classes = loaded.predict_classes(normalise_channels(read_scan(imgs, files)), tta,
                                             img.affine)
            seconds = time.perf_counter() - t0  # predict_classes returns on the CPU: synchronised
            try:
                save_prediction_nifti(classes, img.affine, loaded.label_values, staged.path(dst),
                                      like=img)
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
