"""A self-check before the Triton kernels are trusted on a device.

The fused kernels (:mod:`.triton_se`) are the default on CUDA, but a miscompiled or wrongly
tuned kernel would silently corrupt training. So the first time a kernel is about to run for a
(device, dtype, layout, dim, mode) in a process, it runs once on a small random map of that
dtype and layout against the plain eager formulas (:func:`.fast_se.reference_se`, differentiated
by autograd), forward and every gradient. On a mismatch beyond tolerance, or any exception from
Triton, it warns once with the measured error and the fused kernels are off for the rest of the
process (the blocks take the PyTorch fast path instead). The map is tiny (2 x 6 x 5 x 7), so the
check itself costs milliseconds beyond the kernels' own first compilation.
"""
from __future__ import annotations

import threading
import warnings
from typing import Callable, Optional

import torch

from . import fast_se

# relative tolerance (max |kernel - reference| / max |reference|, per output and gradient)
TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-4}
LOW_PRECISION_TOLERANCE = 3e-2  # bf16 / fp16 maps: one rounding of the output and of dx

_lock = threading.Lock()
_checked: dict[tuple, bool] = {}
_failed: Optional[str] = None  # the warning once any check failed: kernels off for good


def reset() -> None:
    """Forget every verdict (tests)."""
    global _failed
    with _lock:
        _checked.clear()
        _failed = None


def failed() -> Optional[str]:
    """The warning text when a self-check failed in this process, else None."""
    return _failed


def _key(x: torch.Tensor, mode: str) -> tuple:
    return (str(x.device), x.dtype, fast_se._channels_last(x), x.dim(), mode)


def known(x: torch.Tensor, mode: str) -> Optional[bool]:
    """The verdict for ``x``'s kind of map without running anything (None: not checked yet)."""
    if _failed is not None:
        return False
    return _checked.get(_key(x, mode))


def _params(mode: str, channels: int, ndim: int, dtype: torch.dtype, device, gen) -> dict:
    def rnd(*shape):
        return (torch.randn(shape, generator=gen, dtype=dtype) * 0.5).to(device)

    p = {}
    if mode != "sse":
        hidden = max(1, channels // 2)
        p.update(fc1_w=rnd(hidden, channels), fc1_b=rnd(hidden), fc2_w=rnd(channels, hidden),
                 fc2_b=rnd(channels))
    if mode != "cse":
        p.update(sse_w=rnd(1, channels, *([1] * (ndim - 2))), sse_b=rnd(1))
    return p


def measure_error(kernel: Callable, like: torch.Tensor, mode: str) -> float:
    """Largest relative error of ``kernel`` against the eager reference, over the output and the
    gradients of the map and every parameter, on a small map with ``like``'s device, dtype,
    layout and number of dims."""
    gen = torch.Generator().manual_seed(1234)
    spatial = (5, 7) if like.dim() == 4 else (3, 5, 7)
    shape = (2, 6, *spatial)
    pdt = fast_se.acc_dtype(like.dtype)
    x = torch.randn(shape, generator=gen)
    x[torch.rand(shape, generator=gen) < 0.2] = 0  # ReLU-like zeros: ties of the max fusion
    x = x.to(like.device, like.dtype)
    if fast_se._channels_last(like):
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4
                         else torch.channels_last_3d)
    dy = torch.randn(shape, generator=gen).to(like.device, like.dtype)
    params = _params(mode, shape[1], len(shape), pdt, like.device, gen)
    ambiguous = fast_se.max_route_ambiguous(x, mode, **params)
    if ambiguous is not None:  # near-ties of the max fusion: no gradient there (see its doc)
        dy = dy.masked_fill(ambiguous, 0)
    results = []
    with torch.enable_grad(), torch.autocast(like.device.type, enabled=False):
        for fn in (kernel, fast_se.reference_se):
            xi = x.detach().clone().requires_grad_()
            ps = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
            y = fn(xi, mode, **ps)
            grads = torch.autograd.grad(y, [xi, *ps.values()], dy.to(y.dtype))
            results.append([y, *grads])
    err = 0.0
    for got, ref in zip(*results):
        ref = ref.double()
        scale = ref.abs().max().clamp_min(1e-30)
        e = ((got.double() - ref).abs().max() / scale).item()
        err = max(err, e if e == e else float("inf"))  # NaN counts as a failure
    return err


def trusted(kernel: Callable, x: torch.Tensor, mode: str) -> bool:
    """True when ``kernel`` passed (now or earlier) its check for ``x``'s kind of map; False
    once any check in this process failed (a warning says so, once)."""
    global _failed
    verdict = known(x, mode)
    if verdict is not None:
        return verdict
    with _lock:
        if _failed is not None:
            return False
        key = _key(x, mode)
        if key in _checked:
            return _checked[key]
        tol = TOLERANCE.get(x.dtype, LOW_PRECISION_TOLERANCE)
        what = f"{mode}, {str(x.dtype).replace('torch.', '')}, " \
               f"{'channels_last' if key[2] else 'contiguous'}, {x.dim() - 2}D, on {x.device}"
        try:
            err = measure_error(kernel, x, mode)
        except Exception as e:  # any Triton / launch error
            problem = f"raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        else:
            if err <= tol:
                _checked[key] = True
                return True
            problem = f"max relative error {err:.1e} > {tol:.0e}"
        _checked[key] = False
        _failed = (f"scse_seg: fused Triton SE kernel failed its self-check ({what}): {problem}; "
                   "using the PyTorch path for the rest of this process")
    warnings.warn(_failed, RuntimeWarning, stacklevel=3)
    return False
