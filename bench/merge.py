"""Merge the results of a benchmark run split into parts (each part one ``bench/run.py`` command
with its own ``--out``, e.g. one per layout or architecture, so that no single command holds the
machine for long) into one folder: the CSVs concatenated, the parts' reports one after another.

    python bench/merge.py OUT PART_DIR [PART_DIR ...]
"""
from __future__ import annotations

import csv
import sys
from pathlib import Path


def merge(out: Path, parts: list[Path]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name in ("models", "blocks"):
        rows, keys = [], []
        for part in parts:
            path = part / f"{name}.csv"
            if path.is_file():
                with path.open(newline="") as f:
                    for r in csv.DictReader(f):
                        keys += [k for k in r if k not in keys]
                        rows.append(r)
        if rows:
            with (out / f"{name}.csv").open("w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=keys)
                w.writeheader()
                w.writerows(rows)
    reports = [(p / "report.md").read_text().replace("# Benchmark\n", f"# Benchmark, part {i + 1}\n", 1)
               for i, p in enumerate(parts) if (p / "report.md").is_file()]
    (out / "report.md").write_text("\n\n".join(reports))


if __name__ == "__main__":
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    merge(Path(sys.argv[1]), [Path(p) for p in sys.argv[2:]])
