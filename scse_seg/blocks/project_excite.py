"""Project & Excite (Rickmann, Roy, Sarasua, Navab, Wachinger; MICCAI 2019).

Squeeze by average-projecting the map onto each spatial axis (3D: three projections; our 2D form:
two), broadcast-add the projections back to the map's size, excite with two 1x1(x1) convs
(C -> C/r, ReLU, C/r -> C) and a sigmoid, multiply. Unlike cSE's global pool it keeps where along
each axis a channel responds. Defaults as in the authors' code (reduction r = 2, convs with bias).

The first conv is linear, so it is applied to each small projection before the broadcast-add
(``W(z_h + z_w + z_d) + b = W z_h + W z_w + W z_d + b``): the same result without a full-size
conv or a full-size copy of the summed projections.
"""
from __future__ import annotations

import torch
from torch import nn

from .nd import check_dim, layer, spatial_dims
from .registry import register_attention
from .se import _hidden


@register_attention("pe")
class ProjectExcite(nn.Module):
    accepted_kwargs = ("reduction",)

    def __init__(self, channels: int, dim: int = 2, reduction: float = 2):
        super().__init__()
        self.channels, self.dim = channels, check_dim(dim)
        self.dims = spatial_dims(dim)
        hidden = _hidden(channels, reduction)
        conv = layer("conv", dim)
        self.reduce = conv(channels, hidden, 1)
        self.expand = conv(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.reduce.weight.flatten(1)  # hidden x C
        z = None
        for keep in self.dims:  # projection onto axis `keep`: mean over the other spatial axes
            proj = x.mean(dim=tuple(d for d in self.dims if d != keep), keepdim=True)
            proj = torch.einsum("hc,nc...->nh...", w, proj)
            z = proj if z is None else z + proj
        z = z + self.reduce.bias.view(-1, *([1] * self.dim))
        return x * torch.sigmoid(self.expand(torch.relu(z)))
