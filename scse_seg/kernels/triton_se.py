"""Triton kernels for the SE blocks, and plain launchers that run them on tensors.

The blocks are memory bound: eager cSE/sSE/scSE read and write the feature map several times
(mean, 1x1 conv, sigmoid, products, maximum, and as many again in backward). These kernels touch
the map the minimum number of times:

forward   ``squeeze``     read x once -> per-(n, c) partial spatial sums and per-(n, p) sSE
                          logits (channel dot product with the 1x1 conv weight, bias excluded)
          ``excite``      read x once, write out once
backward  ``bwd_reduce``  read x, dy once -> per-(n, c) d g_c partials and per-(n, p) d g_s
          ``bwd_input``   read x, dy once, write dx once -> also per-(n, c) d w_sse partials

Layout: a map ``N, C, *S`` is addressed as ``x[n, c, p] = base + n*s_n + c*s_c + p*s_p`` with the
spatial dims flattened to ``p``; this covers NCHW/NCDHW (``s_p = 1``) and channels_last(_3d)
(``s_c = 1``, ``s_p = C``) without copies. Maps whose spatial dims cannot be flattened to one
stride are copied to contiguous memory first (see :func:`flat_strides`).

Arithmetic is in fp32 (fp64 for fp64 maps, so tests can compare against eager to 1e-6); the
small per-(n, c) / per-(n, p) outputs are returned in that accumulation dtype. Cross-program
reductions go through small partial buffers summed by torch, so results are deterministic (no
atomics).

Modes (``MODE`` constexpr: the index in :data:`.gates.MODES`): 0 cse, 1 sse, 2 scSE max, 3 scSE
add. For ``max``, ties (``x*g_c == x*g_s``, e.g. every ``x == 0`` after a ReLU) split the gradient
half/half, exactly as ``torch.maximum``'s backward does, so fused and eager gradients agree.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .gates import MODES, acc_dtype, has_cse, has_sse

# Split the channel loop of the reducing kernels over several programs when (spatial blocks x
# batch) alone would leave the GPU idle (deep, low-resolution maps). None: 4 programs per SM on
# CUDA, no split elsewhere (the interpreter runs programs one by one). Tests set it to force the
# split path.
MIN_PROGRAMS: int | None = None


def _min_programs(x: torch.Tensor) -> int:
    if MIN_PROGRAMS is not None:
        return MIN_PROGRAMS
    if x.is_cuda:
        return 4 * torch.cuda.get_device_properties(x.device).multi_processor_count
    return 1


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _offsets(pid_p, c0, P, C, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
             IDX64: tl.constexpr):
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = c0 + tl.arange(0, BLOCK_C)
    if IDX64:
        offs_p = offs_p.to(tl.int64)
        offs_c = offs_c.to(tl.int64)
    return offs_p, offs_c, offs_p < P, offs_c < C


@triton.jit
def _max_weight(a, b):
    """d max(a, b) / d a as torch.maximum defines it: 1, 0.5 on ties, 0."""
    return tl.where(a > b, 1.0, tl.where(a == b, 0.5, 0.0))


@triton.jit
def _squeeze_kernel(x_ptr, w_ptr, psum_ptr, plogit_ptr,
                    C, P, sxn, sxc, sxp, n_pblk, N, c_per_prog,
                    HAS_C: tl.constexpr, HAS_S: tl.constexpr, ACC: tl.constexpr,
                    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, IDX64: tl.constexpr):
    """Grid (p blocks, channel groups, N). One read of x[n, group, p block]:
    psum[n, p block, c] = sum_p x ;  plogit[group, n, p] = sum_{c in group} w[c] x."""
    pid_p = tl.program_id(0)
    grp = tl.program_id(1)
    n = tl.program_id(2).to(tl.int64)
    x_base = x_ptr + n * sxn
    c_start = grp * c_per_prog
    c_end = tl.minimum(c_start + c_per_prog, C)
    dot = tl.zeros([BLOCK_P], dtype=ACC)
    for c0 in range(c_start, c_end, BLOCK_C):
        offs_p, offs_c, mask_p, mask_c = _offsets(pid_p, c0, P, c_end, BLOCK_C, BLOCK_P, IDX64)
        m = mask_c[:, None] & mask_p[None, :]
        xt = tl.load(x_base + offs_c[:, None] * sxc + offs_p[None, :] * sxp, mask=m,
                     other=0.0).to(ACC)
        if HAS_C:
            tl.store(psum_ptr + (n * n_pblk + pid_p) * C + offs_c, tl.sum(xt, axis=1),
                     mask=mask_c)
        if HAS_S:
            w = tl.load(w_ptr + offs_c, mask=mask_c, other=0.0).to(ACC)
            dot += tl.sum(xt * w[:, None], axis=0)
    if HAS_S:
        offs_p1 = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        tl.store(plogit_ptr + (grp * N + n) * P + offs_p1, dot, mask=offs_p1 < P)


@triton.jit
def _channel_gate(gc_ptr, n, C, offs_c, mask_c, ACC: tl.constexpr):
    """g_c[n, c] for one channel block."""
    return tl.load(gc_ptr + n * C + offs_c, mask=mask_c, other=0.0).to(ACC)


@triton.jit
def _spatial_gate(logit_ptr, b_ptr, n, P, offs_p, mask_p, ACC: tl.constexpr):
    """g_s[n, p] = sigmoid(logit + b) for one spatial block (the bias is added here, not in
    squeeze, so its gradient is just the sum of d logit)."""
    lg = tl.load(logit_ptr + n * P + offs_p, mask=mask_p, other=0.0).to(ACC)
    b = tl.load(b_ptr).to(ACC)
    return 1.0 / (1.0 + tl.exp(-(lg + b)))


@triton.jit
def _excite_kernel(x_ptr, gc_ptr, logit_ptr, b_ptr, out_ptr,
                   C, P, sxn, sxc, sxp, son, soc, sop,
                   MODE: tl.constexpr, ACC: tl.constexpr,
                   BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, IDX64: tl.constexpr):
    """Grid (p blocks, c blocks, N). out = x*g_c | x*g_s | max(x*g_c, x*g_s) | x*(g_c+g_s)."""
    pid_p = tl.program_id(0)
    n = tl.program_id(2).to(tl.int64)
    offs_p, offs_c, mask_p, mask_c = _offsets(pid_p, tl.program_id(1) * BLOCK_C, P, C,
                                              BLOCK_C, BLOCK_P, IDX64)
    m = mask_c[:, None] & mask_p[None, :]
    xt = tl.load(x_ptr + n * sxn + offs_c[:, None] * sxc + offs_p[None, :] * sxp, mask=m,
                 other=0.0).to(ACC)
    if MODE != 1:
        gc = _channel_gate(gc_ptr, n, C, offs_c, mask_c, ACC)
    if MODE != 0:
        gs = _spatial_gate(logit_ptr, b_ptr, n, P, offs_p, mask_p, ACC)
    if MODE == 0:
        y = xt * gc[:, None]
    elif MODE == 1:
        y = xt * gs[None, :]
    elif MODE == 2:
        y = tl.maximum(xt * gc[:, None], xt * gs[None, :])
    else:
        y = xt * (gc[:, None] + gs[None, :])
    tl.store(out_ptr + n * son + offs_c[:, None] * soc + offs_p[None, :] * sop,
             y.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _bwd_reduce_kernel(x_ptr, dy_ptr, gc_ptr, logit_ptr, b_ptr, pdgc_ptr, pdgs_ptr,
                       C, P, sxn, sxc, sxp, syn, syc, syp, n_pblk, N, c_per_prog,
                       MODE: tl.constexpr, ACC: tl.constexpr,
                       BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, IDX64: tl.constexpr):
    """Grid (p blocks, channel groups, N). One read of x and dy:
    pdgc[n, p block, c] = sum_p dy * x * w_a ;  pdgs[group, n, p] = sum_{c in group} dy * x * w_b
    where (w_a, w_b) route the gradient to the channel / spatial branch (1/0, 0/1, both 1 for
    add, the torch.maximum weights for max)."""
    pid_p = tl.program_id(0)
    grp = tl.program_id(1)
    n = tl.program_id(2).to(tl.int64)
    c_start = grp * c_per_prog
    c_end = tl.minimum(c_start + c_per_prog, C)
    acc_s = tl.zeros([BLOCK_P], dtype=ACC)
    if MODE == 2:  # the spatial gate of this p block serves every channel chunk
        offs_p0 = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        gs = _spatial_gate(logit_ptr, b_ptr, n, P, offs_p0, offs_p0 < P, ACC)
    for c0 in range(c_start, c_end, BLOCK_C):
        offs_p, offs_c, mask_p, mask_c = _offsets(pid_p, c0, P, c_end, BLOCK_C, BLOCK_P, IDX64)
        m = mask_c[:, None] & mask_p[None, :]
        xt = tl.load(x_ptr + n * sxn + offs_c[:, None] * sxc + offs_p[None, :] * sxp, mask=m,
                     other=0.0).to(ACC)
        dyt = tl.load(dy_ptr + n * syn + offs_c[:, None] * syc + offs_p[None, :] * syp, mask=m,
                      other=0.0).to(ACC)
        gxy = xt * dyt
        if MODE == 2:
            gc = _channel_gate(gc_ptr, n, C, offs_c, mask_c, ACC)
            wa = _max_weight(xt * gc[:, None], xt * gs[None, :])
            to_c = gxy * wa
            to_s = gxy - to_c
        else:
            to_c = gxy
            to_s = gxy
        if MODE != 1:
            tl.store(pdgc_ptr + (n * n_pblk + pid_p) * C + offs_c, tl.sum(to_c, axis=1),
                     mask=mask_c)
        if MODE != 0:
            acc_s += tl.sum(to_s, axis=0)
    if MODE != 0:
        offs_p1 = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        tl.store(pdgs_ptr + (grp * N + n) * P + offs_p1, acc_s, mask=offs_p1 < P)


@triton.jit
def _bwd_input_kernel(x_ptr, dy_ptr, gc_ptr, logit_ptr, b_ptr, dxc_ptr, dlogit_ptr, w_ptr,
                      dx_ptr, pdw_ptr,
                      C, P, sxn, sxc, sxp, syn, syc, syp, sdn, sdc, sdp, n_pblk,
                      MODE: tl.constexpr, ACC: tl.constexpr,
                      BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, IDX64: tl.constexpr):
    """Grid (p blocks, c blocks, N). One read of x and dy, one write of dx:
    dx = dy * (direct gate) + dxc[n, c] + dlogit[n, p] * w[c]   (dxc = d mean / P)
    pdw[n, p block, c] = sum_p dlogit * x  (the 1x1 conv weight gradient, summed by torch)."""
    pid_p = tl.program_id(0)
    n = tl.program_id(2).to(tl.int64)
    offs_p, offs_c, mask_p, mask_c = _offsets(pid_p, tl.program_id(1) * BLOCK_C, P, C,
                                              BLOCK_C, BLOCK_P, IDX64)
    m = mask_c[:, None] & mask_p[None, :]
    xt = tl.load(x_ptr + n * sxn + offs_c[:, None] * sxc + offs_p[None, :] * sxp, mask=m,
                 other=0.0).to(ACC)
    dyt = tl.load(dy_ptr + n * syn + offs_c[:, None] * syc + offs_p[None, :] * syp, mask=m,
                  other=0.0).to(ACC)
    if MODE != 1:
        gc = _channel_gate(gc_ptr, n, C, offs_c, mask_c, ACC)
    if MODE != 0:
        gs = _spatial_gate(logit_ptr, b_ptr, n, P, offs_p, mask_p, ACC)
    if MODE == 0:
        dx = dyt * gc[:, None]
    elif MODE == 1:
        dx = dyt * gs[None, :]
    elif MODE == 2:
        wa = _max_weight(xt * gc[:, None], xt * gs[None, :])
        dx = dyt * (wa * gc[:, None] + (1.0 - wa) * gs[None, :])
    else:
        dx = dyt * (gc[:, None] + gs[None, :])
    if MODE != 1:
        dxc = tl.load(dxc_ptr + n * C + offs_c, mask=mask_c, other=0.0).to(ACC)
        dx += dxc[:, None]
    if MODE != 0:
        dlg = tl.load(dlogit_ptr + n * P + offs_p, mask=mask_p, other=0.0).to(ACC)
        w = tl.load(w_ptr + offs_c, mask=mask_c, other=0.0).to(ACC)
        dx += dlg[None, :] * w[:, None]
        tl.store(pdw_ptr + (n * n_pblk + pid_p) * C + offs_c, tl.sum(xt * dlg[None, :], axis=1),
                 mask=mask_c)
    tl.store(dx_ptr + n * sdn + offs_c[:, None] * sdc + offs_p[None, :] * sdp,
             dx.to(dx_ptr.dtype.element_ty), mask=m)


# --------------------------------------------------------------------------------------------
# launchers (plain functions on real tensors; ops.py wraps them as custom ops); ``mode`` is
# one of :data:`.gates.MODES`
# --------------------------------------------------------------------------------------------


def _tl_acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def flat_strides(t: torch.Tensor) -> tuple[int, int, int] | None:
    """(s_n, s_c, s_p) when the spatial dims of ``t`` flatten to a single stride, else None.

    True for contiguous and channels_last(_3d) maps (and any slicing that keeps the spatial block
    dense); size-1 dims are ignored because their stride is arbitrary.
    """
    sizes, strides = t.shape[2:], t.stride()[2:]
    dims = [(s, st) for s, st in zip(sizes, strides) if s != 1]
    if not dims:
        return t.stride(0), t.stride(1), 1
    for (_, outer), (size, inner) in zip(dims[:-1], dims[1:]):
        if outer != inner * size:
            return None
    return t.stride(0), t.stride(1), dims[-1][1]


def strided(t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """``t`` and its flat strides, copying to contiguous memory only if it has no flat stride."""
    s = flat_strides(t)
    if s is None:
        t = t.contiguous()
        s = flat_strides(t)
    return t, s


def _next_pow2(v: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, v))))


def _blocks(C: int, P: int, channels_fastest: bool) -> tuple[int, int]:
    """Tile (BLOCK_C, BLOCK_P) of about 4096 elements, long along the contiguous axis."""
    if channels_fastest:
        bc = min(max(_next_pow2(C), 16), 64)
        bp = min(max(_next_pow2(P), 16), 4096 // bc)
    else:
        bp = min(max(_next_pow2(P), 16), 256)
        bc = min(max(_next_pow2(C), 16), 4096 // bp)
    return bc, bp


class _Geometry:
    """Sizes, tiles and grid shared by the four launchers for one map."""

    def __init__(self, x: torch.Tensor, sx: tuple[int, int, int]):
        self.N, self.C = x.shape[0], x.shape[1]
        self.P = math.prod(x.shape[2:])
        self.bc, self.bp = _blocks(self.C, self.P, sx[1] == 1 and self.C > 1)
        self.n_pblk = triton.cdiv(self.P, self.bp)
        self.n_cblk = triton.cdiv(self.C, self.bc)
        # channel groups for the reducing kernels: enough programs to fill the device
        groups = max(1, min(self.n_cblk, triton.cdiv(_min_programs(x), max(1, self.n_pblk * self.N))))
        self.c_per_prog = triton.cdiv(self.n_cblk, groups) * self.bc
        self.groups = triton.cdiv(self.C, self.c_per_prog)
        self.idx64 = x.numel() >= 2 ** 31 or self.C * self.P >= 2 ** 31
        self.acc = acc_dtype(x.dtype)

    def reduce_grid(self):
        return (self.n_pblk, self.groups, self.N)

    def tile_grid(self):
        return (self.n_pblk, self.n_cblk, self.N)

    def meta(self):
        return dict(ACC=_tl_acc(self.acc), BLOCK_C=self.bc, BLOCK_P=self.bp, IDX64=self.idx64)


def _empty(x, *shape, dtype):
    return torch.empty(shape, device=x.device, dtype=dtype)


def _check_grid(g: _Geometry) -> None:
    if g.N > 65535 or g.n_cblk > 65535:
        raise ValueError(f"fused SE: batch {g.N} / channel blocks {g.n_cblk} exceed the grid limit")


def _dummy(x: torch.Tensor) -> torch.Tensor:
    return torch.empty(1, device=x.device, dtype=acc_dtype(x.dtype))


def squeeze(x: torch.Tensor, sse_w: torch.Tensor | None, mode: str
            ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Spatial means (N, C) for cSE and bias-free sSE logits (N, P), in one read of ``x``."""
    x, sx = strided(x)
    g = _Geometry(x, sx)
    _check_grid(g)
    hc, hs = has_cse(mode), has_sse(mode)
    psum = _empty(x, g.N, g.n_pblk, g.C, dtype=g.acc) if hc else _dummy(x)
    plogit = _empty(x, g.groups, g.N, g.P, dtype=g.acc) if hs else _dummy(x)
    w = sse_w.reshape(-1).contiguous() if hs else _dummy(x)
    if g.N and g.C and g.P:
        _squeeze_kernel[g.reduce_grid()](x, w, psum, plogit, g.C, g.P, *sx, g.n_pblk, g.N,
                                         g.c_per_prog, HAS_C=hc, HAS_S=hs, **g.meta())
    elif hc:
        psum.zero_()
    mean = psum.sum(1) / g.P if hc else None
    if hs:
        logit = plogit.sum(0) if g.groups > 1 else plogit[0]
        if not (g.N and g.C and g.P):
            logit = torch.zeros_like(logit)
    else:
        logit = None
    return mean, logit


def excite(x: torch.Tensor, gc: torch.Tensor | None, logit: torch.Tensor | None,
           sse_b: torch.Tensor | None, mode: str) -> torch.Tensor:
    """The recalibrated map, same dtype and memory format as ``x``; one read, one write."""
    out = torch.empty_like(x)
    xs, sx = strided(x)
    dst = out if flat_strides(out) is not None else torch.empty_like(xs)
    g = _Geometry(xs, sx)
    _check_grid(g)
    if g.N and g.C and g.P:
        _excite_kernel[g.tile_grid()](
            xs, gc if gc is not None else _dummy(x), logit if logit is not None else _dummy(x),
            _bias(x, sse_b), dst, g.C, g.P, *sx, *flat_strides(dst), MODE=MODES.index(mode),
            **g.meta())
    if dst is not out:
        out.copy_(dst)
    return out


def _bias(x: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return b.reshape(-1) if b is not None else torch.zeros(1, device=x.device, dtype=x.dtype)


def bwd_reduce(dy: torch.Tensor, x: torch.Tensor, gc: torch.Tensor | None,
               logit: torch.Tensor | None, sse_b: torch.Tensor | None, mode: str
               ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """d loss / d g_c (N, C) and d loss / d g_s (N, P), in one read of ``x`` and ``dy``."""
    xs, sx = strided(x)
    dys, sy = strided(dy)
    g = _Geometry(xs, sx)
    _check_grid(g)
    hc, hs = has_cse(mode), has_sse(mode)
    pdgc = _empty(x, g.N, g.n_pblk, g.C, dtype=g.acc) if hc else _dummy(x)
    pdgs = _empty(x, g.groups, g.N, g.P, dtype=g.acc) if hs else _dummy(x)
    if g.N and g.C and g.P:
        _bwd_reduce_kernel[g.reduce_grid()](
            xs, dys, gc if gc is not None else _dummy(x), logit if logit is not None else _dummy(x),
            _bias(x, sse_b), pdgc, pdgs, g.C, g.P, *sx, *sy, g.n_pblk, g.N, g.c_per_prog,
            MODE=MODES.index(mode), **g.meta())
    else:
        pdgc.zero_()
        pdgs.zero_()
    dgc = pdgc.sum(1) if hc else None
    dgs = (pdgs.sum(0) if g.groups > 1 else pdgs[0]) if hs else None
    return dgc, dgs


def bwd_input(dy: torch.Tensor, x: torch.Tensor, gc: torch.Tensor | None,
              logit: torch.Tensor | None, sse_b: torch.Tensor | None, dxc: torch.Tensor | None,
              dlogit: torch.Tensor | None, sse_w: torch.Tensor | None, mode: str
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """d loss / d x (like ``x``) and d loss / d w_sse (C,), in one read of x, dy, one write."""
    dx = torch.empty_like(x)
    xs, sx = strided(x)
    dys, sy = strided(dy)
    dst = dx if flat_strides(dx) is not None else torch.empty_like(xs)
    g = _Geometry(xs, sx)
    _check_grid(g)
    hs = has_sse(mode)
    pdw = _empty(x, g.N, g.n_pblk, g.C, dtype=g.acc) if hs else _dummy(x)
    d = _dummy(x)
    if g.N and g.C and g.P:
        _bwd_input_kernel[g.tile_grid()](
            xs, dys, gc if gc is not None else d, logit if logit is not None else d,
            _bias(x, sse_b), dxc if dxc is not None else d, dlogit if dlogit is not None else d,
            sse_w.reshape(-1).contiguous() if hs else d, dst, pdw,
            g.C, g.P, *sx, *sy, *flat_strides(dst), g.n_pblk, MODE=MODES.index(mode), **g.meta())
    elif hs:
        pdw.zero_()
    if dst is not dx:
        dx.copy_(dst)
    return dx, (pdw.sum((0, 1)) if hs else None)
