"""Which CPU training settings are fastest and still reproducible (issue 15, item 6)?

    python bench/bench_cpu_defaults.py --out bench/results/cpu-defaults

For each paper architecture with scSE (the default run's model: width 16, a batch of 16
one-channel 64² slices, 4 classes), a training step (forward + cross-entropy + backward + AdamW,
as bench/run.py models) is timed under every combination of
- ``threads``: ``torch.set_num_threads`` 1 or 2 (this machine has 2 cores),
- ``layout``: NCHW or channels_last (model and batch),
- ``deterministic``: ``torch.use_deterministic_algorithms`` off or on (warn_only, as the trainer).
The eight settings of one architecture are timed interleaved (ABC… then …CBA, so a slow drift of
the machine hits them alike). ``reproducible``: the same setting run twice from the same seed for
``repro_steps`` steps gives bit-identical weights; ``max |Δw| vs default``: how far those weights
are from the library's current CPU default (all threads, NCHW, deterministic on), which tells
whether a setting changes the numbers a run produces. Writes report.md and cpu_defaults.csv.
"""
from __future__ import annotations

import argparse
import itertools
import shlex
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.bench_models import ModelCase, StepRun  # noqa: E402
from bench.common import Setting, Timing, environment, markdown_table, measure, write_csv  # noqa: E402

ARCHS = ("unet", "densenet", "sdnet")
COLUMNS = [("arch", "arch", -1), ("threads", "threads", 0), ("layout", "layout", -1),
           ("deterministic", "deterministic", -1), ("ms_rep1", "ms/step rep 1", 1),
           ("ms_rep2", "ms/step rep 2", 1), ("ms", "ms/step (median)", 1),
           ("slices_per_s", "slices/s", 1), ("speedup", "speed vs default", 2),
           ("reproducible", "reproducible", -1), ("max_dw", "max abs Δw vs default", -1)]


class Knobs:
    """Apply one (threads, deterministic) setting for the duration of a ``with``."""

    def __init__(self, threads: int, deterministic: bool):
        self.threads, self.deterministic = threads, deterministic

    def __enter__(self):
        self._threads = torch.get_num_threads()
        self._det = torch.are_deterministic_algorithms_enabled()
        torch.set_num_threads(self.threads)
        torch.use_deterministic_algorithms(self.deterministic, warn_only=True)

    def __exit__(self, *exc):
        torch.set_num_threads(self._threads)
        torch.use_deterministic_algorithms(self._det, warn_only=True)


def weights_after(arch: str, setting: Setting, work, knobs: Knobs, steps: int) -> torch.Tensor:
    """All parameters, flattened, after ``steps`` steps from seed 0 (StepRun seeds itself)."""
    with knobs:
        run = StepRun(ModelCase(arch, "scse", "fast"), setting, work)
        for _ in range(steps):
            run.step()
        return torch.cat([p.detach().reshape(-1).clone() for p in run.model.parameters()])


def bench_arch(arch: str, args, work) -> list[dict]:
    combos = list(itertools.product(args.threads, ("nchw", "channels_last"), (False, True)))
    runs = []
    for threads, layout, det in combos:
        knobs, setting = Knobs(threads, det), Setting("cpu", "fp32", layout)
        with knobs:
            run = StepRun(ModelCase(arch, "scse", "fast"), setting, work)
            for _ in range(args.warmup):
                run.step()
        runs.append((knobs, run))
    reps = [[] for _ in runs]
    order = list(range(len(runs)))
    for seq in (order, order[::-1]):  # interleaved: a linear drift cancels out
        for i in seq:
            knobs, run = runs[i]
            with knobs:
                reps[i] += measure(run.step, "cpu", 0, args.iters, reps=1).reps
    default = weights_after(arch, Setting("cpu", "fp32", "nchw"), work,
                            Knobs(max(args.threads), True), args.repro_steps)
    rows = []
    for (threads, layout, det), rep in zip(combos, reps):
        t = Timing(rep)
        knobs, setting = Knobs(threads, det), Setting("cpu", "fp32", layout)
        w1 = weights_after(arch, setting, work, knobs, args.repro_steps)
        w2 = weights_after(arch, setting, work, knobs, args.repro_steps)
        rows.append(dict(arch=arch, threads=threads, layout=layout,
                         deterministic="on" if det else "off", ms_rep1=t.medians[0],
                         ms_rep2=t.medians[1], ms=t.median,
                         slices_per_s=work.batch / (t.median * 1e-3),
                         reproducible="yes" if torch.equal(w1, w2) else "NO",
                         max_dw=f"{(w1 - default).abs().max().item():.1e}"))
        print(f"[cpu-defaults] {arch} threads={threads} {layout} deterministic={det}: "
              f"{t.median:.1f} ms/step ({t.medians[0]:.1f} / {t.medians[1]:.1f})", flush=True)
    base = next(r["ms"] for r in rows if r["threads"] == max(args.threads)
                and r["layout"] == "nchw" and r["deterministic"] == "on")
    for r in rows:
        r["speedup"] = base / r["ms"]
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python bench/bench_cpu_defaults.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", nargs="+", default=list(ARCHS), choices=ARCHS)
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--classes", type=int, default=4)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5, help="timed steps per repetition (2 reps)")
    p.add_argument("--repro-steps", type=int, default=3)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    from bench.common import Workload

    work = Workload(args.batch, args.size, args.classes, args.width)
    rows = []
    for arch in args.archs:
        rows += bench_arch(arch, args, work)
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            write_csv(rows, args.out / "cpu_defaults.csv")
    env = environment("cpu")
    report = "\n".join([
        "# CPU training settings: speed and reproducibility",
        "",
        f"Command: `python bench/bench_cpu_defaults.py {shlex.join(argv or sys.argv[1:])}`",
        f"Machine: {env}",
        f"Step: forward + cross-entropy + backward + AdamW, batch {args.batch} x 1 x "
        f"{args.size}², {args.classes} classes, width {args.width}, scSE (fast path); "
        f"{args.iters} steps x 2 interleaved repetitions per setting. 'speed vs default' is "
        f"relative to threads={max(args.threads)}, NCHW, deterministic on (the CPU default).",
        "",
        markdown_table(rows, COLUMNS),
        "",
    ])
    print(report)
    if args.out:
        (args.out / "report.md").write_text(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
