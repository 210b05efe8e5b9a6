"""Export a trained run as a self-contained artefact: a ``torch.export`` program (``model.pt2``,
loaded with ``torch.export.load``, no scse_seg code needed), ONNX when the ``onnx`` package is
installed, and ``preprocessing.json``, everything a runtime needs to apply it (normalisation,
slice axis or patch size, size multiple, label values, class names).

The program takes a float32 batch ``(N, C, H, W)`` (2D) or ``(N, C, D, H, W)`` (3D), C the
run's input channels (``in_channels`` in preprocessing.json, 1 for single-channel data), whose
spatial sizes are multiples of ``size_multiple`` and at least twice it (torch.export
specialises a bottleneck of size 1), and returns logits ``(N, K, ...)``.
"""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import torch

from . import failpoints
from .errors import UserError

PROGRAM = "model.pt2"
ONNX = "model.onnx"
PREPROCESSING = "preprocessing.json"


def _dynamic_shapes(dim: int, multiple: int) -> dict:
    from torch.export import Dim

    shapes = {0: Dim("batch", min=1, max=4096)}
    for i, name in enumerate("dhw"[-dim:] if dim == 3 else "hw"):
        shapes[2 + i] = multiple * Dim(f"{name}_blocks", min=2, max=256)
    return {"x": shapes}


def example_input(dim: int, multiple: int, batch: int = 2, in_channels: int = 1) -> torch.Tensor:
    return torch.randn(batch, in_channels, *([2 * multiple] * dim))


def export_program(model: torch.nn.Module, dim: int, multiple: int, in_channels: int = 1):
    """``torch.export`` of ``model`` in eval mode on CPU, dynamic in batch and spatial size."""
    model = model.eval().to("cpu")
    with torch.no_grad():
        return torch.export.export(model, (example_input(dim, multiple, in_channels=in_channels),),
                                   dynamic_shapes=_dynamic_shapes(dim, multiple))


def onnx_available() -> str | None:
    """None when ONNX export can run, else the reason it cannot."""
    missing = []
    for mod in ("onnx", "onnxscript"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    return None if not missing else f"{' and '.join(missing)} not installed " \
        "(pip install 'scse_seg[export]')"


def export_onnx(program, path: Path, dim: int, multiple: int, in_channels: int = 1) -> None:
    torch.onnx.export(program, (example_input(dim, multiple, in_channels=in_channels),), str(path),
                      dynamo=True, external_data=False,
                      input_names=["image"], output_names=["logits"],
                      dynamic_shapes=_dynamic_shapes(dim, multiple), verbose=False)


def export_run(run_dir: str | Path, out: str | Path, checkpoint: str = "last.pt",
               onnx: bool = True, int8: str | None = None, calibration: str | None = None,
               calibration_count: int = 256) -> dict:
    """Write ``model.pt2``, ``preprocessing.json`` and (if possible and ``onnx``) ``model.onnx``
    into the new or empty folder ``out``; returns what was written and why ONNX was skipped.
    ``int8`` ("conv" or "all", see :mod:`scse_seg.quantize`) also writes ``model_int8.onnx``,
    calibrated on ``calibration_count`` inputs of the run's training volumes (``calibration``:
    the dataset, default the one it was trained on).

    The folder is built beside ``out`` and renamed into place at the end: a kill or a full disk
    leaves ``out`` as it was (absent or empty), so the same command can simply be rerun."""
    from .fileio import check_writable_folder, os_error_text, publish_folder, stage_folder
    from .predictor import load_model

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"export folder {out} exists and is not empty; pass a new folder "
                        "(nothing is overwritten)")
    check_writable_folder(out.parent, "the export")
    loaded = load_model(run_dir, checkpoint, "cpu")
    dim, multiple, c = loaded.cfg.model.dim, loaded.size_multiple, loaded.in_channels
    batches = None
    if int8 is not None:
        from .quantize import VARIANTS, calibration_inputs

        if int8 not in VARIANTS:
            raise UserError(f"unknown --int8 variant {int8!r}; valid: {', '.join(VARIANTS)}")
        if not onnx or onnx_available():
            raise UserError("--int8 quantizes the ONNX export: install onnx, onnxscript and "
                            "onnxruntime (pip install -e \".[export]\") and drop --no-onnx")
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            raise UserError("--int8 needs onnxruntime: pip install -e \".[export]\"") from None
        if calibration_count < 1:
            raise UserError(f"--calibration-count must be at least 1, got {calibration_count}")
        batches = calibration_inputs(loaded, run_dir, calibration, calibration_count)
    program = export_program(loaded.model, dim, multiple, c)
    pre = loaded.preprocessing()
    pre.update(input=f"float32 (N, {c}, {'D, H, W' if dim == 3 else 'H, W'}), spatial sizes multiples "
               f"of {multiple}, at least {2 * multiple}", output="logits (N, num_classes, ...); "
               "argmax over classes, then label_values[class]",
               normalisation_formula="x = (x - mean) / std over the nonzero voxels of the volume "
               "(all voxels if it has no zeros), each channel on its own; centre-pad each channel "
               "with its normalised minimum to the size multiple (and to at least twice it for "
               "this program); crop back",
               source_run=str(Path(run_dir).resolve()), checkpoint=checkpoint,
               torch_version=torch.__version__)
    buf = io.BytesIO()  # serialised in memory: a full disk is an OSError here, not a C++ abort
    torch.export.save(program, buf)
    skipped = onnx_available() if onnx else "not requested"
    try:
        stage = stage_folder(out)
    except OSError as e:
        raise UserError(f"cannot create the export folder {out} ({os_error_text(e)}); pass a "
                        "folder you can write to") from None
    try:
        (stage / PROGRAM).write_bytes(buf.getbuffer())
        failpoints.hit("export_written")  # crash tests: die with the program but no json
        if skipped is None:
            export_onnx(program, stage / ONNX, dim, multiple, c)
        pre["onnx"] = ONNX if skipped is None else f"skipped: {skipped}"
        if batches is not None:
            from .quantize import INT8, quantize_onnx

            quantize_onnx(stage / ONNX, stage / INT8, batches, int8)
            pre["int8"] = dict(file=INT8, variant=int8, runtime="onnxruntime (QDQ, per-channel int8 "
                               "weights, uint8 activations, min-max calibration)",
                               calibration_inputs=int(sum(len(b) for b in batches)))
        (stage / PREPROCESSING).write_text(json.dumps(pre, indent=1))
        publish_folder(stage, out)
    except OSError as e:
        shutil.rmtree(stage, ignore_errors=True)
        raise UserError(f"could not write the export to {out} ({os_error_text(e)}); nothing was "
                        "kept: free disk space or pass another folder") from None
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    written = dict(program=str(out / PROGRAM), preprocessing=str(out / PREPROCESSING),
                   onnx_skipped=skipped)
    if skipped is None:
        written["onnx"] = str(out / ONNX)
    if batches is not None:
        written["int8"] = str(out / "model_int8.onnx")
    return written
