"""The SE blocks' fast path off the Triton kernels (CPU, or wherever Triton is not taken).

The eager scSE-max block (Roy et al., TMI 2019) computes ``torch.maximum(x*g_c, x*g_s)``: two
full products, each kept by autograd for backward, plus the ``mean`` and the 1x1 conv, plus as
many passes again in backward. Here one ``torch.autograd.Function`` serves cse, sse, scse_max and
scse_add, 2D and 3D, NCHW and channels_last:

* forward computes the gates (N x C and N x spatial, in fp32 or fp64) and the output, and saves
  only ``x`` and those gates for backward (never ``x*g_c`` / ``x*g_s``);
* backward recomputes the scSE-max routing mask from ``x`` and the gates, runs the small gate MLP
  backward by hand, and writes the input gradient in one pass.

Two backends do the map-sized work, picked by ``SCSE_SEG_FAST`` (``ops`` or ``compile``):

* ``ops`` (:mod:`.chunked_se`): plain torch ops run chunk by chunk over the map, with their
  temporaries in small buffers kept per thread (no compiler needed, nothing to warm up);
* ``compile``: the same three map-sized steps (excite, gate-gradient reduction, input gradient)
  as plain formulas compiled by ``torch.compile`` (inductor emits one vectorised C++ loop per
  step on CPU); the first call per mode/dtype/layout compiles (seconds), later calls are cheap.

Under ``torch.compile``/``torch.export`` of a whole model the blocks skip this Function and keep
their plain formulas, which the compiler fuses itself (and which export can trace).
"""
from __future__ import annotations

import math
import os
import types
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import chunked_se

MODES = ("cse", "sse", "scse_max", "scse_add")
BACKENDS = ("ops", "compile")
# "ops" by default: the compiled backend makes the blocks faster (bench/README.md) but its first
# use compiles for ~20 s, so the README's default 8-epoch run took 84.8 s with it (fresh inductor
# cache), 67.7 s with a warm cache and 62.2 s with "ops" (2-core CPU, 2026-11-27)
DEFAULT_BACKEND = "ops"


# Smallest map (N*C*spatial elements) for which the fast path beats the blocks' eager formulas
# forward+backward on CPU, per backend and mode; below it a block runs its eager formulas. Small
# maps cost the fixed per-call overhead of autograd and dispatch, where the Function's extra
# steps lose, and save little for backward either way (eager cSE and sSE keep one map, like the
# fast path). Read off the block tables (fp32, the architectures' map shapes, both layouts,
# 2-core CPU) by bench/thresholds.py: ops (chunked_se) from four tables, bench/results/cpu-ops
# and cpu-ops-rerun now and at commit 103410d (runs on this VM differ by up to 2x, so the
# threshold is where the fast path never lost in any of them), compile from bench/results/cpu.
# 2097153 (one past the largest map measured): the fast path did not win in every layout (ops
# sSE lost in channels_last at 2x64x128^2 in some runs; eager sSE saves the same one map).
# ``SCSE_SEG_FAST_MIN=<elements>`` overrides every entry (0: the fast path at every size).
MIN_ELEMENTS = {
    "ops": {"cse": 2097152, "sse": 2097153, "scse_max": 32768, "scse_add": 262144},
    "compile": {"cse": 2097152, "sse": 1048576, "scse_max": 0, "scse_add": 32768},
}


def min_elements(mode: str, backend: Optional[str] = None) -> int:
    """The map size from which a block on CPU takes the fast path (see :data:`MIN_ELEMENTS`)."""
    value = chunked_se.env_elements("SCSE_SEG_FAST_MIN")
    return MIN_ELEMENTS[backend or backend_name()][mode] if value is None else value


def backend_name() -> str:
    """The backend ``SCSE_SEG_FAST`` asks for (default ``ops``)."""
    name = os.environ.get("SCSE_SEG_FAST", DEFAULT_BACKEND).strip().lower() or DEFAULT_BACKEND
    if name not in BACKENDS:
        raise ValueError(f"SCSE_SEG_FAST={name!r} is not a fast-path backend; valid: "
                         f"{', '.join(BACKENDS)}")
    return name


def _has_c(mode: str) -> bool:
    return mode != "sse"


def _has_s(mode: str) -> bool:
    return mode != "cse"


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Gate precision: fp64 for fp64 maps, fp32 otherwise (bf16/fp16 maps get fp32 gates)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------
# channel contractions (the 1x1 conv of sSE and its weight gradient) as one BLAS pass
# --------------------------------------------------------------------------------------------


def _channels_last(x: Tensor) -> bool:
    fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    return not x.is_contiguous() and x.is_contiguous(memory_format=fmt)


def _flat(x: Tensor) -> tuple[Tensor, bool]:
    """``x`` as (N, C, P) (NCHW) or (N, P, C) (channels_last) without copying when possible."""
    n, c = x.shape[:2]
    if _channels_last(x):
        return x.movedim(1, -1).reshape(n, -1, c), True
    return x.contiguous().reshape(n, c, -1), False


def channel_dot(x: Tensor, w: Tensor) -> Tensor:
    """``sum_c w[c] x[n, c, p]`` -> (N, P) in ``x``'s dtype: the bias-free sSE logit."""
    xf, last = _flat(x)
    w = w.reshape(-1).to(x.dtype)
    if last:
        return torch.matmul(xf, w)
    return torch.bmm(w.view(1, 1, -1).expand(xf.shape[0], 1, -1), xf).squeeze(1)


def spatial_dot(x: Tensor, v: Tensor) -> Tensor:
    """``sum_{n, p} x[n, c, p] v[n, p]`` -> (C,): the 1x1 conv weight gradient."""
    xf, last = _flat(x)
    v = v.reshape(xf.shape[0], -1).to(x.dtype)
    if last:
        return torch.bmm(v.unsqueeze(1), xf).sum((0, 1))
    return torch.bmm(xf, v.unsqueeze(2)).sum((0, 2))


# --------------------------------------------------------------------------------------------
# the compile backend's map-sized steps: plain formulas (compiled; run as they are if compiling
# fails)
# --------------------------------------------------------------------------------------------


def _route(x: Tensor, gc: Tensor, gs: Tensor) -> Tensor:
    """d max(x*g_c, x*g_s) / d (x*g_c) as torch.maximum defines it: 1, 0.5 on ties, 0."""
    a, b = x * gc, x * gs
    return torch.where(a > b, 1.0, torch.where(a == b, 0.5, 0.0)).to(x.dtype)


def excite_plain(x: Tensor, gc: Optional[Tensor], gs: Optional[Tensor], mode: str) -> Tensor:
    if mode == "cse":
        return x * gc
    if mode == "sse":
        return x * gs
    if mode == "scse_add":
        return x * (gc + gs)
    return torch.maximum(x * gc, x * gs)


def reduce_plain(dy: Tensor, x: Tensor, gc: Optional[Tensor], gs: Optional[Tensor], mode: str,
                 dims: tuple[int, ...], acc: torch.dtype):
    """(d g_c (N, C), d g_s (N, *spatial)) in ``acc``, None for an absent gate."""
    e = (dy * x).to(acc)
    if mode == "scse_max":
        wa = _route(x, gc, gs)
        ec = e * wa
        return ec.sum(dims), (e - ec).sum(1)
    return (e.sum(dims) if _has_c(mode) else None), (e.sum(1) if _has_s(mode) else None)


def input_plain(dy: Tensor, x: Tensor, gc: Optional[Tensor], gs: Optional[Tensor],
                dxc: Optional[Tensor], dlogit: Optional[Tensor], w: Optional[Tensor],
                mode: str) -> Tensor:
    """dx = dy * (routed gate) + dxc[n, c] + dlogit[n, p] * w[c]."""
    if mode == "cse":
        gate = gc
    elif mode == "sse":
        gate = gs
    elif mode == "scse_add":
        gate = gc + gs
    else:
        wa = _route(x, gc, gs)
        gate = gs + wa * (gc - gs)
    dx = dy * gate
    if dxc is not None:
        dx = dx + dxc
    if dlogit is not None:
        dx = dx + dlogit * w
    return dx.to(x.dtype)


_COMPILED: dict = {}
_COMPILE_FAILED: list[str] = []


def _compiled(fn, key: tuple):
    """``fn`` compiled for one (mode, dims, dtype, layout): a fresh code object per key, so each
    key has its own compile cache (dynamic shapes: a new map size does not recompile) and the
    keys never exhaust dynamo's per-function recompile limit."""
    k = (fn.__name__, *key)
    if k not in _COMPILED:
        fresh = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__,
                                   fn.__defaults__, fn.__closure__)
        _COMPILED[k] = torch.compile(fresh, dynamic=True)
    return _COMPILED[k]


def _fallback(fn_plain, key):
    """Run the compiled step; if compiling fails (no C++ compiler, ...), warn once and run the
    plain formulas for this call; later calls take the ``ops`` backend (:func:`se_function`)."""
    def run(*args):
        if not _COMPILE_FAILED:
            try:
                return _compiled(fn_plain, key)(*args)
            except Exception as e:  # inductor / C++ toolchain errors
                _COMPILE_FAILED.append(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                warnings.warn("scse_seg: torch.compile of the SE fast path failed "
                              f"({_COMPILE_FAILED[0]}); using SCSE_SEG_FAST=ops instead",
                              RuntimeWarning, stacklevel=2)
        return fn_plain(*args)
    return run


def _compiled_steps(x: Tensor, mode: str):
    """The ``compile`` backend's three map-sized steps (excite, reduce, input gradient)."""
    key = (mode, x.dim(), x.dtype, _channels_last(x))
    return (_fallback(excite_plain, key), _fallback(reduce_plain, key),
            _fallback(input_plain, key))


# --------------------------------------------------------------------------------------------
# gates and their (small) backward
# --------------------------------------------------------------------------------------------


def _gate_view(g: Tensor, x: Tensor, channel: bool) -> Tensor:
    """N x C gate -> (N, C, 1, ...); N x P gate -> (N, 1, *spatial); in ``x``'s dtype."""
    shape = (x.shape[0], x.shape[1], *([1] * (x.dim() - 2))) if channel \
        else (x.shape[0], 1, *x.shape[2:])
    return g.to(x.dtype).reshape(shape)


def _p(t: Optional[Tensor], dt: torch.dtype) -> Optional[Tensor]:
    return None if t is None else t.to(dt)


def _mlp(mean: Tensor, fc1_w, fc1_b, fc2_w, fc2_b) -> tuple[Tensor, Tensor]:
    dt = mean.dtype
    h = F.linear(mean, fc1_w.to(dt), _p(fc1_b, dt))
    return h, torch.sigmoid(F.linear(torch.relu(h), fc2_w.to(dt), _p(fc2_b, dt)))


def _gates(x: Tensor, mode: str, fc1_w, fc1_b, fc2_w, fc2_b, sse_w, sse_b):
    acc = acc_dtype(x.dtype)
    dims = tuple(range(2, x.dim()))
    mean = h = gc = gs = None
    if _has_c(mode):
        mean = x.mean(dims, dtype=acc)
        h, gc = _mlp(mean, fc1_w, fc1_b, fc2_w, fc2_b)
    if _has_s(mode):
        logit = channel_dot(x, sse_w).to(acc)
        if sse_b is not None:
            logit = logit + sse_b.reshape(()).to(acc)
        gs = torch.sigmoid(logit)
    return mean, h, gc, gs


def _mlp_backward(dgc: Tensor, x: Tensor, mean: Tensor, h: Tensor, gc: Tensor, fc1_w: Tensor,
                  fc2_w: Tensor):
    """Backward of ``g_c = sigmoid(fc2(relu(fc1(mean))))`` by hand, from ``d g_c`` (N, C):
    (d fc1_w, d fc1_b, d fc2_w, d fc2_b, the input gradient's per-channel term (N, C))."""
    acc = dgc.dtype
    dz = dgc * gc * (1 - gc)
    d_fc2_w, d_fc2_b = dz.t() @ torch.relu(h), dz.sum(0)
    dh = (dz @ fc2_w.to(acc)) * (h > 0)
    return (dh.t() @ mean, dh.sum(0), d_fc2_w, d_fc2_b,
            dh @ fc1_w.to(acc) / math.prod(x.shape[2:]))


def _no_autocast(x: Tensor):
    return torch.autocast(device_type=x.device.type, enabled=False)


class SEFunction(torch.autograd.Function):
    """cSE / sSE / scSE forward and backward saving only ``x`` and the small gates."""

    @staticmethod
    def forward(ctx, x, fc1_w, fc1_b, fc2_w, fc2_b, sse_w, sse_b, mode, backend):
        with _no_autocast(x):
            if backend == "ops":  # squeeze, gates and excitation chunk by chunk
                mean = h = gc = None
                acc = acc_dtype(x.dtype)
                if _has_c(mode):
                    mean = x.mean(tuple(range(2, x.dim())), dtype=acc)
                    h, gc = _mlp(mean, fc1_w, fc1_b, fc2_w, fc2_b)
                out, gs = chunked_se.forward(x, mode, gc, sse_w, sse_b, acc)
            else:
                mean, h, gc, gs = _gates(x, mode, fc1_w, fc1_b, fc2_w, fc2_b, sse_w, sse_b)
                excite = _compiled_steps(x, mode)[0]
                out = excite(x, None if gc is None else _gate_view(gc, x, True),
                             None if gs is None else _gate_view(gs, x, False), mode)
        ctx.mode, ctx.backend = mode, backend
        ctx.save_for_backward(x, fc1_w, fc1_b, fc2_w, fc2_b, sse_w, sse_b, mean, h, gc, gs)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, fc1_w, fc1_b, fc2_w, fc2_b, sse_w, sse_b, mean, h, gc, gs = ctx.saved_tensors
        mode = ctx.mode
        acc = acc_dtype(x.dtype)
        g = [None] * 6  # fc1_w, fc1_b, fc2_w, fc2_b, sse_w, sse_b
        params = (fc1_w, fc1_b, fc2_w, fc2_b, sse_w, sse_b)

        def channel_term(dgc):  # cSE's MLP backward: parameter grads, and dx's (N, C) term
            g[0], g[1], g[2], g[3], dxc = _mlp_backward(dgc, x, mean, h, gc, fc1_w, fc2_w)
            return dxc

        if ctx.backend == "ops":
            with _no_autocast(x):
                dx, dl, dw = chunked_se.backward(dy, x, mode, gc, gs, sse_w, acc, channel_term)
            if dl is not None:
                g[4], g[5] = dw, dl.sum()
            grads = [None if gr is None or p is None else gr.reshape(p.shape).to(p.dtype)
                     for gr, p in zip(g, params)]
            return (dx, *grads, None, None)
        _, reduce, grad_input = _compiled_steps(x, mode)
        dims = tuple(range(2, x.dim()))
        dxc = dlogit = w = None
        if ctx.backend == "compile" and dy.stride() != x.stride():
            # inductor lays dx out like its inputs: give dy x's memory format (one copy, only
            # when the incoming gradient's layout differs from the map's)
            dy = torch.empty_like(x, dtype=dy.dtype).copy_(dy)
        with _no_autocast(x):
            gcv = None if gc is None else _gate_view(gc, x, True)
            gsv = None if gs is None else _gate_view(gs, x, False)
            dgc, dgs = reduce(dy, x, gcv, gsv, mode, dims, acc)
            if gc is not None:
                dxc = _gate_view(channel_term(dgc), x, True)
            if gs is not None:
                dl = dgs.reshape(x.shape[0], -1) * gs * (1 - gs)
                g[4], g[5] = spatial_dot(x, dl), dl.sum()
                dlogit = _gate_view(dl, x, False)
                w = sse_w.to(x.dtype).reshape(1, -1, *([1] * (x.dim() - 2)))
            dx = grad_input(dy, x, gcv, gsv, dxc, dlogit, w, mode)
        grads = [None if gr is None or p is None else gr.reshape(p.shape).to(p.dtype)
                 for gr, p in zip(g, params)]
        return (dx, *grads, None, None)


def se_function(x: Tensor, mode: str, fc1_w=None, fc1_b=None, fc2_w=None, fc2_b=None,
                sse_w=None, sse_b=None, backend: Optional[str] = None) -> Tensor:
    """Fast cSE / sSE / scSE on an ``N, C, *spatial`` map; differentiable in ``x`` and every
    parameter (not twice). ``backend``: "ops" or "compile" (default: ``SCSE_SEG_FAST``)."""
    if mode not in MODES:
        raise ValueError(f"unknown SE mode {mode!r}; valid: {', '.join(MODES)}")
    backend = backend or backend_name()
    if backend == "compile" and _COMPILE_FAILED:
        backend = "ops"  # compiling failed earlier in this process (warned then)
    if not _has_c(mode):
        fc1_w = fc1_b = fc2_w = fc2_b = None
    if not _has_s(mode):
        sse_w = sse_b = None
    return SEFunction.apply(x, fc1_w, fc1_b, fc2_w, fc2_b, sse_w, sse_b, mode, backend)


def module_params(module: torch.nn.Module, mode: str) -> dict[str, Optional[Tensor]]:
    """The parameters of a ChannelSE / SpatialSE / ConcurrentSE block that ``mode`` uses."""
    if mode == "cse":
        cse, sse = module, None
    elif mode == "sse":
        cse, sse = None, module
    else:
        cse, sse = module.cse, module.sse
    p: dict[str, Optional[Tensor]] = {}
    if cse is not None:
        ex = cse.excite
        p.update(fc1_w=ex.fc1.weight, fc1_b=ex.fc1.bias, fc2_w=ex.fc2.weight, fc2_b=ex.fc2.bias)
    if sse is not None:
        p.update(sse_w=sse.conv.weight, sse_b=sse.conv.bias)
    return p


def fast_se(x: Tensor, module: torch.nn.Module, mode: str, backend: Optional[str] = None) -> Tensor:
    """Entry point used by the blocks in :mod:`scse_seg.blocks.se`."""
    return se_function(x, mode, **module_params(module, mode), backend=backend)


@torch.no_grad()
def max_route_ambiguous(x: Tensor, mode: str, fc1_w=None, fc1_b=None, fc2_w=None, fc2_b=None,
                        sse_w=None, sse_b=None, margin: float = 1e-4) -> Optional[Tensor]:
    """Where scSE's max fusion routes its gradient by less than ``margin`` (|g_c - g_s| <
    margin, x != 0), as a boolean map like ``x``; None for the other modes.

    ``max(x*g_c, x*g_s)`` is continuous, but its gradient jumps at ``g_c = g_s``: an element
    routed to the other branch moves a whole ``dy * x`` term between the two gate gradients.
    Two correct implementations whose gates differ by rounding (fp32 kernels vs an fp64
    reference) therefore disagree there by O(1 / map size), far beyond fp32 tolerance; a
    comparison zeroes ``dy`` at these elements (about 1e-4 of a random map)."""
    if mode != "scse_max":
        return None
    _, _, gc, gs = _gates(x.detach(), mode, fc1_w, fc1_b, fc2_w, fc2_b, sse_w, sse_b)
    ones = [1] * (x.dim() - 2)
    gap = (gc.reshape(*x.shape[:2], *ones) - gs.reshape(x.shape[0], 1, *x.shape[2:])).abs()
    return (gap < margin) & (x != 0)


def reference_se(x: Tensor, mode: str, fc1_w=None, fc1_b=None, fc2_w=None, fc2_b=None,
                 sse_w=None, sse_b=None) -> Tensor:
    """The blocks' eager formulas on plain tensors, differentiated by autograd, computed in the
    gate precision: the independent reference of the Triton self-check."""
    xa = x.to(acc_dtype(x.dtype))
    gc = gs = None
    if _has_c(mode):
        gc = _mlp(xa.mean(tuple(range(2, x.dim()))), fc1_w, fc1_b, fc2_w, fc2_b)[1]
        gc = gc.reshape(*gc.shape, *([1] * (x.dim() - 2)))
    if _has_s(mode):
        w = sse_w.to(xa.dtype).reshape(1, -1, *([1] * (x.dim() - 2)))
        logit = (xa * w).sum(1, keepdim=True)
        gs = torch.sigmoid(logit if sse_b is None else logit + sse_b.to(xa.dtype).reshape(()))
    return excite_plain(xa, gc, gs, mode)
