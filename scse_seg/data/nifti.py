"""The one NIfTI reader of training, evaluation and prediction: every file goes through the same
checks, so a bad file fails with the same one-line message whichever command reads it.

Checked before any voxel is read: the file is a NIfTI image (nibabel) and its header's shape can
be held by the file (a 100-byte file claiming 20000^3 voxels is refused instead of allocating
terabytes). Checked when reading: the data decompresses, is real-valued (complex scans are
refused, not silently cast) and, for images, finite.
"""
from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np

from ..errors import DataError

# deflate cannot compress better than ~1032:1 (RFC 1951: 258-byte matches in ~2-bit codes), so a
# .nii.gz file of n bytes holds at most ~1032 n bytes of voxels; a header claiming more is a lie
DEFLATE_MAX_RATIO = 1032


def open_nifti(path: str | Path):
    """nibabel image of ``path`` (header only; voxels are read by :func:`read_voxels`)."""
    import nibabel as nib

    path = Path(path)
    try:
        img = nib.load(str(path))
    except Exception as e:  # ImageFileError for foreign content, OSError/EOFError for truncation
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{path} is not a readable NIfTI image ({msg}); pass .nii or .nii.gz "
                        "files") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise DataError(f"{path} is a {type(img).__name__}, not a NIfTI image; convert it to "
                        ".nii.gz first")
    claimed = int(np.prod(img.shape, dtype=object)) * img.get_data_dtype().itemsize
    size = path.stat().st_size
    room = size * DEFLATE_MAX_RATIO if path.name.endswith(".gz") else size
    if claimed > room:
        raise DataError(f"{path}: its header claims shape {img.shape} ({claimed:,} bytes of "
                        f"voxels) but the file has {size:,} bytes; the file is truncated or its "
                        "header is corrupt, re-export it")
    return img


def read_voxels(img, path: str | Path, finite: bool = True) -> np.ndarray:
    """The voxels of ``img`` as stored (4D kept as is), checked real-valued and, with ``finite``,
    free of NaN/Inf."""
    try:
        data = np.asanyarray(img.dataobj)
    except (OSError, EOFError, zlib.error, ValueError, MemoryError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{path} cannot be read ({msg}); the file is truncated or corrupt, "
                        "re-export or re-download it") from None
    if np.iscomplexobj(data):
        raise DataError(f"{path} holds complex values ({data.dtype}); segmentation needs real "
                        "intensities: save the magnitude (abs) instead")
    if finite and not np.issubdtype(data.dtype, np.integer) and not np.all(np.isfinite(data)):
        raise DataError(f"{path} has NaN/Inf voxels; replace them (e.g. with 0) first")
    return data


def load_nifti(path: str | Path, finite: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(voxels, affine) of one NIfTI file, with every check of this module."""
    img = open_nifti(path)
    return read_voxels(img, path, finite), np.asarray(img.affine, dtype=np.float64)


# ----------------------------------------------------------------------------- scans of channels
# A scan is one 3D image of C channels, stored as one 3D/4D file (MSD: channels on the last axis)
# or as one 3D file per channel (nnU-Net: <case>_0000, <case>_0001, ...). Training data, test
# sets and prediction inputs are all read by open_scan + read_scan.

NIFTI_ENDINGS = (".nii.gz", ".nii")
AFFINE_TOLERANCE = 1e-3  # mm: channels (and a label) must share the image's voxel grid


def is_nifti(path: Path) -> bool:
    return Path(path).name.endswith(NIFTI_ENDINGS)


def strip_ending(name: str) -> str:
    for ext in NIFTI_ENDINGS:
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def channel_index(path: Path) -> int | None:
    """nnU-Net's channel number: ``case_0001.nii.gz`` -> 1; None without a 4-digit suffix."""
    tail = strip_ending(Path(path).name).rsplit("_", 1)
    return int(tail[1]) if len(tail) == 2 and len(tail[1]) == 4 and tail[1].isdigit() else None


def with_channel(name: str, new: int) -> str:
    """``case_0000.nii.gz`` -> ``case_{new:04d}.nii.gz``."""
    stem = strip_ending(name)
    return f"{stem[:-5]}_{new:04d}{name[len(stem):]}"


def case_name(path: Path) -> str:
    """``case_0000.nii.gz`` -> ``case`` (nnU-Net channel 0 suffix), ``case.nii`` -> ``case``."""
    stem = strip_ending(Path(path).name)
    return stem[:-5] if channel_index(Path(stem)) == 0 else stem


def channel_files(path: Path, channels: int = 1) -> list[Path]:
    """The files holding scan ``path``: itself (3D, or 4D with every channel), or for several
    channels and an nnU-Net ``<case>_0000`` file, ``<case>_0000`` ... ``<case>_{C-1}``."""
    path = Path(path)
    if channels == 1 or channel_index(path) != 0:
        return [path]
    return [path.with_name(with_channel(path.name, c)) for c in range(channels)]


def check_channel_files_present(files: list[Path], channels: int) -> None:
    for f in files[1:]:
        if not f.is_file():
            raise DataError(f"channel file {f} not found: {channels} channels are needed and "
                            f"{files[0].name} is channel 0; add {f.name} beside it (nnU-Net: "
                            "<case>_0000, <case>_0001...) or pass one 4D file with all channels")


def open_scan(files: list[Path], channels: int, needs: str = "the model takes",
              too_many: str | None = None) -> list:
    """nibabel images of one scan's ``files``, checked before any voxel is read: present,
    3D (or 4D), ``channels`` channels in all, one voxel grid. ``needs`` says who wants that
    many channels in the error ("the model takes", "dataset.json declares"); ``too_many`` is the
    fix offered for a 4D file of more channels."""
    files = [Path(f) for f in files]
    check_channel_files_present(files, channels)
    imgs = [open_nifti(f) for f in files]
    for f, img in zip(files, imgs):
        if len(img.shape) not in (3, 4) or (len(files) > 1 and len(img.shape) == 4
                                             and img.shape[3] != 1):
            what = "each channel file must hold one 3D volume" if len(files) > 1 else \
                "a 3D volume (or 4D with channels on the last axis) is expected"
            raise DataError(f"{f} has shape {img.shape}; {what}")
    if len(files) == 1:
        shape = imgs[0].shape
        have = shape[3] if len(shape) == 4 else 1
        if have != channels:
            fix = too_many if have > channels and too_many else \
                "give each scan one 4D file with its channels on the last axis, or one file " \
                "per channel (<case>_0000, <case>_0001...)"
            raise DataError(f"{files[0]} has {have} channel{'s' * (have != 1)} (shape {shape}) "
                            f"but {needs} {channels}; {fix}")
    for f, img in zip(files[1:], imgs[1:]):
        if img.shape[:3] != imgs[0].shape[:3]:
            raise DataError(f"{f} has shape {img.shape[:3]} but {files[0].name} has "
                            f"{imgs[0].shape[:3]}; all channels of a scan must share one voxel grid")
        if not np.allclose(img.affine, imgs[0].affine, atol=AFFINE_TOLERANCE):
            raise DataError(f"{f}: its affine differs from {files[0].name}'s by more than "
                            f"{AFFINE_TOLERANCE}; resample every channel onto one grid")
    return imgs


def read_scan(imgs: list, files: list[Path], finite: bool = True) -> np.ndarray:
    """The voxels of a scan opened with :func:`open_scan`: (X, Y, Z) for one channel,
    (C, X, Y, Z) for several."""
    parts = []
    for img, f in zip(imgs, files):
        data = read_voxels(img, f, finite)
        if data.ndim == 4:
            data = data[..., 0] if data.shape[3] == 1 else np.moveaxis(data, -1, 0)
        parts.append(np.asarray(data))
    if len(parts) == 1:
        return parts[0]
    dtype = np.result_type(*parts)
    return np.stack([a.astype(dtype, copy=False) for a in parts])
