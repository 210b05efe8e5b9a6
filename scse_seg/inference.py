"""Whole-volume prediction: batched slice-wise 2D inference reassembled into 3D, and MONAI
sliding-window inference for 3D models; optional test-time flip augmentation.

Inputs are centre-padded to the model's ``size_multiple`` with the volume's minimum (the padding
rule of training, :func:`scse_seg.data.slices.pad_value`; each channel's own minimum for a
(C, X, Y, Z) multi-channel volume) and cropped back."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def size_multiple(model) -> int:
    """The multiple every spatial input size of ``model`` must be (``model.size_multiple``: 16
    for the paper networks, 2**depth for smp encoders); 16 for models that do not say."""
    return int(getattr(model, "size_multiple", 16))


def _pad_to_at_least(x: torch.Tensor, shape, multiple: int, value):
    """Centre-pad the spatial axes of (N, C, *S) ``x`` to at least ``shape`` and to a multiple;
    ``value``: one fill, or one per channel."""
    sizes = x.shape[2:]
    target = [max(int(t), s) for t, s in zip(shape, sizes)]
    target = [-(-t // multiple) * multiple for t in target]
    pads, crop = [], []
    for s, t in zip(reversed(sizes), reversed(target)):
        pads += [(t - s) // 2, t - s - (t - s) // 2]
    for s, t in zip(sizes, target):
        crop.append(slice((t - s) // 2, (t - s) // 2 + s))
    if not any(pads):
        return x, crop
    if np.ndim(value) == 0 or len(value) == 1:
        return F.pad(x, pads, mode="constant", value=float(np.ravel(value)[0])), crop
    return torch.cat([F.pad(x[:, c:c + 1], pads, mode="constant", value=float(v))
                      for c, v in enumerate(value)], 1), crop


def _device_of(model, device):
    if device is not None:
        return torch.device(device)
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@torch.no_grad()
def predict_volume_2d(model, image: np.ndarray, axis: int, batch_size: int = 16,
                      tta_flip: bool = False, device=None, return_probs: bool = False,
                      flip_axis: int = -1, multiple: int | None = None):
    """Predict a (X, Y, Z) volume, or a (C, X, Y, Z) one of C channels, slice by slice along
    spatial ``axis``.

    Slices are padded to a multiple of ``multiple`` (default: the model's ``size_multiple``) with
    the volume's minimum and cropped back. ``tta_flip`` averages the softmax with that of the slice
    flipped along in-plane ``flip_axis`` (flipped back; -1 is the axis that training's
    ``data.augment.flip`` flips). Returns int64 labels (X, Y, Z), or float32 probabilities
    (K, X, Y, Z).
    """
    from .data.slices import channel_pad_values

    dev = _device_of(model, device)
    multiple = multiple or size_multiple(model)
    fill = channel_pad_values(image)
    was_training = model.training
    model.eval()
    vol = torch.as_tensor(np.ascontiguousarray(np.moveaxis(image, axis - 3, 0)), dtype=torch.float32)
    if vol.dim() == 3:  # one channel: (S, a, b) -> (S, 1, a, b)
        vol = vol[:, None]
    outs = []
    for start in range(0, vol.shape[0], batch_size):
        x = vol[start:start + batch_size].to(dev)
        x, crop = _pad_to_at_least(x, (1, 1), multiple, fill)
        p = torch.softmax(model(x).float(), dim=1)
        if tta_flip:
            p = 0.5 * (p + torch.softmax(model(x.flip(flip_axis)).float(), 1).flip(flip_axis))
        p = p[(Ellipsis, *crop)]
        outs.append(p if return_probs else p.argmax(1))
    model.train(was_training)
    out = torch.cat(outs).cpu()
    if return_probs:  # (S, K, a, b) -> (K, X, Y, Z)
        return np.moveaxis(out.movedim(1, 0).numpy(), 1, axis + 1)
    return np.moveaxis(out.numpy().astype(np.int64), 0, axis)


@torch.no_grad()
def predict_volume_3d(model, image: np.ndarray, roi_size=(32, 32, 32), sw_batch_size: int = 2,
                      overlap: float = 0.25, tta_flip: bool = False, device=None,
                      return_probs: bool = False, multiple: int | None = None):
    """Sliding-window prediction of a (X, Y, Z) or (C, X, Y, Z) volume with MONAI
    (Gaussian-weighted blending).

    The volume is padded (its minimum) to at least ``roi_size`` and to a multiple of ``multiple``
    (default: the model's ``size_multiple``), so every window has a size the model takes."""
    from monai.inferers import sliding_window_inference

    from .data.slices import channel_pad_values

    dev = _device_of(model, device)
    multiple = multiple or size_multiple(model)
    was_training = model.training
    model.eval()
    x = torch.as_tensor(np.ascontiguousarray(image), dtype=torch.float32)
    x = (x[None] if x.dim() == 4 else x[None, None]).to(dev)
    x, crop = _pad_to_at_least(x, roi_size, multiple, channel_pad_values(image))
    roi = tuple(min(r, s) for r, s in zip(roi_size, x.shape[2:]))

    def run(inp):
        return torch.softmax(sliding_window_inference(inp, roi, sw_batch_size, model,
                                                      overlap=overlap, mode="gaussian").float(), 1)

    p = run(x)
    if tta_flip:
        p = 0.5 * (p + run(x.flip(-1)).flip(-1))
    p = p[(0, slice(None), *crop)].cpu()
    model.train(was_training)
    return p.numpy() if return_probs else p.argmax(0).numpy().astype(np.int64)


def label_dtype(values) -> np.dtype:
    """The smallest integer type holding every label value (uint8 for 0..255, int16 once a value
    is negative, uint16 up to 65535, ...): a label 40000 stays 40000, never wraps. Past 32 bits
    int64 (uint64 NIfTI files are refused by many tools)."""
    lo, hi = int(np.min(values)), int(np.max(values))
    for t in (np.uint8, np.int8, np.uint16, np.int16, np.uint32, np.int32, np.int64):
        if np.iinfo(t).min <= lo and hi <= np.iinfo(t).max:
            return np.dtype(t)
    raise ValueError(f"label values {lo}..{hi} do not fit a 64-bit integer")


def save_prediction_nifti(labels: np.ndarray, affine: np.ndarray, label_values, path,
                          like=None) -> Path:
    """Write class indices as the dataset's ORIGINAL label values with the source affine.

    ``like``: the source nibabel image; its header (voxel sizes, orientation codes, description)
    is kept, with intensity scaling reset so label values are stored as they are. The file is
    written atomically (a temp file renamed into place).
    """
    import gzip

    import nibabel as nib

    from .fileio import atomic_write_bytes

    values = np.asarray(label_values, dtype=np.int64)
    out = values[np.asarray(labels, dtype=np.int64)]
    dtype = label_dtype(values)
    path = Path(path)
    affine = np.asarray(affine, dtype=np.float64)
    if like is not None:
        img = type(like)(out.astype(dtype), affine, header=like.header.copy(), dtype=dtype)
        img.header.set_slope_inter(1, 0)
        img.header.set_intent("label")
        img.header["cal_min"], img.header["cal_max"] = float(values.min()), float(values.max())
    else:
        img = nib.Nifti1Image(out.astype(dtype), affine, dtype=dtype)
    img.set_data_dtype(dtype)
    data = img.to_bytes()
    if path.name.endswith(".gz"):
        data = gzip.compress(data, compresslevel=6, mtime=0)
    atomic_write_bytes(path, lambda f: f.write(data))
    return path
