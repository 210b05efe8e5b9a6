"""First and later forward+backward of one scSE-max block (2x64x128^2, fp32, CPU) in a fresh
process with an empty inductor cache, per fast-path backend of commit 1d259b9 (which had two):

    git checkout 1d259b9
    for b in ops compile; do TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) SCSE_SEG_FAST=$b \
        SCSE_SEG_FAST_MIN=0 python bench/results/cpu-one-path/before-first-call.py $b; done
"""
import sys
import time

import torch

from scse_seg.blocks import ConcurrentSE

torch.manual_seed(0)
m = ConcurrentSE(64, 2)
x = torch.randn(2, 64, 128, 128, requires_grad=True)
dy = torch.randn_like(x)
times = []
for _ in range(6):
    t = time.perf_counter()
    m(x).backward(dy)
    times.append(time.perf_counter() - t)
print(f"{sys.argv[1]}: first call {times[0]:.2f} s, later calls median {sorted(times[1:])[2] * 1e3:.1f} ms")
