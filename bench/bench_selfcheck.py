"""What the fused kernels' self-check (``scse_seg.kernels.selfcheck``, issue 12) costs on a GPU.

For every mode x dims x dtype x layout, in one fresh process:

* ``first_s``: the first ``selfcheck.trusted`` call, as a block's first call makes it: it
  compiles the Triton kernels for the tiny check map (2 x 6 x 5 x 7 or 2 x 6 x 3 x 5 x 7) and
  compares them with the eager formulas (forward and every gradient);
* ``check_ms``: the check alone once the kernels are compiled (``measure_error`` again, median
  of 5): what the check adds beyond the kernels' own first compilation;
* ``err``: its measured relative error and the verdict (``trusted``);
* ``first_real_s``: the first forward+backward at a real map size afterwards (new tile sizes may
  compile again), for scale.

    python bench/bench_selfcheck.py --device cuda --out bench/results/gpu-selfcheck

CPU: only under ``TRITON_INTERPRET=1`` (the interpreter, not timed meaningfully).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import environment, markdown_table, write_csv  # noqa: E402

COLUMNS = [("mode", "mode", -1), ("dim", "dims", -1), ("dtype", "dtype", -1),
           ("layout", "layout", -1), ("trusted", "trusted", -1), ("err_s", "rel. error", -1),
           ("first_s", "first check s (compile + check)", 3), ("check_ms", "check alone ms", 2),
           ("first_real_s", "first real fwd+bwd s", 3)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(device: torch.device, modes, dims, dtypes, layouts, log=print) -> list[dict]:
    from scse_seg import kernels
    from scse_seg.kernels import ops, selfcheck
    from scse_seg.kernels.gates import acc_dtype, module_params

    rows = []
    for dim in dims:
        for dtype in dtypes:
            for layout in layouts:
                for mode in modes:
                    shape = (2, 6, 5, 7) if dim == 2 else (2, 6, 3, 5, 7)
                    like = torch.zeros(shape, device=device, dtype=dtype)
                    if layout == "channels_last":
                        like = like.contiguous(memory_format=torch.channels_last if dim == 2
                                               else torch.channels_last_3d)
                    fn = kernels.TRITON_FN or ops.se_function
                    _sync(device)
                    t0 = time.perf_counter()
                    ok = selfcheck.trusted(fn, like, mode)
                    _sync(device)
                    first = time.perf_counter() - t0
                    checks, err = [], float("nan")
                    for _ in range(5):
                        _sync(device)
                        t0 = time.perf_counter()
                        err = selfcheck.measure_error(fn, like, mode)
                        _sync(device)
                        checks.append(time.perf_counter() - t0)
                    real = (8, 64, 128, 128) if dim == 2 else (2, 32, 48, 48, 48)
                    if device.type == "cpu":  # the Triton interpreter: a smoke, not a timing
                        real = (2, 8, 9, 11) if dim == 2 else (2, 8, 3, 9, 11)
                    x = torch.randn(real, device=device).to(dtype)
                    if layout == "channels_last":
                        x = x.contiguous(memory_format=torch.channels_last if dim == 2
                                         else torch.channels_last_3d)
                    block = selfcheck.reference_block(mode, real[1], dim, acc_dtype(dtype), 0)
                    xr = x.requires_grad_()
                    ps = module_params(block.to(device), mode)
                    _sync(device)
                    t0 = time.perf_counter()
                    y = fn(xr, mode, **ps)
                    torch.autograd.grad(y, [xr, *ps.values()], torch.ones_like(y))
                    _sync(device)
                    row = dict(mode=mode, dim=f"{dim}D", dtype=str(dtype).replace("torch.", ""),
                               layout=layout, trusted=ok, err=err, err_s=f"{err:.1e}", first_s=first,
                               check_ms=statistics.median(checks) * 1e3,
                               first_real_s=time.perf_counter() - t0)
                    log(" | ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                   for k, v in row.items()))
                    rows.append(row)
    return rows


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--modes", nargs="+", default=["cse", "sse", "scse_max", "scse_add"])
    p.add_argument("--dims", nargs="+", type=int, default=[2, 3])
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"])
    p.add_argument("--layouts", nargs="+", default=["nchw", "channels_last"])
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    from scse_seg import kernels

    device = torch.device(args.device)
    if device.type == "cpu":
        kernels.TRITON_ON_CPU = True
    if not kernels.available():
        raise SystemExit("error: the Triton kernels are not available here (need triton and CUDA, "
                         "or TRITON_INTERPRET=1 on CPU)")
    dtypes = [{"fp32": torch.float32, "bf16": torch.bfloat16}[d] for d in args.dtypes]
    rows = measure(device, args.modes, args.dims, dtypes, args.layouts)
    env = "; ".join(f"{k}: {v}" for k, v in environment(args.device).items())
    report = ("# Fused-kernel self-check cost\n\n" + env
              + "\n\n"
              + "Command: `python bench/bench_selfcheck.py " + " ".join(argv or sys.argv[1:])
              + "`\n\n" + markdown_table(rows, COLUMNS) + "\n")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        write_csv(rows, args.out / "selfcheck.csv")
        (args.out / "report.md").write_text(report)
    print(report)
    return rows


if __name__ == "__main__":
    main()
