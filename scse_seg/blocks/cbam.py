"""CBAM (Woo et al., ECCV 2018) as a decoder/encoder attention option.

Channel attention: a shared MLP on the average- and max-pooled descriptors, summed, sigmoid.
Spatial attention: a 7x7 (7x7x7 in 3D) conv over the channel-wise [mean, max] maps, BN, sigmoid.
Applied sequentially (channel then spatial), as in the paper.
"""
from __future__ import annotations

import torch
from torch import nn

from .nd import check_dim, layer, spatial_dims
from .registry import register_attention


@register_attention("cbam")
class CBAM(nn.Module):
    accepted_kwargs = ("reduction", "kernel_size")

    def __init__(self, channels: int, dim: int = 2, reduction: float = 2, kernel_size: int = 7):
        super().__init__()
        if reduction <= 0:
            raise ValueError(f"reduction must be positive, got {reduction}")
        self.channels, self.dim = channels, check_dim(dim)
        self.dims = spatial_dims(dim)
        hidden = max(1, int(channels // reduction))
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True),
                                 nn.Linear(hidden, channels))
        self.spatial = nn.Sequential(
            layer("conv", dim)(2, 1, kernel_size, padding=kernel_size // 2, bias=False),
            layer("bn", dim)(1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        avg = x.mean(dim=self.dims)
        mx = x.amax(dim=self.dims)
        g_c = torch.sigmoid(self.mlp(avg) + self.mlp(mx))
        x = x * g_c.view(*g_c.shape, *([1] * self.dim))
        desc = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.spatial(desc))
