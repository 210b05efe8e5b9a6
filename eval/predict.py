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

from scse_seg.errors import UserError  # noqa: E402


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
        from scse_seg.predictor import load_model, plan_outputs, predict_files

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
