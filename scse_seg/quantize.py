"""int8 post-training static quantization of an exported network, calibrated on the run's own
training inputs (ONNX Runtime: QDQ format, per-channel int8 weights, uint8 activations).

Why ONNX Runtime: the export already writes ONNX, ORT's static quantization runs on any x86 CPU,
and PyTorch's PT2E flow has moved to ``torchao``, not installed here. Two variants:

* ``all``: every operator ORT can quantize, the SE gates (sigmoid) and the recalibrating
  multiply included — activation x activation products, where SE networks are known to lose
  accuracy in int8 (torchvision's quantized MobileNetV3; Xilinx/brevitas issue 1341);
* ``conv``: only convolutions and matrix products; gates, multiplies, adds and maxima stay float.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import UserError

VARIANTS = {"all": None, "conv": ["Conv", "ConvTranspose", "Gemm", "MatMul"]}
INT8 = "model_int8.onnx"


def calibration_inputs(loaded, run_dir, data_path: str | None = None, count: int = 256,
                       batch: int = 16) -> list[np.ndarray]:
    """About ``count`` network inputs from the run's training volumes, prepared as inference
    prepares them (normalised, resampled as in training, 2D slices evenly spaced through each
    volume, or 3D patches of the training patch size, padded to the size multiple), in batches
    of ``batch``: float32 (N, C, *spatial)."""
    import torch

    from .data import AXIS_INDEX, load_case, read_msd
    from .data.msd import channels_first
    from .data.resample import resample_volume
    from .data.slices import channel_pad_values
    from .evaluation.runs import read_split
    from .inference import _pad_to_at_least

    split = read_split(Path(run_dir) / "split.json")
    root = data_path or split.get("dataset_root")
    if not root or not Path(root).is_dir():
        raise UserError(f"the training data of {run_dir} is not at '{root}'; pass --calibration PATH "
                        "(the dataset it was trained on)")
    ds = read_msd(root)
    if list(ds.class_names) != list(loaded.class_names):
        raise UserError(f"calibration dataset {root} has classes {ds.class_names}, the run "
                        f"{loaded.class_names}; pass the dataset it was trained on")
    if ds.num_channels != loaded.in_channels:
        raise UserError(f"calibration dataset {root} has {ds.num_channels} channel(s), the run "
                        f"takes {loaded.in_channels}; pass the dataset it was trained on")
    names = set(split.get("train") or [])
    cases = [c for c in ds.cases if c.name in names] or list(ds.cases)
    if not cases:
        raise UserError(f"calibration dataset {root} has no volumes")
    cfg, m = loaded.cfg, loaded.size_multiple
    per_volume = max(1, -(-count // len(cases)))
    samples = []
    for case in cases:
        vol = load_case(case, ds)
        img = channels_first(vol.image)
        if loaded.resampled:
            img, _, _ = resample_volume(img, None, vol.affine, cfg.data.zoom, cfg.data.target_spacing)
        fill = channel_pad_values(img)
        x = torch.as_tensor(np.asarray(img, dtype=np.float32))
        if cfg.model.dim == 2:
            s = x.movedim(AXIS_INDEX[cfg.data.axis] + 1, 0)
            idx = np.linspace(0, len(s) - 1, min(per_volume, len(s))).round().astype(int)
            p, _ = _pad_to_at_least(s[idx], (2 * m, 2 * m), m, fill)
            samples += list(p)
        else:
            p, _ = _pad_to_at_least(x[None], tuple(cfg.data.patch_size), m, fill)
            start = [(a - b) // 2 for a, b in zip(p.shape[2:], cfg.data.patch_size)]
            crop = tuple(slice(s0, s0 + b) for s0, b in zip(start, cfg.data.patch_size))
            samples.append(p[(0, slice(None), *crop)])
        if len(samples) >= count:
            break
    samples = samples[:count]
    return [torch.stack(samples[i:i + batch]).numpy() for i in range(0, len(samples), batch)]


def quantize_onnx(fp32: Path, out: Path, batches: list[np.ndarray], variant: str = "conv") -> None:
    """Static int8 quantization of the ONNX model ``fp32`` into ``out``, calibrated (min-max) on
    ``batches``; ``variant``: see the module docstring."""
    if variant not in VARIANTS:
        raise UserError(f"unknown int8 variant {variant!r}; valid: {', '.join(VARIANTS)}")
    if not batches:
        raise UserError("the calibration set is empty; pass a dataset with training volumes")
    try:
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError:
        raise UserError("--int8 needs onnxruntime: pip install -e \".[export]\"") from None
    import tempfile

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(batches)

        def get_next(self):
            x = next(self.it, None)
            return None if x is None else {"image": x}

    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
        quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=VARIANTS[variant])


class OnnxNetwork:
    """An ONNX model run by ONNX Runtime on CPU, called like the network: (N, C, ...) float32
    tensor -> logits tensor; enough for :func:`scse_seg.inference.predict_volume_2d`."""

    training = False

    def __init__(self, path: str | Path, threads: int | None = None, size_multiple: int = 16):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.size_multiple = size_multiple

    def __call__(self, x):
        import torch

        return torch.from_numpy(self.session.run(None, {"image": x.detach().cpu().numpy()})[0])

    def eval(self):
        return self

    def train(self, mode: bool = True):
        return self

    def parameters(self):
        return iter(())


__all__ = ["INT8", "OnnxNetwork", "VARIANTS", "calibration_inputs", "quantize_onnx"]
