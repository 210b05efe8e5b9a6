"""The fused Triton SE kernels as torch custom ops with autograd: what CUDA blocks run, eager or
under torch.compile / torch.export.

Op graph::

    scse_seg::se_forward(x, fc1_w, fc1_b, fc2_w, fc2_b, sse_w, sse_b, mode) -> (out, mean, logit)
        squeeze kernel -> mean (N, C), logit (N, P);  torch MLP: g_c = sigmoid(fc2(relu(fc1(mean))))
        excite kernel  -> out
    backward (register_autograd):
        scse_seg::se_bwd_reduce  -> d g_c (N, C), d g_s (N, P)
        torch: MLP backward by hand (:func:`.gates.mlp_backward`), d logit = d g_s g_s (1 - g_s)
        scse_seg::se_bwd_input   -> d x, d w_sse

The input gradient needs ``d mean``, which exists only after the MLP backward, so that runs
between the two backward kernels and ``d x`` is written in one pass. ``mean`` and ``logit`` are
extra outputs only so backward need not recompute a pass over ``x``; gradients flowing into them
are honoured. Per-(n, c) / per-(n, p) quantities are fp32 (fp64 for fp64 maps) with autocast off.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from . import triton_se as K
from .gates import acc_dtype, check_mode, grads_like, has_cse, has_sse, mlp, mlp_backward, no_autocast

Opt = Optional[Tensor]


def _empty(x: Tensor, *shape) -> Tensor:
    return x.new_empty(shape, dtype=acc_dtype(x.dtype))


@torch.library.custom_op("scse_seg::se_forward", mutates_args=())
def se_forward(x: Tensor, fc1_w: Opt, fc1_b: Opt, fc2_w: Opt, fc2_b: Opt, sse_w: Opt, sse_b: Opt,
               mode: str) -> tuple[Tensor, Tensor, Tensor]:
    mean, logit = K.squeeze(x, sse_w, mode)
    with no_autocast(x):
        gc = mlp(mean, fc1_w, fc1_b, fc2_w, fc2_b)[1].contiguous() if mean is not None else None
    out = K.excite(x, gc, logit, sse_b, mode)
    n = x.shape[0]
    return (out, _empty(x, n, 0) if mean is None else mean,
            _empty(x, n, 0) if logit is None else logit)


@se_forward.register_fake
def _(x, fc1_w, fc1_b, fc2_w, fc2_b, sse_w, sse_b, mode):
    n = x.shape[0]
    return (torch.empty_like(x), _empty(x, n, x.shape[1] if has_cse(mode) else 0),
            _empty(x, n, math.prod(x.shape[2:]) if has_sse(mode) else 0))


@torch.library.custom_op("scse_seg::se_bwd_reduce", mutates_args=())
def se_bwd_reduce(dy: Tensor, x: Tensor, gc: Opt, logit: Opt, sse_b: Opt,
                  mode: str) -> tuple[Tensor, Tensor]:
    dgc, dgs = K.bwd_reduce(dy, x, gc, logit, sse_b, mode)
    n = x.shape[0]
    return (_empty(x, n, 0) if dgc is None else dgc), (_empty(x, n, 0) if dgs is None else dgs)


@se_bwd_reduce.register_fake
def _(dy, x, gc, logit, sse_b, mode):
    n = x.shape[0]
    return (_empty(x, n, x.shape[1] if has_cse(mode) else 0),
            _empty(x, n, math.prod(x.shape[2:]) if has_sse(mode) else 0))


@torch.library.custom_op("scse_seg::se_bwd_input", mutates_args=())
def se_bwd_input(dy: Tensor, x: Tensor, gc: Opt, logit: Opt, sse_b: Opt, dxc: Opt, dlogit: Opt,
                 sse_w: Opt, mode: str) -> tuple[Tensor, Tensor]:
    dx, dw = K.bwd_input(dy, x, gc, logit, sse_b, dxc, dlogit, sse_w, mode)
    return dx, _empty(x, 0) if dw is None else dw


@se_bwd_input.register_fake
def _(dy, x, gc, logit, sse_b, dxc, dlogit, sse_w, mode):
    return torch.empty_like(x), _empty(x, x.shape[1] if has_sse(mode) else 0)


def _setup_context(ctx, inputs, output):
    ctx.mode = inputs[-1]
    ctx.save_for_backward(*inputs[:-1], *output[1:])


def _backward(ctx, dy, dmean_out, dlogit_out):
    x, fc1_w, fc1_b, fc2_w, fc2_b, sse_w, sse_b, mean, logit = ctx.saved_tensors
    mode = ctx.mode
    hc, hs = has_cse(mode), has_sse(mode)
    dy = torch.zeros_like(x) if dy is None else dy
    g = [None] * 6  # fc1_w, fc1_b, fc2_w, fc2_b, sse_w, sse_b
    gc = dxc = dlogit = None
    with no_autocast(x):
        if hc:
            h, gc = mlp(mean, fc1_w, fc1_b, fc2_w, fc2_b)
            gc = gc.contiguous()
        dgc, dgs = se_bwd_reduce(dy, x, gc, logit if hs else None, sse_b, mode)
        if hc:
            *g[:4], dmean = mlp_backward(dgc, mean, h, gc, fc1_w, fc2_w)
            if dmean_out is not None:
                dmean = dmean + dmean_out
            dxc = (dmean / math.prod(x.shape[2:])).contiguous()
        if hs:
            gs = torch.sigmoid(logit if sse_b is None else logit + sse_b.reshape(()).to(logit.dtype))
            dlogit = dgs * gs * (1 - gs)
            if dlogit_out is not None:
                dlogit = dlogit + dlogit_out
            dlogit = dlogit.contiguous()
            g[5] = dlogit.sum()
        dx, dw = se_bwd_input(dy, x, gc, logit if hs else None, sse_b, dxc, dlogit,
                              sse_w if hs else None, mode)
    if hs:
        g[4] = dw
    return (dx, *grads_like(g, (fc1_w, fc1_b, fc2_w, fc2_b, sse_w, sse_b)), None)


se_forward.register_autograd(_backward, setup_context=_setup_context)


def se_function(x: Tensor, mode: str, fc1_w: Opt = None, fc1_b: Opt = None, fc2_w: Opt = None,
                fc2_b: Opt = None, sse_w: Opt = None, sse_b: Opt = None) -> Tensor:
    """Fused cSE / sSE / scSE on an ``N, C, *spatial`` map (2D or 3D), differentiable in ``x``
    and every parameter (once). ``mode``: "cse", "sse", "scse_max" or "scse_add"."""
    check_mode(mode)
    if x.dim() not in (4, 5):
        raise ValueError(f"fused SE expects an N, C, H, W(, D) map, got shape {tuple(x.shape)}")
    if has_cse(mode) and (fc1_w is None or fc2_w is None):
        raise ValueError(f"mode {mode!r} needs fc1_w and fc2_w")
    if not has_cse(mode):
        fc1_w = fc1_b = fc2_w = fc2_b = None
    if has_sse(mode) and (sse_w is None or sse_w.numel() != x.shape[1]):
        raise ValueError(f"mode {mode!r} needs sse_w with {x.shape[1]} elements")
    if not has_sse(mode):
        sse_w = sse_b = None
    return se_forward(x, fc1_w, fc1_b, fc2_w, fc2_b, sse_w, sse_b, mode)[0]
