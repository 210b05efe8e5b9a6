#!/usr/bin/env python
"""Segment new scans with a trained run: one NIfTI of labels per input, with the dataset's
original label values and the input's shape, affine and header. The preprocessing (intensity
normalisation, slice axis or patch size) is read from the run folder.

  python eval/predict.py RUN_DIR [RUN_DIR ...] INPUT [INPUT ...] OUTPUT [--save-probabilities]
                         [--checkpoint last.pt|best.pt] [--tta] [--device cpu]

Several RUN_DIRs (e.g. the folds of a cross-validation) are ensembled: their softmax
probabilities are averaged before the argmax, as nnU-Net does; they must share classes and
channels. A grid variant named without its fold (GRID/runs/unet-scse-s0) stands for all its
folds. --save-probabilities also writes CASE.npz (array 'probabilities', float16, classes x
X x Y x Z, with 'class_names') beside each CASE.nii.gz.
INPUT: a .nii/.nii.gz file, a folder of them, a dataset folder (its imagesTs/ is used), or a
glob pattern ('scans/*.nii.gz'); several may be given.
nnU-Net channel files (case_0000.nii.gz) are written as case.nii.gz. A model trained on several
channels (dataset.json 'modality' / 'channel_names') reads the same channels of every scan: one
4D file with them on its last axis, or case_0000, case_0001... beside each other. OUTPUT: a folder
(created), or a .nii.gz file name for a single input. Inputs are never overwritten; an existing
output, or an output inside a dataset's folders, only with --overwrite. Outputs are written to a
staging folder and moved into place when every scan succeeded: an error leaves nothing behind.
"""
from __future__ import annotations

import argparse
import glob
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


def plan_outputs(inputs, output: str | Path, channels: int = 1,
                 overwrite: bool = False) -> list[tuple[Path, Path]]:
    """(input file, output file) pairs for ``predict.py RUN INPUT [INPUT ...] OUTPUT``, checked
    before anything is read or written. Each INPUT is a NIfTI file, a folder of them, a dataset
    folder with ``imagesTs/``, or a glob pattern (``'scans/*.nii.gz'``, quoted or expanded by the
    shell); OUTPUT a file (for one input file ending in .nii/.nii.gz) or a folder. No output may
    be an input, land in a dataset's folders or replace an existing file (unless ``overwrite``;
    never an input). For a model of several ``channels`` an nnU-Net scan is planned once, by its
    ``<case>_0000`` file (``channel_files`` lists the others, checked present here)."""
    dst = Path(output)
    sources = _expand([inputs] if isinstance(inputs, (str, Path)) else list(inputs))
    for src in sources:
        if src.resolve() == dst.resolve():
            raise UserError(f"OUTPUT {dst} is the same as INPUT {src}; pass another folder for the "
                            "predictions (inputs are never overwritten)")
    files = [f for src in sources for f in _input_files(src, channels)]
    if len(sources) == 1 and sources[0].is_file() and is_nifti(dst):
        pairs = [(sources[0], dst)]
    else:
        if is_nifti(dst):
            raise UserError(f"OUTPUT {dst} is a file name but the inputs are {len(files)} scans "
                            f"({', '.join(str(s) for s in sources[:3])}); pass a folder for the "
                            "predictions")
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
            raise UserError(f"inputs {by_out[o]} and {f} would both be written to {o}")
        by_out[o] = f
    check_can_write([o for _, o in pairs], overwrite, what="OUTPUT")
    return pairs


def _expand(items: list) -> list[Path]:
    """Existing paths as given; a glob pattern (``*``, ``?``, ``[``) by its sorted matches."""
    out = []
    for item in items:
        path = Path(item)
        if path.exists() or not any(c in str(item) for c in "*?["):
            if not path.exists():
                raise UserError(f"input {path} not found; pass a NIfTI file, a folder of them or "
                                "a glob pattern such as 'scans/*.nii.gz'")
            out.append(path)
            continue
        matches = sorted(Path(m) for m in glob.glob(str(item)))
        if not matches:
            raise UserError(f"input pattern {item} matches no file; check the folder and the "
                            "ending (.nii or .nii.gz)")
        out += matches
    return out


def _input_files(src: Path, channels: int) -> list[Path]:
    """The scans one INPUT stands for (a file, a folder of them or a dataset's imagesTs/)."""
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
    return files


def _names(items: list[str], limit: int = 10) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="eval/predict.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", metavar="RUN_DIR ... INPUT ... OUTPUT",
                   help="run folder(s) written by train_seg.py (several: an ensemble), then NIfTI "
                        "files, folders, dataset folders or glob patterns, then the output folder "
                        "(or a .nii.gz file name for one input)")
    p.add_argument("--save-probabilities", action="store_true",
                   help="also write each scan's class probabilities as CASE.npz")
    p.add_argument("--no-postprocessing", action="store_true",
                   help="ignore the runs' postprocessing.json (written by eval/postprocess.py)")
    p.add_argument("--checkpoint", default="last.pt",
                   help="last.pt (end of training, default) or best.pt (best validation Dice)")
    p.add_argument("--tta", action="store_true", help="test-time flip augmentation")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing output files (and allow a dataset's folders)")
    args = p.parse_args(argv)
    try:
        from scse_seg.postprocess import choice_of_runs
        from scse_seg.predictor import load_ensemble, predict_files, probability_file

        runs, inputs, output = split_paths(args.paths)
        loaded = load_ensemble(runs, args.checkpoint, args.device, device_option="--device")
        keep = [] if args.no_postprocessing else choice_of_runs(runs, loaded.class_names)
        pairs = plan_outputs(inputs, output, loaded.in_channels, args.overwrite)
        if args.save_probabilities:
            check_can_write([probability_file(o) for _, o in pairs], args.overwrite,
                            what="--save-probabilities")
        records = predict_files(loaded, pairs, tta=args.tta, progress=not args.no_progress,
                                save_probabilities=args.save_probabilities, keep_largest=keep)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    total = sum(r["seconds"] for r in records)
    where = Path(output) if len(records) != 1 else Path(records[0]["output"])
    model = runs[0] if len(runs) == 1 else f"an ensemble of {len(runs)} runs ({', '.join(runs)})"
    print(f"predicted {len(records)} volume{'s' * (len(records) != 1)} with {model} "
          f"({args.checkpoint}, {loaded.device}): {total / max(len(records), 1):.3f} s/volume; "
          f"labels{' and probabilities' * args.save_probabilities} written to {where}")
    if keep:
        print("postprocessing (postprocessing.json): kept the largest connected component of "
              f"{', '.join(loaded.class_names[c] for c in keep)}")
    return 0


def is_run_folder(path: str | Path) -> bool:
    """A folder train_seg.py wrote (it holds config.yaml); a dataset or scan folder does not."""
    return (Path(path) / "config.yaml").is_file()


def fold_runs(path: str | Path) -> list[str]:
    """A cross-validation variant named without its fold, ``GRID/runs/unet-scse-s0``: the fold
    runs ``GRID/runs/unet-scse-f0-s0``, ``…-f1-s0``, … that compare.py --folds wrote; [] if none."""
    path = Path(path)
    stem, dash, seed = path.name.rpartition("-")
    if not dash or not seed.startswith("s") or not path.parent.is_dir():
        return []
    found = []
    for k in range(1000):
        fold = path.parent / f"{stem}-f{k}-{seed}"
        if not is_run_folder(fold):
            break
        found.append(str(fold))
    return found


def split_paths(paths: list[str]) -> tuple[list[str], list[str], str]:
    """RUN_DIR ... INPUT ... OUTPUT: the leading run folders, the inputs, the last path."""
    runs, used = [], 0
    for path in paths[:-1]:
        members = [path] if is_run_folder(path) else fold_runs(path)
        if not members:
            break
        runs += members
        used += 1
    inputs, output = paths[used:-1], paths[-1]
    if not runs:
        what = "not found" if not Path(paths[0]).exists() else "is not a run folder (no config.yaml)"
        raise UserError(f"run folder {paths[0]} {what}; start with the run folder(s) written by "
                        "train_seg.py: predict.py RUN_DIR [RUN_DIR ...] INPUT [INPUT ...] OUTPUT")
    if not inputs:
        raise UserError("no INPUT given: predict.py RUN_DIR [RUN_DIR ...] INPUT [INPUT ...] OUTPUT")
    return runs, inputs, output


if __name__ == "__main__":
    sys.exit(main())
