"""Residual block (He et al., CVPR 2016, "basic block"), optionally with a recalibration that sees
both branches (CMPE-SE, :mod:`scse_seg.blocks.cmpe_se`)."""
from __future__ import annotations

import torch
from torch import nn

from .nd import layer
from .registry import create_recalibration, register_block


@register_block("residual")
class ResidualBlock(nn.Module):
    """``relu(recal(bn(conv3(relu(bn(conv3(x))))), s(x)) + s(x))``; ``s`` is the identity when the
    widths match, else a 1x1 conv with BN. ``recalibration`` names a ``cmpe_se*`` variant (None:
    plain residual block); ``recalibration_kwargs`` (e.g. ``reduction``) go to it."""

    accepts_recalibration = True

    def __init__(self, in_channels: int, out_channels: int, dim: int = 2,
                 recalibration: str | None = None, **recalibration_kwargs):
        super().__init__()
        conv, bn = layer("conv", dim), layer("bn", dim)
        self.conv1 = conv(in_channels, out_channels, 3, padding=1, bias=False)
        self.bn1 = bn(out_channels)
        self.conv2 = conv(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = bn(out_channels)
        self.shortcut = nn.Identity() if in_channels == out_channels else nn.Sequential(
            conv(in_channels, out_channels, 1, bias=False), bn(out_channels))
        self.recalibration = None if recalibration in (None, "none") else create_recalibration(
            recalibration, out_channels, dim, **recalibration_kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = self.shortcut(x)
        r = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        if self.recalibration is not None:
            r = self.recalibration(r, identity)
        return torch.relu(r + identity)
