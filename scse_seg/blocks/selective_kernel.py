"""Selective kernel convolution (Li, Wang, Hu, Yang; "Selective Kernel Networks", CVPR 2019).

Two conv branches with different receptive fields (3x3, and 3x3 with dilation 2 for the 5x5
field), each conv-BN-ReLU; fuse by sum, squeeze by global average pooling, one FC to
``d = max(C/r, L)`` with BN and ReLU, one FC per branch, softmax across branches: per-channel
weights that softly choose the receptive field; the output is the weighted sum of the branches.
Defaults as in the paper (r = 16, L = 32); ``groups`` is the branch convs' grouping (the paper's
G = 32 in ResNeXt backbones; 1 here, since segmentation widths are often below 32).
Same computation as timm's ``SelectiveKernel(split_input=False)`` (the test checks it).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .nd import batch_norm_any_batch, check_dim, layer, spatial_dims
from .registry import register_block


class SelectiveKernelConv(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, dim: int = 2,
                 dilations: Sequence[int] = (1, 2), groups: int = 1, reduction: float = 16,
                 min_width: int = 32):
        super().__init__()
        self.dim, self.dims = check_dim(dim), spatial_dims(dim)
        conv, bn = layer("conv", dim), layer("bn", dim)
        self.paths = nn.ModuleList(nn.Sequential(
            conv(in_channels, out_channels, 3, padding=d, dilation=d, groups=groups, bias=False),
            bn(out_channels), nn.ReLU(inplace=True)) for d in dilations)
        width = max(int(out_channels // reduction), min_width)
        self.fc_reduce = nn.Linear(out_channels, width, bias=False)
        self.bn = nn.BatchNorm1d(width)
        self.fc_select = nn.Linear(width, out_channels * len(self.paths), bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = torch.stack([p(x) for p in self.paths], dim=1)  # N x P x C x *spatial
        n, p, c = feats.shape[:3]
        z = self.fc_reduce(feats.sum(dim=1).mean(dim=self.dims))
        z = torch.relu(batch_norm_any_batch(self.bn, z))
        weights = torch.softmax(self.fc_select(z).view(n, p, c), dim=1)
        return (feats * weights.view(n, p, c, *([1] * self.dim))).sum(dim=1)


@register_block("sk")
class SelectiveKernelBlock(nn.Sequential):
    """The U-Net double conv with each conv-BN-ReLU replaced by a selective kernel conv."""

    def __init__(self, in_channels: int, out_channels: int, dim: int = 2, **kwargs):
        super().__init__(SelectiveKernelConv(in_channels, out_channels, dim, **kwargs),
                         SelectiveKernelConv(out_channels, out_channels, dim, **kwargs))
