"""The scSE fast path on CPU: one autograd Function that saves only ``x`` and the gates.

The eager scSE block (:class:`scse_seg.blocks.ConcurrentSE`, Roy et al., TMI 2019) keeps ``x``,
``x*g_c`` and ``x*g_s`` for backward (max fusion; ``x`` and a product for add): three maps per
block. This Function keeps ``x`` and the gates (N x C, N x spatial), recomputes the max fusion's
routing from them in backward, runs the small gate MLP backward by hand and writes the input
gradient in one pass. cSE and sSE alone keep their eager formulas, which save one map already.

The map-sized work is plain torch ops run chunk by chunk: whole channel columns (every channel
of a run of spatial positions, so sSE's channel sums are complete in a chunk) of about
:data:`CHUNK_ELEMENTS_PER_THREAD` elements per thread, with three chunk-sized scratch buffers
kept per thread, since a fresh map-sized temporary costs a page fault per 4 KB on first write
(bench/README.md: ``python bench/bench_chunks.py``; smaller chunks lose to per-op dispatch). A
map is handled as a view ``(N, C, P)`` (NCHW, ``ch = 1``) or ``(N, P, C)`` (channels_last,
``ch = 2``), P the flattened spatial size, so 2D and 3D maps and both layouts share one code.
"""
from __future__ import annotations

import math
import threading

import torch
from torch import Tensor

from .gates import acc_dtype, grads_like, is_channels_last, mlp, mlp_backward, no_autocast

MODES = ("scse_max", "scse_add")
CHUNK_ELEMENTS_PER_THREAD = 131072  # 128K: as fast as one chunk per map (bench_chunks.py)
_SCRATCH = threading.local()


def _in(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


class _Chunks:
    """One map's chunking: views of flat maps and per-position (N, P) tensors chunk by chunk,
    made by one ``split`` call each (per-chunk Python slicing costs as much as the ops)."""

    def __init__(self, x: Tensor):
        self.ch = 2 if is_channels_last(x) else 1
        self.sp = 3 - self.ch  # the spatial axis of the flat view
        self.n, self.c = x.shape[:2]
        self.p = math.prod(x.shape[2:])
        target = CHUNK_ELEMENTS_PER_THREAD * torch.get_num_threads()
        self.step = max(1, min(self.p, target // max(1, self.n * self.c)))
        self.count = -(-self.p // self.step)
        self.dtype = x.dtype
        self.size = self.n * self.c * self.step

    def empty_like(self, x: Tensor) -> Tensor:
        """A map like ``x`` whose flat view is a view (writing it writes the map)."""
        fmt = torch.contiguous_format if self.ch == 1 else \
            torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        return torch.empty_like(x, memory_format=fmt)

    def maps(self, t: Tensor) -> tuple[Tensor, ...]:
        flat = t.reshape(self.n, self.c, -1) if self.ch == 1 \
            else t.movedim(1, -1).reshape(self.n, -1, self.c)
        return flat.split(self.step, dim=self.sp)

    def positions(self, v: Tensor) -> tuple[Tensor, ...]:
        """An (N, P) per-position tensor's chunks, (N, pb) each."""
        return v.split(self.step, dim=1)

    def channel(self, g: Tensor) -> Tensor:
        """An (N, C) per-channel tensor, broadcastable against a chunk."""
        return _in(g, self.dtype).unsqueeze(self.sp)

    def spread(self, v: Tensor) -> Tensor:
        """A chunk's (N, pb) per-position block, broadcastable against the chunk."""
        return _in(v, self.dtype).unsqueeze(self.ch)

    def scratch(self, name: str, like: Tensor) -> Tensor:
        """A chunk-sized buffer shaped like ``like``, kept per thread and reused across calls
        (grown, never shrunk: 3 buffers of one chunk each, 3 MB at the default size)."""
        pool = _SCRATCH.__dict__.setdefault("pool", {})
        buf = pool.get((name, self.dtype))
        if buf is None or buf.numel() < self.size:
            buf = pool[(name, self.dtype)] = torch.empty(self.size, dtype=self.dtype)
        return buf[:like.numel()].view(like.shape)

    def logit(self, xc: Tensor, w: Tensor) -> Tensor:
        """``sum_c w[c] x[n, c, p]`` of a chunk -> (N, pb), one BLAS call (``bmm`` with ``w``
        expanded over the batch: ``matmul`` would copy an NCHW chunk to transpose it)."""
        if self.ch == 1:
            return torch.bmm(w.view(1, 1, -1).expand(self.n, 1, self.c), xc).squeeze(1)
        return torch.bmm(xc, w.view(1, -1, 1).expand(self.n, self.c, 1)).squeeze(2)

    def weight_grad(self, xc: Tensor, dl: Tensor, acc: torch.dtype) -> Tensor:
        """``sum_{n, p} x[n, c, p] dl[n, p]`` of a chunk -> (C,) in ``acc`` (NCHW: a product and
        a sum; a matrix-vector ``bmm`` over a strided chunk measured slower)."""
        if self.ch == 1:
            prod = torch.mul(xc, dl.unsqueeze(1), out=self.scratch("t", xc))
            return prod.sum((0, 2), dtype=acc)
        return torch.bmm(dl.unsqueeze(1), xc).sum((0, 1), dtype=acc)

    def add_outer(self, dxc: Tensor, dl: Tensor, w: Tensor) -> Tensor:
        """``dxc += dl[n, p] * w[c]`` in place, one batched rank-1 update (``baddbmm_``)."""
        if self.ch == 1:
            return dxc.baddbmm_(w.view(1, -1, 1).expand(self.n, -1, 1), dl.unsqueeze(1))
        return dxc.baddbmm_(dl.unsqueeze(2), w.view(1, 1, -1).expand(self.n, 1, -1))

    def route(self, xc: Tensor, gcc: Tensor, gsc: Tensor) -> Tensor:
        """d max(x*g_c, x*g_s) / d (x*g_c) as torch.maximum's backward routes it: 1 where
        ``x*g_c > x*g_s``, 1/2 on ties (every ``x == 0``, e.g. after a ReLU), else 0."""
        r = torch.mul(xc, gcc, out=self.scratch("k", xc))
        r.sub_(torch.mul(xc, gsc, out=self.scratch("t", xc)))
        return r.sign_().add_(1).mul_(0.5)  # torch.heaviside does this in one op, 8x slower


def _forward(x: Tensor, mode: str, gc: Tensor, sse_w: Tensor, sse_b, acc) -> tuple[Tensor, Tensor]:
    """The block's output and sSE's gate (N, P) in ``acc``, chunk by chunk."""
    ck = _Chunks(x)
    out = ck.empty_like(x)
    gs = torch.empty(ck.n, ck.p, dtype=acc)
    gcc, w = ck.channel(gc), sse_w.reshape(-1).to(x.dtype)
    for xc, oc, gsb in zip(ck.maps(x), ck.maps(out), ck.positions(gs)):
        logit = _in(ck.logit(xc, w), acc)
        torch.sigmoid(logit if sse_b is None else logit.add_(sse_b.reshape(()).to(acc)), out=gsb)
        gsc = ck.spread(gsb)
        if mode == "scse_add":
            torch.add(gcc, gsc, out=oc).mul_(xc)
        else:
            torch.mul(xc, gcc, out=oc)
            torch.maximum(oc, torch.mul(xc, gsc, out=ck.scratch("t", xc)), out=oc)
    return out, gs


def _backward(dy: Tensor, x: Tensor, mode: str, gc: Tensor, gs: Tensor, sse_w: Tensor, acc,
              channel_term):
    """(dx, d logit of sSE (N, P), sSE weight gradient (C,)). ``channel_term(d g_c)`` turns cSE's
    gate gradient, summed over the whole map, into dx's per-channel term (N, C)."""
    ck = _Chunks(x)
    ch, sp = ck.ch, ck.sp
    dx = ck.empty_like(x)
    xs, dys, dxs = ck.maps(x), ck.maps(dy), ck.maps(dx)
    gcc, gsx = ck.channel(gc), ck.positions(_in(gs, x.dtype))
    dgc = torch.zeros(ck.n, ck.c, dtype=acc)
    dlogit = torch.empty(ck.n, ck.p, dtype=acc)
    dw = torch.zeros(ck.c, dtype=acc)
    w = sse_w.reshape(-1).to(x.dtype)
    for xc, dyc, gsd, gsxb, dlb in zip(xs, dys, ck.positions(gs * (1 - gs)), gsx,
                                      ck.positions(dlogit)):
        # phase 1: gate gradients, e = dy*x routed r*e to g_c and (1 - r)*e to g_s for max
        e = torch.mul(dyc, xc, out=ck.scratch("e", xc))
        dgs = e.sum(ch, dtype=acc)
        if mode == "scse_max":
            e.mul_(ck.route(xc, gcc, ck.spread(gsxb)))
            dgs.sub_(e.sum(ch, dtype=acc))
        dgc.add_(e.sum(sp, dtype=acc))
        dl = torch.mul(dgs, gsd, out=dlb)  # d logit = d g_s * g_s (1 - g_s)
        dw.add_(ck.weight_grad(xc, _in(dl, x.dtype), acc))
    ctc = ck.channel(channel_term(dgc))
    for xc, dyc, dxc, gsxb, dlb in zip(xs, dys, dxs, gsx, ck.positions(_in(dlogit, x.dtype))):
        # phase 2: dx = dy * (routed gate) + ctc[n, c] + dlogit[n, p] * w[c]
        gsc = ck.spread(gsxb)
        if mode == "scse_add":
            gate = torch.add(gcc, gsc, out=ck.scratch("k", xc))
        else:  # the routed gate g_s + r (g_c - g_s); lerp is exact at r = 0 and 1
            gate = torch.lerp(gsc, gcc, ck.route(xc, gcc, gsc), out=ck.scratch("t", xc))
        ck.add_outer(torch.addcmul(ctc, dyc, gate, out=dxc), dlb, w)
    return dx, dlogit, dw


class SEFunction(torch.autograd.Function):
    """scSE (max or add) forward and backward, saving only ``x`` and the gates."""

    @staticmethod
    def forward(ctx, x, fc1_w, fc1_b, fc2_w, fc2_b, sse_w, sse_b, mode):
        acc = acc_dtype(x.dtype)
        with no_autocast(x):
            mean = x.mean(tuple(range(2, x.dim())), dtype=acc)
            h, gc = mlp(mean, fc1_w, fc1_b, fc2_w, fc2_b)
            out, gs = _forward(x, mode, gc, sse_w, sse_b, acc)
        ctx.mode = mode
        ctx.save_for_backward(x, fc1_w, fc1_b, fc2_w, fc2_b, sse_w, sse_b, mean, h, gc, gs)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, fc1_w, fc1_b, fc2_w, fc2_b, sse_w, sse_b, mean, h, gc, gs = ctx.saved_tensors
        g = [None] * 4

        def channel_term(dgc):  # the MLP backward: parameter grads, dx's per-channel term
            *g[:4], dmean = mlp_backward(dgc, mean, h, gc, fc1_w, fc2_w)
            return dmean / math.prod(x.shape[2:])

        with no_autocast(x):
            dx, dl, dw = _backward(dy, x, ctx.mode, gc, gs, sse_w, acc_dtype(x.dtype), channel_term)
        grads = grads_like([*g, dw, dl.sum()], (fc1_w, fc1_b, fc2_w, fc2_b, sse_w, sse_b))
        return (dx, *grads, None)


def se_function(x: Tensor, mode: str, fc1_w, fc1_b, fc2_w, fc2_b, sse_w, sse_b) -> Tensor:
    """scSE (``mode`` "scse_max" or "scse_add") of a CPU ``N, C, *spatial`` map; differentiable
    in ``x`` and every parameter (once)."""
    if mode not in MODES:
        raise ValueError(f"the CPU fast path serves {', '.join(MODES)}, not {mode!r}")
    return SEFunction.apply(x, fc1_w, fc1_b, fc2_w, fc2_b, sse_w, sse_b, mode)
