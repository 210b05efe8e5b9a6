"""Benchmark command line: one command, one report.

    python bench/run.py all --device cuda --dtype bf16 fp32 --layout nchw channels_last \\
        --out bench/results/gpu
    python bench/run.py models --device cpu --out bench/results/cpu
    python bench/run.py blocks --device cuda --dtype bf16
    python bench/run.py family --device cpu --out bench/results/cpu   # issue 14's blocks
    python bench/run.py overhead --device cpu --layout nchw channels_last  # paired step overhead

Writes ``report.md`` (settings, environment and the tables) and ``models.csv`` / ``blocks.csv``
into ``--out``; the report is printed as well. See bench/README.md.
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import shlex
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench import bench_blocks, bench_models, common  # noqa: E402

# Per device: models (batch, size, warmup, iters), blocks (warmup, iters), copy size for the
# bandwidth. CPU: small enough for the whole report in a few minutes on 2 cores, paper width.
DEFAULTS = {
    "cuda": dict(batch=16, size=256, warmup=5, iters=10, block_warmup=10, block_iters=30,
                 copy_mib=1024),
    "cpu": dict(batch=2, size=128, warmup=1, iters=8, block_warmup=2, block_iters=10,
                copy_mib=256),
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python bench/run.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", nargs="?", default="all", choices=("all", "models", "blocks"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda[:i] (default: cuda when available)")
    p.add_argument("--dtype", nargs="+", default=["fp32"], choices=sorted(common.DTYPES),
                   help="fp32 and/or bf16 (autocast, fp32 parameters); default fp32")
    p.add_argument("--layout", nargs="+", default=["nchw"], choices=common.LAYOUTS,
                   help="default nchw")
    p.add_argument("--compile", nargs="?", const="on", default="off", choices=("off", "on", "both"),
                   help="torch.compile the model / block: off (default), on (bare --compile), both")
    p.add_argument("--fused", action=argparse.BooleanOptionalAction, default=None,
                   help="CUDA: time every attention both eager and with the fused Triton kernels "
                        "(default on CUDA). CPU: with TRITON_INTERPRET=1, check the kernels "
                        "against eager in the block table (correctness smoke, not timed)")
    p.add_argument("--batch", type=int, help="default 16 on CUDA, 2 on CPU")
    p.add_argument("--size", type=int, help="slice size, divisible by 32; default 256 on CUDA, "
                                            "128 on CPU")
    p.add_argument("--classes", type=int, default=28, help="output classes (default 28)")
    p.add_argument("--width", type=int, default=64, help="paper archs' width (default 64, paper)")
    p.add_argument("--encoder", default="resnet34", help="smp encoder of smp_unet and of the anchor "
                                                       "(default resnet34)")
    p.add_argument("--archs", nargs="+", default=list(bench_models.ARCHS),
                   choices=bench_models.ARCHS, help="model table architectures")
    p.add_argument("--attentions", nargs="+", default=list(bench_models.ATTENTIONS),
                   choices=bench_models.ATTENTIONS)
    p.add_argument("--no-anchor", action="store_true", help="leave out smp's Unet anchor rows")
    p.add_argument("--block-archs", nargs="+", default=list(bench_blocks.BLOCK_ARCHS),
                   choices=bench_models.ARCHS, help="architectures whose map shapes the block "
                                                    "table uses (default the three paper archs)")
    p.add_argument("--variants", nargs="+", default=list(bench_blocks.VARIANTS),
                   choices=bench_blocks.VARIANTS, help="blocks of the block table")
    for name in ("warmup", "iters", "block-warmup", "block-iters"):
        p.add_argument(f"--{name}", type=int, help="untimed / timed calls per repetition "
                                                   "(2 repetitions); device-dependent default")
    p.add_argument("--copy-mib", type=int, help="size of the bandwidth copy (default 1024 on CUDA, "
                                                "256 on CPU)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", type=Path, help="folder for report.md, models.csv, blocks.csv")
    return p


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill device-dependent defaults; refuse what cannot run."""
    kind = torch.device(args.device).type
    if kind not in DEFAULTS:
        raise SystemExit(f"--device must be cpu or cuda, got {args.device!r}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    for k, v in DEFAULTS[kind].items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    if args.size % 32:
        raise SystemExit(f"--size must be divisible by 32, got {args.size}")
    from scse_seg import kernels

    if args.fused is None:
        args.fused = kind == "cuda" and kernels.available()
    if args.fused and not kernels.available():
        raise SystemExit("--fused: the Triton kernels are not available here (need triton and "
                         "CUDA, or TRITON_INTERPRET=1 on CPU)")
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def settings(args) -> list[common.Setting]:
    compile_modes = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    return [common.Setting(args.device, d, lay, c)
            for d, lay, c in itertools.product(args.dtype, args.layout, compile_modes)]


def workload(args) -> common.Workload:
    return common.Workload(args.batch, args.size, args.classes, args.width, args.encoder)


def header(args, argv, bandwidth=None) -> str:
    env = common.environment(args.device)
    cuda = torch.device(args.device).type == "cuda"
    lines = [
        f"Command: `python bench/run.py {shlex.join(argv)}`",
        f"Date (UTC): {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M}",
        "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()),
        f"Input: batch {args.batch} × 1 × {args.size} × {args.size}, {args.classes} classes; "
        f"paper architectures at width {args.width}" + (" (the paper's)" if args.width == 64 else
                                                        " (reduced from the paper's 64)")
        + f"; smp encoder {args.encoder}, random init",
        f"Timing: {'CUDA events' if cuda else 'time.perf_counter'}; models {max(1, args.warmup)} "
        f"warm-up + 2 × {args.iters} timed steps, the variants of an architecture interleaved "
        "(rep 1 of each in turn, then rep 2 of each in reverse order); blocks "
        f"{args.block_warmup} warm-up + 2 × {args.block_iters} timed calls; figures are medians; "
        "'rep 1' / 'rep 2' are the two repetitions, 'median' is over both",
        "Peak memory (MiB): parameters + batch + peak growth over the warm-up steps (gradients, "
        f"AdamW state, activations); growth by {common.PeakMemory.source(args.device)}",
    ]
    if bandwidth is not None:
        lines.append(f"Copy bandwidth (floor of the block table): {bandwidth / 1e9:.1f} GB/s "
                     "(read + write of a large device copy)")
    if args.fused and cuda:
        fused = "timed as impl 'fused' beside 'torch' (the blocks' eager formulas)"
    elif args.fused:
        fused = "Triton interpreter on CPU: checked against the eager formulas, not timed"
    else:
        fused = "off" + ("" if cuda else " (CPU)")
    lines.append("Fused SE kernels: " + fused)

    lines.append("Impl: 'torch' = the blocks' plain eager formulas (`fused=False`); 'fast' = the "
                 "blocks' CPU fast path (scSE: `scse_seg.kernels.cpu_se`); 'smp' = smp's own")
    return "\n".join(f"- {line}" for line in lines)


def main(argv: list[str] | None = None, log=print) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["family"]:  # the SE family's successors: own options, see bench_family
        from bench import bench_family

        return bench_family.main(argv[1:], log=log)
    if argv[:1] == ["overhead"]:  # scSE's step overhead from paired rounds: see bench_overhead
        from bench import bench_overhead

        return bench_overhead.main(argv[1:], log=log)
    args = resolve(parser().parse_args(argv))
    grid = settings(args)
    cuda = torch.device(args.device).type == "cuda"
    result: dict = {"models": [], "blocks": []}
    sections = []
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)

    def saver(name):  # rewrite the CSV after every row: a run cut short keeps what it measured
        return (lambda rows: common.write_csv(rows, args.out / f"{name}.csv")) if args.out else None

    if args.what in ("all", "models"):
        # no 'fast' model rows on CUDA: there the blocks' fast path is the Triton kernels
        # (the 'fused' rows)
        cases = bench_models.model_cases(args.archs, args.attentions, fused=args.fused and cuda,
                                         anchor=not args.no_anchor, fast=not cuda)
        result["models"] = bench_models.run_models(grid, cases, workload(args), args.warmup,
                                                   args.iters, log=log, on_row=saver("models"))
        sections.append("## Training step (forward + backward + AdamW)\n\n"
                        + common.sectioned_markdown(result["models"], bench_models.COLUMNS, grid))
    bandwidth = None
    if args.what in ("all", "blocks"):
        bandwidth, _ = common.copy_bandwidth(args.device, args.copy_mib * 2 ** 20)
        result["blocks"] = bench_blocks.run_blocks(
            grid, workload(args), args.block_archs, args.variants, bandwidth,
            fused=args.fused and cuda, check_fused=args.fused, warmup=args.block_warmup,
            iters=args.block_iters, log=log, on_row=saver("blocks"))
        sections.append(
            "## SE blocks at the architectures' map shapes (time vs memory-traffic floor)\n\n"
            f"Floor: forward {bench_blocks.FWD_PASSES} map passes, forward+backward "
            f"{bench_blocks.FWD_PASSES + bench_blocks.BWD_PASSES}, at the copy bandwidth. "
            "`smp_scse` is smp's `SCSEModule` (reduction 16, additive); ours use the blocks' "
            "default reduction, 16 (2 in reports made before issue 27).\n\n"
            + common.sectioned_markdown(result["blocks"], bench_blocks.COLUMNS, grid))
    report = "# Benchmark\n\n" + header(args, argv, bandwidth) + "\n\n" + "\n\n".join(sections) + "\n"
    result["report"] = report
    if args.out:
        (args.out / "report.md").write_text(report)
        log(f"wrote {args.out}/report.md")
    log(report)
    return result


if __name__ == "__main__":
    main()
