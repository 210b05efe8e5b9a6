#!/usr/bin/env python
"""Segment new scans with a trained run: one NIfTI of labels per input, with the dataset's
original label values and the input's shape, affine and header. The preprocessing (intensity
normalisation, slice axis or patch size) is read from the run folder.

  python eval/predict.py RUN_DIR INPUT OUTPUT [--checkpoint last.pt|best.pt] [--tta] [--device cpu]

INPUT: a .nii/.nii.gz file, a folder of them, or a dataset folder (its imagesTs/ is used).
nnU-Net channel files (case_0000.nii.gz) are written as case.nii.gz. A model trained on several
channels (dataset.json 'modality' / 'channel_names') reads the same channels of every scan: one
4D file with them on its last axis, or case_0000, case_0001... beside each other. OUTPUT: a folder
(created), or a .nii.gz file name for a single input. Inputs are never overwritten; an existing
output, or an output inside a dataset's folders, only with --overwrite. Outputs are written to a
staging folder and moved into place when every scan succeeded: an error leaves nothing behind.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scse_seg.data.nifti import (  # noqa: E402
    case_name,
    channel_files,
    channel_index,
    check_channel_files_present,
    is_nifti,
    with_channel,
)
from scse_seg.errors import DataError, UserError  # noqa: E402
from scse_seg.fileio import check_can_write  # noqa: E402


def plan_outputs(inputs: str | Path, output: str | Path, channels: int = 1,
                 overwrite: bool = False) -> list[tuple[Path, Path]]:
    """(input file, output file) pairs for ``predict.py INPUT OUTPUT``, checked before anything
    is read or written: INPUT a NIfTI file, a folder of them or a dataset folder with
    ``imagesTs/``; OUTPUT a file (for one input ending in .nii/.nii.gz) or a folder; no output
    may be an input, land in a dataset's folders or replace an existing file (unless
    ``overwrite``; never an input). For a model of several ``channels`` an nnU-Net scan is
    planned once, by its ``<case>_0000`` file (``channel_files`` lists the others,
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
        extra = sorted(p.name for p in files if channel_index(p) not in (None, 0) and
                       with_channel(p.name, 0) in names)
        if extra and channels == 1:
            raise DataError(f"{folder} holds channel files {_names(extra)} besides _0000; the model "
                            "takes one channel: keep only the _0000 files of each case")
        files = [p for p in files if p.name not in extra]  # read with their _0000 file
        beyond = [n for n in extra if channel_index(Path(n)) >= channels]
        if beyond and channels > 1:
            raise DataError(f"{folder} holds channel files {_names(beyond)} beyond the "
                            f"{channels} channels the model takes (_0000 to _{channels - 1:04d}); "
                            "remove them or predict with a run trained on those channels")
    for f in files:
        check_channel_files_present(channel_files(f, channels), channels)
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
    check_can_write([o for _, o in pairs], overwrite, what="OUTPUT")
    return pairs


def _names(items: list[str], limit: int = 10) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="eval/predict.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", metavar="RUN_DIR", help="run folder written by train_seg.py")
    p.add_argument("input", metavar="INPUT", help="NIfTI file, folder of them, or dataset folder")
    p.add_argument("output", metavar="OUTPUT", help="output folder (or .nii.gz for one input)")
    p.add_argument("--checkpoint", default="last.pt",
                   help="last.pt (end of training, default) or best.pt (best validation Dice)")
    p.add_argument("--tta", action="store_true", help="test-time flip augmentation")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing output files (and allow a dataset's folders)")
    args = p.parse_args(argv)
    try:
        from scse_seg.predictor import load_model, predict_files

        loaded = load_model(args.run_dir, args.checkpoint, args.device, device_option="--device")
        pairs = plan_outputs(args.input, args.output, loaded.in_channels, args.overwrite)
        records = predict_files(loaded, pairs, tta=args.tta, progress=not args.no_progress)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    total = sum(r["seconds"] for r in records)
    out = Path(args.output)
    where = out if len(records) != 1 else Path(records[0]["output"])
    print(f"predicted {len(records)} volume{'s' * (len(records) != 1)} with {args.run_dir} "
          f"({args.checkpoint}, {loaded.device}): {total / max(len(records), 1):.3f} s/volume; "
          f"labels written to {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
