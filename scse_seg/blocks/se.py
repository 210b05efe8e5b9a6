"""Squeeze-and-excitation recalibration (Roy, Navab, Wachinger, MICCAI 2018 / IEEE TMI 2019).

* cSE: squeeze space (global average pool), excite channels (FC C->C/r->C, ReLU, sigmoid).
* sSE: squeeze channels (1x1 conv C->1), excite space (sigmoid).
* scSE: both recalibrations concurrently, combined by ``add`` (MICCAI version, smp's
  ``SCSEModule``; our default) or by element-wise ``max`` (journal version and the authors' code).

Defaults: reduction 16 (SENet's ratio) and additive fusion, the setting that measured level or
better on every network and dataset of ``eval/results/README.md``; the TMI 2019 setting is
``reduction=2, fusion="max"``.

Each block works for 2D and 3D maps. Its eager formulas below are the reference of every fast
path. With ``fused=True`` (default) a block runs its device's fast path from
:mod:`scse_seg.kernels` where there is one: the fused Triton kernels on CUDA (after a one-off
self-check), and on CPU, for scSE during training, an autograd Function that keeps only the input
and the gates for backward. ``fused=False``, ``SCSE_SEG_FUSED=0``, and tracing by
``torch.compile`` / ``torch.export`` run the eager formulas.
"""
from __future__ import annotations

import torch
from torch import nn

from .nd import check_dim, layer, spatial_dims
from .registry import register_attention


def _hidden(channels: int, reduction: float, min_hidden: int = 1) -> int:
    """cSE's bottleneck width ``C // r``, at least ``min_hidden`` (and never wider than ``C``): a
    floor like timm's ``rd_divisor`` keeps narrow layers from a one-unit bottleneck at r=16."""
    if reduction <= 0:
        raise ValueError(f"reduction must be positive, got {reduction}")
    if min_hidden < 1:
        raise ValueError(f"min_hidden must be at least 1, got {min_hidden}")
    return max(int(channels // reduction), min(min_hidden, channels), 1)


def _fast(module: nn.Module, x: torch.Tensor, mode: str) -> torch.Tensor | None:
    """The block on its fast path (see :func:`scse_seg.kernels.se`); None: use the formulas."""
    if not module.fused:
        return None
    from scse_seg import kernels
    from scse_seg.kernels.gates import module_params

    return kernels.se(x, mode, module_params(module, mode))


@register_attention("none")
class NoAttention(nn.Identity):
    """Vanilla network: no recalibration. Kept as a registry entry so ``attention="none"`` works."""

    accepted_kwargs = ()

    def __init__(self, channels: int, dim: int = 2):
        super().__init__()
        self.channels, self.dim = channels, check_dim(dim)


class _ChannelExcitation(nn.Module):
    """The cSE gate: spatial mean -> FC -> ReLU -> FC -> sigmoid, returning N x C weights."""

    def __init__(self, channels: int, reduction: float, dim: int, min_hidden: int = 1):
        super().__init__()
        hidden = _hidden(channels, reduction, min_hidden)
        self.dims = spatial_dims(dim)
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def gate_from_mean(self, mean: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.fc2(torch.relu(self.fc1(mean))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate_from_mean(x.mean(dim=self.dims))


@register_attention("cse")
class ChannelSE(nn.Module):
    """Spatial squeeze & channel excitation, the "cSE" block: ``x * sigmoid(MLP(mean(x)))``."""

    accepted_kwargs = ("reduction", "min_hidden", "fused")

    def __init__(self, channels: int, dim: int = 2, reduction: float = 16, min_hidden: int = 1,
                 fused: bool = True):
        super().__init__()
        self.channels, self.dim, self.fused = channels, check_dim(dim), fused
        self.excite = _ChannelExcitation(channels, reduction, dim, min_hidden)

    def gates(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The block's gate: ``{"cse": (N, C)}`` (read by ``eval/gates.py``)."""
        return {"cse": self.excite(x)}

    def recalibrate(self, x: torch.Tensor, gates: dict[str, torch.Tensor]) -> torch.Tensor:
        """The block's output for given gates (its eager formula; knock-outs replace a gate)."""
        g = gates["cse"]
        return x * g.view(*g.shape, *([1] * (x.dim() - g.dim())))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _fast(self, x, "cse")
        if out is not None:
            return out
        return self.recalibrate(x, self.gates(x))


@register_attention("sse")
class SpatialSE(nn.Module):
    """Channel squeeze & spatial excitation, the "sSE" block: ``x * sigmoid(conv1x1(x))``."""

    accepted_kwargs = ("fused",)

    def __init__(self, channels: int, dim: int = 2, fused: bool = True):
        super().__init__()
        self.channels, self.dim, self.fused = channels, check_dim(dim), fused
        self.conv = layer("conv", dim)(channels, 1, kernel_size=1)

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.conv(x))

    def gates(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The block's gate: ``{"sse": (N, 1, *spatial)}``."""
        return {"sse": self.gate(x)}

    def recalibrate(self, x: torch.Tensor, gates: dict[str, torch.Tensor]) -> torch.Tensor:
        return x * gates["sse"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _fast(self, x, "sse")
        if out is not None:
            return out
        return self.recalibrate(x, self.gates(x))


FUSIONS = ("max", "add")


@register_attention("scse")
class ConcurrentSE(nn.Module):
    """Concurrent spatial and channel SE, the "scSE" block.

    ``fusion="add"``: ``x*g_c + x*g_s`` (MICCAI 2018, smp's ``SCSEModule``; our default).
    ``fusion="max"``: ``max(x*g_c, x*g_s)`` (TMI 2019, authors' code, there with r=2).
    """

    accepted_kwargs = ("reduction", "min_hidden", "fusion", "fused")

    def __init__(self, channels: int, dim: int = 2, reduction: float = 16, fusion: str = "add",
                 min_hidden: int = 1, fused: bool = True):
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f"unknown scSE fusion {fusion!r}; valid: {', '.join(FUSIONS)}")
        self.channels, self.dim, self.fusion, self.fused = channels, check_dim(dim), fusion, fused
        self.cse = ChannelSE(channels, dim, reduction, min_hidden, fused=False)
        self.sse = SpatialSE(channels, dim, fused=False)

    def gates(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Both gates: ``{"cse": (N, C), "sse": (N, 1, *spatial)}``."""
        return {**self.cse.gates(x), **self.sse.gates(x)}

    def recalibrate(self, x: torch.Tensor, gates: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.fusion == "max":
            return torch.maximum(self.cse.recalibrate(x, gates), self.sse.recalibrate(x, gates))
        g_c = gates["cse"]
        return x * (g_c.view(*g_c.shape, *([1] * (x.dim() - g_c.dim()))) + gates["sse"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _fast(self, x, f"scse_{self.fusion}")
        if out is not None:
            return out
        return self.recalibrate(x, self.gates(x))

    def extra_repr(self) -> str:
        return f"fusion={self.fusion!r}"
