"""Convolutional blocks of the three paper architectures, each written once for 2D and 3D."""
from __future__ import annotations

import torch
from torch import nn

from .nd import layer
from .registry import register_block


@register_block("double_conv")
class UNetBlock(nn.Sequential):
    """U-Net block: (conv3x3 - BN - ReLU) x 2 (Ronneberger et al. 2015, with batch norm)."""

    def __init__(self, in_channels: int, out_channels: int, dim: int = 2, kernel_size: int = 3):
        conv, bn = layer("conv", dim), layer("bn", dim)
        pad = kernel_size // 2
        super().__init__(
            conv(in_channels, out_channels, kernel_size, padding=pad, bias=False), bn(out_channels),
            nn.ReLU(inplace=True),
            conv(out_channels, out_channels, kernel_size, padding=pad, bias=False), bn(out_channels),
            nn.ReLU(inplace=True),
        )


class _BNPReLUConv(nn.Sequential):
    """Pre-activation unit of the FC-DenseNet / QuickNAT block."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, dim: int):
        super().__init__(layer("bn", dim)(in_channels), nn.PReLU(),
                         layer("conv", dim)(in_channels, out_channels, kernel_size,
                                            padding=kernel_size // 2))


class DenseBlock(nn.Module):
    """FC-DenseNet block as in QuickNAT / Roy et al.: two densely connected BN-PReLU-conv5x5 units
    and a BN-PReLU-conv1x1 bottleneck that brings the concatenation back to ``out_channels``."""

    def __init__(self, in_channels: int, out_channels: int = 64, dim: int = 2, kernel_size: int = 5):
        super().__init__()
        self.unit1 = _BNPReLUConv(in_channels, out_channels, kernel_size, dim)
        self.unit2 = _BNPReLUConv(in_channels + out_channels, out_channels, kernel_size, dim)
        self.transition = _BNPReLUConv(in_channels + 2 * out_channels, out_channels, 1, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o1 = self.unit1(x)
        o2 = self.unit2(torch.cat([x, o1], dim=1))
        return self.transition(torch.cat([x, o1, o2], dim=1))


class SDNetBlock(nn.Sequential):
    """SD-Net block: conv5x5 - PReLU - BN (Roy et al. 2017, as used in the scSE papers)."""

    def __init__(self, in_channels: int, out_channels: int = 64, dim: int = 2, kernel_size: int = 5):
        super().__init__(layer("conv", dim)(in_channels, out_channels, kernel_size,
                                            padding=kernel_size // 2),
                         nn.PReLU(), layer("bn", dim)(out_channels))
