"""A self-check before the Triton kernels are trusted on a device.

A miscompiled or wrongly tuned kernel would silently corrupt training. So the first time the
kernels are about to run for a (device, dtype, layout, dim, mode) in a process, they run once on
a small random map of that kind against the blocks' eager formulas (:mod:`scse_seg.blocks.se`,
differentiated by autograd in the gate precision), forward and every gradient. On a mismatch
beyond tolerance, or any exception from Triton, one warning gives the measured error and the
kernels are off for the rest of the process (the blocks run their eager formulas). The map is
tiny (2 x 6 x 5 x 7), so the check costs milliseconds beyond the kernels' first compilation.
"""
from __future__ import annotations

import threading
import warnings
from typing import Callable, Optional

import torch
from torch import nn

from .gates import acc_dtype, is_channels_last, module_params

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


def _key(x: torch.Tensor, mode: str) -> tuple:
    return (str(x.device), x.dtype, is_channels_last(x), x.dim(), mode)


def known(x: torch.Tensor, mode: str) -> Optional[bool]:
    """The verdict for ``x``'s kind of map without running anything (None: not checked yet)."""
    return False if _failed is not None else _checked.get(_key(x, mode))


def reference_block(mode: str, channels: int, dim: int, dtype: torch.dtype = torch.float64,
                    seed: Optional[int] = None) -> nn.Module:
    """The block that ``mode`` names, on its eager formulas (``fused=False``), in ``dtype``; with
    ``seed``, random parameters (non-zero biases, gates away from 0 and 1)."""
    from scse_seg.blocks import ChannelSE, ConcurrentSE, SpatialSE

    if mode == "cse":
        block = ChannelSE(channels, dim, fused=False)
    elif mode == "sse":
        block = SpatialSE(channels, dim, fused=False)
    else:
        block = ConcurrentSE(channels, dim, fusion=mode.removeprefix("scse_"), fused=False)
    block = block.to(dtype)
    if seed is not None:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in block.parameters():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=dtype) * 0.5)
    return block


@torch.no_grad()
def max_route_ambiguous(block: nn.Module, x: torch.Tensor,
                        margin: float = 1e-4) -> Optional[torch.Tensor]:
    """Where an scSE-max ``block`` routes its gradient by less than ``margin`` (|g_c - g_s| <
    margin, x != 0), as a boolean map like ``x``; None for other blocks.

    ``max(x*g_c, x*g_s)`` is continuous, but its gradient jumps at ``g_c = g_s``: an element
    routed to the other branch moves a whole ``dy * x`` term between the two gate gradients.
    Two correct implementations whose gates differ by rounding (fp32 kernels vs an fp64
    reference) therefore disagree there by O(1 / map size), far beyond fp32 tolerance; a
    comparison zeroes ``dy`` at these elements (about 1e-4 of a random map)."""
    if getattr(block, "fusion", None) != "max":
        return None
    xd = x.to(next(block.parameters()).dtype)
    gc = block.cse.excite(xd)
    gap = (gc.view(*gc.shape, *([1] * (x.dim() - 2))) - block.sse.gate(xd)).abs()
    return (gap < margin) & (x != 0)


def measure_error(kernel: Callable, like: torch.Tensor, mode: str) -> float:
    """Largest relative error of ``kernel(x, mode, **params)`` against the block's eager
    formulas, over the output and the gradients of the map and every parameter, on a small map
    with ``like``'s device, dtype, layout and number of dims."""
    gen = torch.Generator().manual_seed(1234)
    shape = (2, 6, *((5, 7) if like.dim() == 4 else (3, 5, 7)))
    x = torch.randn(shape, generator=gen)
    x[torch.rand(shape, generator=gen) < 0.2] = 0  # ReLU-like zeros: ties of the max fusion
    x = x.to(like.device, like.dtype)
    if is_channels_last(like):
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4
                         else torch.channels_last_3d)
    dy = torch.randn(shape, generator=gen).to(like.device, like.dtype)
    block = reference_block(mode, shape[1], x.dim() - 2, acc_dtype(like.dtype), 4321).to(like.device)
    ambiguous = max_route_ambiguous(block, x)
    if ambiguous is not None:
        dy = dy.masked_fill(ambiguous, 0)
    params = {k: v for k, v in module_params(block, mode).items() if v is not None}
    ref_dtype = acc_dtype(like.dtype)
    results = []
    with torch.enable_grad(), torch.autocast(like.device.type, enabled=False):
        for run in (lambda t: kernel(t, mode, **params), lambda t: block(t.to(ref_dtype))):
            xi = x.detach().clone().requires_grad_()
            y = run(xi)
            results.append([y, *torch.autograd.grad(y, [xi, *params.values()], dy.to(y.dtype))])
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
        key = _key(x, mode)
        if _failed is not None or key in _checked:
            return _failed is None and _checked[key]
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
                   "using the eager formulas for the rest of this process")
    warnings.warn(_failed, RuntimeWarning, stacklevel=3)
    return False
