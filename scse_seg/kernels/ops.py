"""The fused SE kernels as torch custom ops with autograd (for torch.compile / torch.export) and
as a plain autograd Function with the same forward and backward (:class:`EagerSE`, eager calls).

Op graph::

    scse_seg::se_forward(x, fc1_w, fc1_b, fc2_w, fc2_b, sse_w, sse_b, mode) -> (out, mean, logit)
        squeeze kernel -> mean (N, C), logit (N, P);  torch MLP: g_c = sigmoid(fc2(relu(fc1(mean))))
        excite kernel  -> out
    backward (register_autograd):
        scse_seg::se_bwd_reduce  -> d g_c (N, C), d g_s (N, P)
        torch: MLP backward (d g_c -> d mean, d fc*), d logit = d g_s * g_s (1 - g_s), d b = sum
        scse_seg::se_bwd_input   -> d x, d w_sse

Why the MLP backward is written out here instead of left to autograd: d x needs d mean, which
only exists after the MLP backward, and computing d x in one pass (read x and dy, write dx once)
requires that MLP backward to run *between* the two backward kernels. Split into autograd-visible
pieces (squeeze op -> torch MLP -> excite op), autograd would instead produce two partial d x
maps and add them: three extra passes over the map. The MLP is N x C, so the ten lines of manual
backward cost nothing; the tests check it against eager autograd.

``mean`` and ``logit`` are extra outputs only so backward can use them without recomputing a
pass over x; :func:`fused_se_function` returns ``out`` alone. Gradients flowing into them are
nevertheless honoured. Double backward is not supported.

All per-(n, c) / per-(n, p) quantities are fp32 (fp64 for fp64 maps) and the MLP runs in that
precision with autocast disabled, so bf16/fp16 maps under autocast get fp32 gates, as the eager
blocks get from their fp32 ``mean``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import triton_se as K
from .fast_se import module_params

MODES = tuple(K.MODES)


def _mode(mode: str) -> int:
    if mode not in K.MODES:
        raise ValueError(f"unknown fused SE mode {mode!r}; valid: {', '.join(MODES)}")
    return K.MODES[mode]


def _no_autocast(device: torch.device):
    return torch.autocast(device_type=device.type, enabled=False)


def _mlp(mean: Tensor, fc1_w: Tensor, fc1_b: Optional[Tensor], fc2_w: Tensor,
         fc2_b: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """(hidden pre-activation h, gate g_c) of the cSE excitation, in ``mean``'s dtype."""
    dt = mean.dtype
    with _no_autocast(mean.device):
        h = F.linear(mean, fc1_w.to(dt), None if fc1_b is None else fc1_b.to(dt))
        z = F.linear(torch.relu(h), fc2_w.to(dt), None if fc2_b is None else fc2_b.to(dt))
        return h, torch.sigmoid(z)


def _spatial_size(x: Tensor) -> int:
    return math.prod(x.shape[2:])


# --------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------


def _forward_impl(x: Tensor, fc1_w: Optional[Tensor], fc1_b: Optional[Tensor],
                  fc2_w: Optional[Tensor], fc2_b: Optional[Tensor], sse_w: Optional[Tensor],
                  sse_b: Optional[Tensor], mode: str) -> tuple[Tensor, Tensor, Tensor]:
    m = _mode(mode)
    mean, logit = K.squeeze(x, sse_w, m)
    gc = _mlp(mean, fc1_w, fc1_b, fc2_w, fc2_b)[1].contiguous() if mean is not None else None
    out = K.excite(x, gc, logit, sse_b, m)
    acc = K.acc_dtype(x.dtype)
    if mean is None:
        mean = x.new_empty((x.shape[0], 0), dtype=acc)
    if logit is None:
        logit = x.new_empty((x.shape[0], 0), dtype=acc)
    return out, mean, logit


@torch.library.custom_op("scse_seg::se_forward", mutates_args=())
def se_forward(x: Tensor, fc1_w: Optional[Tensor], fc1_b: Optional[Tensor],
               fc2_w: Optional[Tensor], fc2_b: Optional[Tensor], sse_w: Optional[Tensor],
               sse_b: Optional[Tensor], mode: str) -> tuple[Tensor, Tensor, Tensor]:
    return _forward_impl(x, fc1_w, fc1_b, fc2_w, fc2_b, sse_w, sse_b, mode)


@se_forward.register_fake
def _(x, fc1_w, fc1_b, fc2_w, fc2_b, sse_w, sse_b, mode):
    m, acc, n = _mode(mode), K.acc_dtype(x.dtype), x.shape[0]
    mean = x.new_empty((n, x.shape[1] if K.has_cse(m) else 0), dtype=acc)
    logit = x.new_empty((n, _spatial_size(x) if K.has_sse(m) else 0), dtype=acc)
    return torch.empty_like(x), mean, logit


# --------------------------------------------------------------------------------------------
# backward kernels as ops (so the backward graph traces under torch.compile)
# --------------------------------------------------------------------------------------------


def _bwd_reduce_impl(dy: Tensor, x: Tensor, gc: Optional[Tensor], logit: Optional[Tensor],
                     sse_b: Optional[Tensor], mode: str) -> tuple[Tensor, Tensor]:
    m = _mode(mode)
    dgc, dgs = K.bwd_reduce(dy, x, gc, logit, sse_b, m)
    acc = K.acc_dtype(x.dtype)
    empty = x.new_empty((x.shape[0], 0), dtype=acc)
    return (dgc if dgc is not None else empty), (dgs if dgs is not None else empty.clone())


@torch.library.custom_op("scse_seg::se_bwd_reduce", mutates_args=())
def se_bwd_reduce(dy: Tensor, x: Tensor, gc: Optional[Tensor], logit: Optional[Tensor],
                  sse_b: Optional[Tensor], mode: str) -> tuple[Tensor, Tensor]:
    return _bwd_reduce_impl(dy, x, gc, logit, sse_b, mode)


@se_bwd_reduce.register_fake
def _(dy, x, gc, logit, sse_b, mode):
    m, acc, n = _mode(mode), K.acc_dtype(x.dtype), x.shape[0]
    return (x.new_empty((n, x.shape[1] if K.has_cse(m) else 0), dtype=acc),
            x.new_empty((n, _spatial_size(x) if K.has_sse(m) else 0), dtype=acc))


def _bwd_input_impl(dy: Tensor, x: Tensor, gc: Optional[Tensor], logit: Optional[Tensor],
                    sse_b: Optional[Tensor], dxc: Optional[Tensor], dlogit: Optional[Tensor],
                    sse_w: Optional[Tensor], mode: str) -> tuple[Tensor, Tensor]:
    m = _mode(mode)
    dx, dw = K.bwd_input(dy, x, gc, logit, sse_b, dxc, dlogit, sse_w, m)
    if dw is None:
        dw = x.new_empty((0,), dtype=K.acc_dtype(x.dtype))
    return dx, dw


@torch.library.custom_op("scse_seg::se_bwd_input", mutates_args=())
def se_bwd_input(dy: Tensor, x: Tensor, gc: Optional[Tensor], logit: Optional[Tensor],
                 sse_b: Optional[Tensor], dxc: Optional[Tensor], dlogit: Optional[Tensor],
                 sse_w: Optional[Tensor], mode: str) -> tuple[Tensor, Tensor]:
    return _bwd_input_impl(dy, x, gc, logit, sse_b, dxc, dlogit, sse_w, mode)


@se_bwd_input.register_fake
def _(dy, x, gc, logit, sse_b, dxc, dlogit, sse_w, mode):
    m = _mode(mode)
    dw = x.new_empty((x.shape[1] if K.has_sse(m) else 0,), dtype=K.acc_dtype(x.dtype))
    return torch.empty_like(x), dw


# --------------------------------------------------------------------------------------------
# autograd
# --------------------------------------------------------------------------------------------


def _setup_context(ctx, inputs, output):
    x, fc1_w, fc1_b, fc2_w, fc2_b, sse_w, sse_b, mode = inputs
    _, mean, logit = output
    ctx.mode = mode
    ctx.save_for_backward(x, fc1_w, fc1_b, fc2_w, fc2_b, sse_w, sse_b, mean, logit)


def _like(grad: Optional[Tensor], param: Optional[Tensor]) -> Optional[Tensor]:
    if grad is None or param is None:
        return None
    return grad.reshape(param.shape).to(param.dtype)


def _backward(ctx, dy, dmean_out, dlogit_out):
    return _backward_impl(ctx.saved_tensors, ctx.mode, dy, dmean_out, dlogit_out,
                          se_bwd_reduce, se_bwd_input)


def _backward_impl(saved, mode, dy, dmean_out, dlogit_out, bwd_reduce, bwd_input):
    x, fc1_w, fc1_b, fc2_w, fc2_b, sse_w, sse_b, mean, logit = saved
    m = _mode(mode)
    if dy is None:
        dy = torch.zeros_like(x)
    hc, hs = K.has_cse(m), K.has_sse(m)
    g_fc1_w = g_fc1_b = g_fc2_w = g_fc2_b = g_sse_w = g_sse_b = None
    gc = dxc = dlogit = None
    with _no_autocast(x.device):
        if hc:
            h, gc = _mlp(mean, fc1_w, fc1_b, fc2_w, fc2_b)
            gc = gc.contiguous()
        dgc, dgs = bwd_reduce(dy, x, gc, logit if hs else None, sse_b, mode)
        if hc:
            # manual backward of sigmoid(fc2(relu(fc1(mean)))); see the module docstring
            dt = mean.dtype
            a = torch.relu(h)
            dz = dgc * gc * (1 - gc)
            g_fc2_w, g_fc2_b = dz.t() @ a, dz.sum(0)
            dh = (dz @ fc2_w.to(dt)) * (h > 0)
            g_fc1_w, g_fc1_b = dh.t() @ mean, dh.sum(0)
            dmean = dh @ fc1_w.to(dt)
            if dmean_out is not None:
                dmean = dmean + dmean_out
            dxc = (dmean / _spatial_size(x)).contiguous()
        if hs:
            b = torch.zeros((), dtype=logit.dtype, device=logit.device) if sse_b is None \
                else sse_b.reshape(()).to(logit.dtype)
            gs = torch.sigmoid(logit + b)
            dlogit = dgs * gs * (1 - gs)
            if dlogit_out is not None:
                dlogit = dlogit + dlogit_out
            dlogit = dlogit.contiguous()
            g_sse_b = dlogit.sum()
        dx, dw = bwd_input(dy, x, gc, logit if hs else None, sse_b, dxc, dlogit,
                           sse_w if hs else None, mode)
        if hs:
            g_sse_w = dw
    return (dx, _like(g_fc1_w, fc1_w), _like(g_fc1_b, fc1_b), _like(g_fc2_w, fc2_w),
            _like(g_fc2_b, fc2_b), _like(g_sse_w, sse_w), _like(g_sse_b, sse_b), None)


se_forward.register_autograd(_backward, setup_context=_setup_context)


class EagerSE(torch.autograd.Function):
    """The same forward and backward as the custom op, called directly: what eager calls use.

    A ``torch.library.custom_op`` call goes through the dispatcher, its autograd wrapper and an
    aliasing check in Python: on the H100 of bench/results/gpu-h100 one scSE call took 2.6 ms of
    host time through the op and 2.1 ms through this Function (bench/profile_fused.py), while
    the GPU needs ~0.1 ms for it. The op stays for ``torch.compile`` / ``torch.export``."""

    @staticmethod
    def forward(ctx, x, fc1_w, fc1_b, fc2_w, fc2_b, sse_w, sse_b, mode):
        out, mean, logit = _forward_impl(x, fc1_w, fc1_b, fc2_w, fc2_b, sse_w, sse_b, mode)
        ctx.mode = mode
        ctx.save_for_backward(x, fc1_w, fc1_b, fc2_w, fc2_b, sse_w, sse_b, mean, logit)
        return out

    @staticmethod
    def backward(ctx, dy):
        return (*_backward_impl(ctx.saved_tensors, ctx.mode, dy, None, None, _bwd_reduce_impl,
                                _bwd_input_impl)[:7], None)


# --------------------------------------------------------------------------------------------
# public functions
# --------------------------------------------------------------------------------------------


def fused_se_function(x: Tensor, mode: str, fc1_w: Tensor | None = None,
                      fc1_b: Tensor | None = None, fc2_w: Tensor | None = None,
                      fc2_b: Tensor | None = None, sse_w: Tensor | None = None,
                      sse_b: Tensor | None = None) -> Tensor:
    """Fused cSE / sSE / scSE on an ``N, C, *spatial`` map (2D or 3D), differentiable in ``x``
    and every parameter. ``mode``: "cse", "sse", "scse_max" or "scse_add"."""
    m = _mode(mode)
    if x.dim() not in (4, 5):
        raise ValueError(f"fused SE expects an N, C, H, W(, D) map, got shape {tuple(x.shape)}")
    if K.has_cse(m) and (fc1_w is None or fc2_w is None):
        raise ValueError(f"mode {mode!r} needs fc1_w and fc2_w")
    if K.has_sse(m):
        if sse_w is None or sse_w.numel() != x.shape[1]:
            raise ValueError(f"mode {mode!r} needs sse_w with {x.shape[1]} elements")
    else:
        sse_w = sse_b = None
    if not K.has_cse(m):
        fc1_w = fc1_b = fc2_w = fc2_b = None
    if EAGER_FUNCTION and not (torch.compiler.is_compiling() or torch.jit.is_tracing()):
        return EagerSE.apply(x, fc1_w, fc1_b, fc2_w, fc2_b, sse_w, sse_b, mode)
    return se_forward(x, fc1_w, fc1_b, fc2_w, fc2_b, sse_w, sse_b, mode)[0]


EAGER_FUNCTION = True  # False: eager calls go through the custom op too (tests, comparison)


def fused_cse(x: Tensor, fc1_w: Tensor, fc1_b: Tensor | None, fc2_w: Tensor,
              fc2_b: Tensor | None) -> Tensor:
    """``x * sigmoid(fc2(relu(fc1(mean(x)))))``."""
    return fused_se_function(x, "cse", fc1_w, fc1_b, fc2_w, fc2_b)


def fused_sse(x: Tensor, sse_w: Tensor, sse_b: Tensor | None) -> Tensor:
    """``x * sigmoid(conv1x1(x))``."""
    return fused_se_function(x, "sse", sse_w=sse_w, sse_b=sse_b)


def fused_scse(x: Tensor, fc1_w: Tensor, fc1_b: Tensor | None, fc2_w: Tensor,
               fc2_b: Tensor | None, sse_w: Tensor, sse_b: Tensor | None,
               fusion: str = "max") -> Tensor:
    """``max(x*g_c, x*g_s)`` (fusion "max") or ``x*(g_c + g_s)`` (fusion "add")."""
    if fusion not in ("max", "add"):
        raise ValueError(f"unknown scSE fusion {fusion!r}; valid: max, add")
    return fused_se_function(x, f"scse_{fusion}", fc1_w, fc1_b, fc2_w, fc2_b, sse_w, sse_b)


def fused_se(x: Tensor, module: torch.nn.Module, mode: str) -> Tensor:
    """Entry point used by the blocks in :mod:`scse_seg.blocks.se`."""
    return fused_se_function(x, mode, **module_params(module, mode))
