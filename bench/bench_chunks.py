"""How big the CPU fast path's chunks are (:data:`scse_seg.kernels.cpu_se.CHUNK_ELEMENTS_PER_THREAD`).

    python bench/bench_chunks.py --out bench/results/cpu-chunks

Two tables. *Cache*: one fp32 multiply ``torch.mul(a, b, out=o)`` at operand sizes from
L2-resident to map-sized, in ns per element (the same ``o`` every call, so no page faults).
*Chunk size*: forward+backward of scSE (max, add) on the fast path at the bench's largest map,
for each chunk size in elements per thread (0 = the whole map as one chunk, its scratch buffers
map-sized), beside the blocks' eager formulas and smp's ``SCSEModule``, interleaved over rounds
in one run.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import environment, markdown_table, write_csv  # noqa: E402

SIZES = (16384, 32768, 65536, 131072, 262144, 524288, 2097152)
CHUNKS = (0, 16384, 32768, 65536, 131072, 262144)
MODES = ("scse_max", "scse_add")


def _median_us(fn, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def cache_table(sizes=SIZES, iters: int = 50) -> list[dict]:
    rows = []
    for n in sizes:
        a, b, o = torch.randn(n), torch.randn(n), torch.empty(n)
        us = _median_us(lambda a=a, b=b, o=o: torch.mul(a, b, out=o), 5, iters)
        rows.append({"elements": n, "operands_MB": 3 * 4 * n / 1e6, "us": us,
                     "ns_per_element": 1e3 * us / n})
    return rows


def chunk_table(shape, layout: str, chunks=CHUNKS, rounds: int = 5, iters: int = 5,
                log=print) -> list[dict]:
    """Per mode: fb ms per chunk size, eager and smp, interleaved over ``rounds`` rounds."""
    from segmentation_models_pytorch.base.modules import SCSEModule

    from scse_seg.blocks import ConcurrentSE
    from scse_seg.kernels import cpu_se
    from scse_seg.kernels.gates import module_params

    torch.manual_seed(0)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(shape).contiguous(memory_format=fmt).requires_grad_()
    dy = torch.randn(shape).contiguous(memory_format=fmt)
    old = cpu_se.CHUNK_ELEMENTS_PER_THREAD
    rows = []
    try:
        for mode in MODES:
            block = ConcurrentSE(shape[1], 2, fusion=mode.removeprefix("scse_"), fused=False)
            params = module_params(block, mode)
            variants = {f"chunk {c}": (c, lambda m=mode, p=params: cpu_se.se_function(x, m, **p))
                        for c in chunks}
            variants["eager"] = (None, lambda b=block: b(x))
            if mode == "scse_add":
                smp = SCSEModule(shape[1], reduction=16)
                variants["smp SCSEModule"] = (None, lambda smp=smp: smp(x))
            times: dict[str, list[float]] = {k: [] for k in variants}
            for _ in range(rounds):
                for name, (chunk, fwd) in variants.items():
                    if chunk is not None:
                        cpu_se.CHUNK_ELEMENTS_PER_THREAD = chunk or x.numel()
                    times[name].append(_median_us(lambda f=fwd: f().backward(dy), 1, iters) / 1e3)
            base = statistics.median(times["chunk 0"])
            for name, ts in times.items():
                ms = statistics.median(ts)
                rows.append({"layout": layout, "mode": mode, "variant": name, "fb_ms": ms,
                             "vs_unchunked": ms / base})
                log(f"[chunks] {layout} {mode} {name}: {ms:.2f} ms")
    finally:
        cpu_se.CHUNK_ELEMENTS_PER_THREAD = old
    return rows


def main(argv=None, log=print) -> dict:
    import shlex

    p = argparse.ArgumentParser(prog="python bench/bench_chunks.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="2,64,128,128", help="map N,C,H,W (default: the bench's "
                                                           "largest, 2,64,128,128)")
    p.add_argument("--layout", nargs="+", default=["nchw", "channels_last"])
    p.add_argument("--chunks", nargs="+", type=int, default=list(CHUNKS))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--threads", type=int)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = tuple(int(s) for s in args.shape.split(","))
    cache = cache_table()
    chunks = [r for lay in args.layout
              for r in chunk_table(shape, lay, args.chunks, args.rounds, args.iters, log)]
    env = environment("cpu")
    report = (
        "# Chunk size of the CPU fast path\n\n"
        f"- command: `python bench/bench_chunks.py {shlex.join(argv or sys.argv[1:])}`\n"
        f"- environment: {', '.join(f'{k} {v}' for k, v in env.items())}\n"
        f"- {torch.get_num_threads()} torch threads, fp32\n\n"
        "## One multiply, ns per element, by operand size\n\n"
        + markdown_table(cache, [("elements", "elements", 0), ("operands_MB", "3 operands MB", 2),
                                 ("us", "µs", 1), ("ns_per_element", "ns / element", 3)])
        + f"\n\n## SE blocks forward+backward at {'×'.join(map(str, shape))} by chunk size\n\n"
        "Medians of per-round medians, the variants of a block interleaved; `vs unchunked`: "
        "over `chunk 0`.\n\n"
        + markdown_table(chunks, [("layout", "layout", -1), ("mode", "block", -1),
                                  ("variant", "variant", -1), ("fb_ms", "fwd+bwd ms", 2),
                                  ("vs_unchunked", "vs unchunked", 2)]) + "\n")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        write_csv(cache, args.out / "cache.csv")
        write_csv(chunks, args.out / "chunks.csv")
        (args.out / "report.md").write_text(report)
    log(report)
    return {"cache": cache, "chunks": chunks, "report": report}


if __name__ == "__main__":
    main()
