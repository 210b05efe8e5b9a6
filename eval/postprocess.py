#!/usr/bin/env python
"""Choose the postprocessing from held-out predictions, as nnU-Net does: for each structure,
keep only its largest connected component if that raised the mean Dice on the runs' held-out
volumes (pooled over the runs given, e.g. every fold of a cross-validation), and write the
choice to postprocessing.json in each run folder. eval/predict.py applies it from then on (and
says so); eval/evaluate.py applies it with --postprocess.

  python eval/postprocess.py RUN_DIR [RUN_DIR ...] [--checkpoint last.pt] [--overwrite]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scse_seg.errors import UserError  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="eval/postprocess.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                   help="run folder(s) trained on one dataset (e.g. the folds of a grid)")
    p.add_argument("--checkpoint", default="last.pt", help="last.pt (default) or best.pt")
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--overwrite", action="store_true", help="replace an existing postprocessing.json")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    try:
        from tqdm.auto import tqdm

        from scse_seg.evaluation.runs import open_run
        from scse_seg.fileio import check_can_write
        from scse_seg.postprocess import FILE, choose_classes, write_choice
        from scse_seg.runtime import show_progress

        runs = [open_run(r, checkpoint=args.checkpoint, device=args.device) for r in args.run_dirs]
        check_can_write([Path(r) / FILE for r in args.run_dirs], args.overwrite,
                        what="postprocessing.json")
        names = runs[0].dataset.class_names
        for r, d in zip(runs[1:], args.run_dirs[1:]):
            if r.dataset.class_names != names:
                raise UserError(f"{d} was trained on classes {r.dataset.class_names}, "
                                f"{args.run_dirs[0]} on {names}; pass runs of one dataset")
        jobs = [(r, v) for r in runs for v in r.val]

        def pairs():  # one volume in memory at a time
            for run, name in tqdm(jobs, desc="held-out volumes", unit="volume",
                                  disable=not show_progress(not args.no_progress)):
                vol = run.load(name)
                yield run.predict(vol.image, False, vol.affine), vol.label

        chosen, means = choose_classes(pairs(), len(names))
        for r in args.run_dirs:
            write_choice(r, chosen, means, list(names), len(jobs))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(f"{'structure':<24} {'Dice':>8} {'largest component':>18}")
    for c, (before, after) in means.items():
        print(f"{names[c]:<24} {before:8.4f} {after:18.4f}{'  <- kept' if c in chosen else ''}")
    kept = ", ".join(names[c] for c in chosen) or "none"
    print(f"keep the largest component of: {kept} (decided on {len(jobs)} held-out volumes); "
          f"written to {FILE} in {len(args.run_dirs)} run folder(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
