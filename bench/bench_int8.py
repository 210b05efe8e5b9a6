"""int8 vs fp32 for trained runs, side by side in one process (issue 30): mean Dice on each run's
held-out volumes and CPU inference seconds per volume for the eager PyTorch model, its fp32 ONNX
export and the two int8 exports (``conv``: SE gates float; ``all``), all through the same
preprocessing and 2D slice loop (scse_seg.inference), on the threads given.

    python bench/bench_int8.py RUN [RUN ...] --out bench/results/cpu-int8 [--threads 2] [--no-timing]

Writes OUT/int8.csv (one row per run x model) and OUT/report.md. ``--no-timing`` for a machine
that is running other work: Dice only, no time column.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _dice(pred, label, k):
    from scse_seg.metrics import dice_per_class

    return float(np.nanmean(dice_per_class(np.asarray(pred), label, k)[1:]))


def bench_run(run_dir: Path, threads: int, timing: bool, calibration_count: int) -> list[dict]:
    import torch

    from scse_seg.evaluation.runs import open_run
    from scse_seg.export import ONNX, export_run
    from scse_seg.quantize import INT8, OnnxNetwork

    torch.set_num_threads(threads)
    run = open_run(run_dir, device="cpu")
    loaded, k = run.loaded, len(run.loaded.class_names)
    volumes = [run.load(n) for n in run.val]
    models = {"pytorch fp32": loaded}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in ("conv", "all"):
            out = Path(tmp) / variant
            export_run(run_dir, out, int8=variant, calibration_count=calibration_count)
            if variant == "conv":
                models["onnx fp32"] = dataclasses.replace(
                    loaded, model=OnnxNetwork(out / ONNX, threads, loaded.size_multiple))
            models[f"onnx int8 ({variant})"] = dataclasses.replace(
                loaded, model=OnnxNetwork(out / INT8, threads, loaded.size_multiple))
        rows = []
        for name, m in models.items():
            m.predict_classes(volumes[0].image, False, volumes[0].affine)  # warm-up
            dice, seconds = [], []
            for vol in volumes:
                t0 = time.perf_counter()
                pred = m.predict_classes(vol.image, False, vol.affine)
                seconds.append(time.perf_counter() - t0)
                dice.append(_dice(pred, vol.label, k))
            rows.append(dict(run=run_dir.name, model=name, volumes=len(volumes), dice=np.mean(dice),
                             seconds_per_volume=np.median(seconds) if timing else float("nan")))
    base = rows[0]
    for r in rows:
        r["delta_points"] = 100 * (r["dice"] - base["dice"])
        r["speedup_vs_pytorch"] = (base["seconds_per_volume"] / r["seconds_per_volume"]) if timing \
            else float("nan")
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--calibration-count", type=int, default=256)
    p.add_argument("--no-timing", action="store_true")
    args = p.parse_args(argv)
    rows = []
    for r in args.runs:
        rows += bench_run(r, args.threads, not args.no_timing, args.calibration_count)
        print(f"{r}: done", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "int8.csv", "w", newline="") as f:
        w = csv.DictWriter(f, list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = [f"# int8 vs fp32 ({args.threads} threads{', Dice only' if args.no_timing else ''})", "",
             "| run | model | volumes | mean Dice | Δ vs PyTorch fp32 (points) | s/volume | speed-up |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        t = "—" if args.no_timing else f"{r['seconds_per_volume']:.2f}"
        x = "—" if args.no_timing else f"{r['speedup_vs_pytorch']:.2f}×"
        lines.append(f"| {r['run']} | {r['model']} | {r['volumes']} | {r['dice']:.4f} | "
                     f"{r['delta_points']:+.2f} | {t} | {x} |")
    (args.out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
