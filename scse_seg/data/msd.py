"""Datasets in the Medical Segmentation Decathlon / nnU-Net layout (imagesTr/, labelsTr/,
dataset.json), read with nibabel, checked so that bad files fail with a message that names them.

``dataset.json`` is the source of truth: its ``labels`` map original label values to names (MSD:
``{"0": "background"}``; nnU-Net v2: ``{"background": 0}``), values are remapped to contiguous
class indices (LPBA40's 21..166 become 1..54) and files on disk that it does not pair are reported
as orphans by name.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import DataError
from .nifti import AFFINE_TOLERANCE, channel_files, load_nifti, open_scan, read_scan


@dataclass
class CaseRef:
    name: str
    image: Path  # the 3D/4D image, or channel 0 (<case>_0000) when channels are separate files
    label: Path
    channel_files: list[Path] = field(default_factory=list)  # all channel files, nnU-Net layout

    @property
    def image_files(self) -> list[Path]:
        """Every file holding this case's image: its channel files, or the one image file."""
        return list(self.channel_files) or [self.image]


@dataclass
class MSDDataset:
    root: Path
    name: str
    cases: list[CaseRef]
    label_values: list[int]  # original values, index = class index (0 = background)
    class_names: list[str]
    orphans: list[str] = field(default_factory=list)  # human-readable warnings
    modality: str = ""  # name of channel 0
    channel_names: list[str] = field(default_factory=list)  # as declared; [] = one channel

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_channels(self) -> int:
        """Input channels of every case (the network's in_channels): those dataset.json declares."""
        return max(1, len(self.channel_names))


@dataclass
class Volume:
    name: str
    image: np.ndarray  # float32 (X, Y, Z), or (C, X, Y, Z) with several channels; normalised
    label: np.ndarray  # int64 class indices (X, Y, Z)
    affine: np.ndarray  # 4x4, from the image file
    label_values: list[int]  # original label value of each class index

    @property
    def num_channels(self) -> int:
        return num_channels(self.image)


def num_channels(image: np.ndarray) -> int:
    """Channels of a loaded image: (X, Y, Z) is one channel, (C, X, Y, Z) holds C."""
    return int(image.shape[0]) if image.ndim == 4 else 1


def channels_first(image: np.ndarray) -> np.ndarray:
    """(C, X, Y, Z) view of a loaded image, whatever its number of channels."""
    return image if image.ndim == 4 else image[None]


def _strip_ext(name: str) -> str:
    for ext in (".nii.gz", ".nii", ".mha", ".nrrd"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def _inside(root: Path, rel: str, what: str) -> Path:
    """The file a dataset.json path names, refusing paths written to leave the dataset folder.

    The check is on the path as written (no absolute paths, no '../' climbing out); the file
    itself may be a symlink to anywhere (datasets linked in from shared storage are common on
    clusters), so links are not resolved here."""
    if not isinstance(rel, str) or not rel:
        raise DataError(f"{root / 'dataset.json'}: {what} entry {rel!r} is not a file path")
    norm = os.path.normpath(rel)
    if os.path.isabs(rel) or norm == ".." or norm.startswith(".." + os.sep):
        raise DataError(f"{root / 'dataset.json'}: {what} path {rel!r} points outside the dataset "
                        f"folder {root}; paths must stay inside it (no '../' or absolute paths)")
    return root / norm


def _parse_labels(labels, js: Path) -> tuple[list[int], list[str]]:
    if not isinstance(labels, dict) or not labels:
        raise DataError(f"{js}: 'labels' must be a non-empty mapping of label value to name")
    pairs = []
    for k, v in labels.items():
        try:
            if isinstance(v, (int, float)) and not isinstance(v, bool):  # nnU-Net v2: name -> value
                value, name = v, str(k)
            else:  # MSD: "value" -> name
                value, name = k, str(v)
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            pairs.append((int(value), name))
        except (TypeError, ValueError, OverflowError):
            raise DataError(f"{js}: label entry {k!r}: {v!r} is neither 'value: name' (MSD) nor "
                            "'name: value' (nnU-Net v2); region labels are not supported") from None
    pairs.sort()
    values = [p[0] for p in pairs]
    if len(set(values)) != len(values):
        raise DataError(f"{js}: label values repeat in 'labels'")
    if values[0] != 0:
        raise DataError(f"{js}: 'labels' must declare background as value 0")
    return values, [p[1] for p in pairs]


def _parse_channels(meta: dict, js: Path) -> list[str]:
    """Channel names in channel order from ``modality`` (MSD) or ``channel_names`` (nnU-Net v2),
    both ``{"0": name, "1": name, ...}``; [] when neither is given (one channel)."""
    decl = meta.get("channel_names", meta.get("modality"))
    key = "channel_names" if "channel_names" in meta else "modality"
    if decl is None:
        return []
    if not isinstance(decl, dict) or not decl:
        raise DataError(f"{js}: '{key}' must map channel indices to names, e.g. "
                        '{"0": "T2", "1": "ADC"}')
    try:
        idx = sorted((int(k), str(v)) for k, v in decl.items())
    except (TypeError, ValueError):
        raise DataError(f"{js}: '{key}' keys must be channel indices \"0\", \"1\", ...; got "
                        f"{sorted(map(str, decl))}") from None
    if [i for i, _ in idx] != list(range(len(idx))):
        raise DataError(f"{js}: '{key}' must number its channels 0, 1, ... without gaps; got "
                        f"{[i for i, _ in idx]}")
    return [n for _, n in idx]


def _channel_files(image: Path, channels: int, js: Path, what: str) -> list[Path]:
    """nnU-Net layout: the ``<case>_0000`` ... ``<case>_{C-1}`` files of ``image`` (which is
    channel 0), checked present; [] for one channel or a single (4D) image file."""
    files = channel_files(image, channels)
    if len(files) == 1:
        return []
    for f in files[1:]:
        if not f.is_file():
            raise DataError(f"{what}: channel file {f} is missing ({js.name} declares {channels} "
                            f"channels, {image.name} is channel 0); add it, or give the case "
                            "one 4D file with all channels on its last axis")
    return files


def read_msd(root: str | Path) -> MSDDataset:
    """Read and check ``root/dataset.json``; list the image/label pairs and any orphans."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset folder {root} not found; pass the folder that holds "
                        "dataset.json, imagesTr/ and labelsTr/ (--data PATH or data.path)")
    js = root / "dataset.json"
    if not js.is_file():
        raise DataError(f"{js} not found; an MSD/nnU-Net dataset needs a dataset.json listing "
                        "its labels and training cases")
    meta = _read_json(js)
    if not isinstance(meta, dict):
        raise DataError(f"{js} must hold a JSON object")
    if "labels" not in meta:
        raise DataError(f"{js} has no 'labels' entry mapping label values to structure names")
    values, names = _parse_labels(meta["labels"], js)
    channels = _parse_channels(meta, js)
    n_ch = max(1, len(channels))
    ending = _file_ending(meta, js)
    cases: list[CaseRef] = []
    if "training" in meta:
        if not isinstance(meta["training"], list):
            raise DataError(f"{js}: 'training' must be a list of {{image, label}} entries")
        for i, entry in enumerate(meta["training"]):
            if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
                raise DataError(f"{js}: training entry {i} needs 'image' and 'label' keys")
            img = _inside(root, entry["image"], "image")
            lab = _inside(root, entry["label"], "label")
            if not img.exists() and img.name.endswith(ending):  # MSD lists xxx.nii.gz,
                alt = img.with_name(_strip_ext(img.name) + "_0000" + ending)  # nnU-Net has _0000
                img = alt if alt.exists() else img
            for p, what in ((img, "image"), (lab, "label")):
                if not p.is_file():
                    raise DataError(f"{js}: training entry {i} points to missing {what} file {p}; "
                                    "restore the file or remove the entry")
            files = _channel_files(img, n_ch, js, f"{js}: training entry {i}")
            cases.append(CaseRef(_strip_ext(lab.name), img, lab, files))
    else:  # nnU-Net v2: pair imagesTr/<case>_0000<ending> with labelsTr/<case><ending>
        for lab in sorted((root / "labelsTr").glob(f"*{ending}")):
            case = lab.name[: -len(ending)]
            img = _inside(root, f"imagesTr/{case}_0000{ending}", "image")
            if img.is_file():
                cases.append(CaseRef(case, img, lab, _channel_files(img, n_ch, js, str(lab))))
    _check_unique(cases, js)
    orphans = _find_orphans(root, cases, ending)
    if not cases:
        raise DataError(f"dataset {root} has no image/label pairs (dataset.json 'training' is "
                        "empty or labelsTr/ has no matching files)")
    return MSDDataset(root, str(meta.get("name", root.name)), cases, values, names, orphans,
                      channels[0] if channels else "", channels)


def _read_json(js: Path):
    try:
        return json.loads(js.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        why = "nested too deeply" if isinstance(e, RecursionError) else str(e)
        raise DataError(f"{js} is not valid JSON ({why}); fix or regenerate it") from None


def _file_ending(meta: dict, js: Path) -> str:
    """``file_ending`` (nnU-Net v2), a plain suffix such as ".nii.gz": never a path."""
    ending = meta.get("file_ending", ".nii.gz")
    if not isinstance(ending, str) or not ending.startswith(".") or "/" in ending or \
            "\\" in ending or ".." in ending:
        raise DataError(f"{js}: 'file_ending' must be a file suffix such as \".nii.gz\"; got "
                        f"{ending!r}")
    return ending


def _check_unique(cases: list[CaseRef], js: Path) -> None:
    """A file listed twice would put one case in both the training and the validation split."""
    for what, key in (("image", lambda c: c.image), ("label", lambda c: c.label)):
        seen: dict[Path, int] = {}
        for i, c in enumerate(cases):
            f = Path(os.path.normpath(key(c)))
            if f in seen:
                raise DataError(f"{js}: training entries {seen[f]} and {i} both use the {what} file "
                                f"{f}; list each case once (a repeated case would leak from the "
                                "training into the validation split)")
            seen[f] = i


def _find_orphans(root: Path, cases: list[CaseRef], ending: str) -> list[str]:
    used = {f.resolve() for c in cases for f in c.image_files} | {c.label.resolve() for c in cases}
    case_names = {c.name for c in cases}
    out = []
    for sub, other in (("imagesTr", "label"), ("labelsTr", "image")):
        folder = root / sub
        if not folder.is_dir():
            continue
        for f in sorted(folder.iterdir()):
            if f.name.startswith(".") or not f.name.endswith(ending) or f.resolve() in used:
                continue
            case = f.name[: -len(ending)]
            channel = sub == "imagesTr" and len(case) > 5 and case[-5] == "_" and case[-4:].isdigit()
            if channel and case[:-5] in case_names and case[-4:] != "0000":
                out.append(f"orphan {sub}/{f.name}: channel {int(case[-4:])} is not declared in "
                           "dataset.json ('modality' / 'channel_names'); it is not used")
                continue
            case = case[:-5] if sub == "imagesTr" and case.endswith("_0000") else case
            why = f"has no {other}" if case not in case_names else "is not listed"
            out.append(f"orphan {sub}/{f.name}: {why}; it is not used for training or evaluation")
    return out


def remap_labels(label: np.ndarray, label_values: list[int]) -> np.ndarray:
    """Original label values -> contiguous class indices (values must all be declared; -1 for
    any that is not). A sorted search, not a table sized by the largest value: a label value of
    10^12 costs nothing."""
    values = np.asarray(sorted(label_values), dtype=np.int64)
    order = np.argsort(np.asarray(label_values, dtype=np.int64), kind="stable")
    label = np.asarray(label, dtype=np.int64)
    pos = np.clip(np.searchsorted(values, label), 0, len(values) - 1)
    return np.where(values[pos] == label, order[pos], -1)


def restore_labels(classes: np.ndarray, label_values: list[int]) -> np.ndarray:
    """Class indices -> original label values (for writing predictions)."""
    return np.asarray(label_values, dtype=np.int64)[classes]


def normalise(image: np.ndarray) -> np.ndarray:
    """Per-volume z-score over the nonzero voxels (the whole volume if it has no zeros): uint8
    and raw float scanners end up on one scale; background stays the minimum."""
    x = image.astype(np.float32)
    fg = x[x != 0] if np.any(x == 0) and np.any(x != 0) else x.ravel()
    mean, std = float(fg.mean()), float(fg.std())
    return ((x - mean) / (std if std > 1e-8 else 1.0)).astype(np.float32)


def normalise_channels(image: np.ndarray) -> np.ndarray:
    """:func:`normalise` applied to each channel of a (C, X, Y, Z) image on its own (modalities
    have unrelated scales); a (X, Y, Z) image is normalised as one channel."""
    if image.ndim == 3:
        return normalise(image)
    return np.stack([normalise(c) for c in image]).astype(np.float32, copy=False)


def _read_channels(case: CaseRef, channels: int):
    """(image (X, Y, Z) or (C, X, Y, Z), affine of channel 0) from the case's image file(s),
    checked: the channel count dataset.json declares, one grid for all channels."""
    files = case.image_files
    imgs = open_scan(files, channels, needs="dataset.json declares",
                     too_many="list every channel in its 'modality' (MSD) or 'channel_names' "
                              "(nnU-Net), or keep one channel")
    return read_scan(imgs, files, finite=False), np.asarray(imgs[0].affine, dtype=np.float64)


def load_case(case: CaseRef, ds: MSDDataset, *, check: bool = True) -> Volume:
    """Read one image/label pair, check it, normalise the image (each channel on its own) and
    remap the labels. The image comes back (X, Y, Z), or (C, X, Y, Z) with several channels."""
    image, affine = _read_channels(case, ds.num_channels)
    label, l_affine = load_nifti(case.label, finite=False)
    if label.ndim == 4 and label.shape[3] == 1:
        label = label[..., 0]
    if label.shape != image.shape[-3:]:
        raise DataError(f"{case.label} has shape {label.shape} but its image {case.image.name} has "
                        f"{image.shape[-3:]}; image and label must be on the same voxel grid")
    if check and not np.allclose(affine, l_affine, atol=AFFINE_TOLERANCE):
        raise DataError(f"{case.label}: its affine differs from {case.image.name}'s by more than "
                        f"{AFFINE_TOLERANCE}; resample the label onto the image grid")
    if not np.issubdtype(image.dtype, np.integer):
        bad = ~np.isfinite(image)
        if bad.any():
            raise DataError(f"{case.image} has {int(bad.sum())} NaN/Inf voxels; fix the image "
                            "(e.g. replace them with 0) before training")
    lab = np.asarray(label)
    if not np.issubdtype(lab.dtype, np.integer):
        if not np.all(np.isfinite(lab)) or np.any(lab != np.round(lab)):
            raise DataError(f"{case.label} holds non-integer label values; labels must be integers")
        lab = lab.astype(np.int64)
    present = np.unique(lab)
    undeclared = sorted(set(present.tolist()) - set(ds.label_values))
    if undeclared:
        raise DataError(f"{case.label} has label values {undeclared[:10]} that dataset.json does "
                        f"not declare (declared: {ds.label_values[:10]}"
                        f"{'...' if len(ds.label_values) > 10 else ''}); add them to 'labels' or "
                        "fix the label file")
    return Volume(case.name, normalise_channels(np.asarray(image)),
                  remap_labels(lab.astype(np.int64), ds.label_values), affine, list(ds.label_values))


def read_test_set(path: str | Path) -> tuple[MSDDataset, str]:
    """Labelled volumes to test a model on, and which ones they are (``"imagesTs"`` or
    ``"imagesTr"``): ``imagesTs/`` + ``labelsTs/`` when the dataset has test labels (``path`` is
    the dataset folder or its ``imagesTs/``), otherwise every training pair of the dataset
    (another site, another MSD/nnU-Net dataset). Labels and names come from its dataset.json."""
    path = Path(path)
    root = path.parent if path.name in ("imagesTs", "labelsTs", "imagesTr", "labelsTr") else path
    ds = read_msd(root)
    if not (root / "labelsTs").is_dir():
        return ds, "imagesTr"
    js = root / "dataset.json"
    ending = _file_ending(_read_json(js), js)
    cases, missing = [], []
    for lab in sorted((root / "labelsTs").glob(f"*{ending}")):
        case = lab.name[: -len(ending)]
        imgs = [root / "imagesTs" / f"{case}_0000{ending}", root / "imagesTs" / lab.name]
        img = next((p for p in imgs if p.is_file()), None)
        if img is None:
            missing.append(case)
        else:
            cases.append(CaseRef(case, img, lab, _channel_files(img, ds.num_channels, js,
                                                                str(lab))))
    if missing:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise DataError(f"{root / 'labelsTs'}: labels {shown} have no image in {root / 'imagesTs'} "
                        f"(expected <case>_0000{ending} or <case>{ending}); add the images or "
                        "remove the labels")
    if not cases:
        raise DataError(f"{root / 'labelsTs'} holds no {ending} label files; add them or pass a "
                        "dataset whose imagesTr/labelsTr are the test volumes")
    return MSDDataset(root, ds.name, cases, ds.label_values, ds.class_names, [], ds.modality,
                      ds.channel_names), "imagesTs"
