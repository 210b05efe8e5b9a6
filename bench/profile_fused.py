"""Host vs device time of one SE block call (forward + backward) on CUDA, per implementation:
``fused`` (the Triton kernels through their torch.library custom ops), ``torch`` (the eager
formulas) and ``smp`` (smp's SCSEModule).
``host`` is the time to issue a call; ``wall`` includes waiting for the GPU: a call is host-bound
when the two are equal.

    python bench/profile_fused.py --mode scse_max --shapes 16x64x32x32 16x64x128x128
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def per_call(fn, calls: int) -> tuple[float, float]:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - t0) / calls
    torch.cuda.synchronize()
    return host, (time.perf_counter() - t0) / calls


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", nargs="+", default=["16x64x32x32", "16x64x128x128"])
    p.add_argument("--mode", default="scse_max")
    p.add_argument("--calls", type=int, default=50)
    args = p.parse_args()
    from bench.bench_blocks import make_block

    for shape in args.shapes:
        dims = [int(v) for v in shape.split("x")]
        x = torch.randn(dims, device="cuda").relu().requires_grad_()
        dy = torch.randn_like(x)
        for impl in ("fused", "torch", "smp"):
            variant = "smp_scse" if impl == "smp" else args.mode
            m = make_block(variant, dims[1], fused=impl == "fused").cuda()

            def call(m=m, x=x, dy=dy):
                m(x).backward(dy)

            host, wall = per_call(call, args.calls)
            print(f"{shape} {args.mode} {impl:9s} host {host * 1e6:7.0f} us/call, "
                  f"wall {wall * 1e6:7.0f} us/call")


if __name__ == "__main__":
    main()
