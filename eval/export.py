#!/usr/bin/env python
"""Export a trained run for deployment without scse_seg: OUT/model.pt2 (torch.export program,
``torch.export.load(path).module()(x)``), OUT/model.onnx when the onnx and onnxscript packages are
installed (pip install 'scse_seg[export]'), and OUT/preprocessing.json (normalisation, slice axis
or patch size, size multiple, label values, class names).

  python eval/export.py RUN_DIR OUT [--checkpoint last.pt|best.pt] [--no-onnx]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scse_seg.errors import UserError  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="eval/export.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", metavar="RUN_DIR", help="run folder written by train_seg.py")
    p.add_argument("out", metavar="OUT", help="new (or empty) folder for the exported model")
    p.add_argument("--checkpoint", default="last.pt", help="last.pt (default) or best.pt")
    p.add_argument("--no-onnx", action="store_true", help="skip ONNX even if it is available")
    p.add_argument("--int8", nargs="?", const="conv", choices=("conv", "all"),
                   help="also model_int8.onnx, statically quantized with ONNX Runtime: 'conv' "
                        "(default) quantizes convolutions and keeps the SE gates float, 'all' "
                        "quantizes every operator it can")
    p.add_argument("--calibration", metavar="PATH",
                   help="dataset whose training volumes calibrate --int8 (default: the run's own)")
    p.add_argument("--calibration-count", type=int, default=256, metavar="N",
                   help="network inputs (slices or patches) to calibrate on (default 256)")
    args = p.parse_args(argv)
    try:
        from scse_seg.export import export_run

        written = export_run(args.run_dir, args.out, args.checkpoint, onnx=not args.no_onnx,
                             int8=args.int8, calibration=args.calibration,
                             calibration_count=args.calibration_count)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    for what in ("program", "onnx", "int8", "preprocessing"):
        if what in written:
            print(f"wrote {written[what]}")
    if written["onnx_skipped"]:
        print(f"ONNX skipped: {written['onnx_skipped']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
