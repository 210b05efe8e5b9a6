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
