#!/usr/bin/env python
"""Compare attention variants against the vanilla network: train (or reuse) every
architecture x attention x seed with identical splits and schedule, evaluate on the held-out
volumes and write report.md, results.csv and PNG figures.

  python eval/compare.py --data ../shared/data/Task04_Hippocampus --archs unet,densenet,sdnet \\
      --attns none,cse,sse,scse --seeds 2 --out runs/compare
  python eval/compare.py --config configs/compare_hippocampus_cpu.yaml
  python eval/compare.py --data ../shared/data/LPBA40 --folds 4 --archs densenet \\
      --attns none,scse --sweep model.reduction=2,16 model.placement=encoder,decoder,all

An interrupted grid resumes: finished runs are reused, unfinished ones continue from last.pt.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scse_seg.errors import UserError  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eval/compare.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE",
                   help="YAML: a training config (may use base:) plus a 'compare:' section with "
                        "archs, attns, blocks, seeds, out, surface, tta")
    p.add_argument("--data", metavar="PATH", help="MSD-layout dataset (default: the built-in phantom)")
    p.add_argument("--archs", help="comma-separated architectures (default unet)")
    p.add_argument("--attns", help="comma-separated attentions (default none,cse,sse,scse)")
    p.add_argument("--blocks",
                   help="comma-separated conv blocks crossed with --attns (unet, sdnet); "
                        "'block+attn' pins one attention, e.g. double_conv,residual+cmpe_se1,"
                        "sk+none; the first is the baseline's block (default: each arch's own)")
    p.add_argument("--seeds", type=int, help="number of seeds per variant (default 1)")
    p.add_argument("--folds", type=int, metavar="K",
                   help="K-fold cross-validation over subjects: every variant is trained on every "
                        "fold and tested on all subjects (each held out once)")
    p.add_argument("--sweep", action="append", nargs="+", metavar="KEY=V1,V2",
                   help="also cross these config values, e.g. --sweep model.reduction=2,8,16 "
                        "model.fusion=max,add (attention-only keys reuse one vanilla run)")
    p.add_argument("--ablate", action="append", nargs="+", metavar="KEY=V1,V2",
                   help="an ablation study: besides the configured setting, change one key at a "
                        "time to each listed value, e.g. --ablate model.placement=encoder,decoder "
                        "model.fusion=add (not crossed; attention-only keys reuse one vanilla run)")
    p.add_argument("--shard", metavar="I/N",
                   help="train and evaluate only runs I, I+N, I+2N, ... of the grid, so N "
                        "processes (or machines sharing the folder) split it; then run the "
                        "command without --shard to write the report from the finished runs")
    p.add_argument("--executor", choices=("local", "slurm"),
                   help="run every unfinished run as its own submitit job (pip install -e "
                        "\".[cluster]\"): 'slurm' as a job array, 'local' as processes on this "
                        "machine; the command waits, then writes the report (default: in this process)")
    p.add_argument("--parallel", type=int, metavar="N",
                   help="with --executor: at most N jobs at once (local default 1)")
    p.add_argument("--slurm", nargs="+", metavar="KEY=VALUE", default=[],
                   help="SLURM job parameters over the config's compare.slurm, e.g. partition=gpu "
                        "gpus_per_node=1 cpus_per_task=8 mem_gb=32 timeout_min=240")
    p.add_argument("--status", action="store_true",
                   help="print which runs of the grid are done, submitted, failed, interrupted or "
                        "not started, and exit")
    p.add_argument("--epochs", type=int, help="training epochs of every run")
    p.add_argument("--out", metavar="DIR", help="output folder (default runs/compare)")
    p.add_argument("--surface", action="store_true",
                   help="also HD95, average surface distance and normalised surface Dice (NSD)")
    p.add_argument("--nsd-tolerance", type=float, metavar="MM",
                   help="the NSD's tolerance in mm (default 1)")
    p.add_argument("--test", metavar="PATH",
                   help="also score every variant on this labelled test set (imagesTs/+labelsTs/ "
                        "or another dataset with the same classes; under --folds: the ensemble "
                        "of each variant's folds) and write the same report into OUT/test-NAME")
    p.add_argument("--tta", action="store_true",
                   help="test-time flip augmentation with the flips training used "
                        "(data.augment.flip); refused for runs trained without flips")
    p.add_argument("--device", help="auto, cpu or cuda")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="training config overrides applied to every run, e.g. model.width=16")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from scse_seg.grid import GridSpec, run_grid

        spec = GridSpec.from_args(args)
        if args.status:
            from scse_seg.cluster import grid_status

            states = grid_status(spec)
            for run, state in states:
                print(f"{state:12s} {run}")
            counts = {s: sum(st == s for _, st in states) for s in dict.fromkeys(st for _, st in states)}
            print(", ".join(f"{n} {s}" for s, n in counts.items()))
            return 0
        if args.executor:
            from scse_seg.cluster import run_grid_with
            from scse_seg.config import parse_override

            slurm = dict(spec.slurm or {})
            for item in args.slurm:
                if "=" not in item:
                    raise UserError(f"--slurm {item!r} must look like KEY=VALUE, e.g. partition=gpu")
                slurm.update(parse_override(item))
            out = run_grid_with(spec, args.executor, args.parallel, slurm)
        elif args.parallel or args.slurm:
            raise UserError("--parallel and --slurm go with --executor local|slurm")
        else:
            out = run_grid(spec)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume the grid", file=sys.stderr)
        return 130
    if spec.shard:
        print(f"shard {spec.shard[0]}/{spec.shard[1]} done; when every shard is, run the command "
              "without --shard to write the report")
    else:
        print(f"report: {out / 'report.md'}")
        if spec.test is not None:
            from scse_seg.grid import test_folder

            print(f"report on the test set: {test_folder(spec) / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
