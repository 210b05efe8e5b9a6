#!/usr/bin/env python
"""Inspect what every SE block of a trained run does: the cSE and sSE gates it learned over
labelled volumes, and the Dice lost when one gate is replaced by its mean or the block removed
(SENet's analysis of excitation, Hu et al. TPAMI 2019, section 7.2, for segmentation).

  python eval/gates.py RUN_DIR --out DIR                 # its held-out volumes
  python eval/gates.py RUN_DIR --test PATH --out DIR     # a separate labelled set

DIR gets summary.md (one row per block, findings), blocks.csv, sse_structures.csv,
knockout.csv and the figures gates.png, knockout.png, sse_structures.png, sse_overlay.png.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scse_seg.errors import UserError  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="eval/gates.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", metavar="RUN_DIR", help="run folder written by train_seg.py")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the report")
    p.add_argument("--data", metavar="PATH", help="dataset folder the run was trained on (default: "
                   "the one in its split.json); its held-out volumes are inspected")
    p.add_argument("--test", metavar="PATH", help="inspect on every labelled volume of this test set "
                   "instead (imagesTs/+labelsTs/, or another dataset's imagesTr/+labelsTr/)")
    p.add_argument("--checkpoint", default="last.pt", help="last.pt (default) or best.pt")
    p.add_argument("--max-volumes", type=int, metavar="N", help="only the first N volumes")
    p.add_argument("--no-knockout", action="store_true",
                   help="gate statistics only (a knock-out pass per gate and block is the slow part)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier report in DIR")
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    try:
        if args.data and args.test:
            raise UserError("pass either --data (the run's own dataset: its held-out volumes) or "
                            "--test (a separate labelled test set), not both")
        if args.max_volumes is not None and args.max_volumes < 1:
            raise UserError(f"--max-volumes must be at least 1, got {args.max_volumes}")
        from scse_seg.evaluation.gates import GATE_FILES, inspect_gates, run_volumes, write_gate_report
        from scse_seg.evaluation.runs import attention_setting, checkpoint_identity, open_run
        from scse_seg.fileio import check_can_write
        from scse_seg.runtime import show_progress

        out = Path(args.out)
        check_can_write([out / f for f in GATE_FILES], args.overwrite, what="gate report")
        run = open_run(args.run_dir, args.data, args.checkpoint, args.device, args.test)
        m = run.cfg.model
        setting = attention_setting(m)
        from scse_seg.evaluation.gates import gate_sites

        if not gate_sites(run.model):
            raise UserError(f"{args.run_dir} was trained with attention {m.attention!r}, which has no "
                            "cSE or sSE gate to inspect; pass a run trained with cse, sse or scSE "
                            "(or a model given them by add_attention)")
        from scse_seg.data import AXIS_INDEX

        volumes = run_volumes(run, args.max_volumes)
        report = inspect_gates(run.model, volumes, list(run.ckpt["class_names"]), m.dim,
                               AXIS_INDEX[run.cfg.data.axis], run.loaded.size_multiple,
                               knockout=not args.no_knockout, device=run.device,
                               progress=show_progress(not args.no_progress))
        about = (f"{m.arch}, {m.attention}" + (f" ({setting})" if setting else "") +
                 f"; {checkpoint_identity(run.loaded)}; {run.evaluated_on}: "
                 f"{', '.join(report.volumes)}.")
        heading = f"Gates of {Path(args.run_dir).name}"
        write_gate_report(report, out, heading, about)
        print(f"{len(report.blocks)} blocks inspected on {len(volumes)} volume"
              f"{'s' * (len(volumes) != 1)} (mean Dice "
              f"{report.dice:.4f}); report: {out / 'summary.md'}")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
