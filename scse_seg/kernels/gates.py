"""What the SE fast paths of both devices share: the modes, the gate precision, the cSE gate MLP
and its backward, and a block's parameters (Roy et al., MICCAI 2018 / TMI 2019)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

MODES = ("cse", "sse", "scse_max", "scse_add")


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"unknown SE mode {mode!r}; valid: {', '.join(MODES)}")
    return mode


def has_cse(mode: str) -> bool:
    return mode != "sse"


def has_sse(mode: str) -> bool:
    return mode != "cse"


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Gate precision: fp64 for fp64 maps, fp32 otherwise (bf16/fp16 maps get fp32 gates, as the
    eager blocks get from their fp32 mean under autocast)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def is_channels_last(x: Tensor) -> bool:
    fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    return x.dim() in (4, 5) and not x.is_contiguous() and x.is_contiguous(memory_format=fmt)


def no_autocast(x: Tensor):
    return torch.autocast(device_type=x.device.type, enabled=False)


def _cast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else t.to(dtype)


def mlp(mean: Tensor, fc1_w, fc1_b, fc2_w, fc2_b) -> tuple[Tensor, Tensor]:
    """(hidden pre-activation h, gate g_c = sigmoid(fc2(relu(h)))) in ``mean``'s dtype."""
    dt = mean.dtype
    h = F.linear(mean, fc1_w.to(dt), _cast(fc1_b, dt))
    return h, torch.sigmoid(F.linear(torch.relu(h), fc2_w.to(dt), _cast(fc2_b, dt)))


def mlp_backward(dgc: Tensor, mean: Tensor, h: Tensor, gc: Tensor, fc1_w: Tensor,
                 fc2_w: Tensor) -> tuple[Tensor, ...]:
    """Backward of :func:`mlp` by hand from ``d g_c`` (N, C): (d fc1_w, d fc1_b, d fc2_w,
    d fc2_b, d mean). Written out because the input gradient needs ``d mean`` between the map
    passes of backward; the MLP is N x C, so this costs nothing next to them."""
    dz = dgc * gc * (1 - gc)
    dh = (dz @ fc2_w.to(dz.dtype)) * (h > 0)
    return dh.t() @ mean, dh.sum(0), dz.t() @ torch.relu(h), dz.sum(0), dh @ fc1_w.to(dz.dtype)


def grads_like(grads, params) -> list[Tensor | None]:
    """Parameter gradients in their parameters' shapes and dtypes (None where either is None)."""
    return [None if g is None or p is None else g.reshape(p.shape).to(p.dtype)
            for g, p in zip(grads, params)]


def module_params(module: torch.nn.Module, mode: str) -> dict[str, Tensor | None]:
    """The parameters of a ChannelSE / SpatialSE / ConcurrentSE block that ``mode`` uses."""
    cse = module if mode == "cse" else None if mode == "sse" else module.cse
    sse = module if mode == "sse" else None if mode == "cse" else module.sse
    p: dict[str, Tensor | None] = {}
    if cse is not None:
        ex = cse.excite
        p.update(fc1_w=ex.fc1.weight, fc1_b=ex.fc1.bias, fc2_w=ex.fc2.weight, fc2_b=ex.fc2.bias)
    if sse is not None:
        p.update(sse_w=sse.conv.weight, sse_b=sse.conv.bias)
    return p
