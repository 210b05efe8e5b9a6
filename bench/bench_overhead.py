"""What an attention costs a training step, as the median of paired per-round ratios (issue 12).

    python bench/run.py overhead --device cpu --layout nchw channels_last \\
        --out bench/results/cpu-overhead

The model table (``bench/run.py models``) times 2 x ``iters`` steps per variant and compares
medians; on a shared 2-core VM its two repetitions of one row differ by 20-37 %, so a 5 % target
cannot be read from it. Here every architecture's variants (``none``, scSE on the fast path,
optionally scSE eager) are built side by side and timed in many short rounds: each round runs
one step of every variant, in an order rotated from round to round (each variant takes every
position equally often), and a variant's overhead in that round is its step time over the
``none`` step of the same round. Drift of the machine (clocks, neighbours, the allocator) moves
both steps of a pair alike, so it cancels in the ratio. Reported: the median of the per-round
ratios minus 1, with a distribution-free 95 % confidence interval of that median (order
statistics of the binomial, no normality assumed), and in how many rounds the variant was
slower. smp's own ``Unet(decoder_attention_type="scse")`` against its ``None`` is measured the
same way in the same run, as the anchor.
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Sequence

import torch

from .bench_models import ANCHOR, ARCHS, ModelCase, StepRun, arch_label
from .common import LAYOUTS, Setting, Workload, environment, markdown_table, write_csv

COLUMNS = [("layout", "layout", -1), ("arch", "arch", -1), ("attention", "attention", -1),
           ("impl", "impl", -1), ("rounds", "rounds", 0), ("ms", "ms/step (median)", 1),
           ("overhead_pct", "overhead vs none % (median of rounds)", 1),
           ("ci_lo_pct", "95% CI low", 1), ("ci_hi_pct", "95% CI high", 1),
           ("slower_rounds", "rounds slower than none", -1)]


def median_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """Distribution-free confidence interval of the median: the order statistics
    ``(x_(k), x_(n-k+1))`` with the largest ``k`` such that ``P(Binomial(n, 1/2) <= k-1)`` is at
    most ``(1 - level) / 2`` (coverage at least ``level``). Needs n >= 6 at 95 %."""
    from scipy.stats import binom

    xs = sorted(values)
    n = len(xs)
    tail = (1 - level) / 2
    k = 0
    while binom.cdf(k, n, 0.5) <= tail:  # k counts the order statistics left out below
        k += 1
    if k == 0:
        raise ValueError(f"{n} values are too few for a {level:.0%} interval of the median")
    return xs[k - 1], xs[n - k]


def rotations(n_cases: int, rounds: int) -> list[list[int]]:
    """Round r runs the cases in the order r, r+1, ... (mod n): over n rounds each case takes
    every position once, so a position effect (the first step after another model's) is shared."""
    return [[(r + i) % n_cases for i in range(n_cases)] for r in range(rounds)]


def paired_rounds(step_fns: Sequence, rounds: int, timer) -> list[list[float]]:
    """``times[r][i]``: ms of one call of ``step_fns[i]`` in round ``r`` (rotated orders)."""
    times = [[0.0] * len(step_fns) for _ in range(rounds)]
    for r, order in enumerate(rotations(len(step_fns), rounds)):
        for i in order:
            times[r][i] = timer(step_fns[i])
    return times


def summarise(times: list[list[float]], base: int = 0) -> list[dict]:
    """Per case: median step ms, and the median / CI / sign count of its per-round ratio to
    case ``base`` (the ``none`` variant)."""
    out = []
    for i in range(len(times[0])):
        col = [t[i] for t in times]
        row = {"rounds": len(times), "ms": statistics.median(col)}
        if i != base:
            ratios = [t[i] / t[base] for t in times]
            lo, hi = median_ci(ratios)
            row.update(overhead_pct=100 * (statistics.median(ratios) - 1),
                       ci_lo_pct=100 * (lo - 1), ci_hi_pct=100 * (hi - 1),
                       slower_rounds=f"{sum(r > 1 for r in ratios)} of {len(ratios)}")
        out.append(row)
    return out


def groups(archs: Sequence[str], eager: bool, anchor: bool,
           settings: Sequence[tuple] = ()) -> list[list[ModelCase]]:
    """One group per architecture: ``none`` first (the base of the ratios), then scSE (and
    scSE with each of ``settings``, attention options such as (("reduction", 16),))."""
    out = []
    for arch in archs:
        cases = [ModelCase(arch, "none", "torch"), ModelCase(arch, "scse", "fast")]
        cases += [ModelCase(arch, "scse", "fast", tuple(opts)) for opts in settings]
        out.append(cases + ([ModelCase(arch, "scse", "torch")] if eager else []))
    if anchor:
        out.append([ModelCase(ANCHOR, "none", "smp"), ModelCase(ANCHOR, "scse", "smp")])
    return out


def _perf_timer(fn) -> float:
    import time

    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def label(case: ModelCase) -> str:
    """The attention column: ``scse``, or ``scse (reduction=16, fusion=add)``."""
    if not case.options:
        return case.attention
    return f"{case.attention} ({', '.join(f'{k}={v}' for k, v in case.options)})"


def parse_setting(text: str) -> tuple:
    """``"reduction=16,fusion=add"`` -> (("reduction", 16), ("fusion", "add"))."""
    import yaml

    out = []
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"--scse-setting: {item!r} is not KEY=VALUE (e.g. reduction=16)")
        out.append((key.strip(), yaml.safe_load(value.strip())))
    return tuple(out)


def run_overhead(layouts: Sequence[str], archs: Sequence[str], work: Workload, rounds: int,
                 warmup: int = 2, eager: bool = False, anchor: bool = True, device: str = "cpu",
                 log=print, on_row=None, settings: Sequence[tuple] = ()) -> list[dict]:
    rows: list[dict] = []
    for layout in layouts:
        setting = Setting(device, "fp32", layout)
        for cases in groups(archs, eager, anchor, settings):
            runs = [StepRun(c, setting, work) for c in cases]
            for run in runs:
                for _ in range(warmup):
                    run.step()
            times = paired_rounds([run.step for run in runs], rounds, _perf_timer)
            for case, stats in zip(cases, summarise(times)):
                row = {"layout": layout, "arch": arch_label(case.arch, work),
                       "attention": label(case), "impl": case.impl, **stats}
                rows.append(row)
                if "overhead_pct" in row:
                    log(f"[overhead] {layout} {row['arch']} {row['attention']} {case.impl}: "
                        f"{row['overhead_pct']:+.1f}% [{row['ci_lo_pct']:+.1f}, "
                        f"{row['ci_hi_pct']:+.1f}] over {row['rounds']} rounds")
            del runs
            if on_row:
                on_row(rows)
    return rows


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python bench/run.py overhead", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--layout", nargs="+", default=["nchw"], choices=LAYOUTS)
    p.add_argument("--archs", nargs="+", default=["unet", "densenet", "sdnet"],
                   choices=[a for a in ARCHS])
    p.add_argument("--rounds", type=int, default=20, help="paired rounds per architecture "
                                                         "(default 20; at least 6)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    p.add_argument("--eager", action="store_true", help="also time scSE's eager formulas")
    p.add_argument("--scse-setting", action="append", default=[], metavar="KEY=V[,KEY=V]",
                   help="also time scSE with these options, e.g. reduction=16,fusion=add "
                        "(smp's setting); repeatable")
    p.add_argument("--no-anchor", action="store_true", help="leave out smp's Unet anchor")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--classes", type=int, default=28)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--encoder", default="resnet34")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", type=Path, help="folder for overhead.md and overhead.csv")
    return p


def main(argv: Sequence[str] | None = None, log=print) -> dict:
    import shlex

    args = parser().parse_args(argv)
    if args.rounds < 6:
        raise SystemExit("--rounds must be at least 6 (a 95% interval of a median needs 6)")
    if torch.device(args.device).type == "cuda":
        raise SystemExit("overhead: CPU only for now (steps timed with time.perf_counter)")
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Workload(args.batch, args.size, args.classes, args.width, args.encoder)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    save = (lambda rows: write_csv(rows, args.out / "overhead.csv")) if args.out else None
    settings = [parse_setting(t) for t in args.scse_setting]
    rows = run_overhead(args.layout, args.archs, work, args.rounds, args.warmup, args.eager,
                        not args.no_anchor, args.device, log, save, settings)
    env = environment(args.device)
    report = (
        "# Training-step overhead of scSE, paired rounds (issue 12)\n\n"
        f"- command: `python bench/run.py overhead {shlex.join(argv or [])}`\n"
        f"- environment: {', '.join(f'{k} {v}' for k, v in env.items())}\n"
        f"- step: forward + cross-entropy + backward + AdamW, fp32, batch {args.batch} × 1 × "
        f"{args.size}², {args.classes} classes, paper architectures at width {args.width}, smp "
        f"encoder {args.encoder} (random init); {args.warmup} untimed steps per variant, then "
        f"{args.rounds} rounds of one step per variant in rotated order\n"
        "- impl: 'fast' = the blocks' default CPU path (scSE: `scse_seg.kernels.cpu_se`), "
        "'torch' = their eager formulas, 'smp' = smp's own Unet with/without its scSE\n"
        "- overhead: median over rounds of (step time / `none` step time of the same round) − 1;"
        " CI: distribution-free 95 % interval of that median\n\n"
        + markdown_table(rows, COLUMNS) + "\n")
    if args.out:
        (args.out / "overhead.md").write_text(report)
        log(f"wrote {args.out}/overhead.md")
    log(report)
    return {"rows": rows, "report": report}
