"""The map sizes from which the SE fast path beats the eager formulas on CPU, read off a block
table (``bench/run.py blocks``): ``scse_seg.kernels.fast_se.MIN_ELEMENTS`` is filled from this.

Rule, per mode: the smallest measured map (elements, N*C*spatial) such that at it and at every
larger measured map, in every layout and every table given, the fast path's forward+backward
median is no slower than the eager formulas'; maps are compared by element count, so a shape that
loses (in any table: give several runs to be robust to noise) pushes the threshold above it. A
mode that wins at every measured map gets 0 (the fast path at every size). Printed as a table
and as the dict to paste.

    python bench/thresholds.py bench/results/cpu-ops/blocks.csv bench/results/cpu-ops-rerun/blocks.csv
"""
from __future__ import annotations

import argparse
import csv
import math
from collections import defaultdict

MODES = ("cse", "sse", "scse_max", "scse_add")


def numel(shape: str) -> int:
    return math.prod(int(v) for v in shape.replace("×", "x").split("x"))


def thresholds(rows: list[dict]) -> tuple[dict[str, int], list[tuple]]:
    """(mode -> threshold in elements, rows of (mode, elements, shape, layout, fast/eager))."""
    t = defaultdict(dict)
    for r in rows:
        if r["variant"] in MODES and r["impl"] in ("torch", "fast") and r["fb_us"]:
            t[(r["variant"], r["shape"], r["layout"], r["table"])][r["impl"]] = float(r["fb_us"])
    table = sorted((mode, numel(shape), shape, layout, d["fast"] / d["torch"])
                   for (mode, shape, layout, _), d in t.items() if {"fast", "torch"} <= d.keys())
    out = {}
    for mode in MODES:
        sizes = sorted({n for m, n, *_ in table if m == mode})
        losing = [n for m, n, _, _, ratio in table if m == mode and ratio > 1.0]
        if not losing:
            out[mode] = 0
        else:
            above = [n for n in sizes if n > max(losing)]
            out[mode] = min(above) if above else max(sizes) + 1
    return out, table


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("csv", nargs="+", help="blocks.csv of bench/run.py blocks (fast and torch "
                   "rows); several: a map must win in each")
    args = p.parse_args(argv)
    rows = []
    for i, path in enumerate(args.csv):
        with open(path, newline="") as f:
            rows += [dict(r, table=i) for r in csv.DictReader(f)]
    found, table = thresholds(rows)
    print("| block | map | elements | layout | fast / eager fwd+bwd |\n|---|---|---:|---|---:|")
    for mode, n, shape, layout, ratio in table:
        print(f"| {mode} | {shape} | {n} | {layout} | {ratio:.2f} |")
    print("\nfast path from (elements):", found)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
