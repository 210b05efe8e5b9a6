#!/usr/bin/env python
"""Reference use of an exported model without scse_seg: preprocessing.json -> logits -> labels.

  python eval/apply_exported.py EXPORT_DIR SCAN.nii.gz OUT.nii.gz [--int8]

--int8 runs model_int8.onnx (eval/export.py --int8) with onnxruntime instead of model.pt2.

Needs torch, numpy and nibabel (MONAI for 3D models: the sliding window). Steps, as in training:
each channel z-scored over its nonzero voxels; 2D: slices along ``slice_axis_index``, centre-padded
with the channel's minimum to a multiple of ``size_multiple`` (at least twice it, what the
exported program takes), logits cropped back; 3D: Gaussian sliding window of ``roi_size``; argmax,
class index -> the dataset's label value, written on the input's grid with its affine and header.
Runs trained on resampled volumes (``resample`` in preprocessing.json) also need that resampling:
use ``eval/predict.py`` for them.
"""
import json
import sys

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F


def zscore(x):
    fg = x[x != 0] if (x == 0).any() and (x != 0).any() else x.ravel()
    return (x - fg.mean()) / (fg.std() if fg.std() > 1e-8 else 1.0)


def pad(x, multiple, fills, at_least):
    """Centre-pad the spatial axes of (N, C, *S) to multiples of ``multiple``, >= ``at_least``."""
    sizes = x.shape[2:]
    target = [-(-max(s, a) // multiple) * multiple for s, a in zip(sizes, at_least)]
    pads = [p for s, t in zip(reversed(sizes), reversed(target))
            for p in ((t - s) // 2, t - s - (t - s) // 2)]
    x = torch.cat([F.pad(x[:, c:c + 1], pads, value=float(f)) for c, f in enumerate(fills)], 1)
    return x, tuple(slice((t - s) // 2, (t - s) // 2 + s) for s, t in zip(sizes, target))


def onnx_network(path):
    """An ONNX model as a function of a float32 tensor, run by onnxruntime on CPU."""
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run(None, {"image": x.numpy()})[0])


@torch.no_grad()
def segment(export_dir, scan, int8=False):
    pre = json.load(open(f"{export_dir}/preprocessing.json"))
    if "resample" in pre:
        sys.exit("error: this run was trained on resampled volumes; use eval/predict.py")
    if int8 and "int8" not in pre:
        sys.exit(f"error: {export_dir} has no int8 model; export it with eval/export.py --int8")
    net = onnx_network(f"{export_dir}/{pre['int8']['file']}") if int8 else \
        torch.export.load(f"{export_dir}/model.pt2").module()
    img = nib.load(scan)
    x = np.asarray(img.dataobj, dtype=np.float32)
    x = np.moveaxis(x, -1, 0) if x.ndim == 4 else x[None]  # (C, X, Y, Z)
    x = np.stack([zscore(c) for c in x])
    fills, m = x.reshape(len(x), -1).min(1), pre["size_multiple"]
    if pre["dim"] == 2:
        slices = torch.from_numpy(np.moveaxis(x, 1 + pre["slice_axis_index"], 0).copy())  # (S, C, a, b)
        padded, crop = pad(slices, m, fills, (2 * m, 2 * m))
        logits = torch.cat([net(b)[(..., *crop)] for b in padded.split(32)])  # (S, K, a, b)
        classes = np.moveaxis(logits.argmax(1).numpy(), 0, pre["slice_axis_index"])
    else:
        from monai.inferers import sliding_window_inference

        sw = pre["sliding_window"]
        padded, crop = pad(torch.from_numpy(x)[None], m, fills, sw["roi_size"])
        roi = [min(r, s) for r, s in zip(sw["roi_size"], padded.shape[2:])]
        logits = sliding_window_inference(padded, roi, 2, net, overlap=sw["overlap"], mode="gaussian")
        classes = logits[(0, slice(None), *crop)].argmax(0).numpy()
    return np.asarray(pre["label_values"])[classes], img


if __name__ == "__main__":
    labels, img = segment(sys.argv[1], sys.argv[2], int8="--int8" in sys.argv[4:])
    out = nib.Nifti1Image(labels.astype(np.int32), img.affine, img.header)
    out.set_data_dtype(np.int32)
    nib.save(out, sys.argv[3])
    print(f"labels {sorted(np.unique(labels).tolist())} written to {sys.argv[3]}")
