"""The fast path's ``ops`` backend: plain torch ops, run chunk by chunk over the map.

The steps of a block (squeeze, excitation; gate gradients; input gradient) need up to three
map-sized temporaries on top of the output. Fresh ones cost a page fault per 4 KB on their first
write (an 8 MB map: ~2,000 minor faults; the previous, unchunked ``ops`` steps took ~4,900 per
scSE-max forward+backward at 2x64x128^2), and keeping map-sized ones would hold three maps per
thread for the life of the process (1.6 GB for a 2x32x128^3 volume). So the map is cut into
chunks of about :data:`CHUNK_ELEMENTS_PER_THREAD` elements per thread, whole channel columns
each (all channels of a run of spatial positions, so sSE's channel sums are complete inside a
chunk), and the temporaries are three chunk-sized buffers kept per thread:

* forward: cSE's spatial mean over the whole map first (its gate needs all of it); then, per
  chunk, sSE's logit and gate and the output;
* backward, phase 1 per chunk: ``dy*x``, the scSE-max routing weight, the gate gradients (cSE's
  summed over the chunks, sSE's complete per chunk), sSE's logit gradient and weight-gradient
  share; for sSE alone also the input gradient;
* backward, phase 2 per chunk (cSE, scSE: the input gradient needs cSE's gate gradient summed
  over the whole map): the routing weight again, then ``dx``.

Nothing map-sized is kept between the phases or for backward beyond ``x`` and the gates: the
max-routing weight is recomputed from ``x`` and the gates (Roy et al., TMI 2019, max fusion).
``python bench/bench_chunks.py`` measures the chunk size: at 128K elements per thread the
chunked steps are about as fast as unchunked ones with kept map-sized buffers (scSE within 10%,
sSE 16% slower, cSE 0.66-0.73x); smaller chunks lose to per-op dispatch. (One multiply over
L2-resident operands costs half as much per element as over a whole map, but the chunked steps
did not turn that into an end-to-end gain here.) Off CPU (CUDA without trusted Triton kernels)
the whole map is one chunk.

Layouts: a map is handled as a view ``(N, C, P)`` (NCHW, ``ch = 1``) or ``(N, P, C)``
(channels_last, ``ch = 2``), P the flattened spatial size (2D or 3D alike).
"""
from __future__ import annotations

import os
import threading
from typing import Optional

import torch
from torch import Tensor

# Elements per chunk and thread (torch splits a chunk's op over its threads). From
# ``python bench/bench_chunks.py`` (2 threads, 2x64x128^2 fp32, both layouts; bench/README.md):
# 128K per thread is as fast as one chunk per map, 64K and less per thread lose to per-op
# dispatch. ``SCSE_SEG_CHUNK=<elements>`` sets the chunk size (0: the whole map as one chunk,
# and then the kept scratch buffers are map-sized).
CHUNK_ELEMENTS_PER_THREAD = 131072


def chunk_elements(x: Tensor) -> int:
    """Elements per chunk for ``x`` (0: one chunk)."""
    if x.device.type != "cpu":
        return 0
    value = env_elements("SCSE_SEG_CHUNK")
    return CHUNK_ELEMENTS_PER_THREAD * torch.get_num_threads() if value is None else value


def env_elements(name: str) -> Optional[int]:
    """A count of map elements set by environment variable ``name`` (None when unset)."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        value = int(float(raw))
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(f"{name}={raw!r} must be a number of map elements >= 0")
    return value


def _is_channels_last(x: Tensor) -> bool:
    fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    return x.dim() in (4, 5) and not x.is_contiguous() and x.is_contiguous(memory_format=fmt)


def layout_of(x: Tensor) -> int:
    """The channel axis of ``x``'s flat view: 2 for channels_last maps, else 1."""
    return 2 if _is_channels_last(x) else 1


def empty_like(x: Tensor, ch: int) -> Tensor:
    """A map like ``x`` in the layout whose flat view (``ch``) is a view, so writing into the
    view writes the map."""
    if ch == 1:
        return torch.empty_like(x, memory_format=torch.contiguous_format)
    fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    return torch.empty_like(x, memory_format=fmt)


def flat(t: Tensor, ch: int) -> Tensor:
    """``t`` as (N, C, P) (``ch=1``) or (N, P, C) (``ch=2``); a view when ``t`` has that layout."""
    n, c = t.shape[:2]
    if ch == 1:
        return t.reshape(n, c, -1)
    return t.movedim(1, -1).reshape(n, -1, c)


def positions_per_chunk(n: int, c: int, p: int, target: int) -> int:
    """Spatial positions per chunk: a chunk is a run of positions of every sample and channel
    (so a channel column is whole inside it), about ``target`` elements; ``target=0``: all."""
    if target <= 0 or n * c * p <= target:
        return p
    return max(1, target // (n * c))


class _Chunks:
    """One map's chunking: views of flat maps and per-position (N, P) tensors chunk by chunk,
    made by one ``split`` call each (per-chunk Python slicing cost as much as the ops)."""

    def __init__(self, x: Tensor):
        self.ch = layout_of(x)
        self.sp = 3 - self.ch  # the spatial axis of the flat view
        self.n, self.c = x.shape[:2]
        self.p = x.numel() // max(1, self.n * self.c)
        self.step = positions_per_chunk(self.n, self.c, self.p, chunk_elements(x))
        self.dtype, self.device = x.dtype, x.device
        self._size = self.n * self.c * self.step
        self._buf: dict[str, Tensor] = {}

    def __len__(self) -> int:
        return -(-self.p // self.step)

    def maps(self, t3: Tensor) -> tuple[Tensor, ...]:
        return t3.split(self.step, dim=self.sp)

    def positions(self, v: Tensor) -> tuple[Tensor, ...]:
        """An (N, P) per-position tensor's chunks, (N, pb) each."""
        return v.split(self.step, dim=1)

    def channel(self, g: Tensor) -> Tensor:
        """An (N, C) per-channel tensor, broadcastable against a chunk."""
        return g.unsqueeze(self.sp)

    def spread(self, v: Tensor) -> Tensor:
        """A chunk's (N, pb) per-position block, broadcastable against the chunk."""
        return v.unsqueeze(self.ch)

    def scratch(self, name: str, like: Tensor) -> Tensor:
        """A chunk-sized buffer shaped like ``like``, contiguous; reused across chunks and calls
        (per thread), since a fresh MB-sized buffer costs a page fault per 4 KB on first write."""
        buf = self._buf.get(name)
        if buf is None:
            buf = self._buf[name] = _scratch(name, self._size, self.dtype, self.device)
        return buf[:like.numel()].view(like.shape)

    def weight(self, w: Tensor) -> Tensor:
        """sSE's 1x1 conv weight (C,) as the (N, C, 1) / (N, 1, C) factor of :meth:`add_outer`."""
        w = w.reshape(-1).to(self.dtype)
        return w.view(1, -1, 1).expand(self.n, -1, 1) if self.ch == 1 \
            else w.view(1, 1, -1).expand(self.n, 1, -1)

    def add_outer(self, dxc: Tensor, dl: Tensor, w: Tensor) -> Tensor:
        """``dxc += dl[n, p] * w[c]`` in place, one batched rank-1 update (``baddbmm_``; a
        broadcast multiply plus an add make two passes)."""
        if self.ch == 1:
            return dxc.baddbmm_(w, dl.unsqueeze(1))
        return dxc.baddbmm_(dl.unsqueeze(2), w)

    def logit(self, xc: Tensor, w: Tensor) -> Tensor:
        """``sum_c w[c] x[n, c, p]`` of a chunk -> (N, pb), one BLAS call (``bmm`` with ``w``
        expanded over the batch: ``matmul`` would copy an NCHW chunk to transpose it)."""
        if self.ch == 1:
            return torch.bmm(w.view(1, 1, -1).expand(self.n, 1, self.c), xc).squeeze(1)
        return torch.bmm(xc, w.view(1, -1, 1).expand(self.n, self.c, 1)).squeeze(2)

    def weight_grad(self, xc: Tensor, dl: Tensor, acc: torch.dtype) -> Tensor:
        """``sum_{n, p} x[n, c, p] dl[n, p]`` of a chunk -> (C,) in ``acc``. NCHW: a product
        and a sum (a matrix-vector ``bmm`` over a strided chunk measured slower)."""
        if self.ch == 1:
            prod = torch.mul(xc, dl.unsqueeze(1), out=self.scratch("t", xc))
            return prod.sum((0, 2), dtype=acc)
        return torch.bmm(dl.unsqueeze(1), xc).sum((0, 1), dtype=acc)


_SCRATCH = threading.local()


def _scratch(name: str, size: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A 1-D buffer of at least ``size`` elements kept for this thread (grown, never shrunk;
    CPU only, where chunks bound it: 3 buffers of one chunk each, 3 MB at the default size)."""
    if device.type != "cpu":
        return torch.empty(size, dtype=dtype, device=device)
    pool = getattr(_SCRATCH, "pool", None)
    if pool is None:
        pool = _SCRATCH.pool = {}
    key = (name, dtype)
    buf = pool.get(key)
    if buf is None or buf.numel() < size:
        buf = pool[key] = torch.empty(size, dtype=dtype)
    return buf


def _route_weight(ck: _Chunks, xc: Tensor, gcc: Tensor, gsc: Tensor) -> Tensor:
    """d max(x*g_c, x*g_s) / d (x*g_c) as torch.maximum's backward routes it: 1 where
    ``x*g_c > x*g_s``, 1/2 on ties (every ``x == 0``, e.g. after a ReLU), else 0."""
    r = torch.mul(xc, gcc, out=ck.scratch("k", xc))
    r.sub_(torch.mul(xc, gsc, out=ck.scratch("t", xc)))
    return r.sign_().add_(1).mul_(0.5)  # torch.heaviside does this in one op, 8x slower


def _in(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return t if t is None or t.dtype == dtype else t.to(dtype)


def forward(x: Tensor, mode: str, gc: Optional[Tensor], sse_w: Optional[Tensor],
            sse_b: Optional[Tensor], acc: torch.dtype) -> tuple[Tensor, Optional[Tensor]]:
    """The block's output for gate ``gc`` (N, C; None without cSE), and sSE's gate (N, P) in
    ``acc`` (None without sSE), computed chunk by chunk from ``x``."""
    ck = _Chunks(x)
    out = empty_like(x, ck.ch)
    xs, os_ = ck.maps(flat(x, ck.ch)), ck.maps(flat(out, ck.ch))
    gcc = None if gc is None else ck.channel(_in(gc, x.dtype))
    gs = None if sse_w is None else torch.empty(ck.n, ck.p, dtype=acc, device=x.device)
    gss = (None,) * len(ck) if gs is None else ck.positions(gs)
    w = None if sse_w is None else sse_w.reshape(-1).to(x.dtype)
    bias = None if sse_b is None else sse_b.reshape(()).to(acc)
    for xc, oc, gsb in zip(xs, os_, gss):
        gsc = None
        if gsb is not None:
            logit = _in(ck.logit(xc, w), acc)
            torch.sigmoid(logit if bias is None else logit.add_(bias), out=gsb)
            gsc = ck.spread(_in(gsb, x.dtype))
        if mode == "cse":
            torch.mul(xc, gcc, out=oc)
        elif mode == "sse":
            torch.mul(xc, gsc, out=oc)
        elif mode == "scse_add":
            torch.add(gcc, gsc, out=oc).mul_(xc)
        else:
            torch.mul(xc, gcc, out=oc)
            torch.maximum(oc, torch.mul(xc, gsc, out=ck.scratch("t", xc)), out=oc)
    return out, gs


def backward(dy: Tensor, x: Tensor, mode: str, gc: Optional[Tensor], gs: Optional[Tensor],
             sse_w: Optional[Tensor], acc: torch.dtype, channel_input_grad):
    """Gradients of the block's map-sized part. ``gc`` (N, C) and ``gs`` (N, P) are the gates
    (``acc``); ``channel_input_grad(dgc)`` turns cSE's gate gradient (N, C) into the input
    gradient's per-channel term (N, C) (the MLP backward, done by the caller) and returns it.

    Returns (dx, d logit of sSE (N, P) in ``acc`` or None, sSE weight gradient (C,) or None)."""
    ck = _Chunks(x)
    ch, sp = ck.ch, ck.sp
    dx = empty_like(x, ch)
    xs, dys, dxs = (ck.maps(flat(t, ch)) for t in (x, dy, dx))
    gcc = None if gc is None else ck.channel(_in(gc, x.dtype))
    gsx = None if gs is None else ck.positions(_in(gs, x.dtype))
    has_c, has_s = gc is not None, gs is not None
    dgc = torch.zeros(ck.n, ck.c, dtype=acc, device=x.device) if has_c else None
    dlogit = torch.empty(ck.n, ck.p, dtype=acc, device=x.device) if has_s else None
    dw = torch.zeros(ck.c, dtype=acc, device=x.device) if has_s else None
    wv = None if sse_w is None else ck.weight(sse_w)
    none = (None,) * len(ck)
    chunks = zip(xs, dys, dxs, none if gs is None else ck.positions(gs * (1 - gs)),
                 none if gs is None else gsx, none if gs is None else ck.positions(dlogit))
    for xc, dyc, dxc, gsb, gsxb, dlb in chunks:  # phase 1: gate gradients (sSE alone: dx)
        gsc = None if gsxb is None else ck.spread(gsxb)
        e = torch.mul(dyc, xc, out=ck.scratch("e", xc))
        dgs = None
        if mode == "scse_max":  # e routed: r*e to g_c, (1 - r)*e to g_s
            r = _route_weight(ck, xc, gcc, gsc)
            dgs = e.sum(ch, dtype=acc)
            e.mul_(r)
            dgc.add_(e.sum(sp, dtype=acc))
            dgs.sub_(e.sum(ch, dtype=acc))
        else:
            if has_c:
                dgc.add_(e.sum(sp, dtype=acc))
            if has_s:
                dgs = e.sum(ch, dtype=acc)
        if has_s:
            dl = torch.mul(dgs, gsb, out=dlb)  # gsb: the chunk's g_s * (1 - g_s)
            dlx = _in(dl, x.dtype)
            dw.add_(ck.weight_grad(xc, dlx, acc))
            if mode == "sse":  # dx = dy * g_s + dlogit * w
                ck.add_outer(torch.mul(dyc, gsc, out=dxc), dlx, wv)
    if not has_c:
        return dx, dlogit, dw
    ctc = ck.channel(channel_input_grad(dgc).to(x.dtype))  # dx's per-channel term
    dls = none if dlogit is None else ck.positions(_in(dlogit, x.dtype))
    for xc, dyc, dxc, gsxb, dlb in zip(xs, dys, dxs, none if gsx is None else gsx, dls):
        # phase 2: dx = dy * (routed gate) + ctc[n, c] + dlogit[n, p] * w[c]
        if mode == "cse":
            torch.addcmul(ctc, dyc, gcc, out=dxc)
            continue
        gsc = ck.spread(gsxb)
        if mode == "scse_add":
            gate = torch.add(gcc, gsc, out=ck.scratch("k", xc))
        else:  # the routed gate g_s + r * (g_c - g_s)
            r = _route_weight(ck, xc, gcc, gsc)
            gate = torch.lerp(gsc, gcc, r, out=ck.scratch("t", xc))  # exact at r = 0 and 1
        ck.add_outer(torch.addcmul(ctc, dyc, gate, out=dxc), dlb, wv)
    return dx, dlogit, dw
