#!/usr/bin/env python
"""Evaluate one training run on its held-out volumes: per-structure Dice (and optionally HD95 /
average surface distance), mean +- std over volumes.

  python eval/evaluate.py runs/default-unet-scse-s0 [--data PATH] [--surface] [--tta]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scse_seg.errors import UserError  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="eval/evaluate.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="run folder written by train_seg.py")
    p.add_argument("--data", metavar="PATH", help="dataset folder (default: the one it trained on)")
    p.add_argument("--checkpoint", default="last.pt", help="last.pt (default) or best.pt")
    p.add_argument("--surface", action="store_true", help="also HD95 and average surface distance")
    p.add_argument("--tta", action="store_true",
                   help="test-time flip augmentation with the flips training used "
                        "(data.augment.flip); refused for runs trained without flips")
    p.add_argument("--save-predictions", metavar="DIR",
                   help="write predictions as NIfTI (original label values, source affine)")
    p.add_argument("--device", default=None)
    args = p.parse_args(argv)
    try:
        from scse_seg.evaluation.runs import evaluate_run, format_run_summary

        res = evaluate_run(args.run_dir, args.data, args.checkpoint, tta_flip=args.tta,
                           surface=args.surface, device=args.device,
                           save_dir=args.save_predictions)
        print(format_run_summary(res))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
