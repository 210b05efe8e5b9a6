#!/usr/bin/env python
"""Evaluate one training run: per-structure Dice (and optionally HD95 / average surface
distance), mean +- std over volumes, printed as a table and written per volume and structure
as CSV (default: in the run folder).

  python eval/evaluate.py RUN_DIR [--data PATH] [--surface] [--tta]   # its held-out volumes
  python eval/evaluate.py RUN_DIR --test PATH                         # a separate labelled set
  python eval/evaluate.py RUN_DIR RUN_DIR ... --test PATH             # an ensemble on it

--test PATH: a dataset with imagesTs/ + labelsTs/ (its test volumes), or another MSD/nnU-Net
dataset with the same classes (every imagesTr/labelsTr pair).
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scse_seg.errors import UserError  # noqa: E402


def default_csv(run_dir: str, test: str | None, checkpoint: str, postprocess: bool = False,
                members: int = 1) -> Path:
    """RUN_DIR/evaluation-heldout-last.csv, or evaluation-test-<dataset>-last.csv (with
    ``-postprocessed`` before .csv for --postprocess)."""
    which = "heldout"
    if test is not None:
        t = Path(os.path.abspath(test))  # the name as given, not a symlink's target
        t = t.parent if t.name in ("imagesTs", "labelsTs") else t
        which = "test-" + re.sub(r"[^A-Za-z0-9_.-]+", "_", t.name)
    tail = ("-postprocessed" if postprocess else "") + (f"-ensemble{members}" if members > 1 else "")
    return Path(run_dir) / f"evaluation-{which}-{Path(checkpoint).stem}{tail}.csv"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="eval/evaluate.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                   help="run folder written by train_seg.py; several (with --test): scored as one "
                        "ensemble, their softmax averaged (e.g. the folds of a cross-validation)")
    p.add_argument("--data", metavar="PATH", help="dataset folder the run was trained on "
                   "(default: the one in its split.json); its held-out volumes are evaluated")
    p.add_argument("--test", metavar="PATH", help="evaluate every labelled volume of this test set "
                   "instead (imagesTs/+labelsTs/, or another dataset's imagesTr/+labelsTr/)")
    p.add_argument("--checkpoint", default="last.pt", help="last.pt (default) or best.pt")
    p.add_argument("--surface", action="store_true",
                   help="also HD95, average surface distance and normalised surface Dice (NSD)")
    p.add_argument("--nsd-tolerance", type=float, metavar="MM",
                   help="the NSD's tolerance in mm (default 1)")
    p.add_argument("--postprocess", action="store_true",
                   help="apply the run's postprocessing.json (chosen by eval/postprocess.py)")
    p.add_argument("--tta", action="store_true",
                   help="test-time flip augmentation with the flips training used "
                        "(data.augment.flip); refused for runs trained without flips")
    p.add_argument("--save-predictions", metavar="DIR",
                   help="write predictions as NIfTI (original label values, source affine); "
                        "never into a dataset's folders or over existing files without --overwrite")
    p.add_argument("--overwrite", action="store_true",
                   help="--save-predictions may replace existing files")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--csv", metavar="FILE", help="per-volume, per-structure results (default: "
                   "RUN_DIR/evaluation-{heldout|test-NAME}-CHECKPOINT.csv)")
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda or cuda:N")
    args = p.parse_args(argv)
    try:
        if args.data and args.test:
            raise UserError("pass either --data (the run's own dataset: its held-out volumes) or "
                            "--test (a separate labelled test set), not both")
        from scse_seg.evaluation.compare_report import write_results_csv
        from scse_seg.evaluation.runs import evaluate_run, format_run_summary
        from scse_seg.fileio import check_writable_folder

        csv_path = Path(args.csv) if args.csv else \
            default_csv(args.run_dirs[0], args.test, args.checkpoint, args.postprocess,
                        len(args.run_dirs))
        if csv_path.is_dir():
            raise UserError(f"--csv {csv_path} is a folder; pass a file name")
        if len(args.run_dirs) > 1 and not args.test:
            raise UserError("several RUN_DIRs are scored together only on a test set: pass --test "
                            "PATH (their held-out volumes differ)")
        if len(args.run_dirs) > 1 and args.postprocess:
            raise UserError("--postprocess scores one run; pass a single RUN_DIR")
        if Path(args.run_dirs[0]).is_dir() or args.csv:
            check_writable_folder(csv_path.parent, "the results CSV")
        from scse_seg.metrics import check_nsd_tolerance

        tolerance = check_nsd_tolerance(1.0 if args.nsd_tolerance is None else args.nsd_tolerance)
        runs = args.run_dirs[0] if len(args.run_dirs) == 1 else args.run_dirs
        res = evaluate_run(runs, args.data, args.checkpoint, tta_flip=args.tta,
                           nsd_tolerance=tolerance, postprocess=args.postprocess,
                           surface=args.surface, device=args.device,
                           save_dir=args.save_predictions, test_path=args.test,
                           progress=not args.no_progress, overwrite=args.overwrite)
        try:
            write_results_csv([res], csv_path)
        except OSError as e:
            raise UserError(f"could not write {csv_path} ({e.strerror or e}); pass --csv FILE") from None
        print(format_run_summary(res))
        print(f"per-volume, per-structure results: {csv_path}")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
