"""ECA, efficient channel attention (Wang et al., "ECA-Net", CVPR 2020).

cSE without the bottleneck: the spatially pooled channel vector goes through one 1D convolution
of adaptive size ``k = |log2(C)/gamma + b/gamma|_odd`` (no bias) and a sigmoid, so neighbouring
channels interact locally; ``k`` parameters per block (3 at C = 64).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .nd import check_dim, spatial_dims
from .registry import register_attention


def eca_kernel_size(channels: int, gamma: float = 2, beta: float = 1) -> int:
    """The paper's adaptive kernel size, as in the authors' code: ``t = int(|(log2 C + b) / gamma|)``,
    made odd by adding 1 (C = 64 -> 3, C = 256 -> 5, C = 4 -> 1). timm additionally clamps it to
    at least 3, which differs only for C < 8."""
    t = int(abs((math.log2(channels) + beta) / gamma))
    return t if t % 2 else t + 1


@register_attention("eca")
class EfficientChannelAttention(nn.Module):
    """``x * sigmoid(conv1d_k(mean(x)))`` with the paper's defaults gamma = 2, b = 1."""

    accepted_kwargs = ("gamma", "beta")

    def __init__(self, channels: int, dim: int = 2, gamma: float = 2, beta: float = 1):
        super().__init__()
        self.channels, self.dim = channels, check_dim(dim)
        self.dims = spatial_dims(dim)
        k = eca_kernel_size(channels, gamma, beta)
        self.conv = nn.Conv1d(1, 1, k, padding=k // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x.mean(dim=self.dims).unsqueeze(1)).squeeze(1)  # N x C
        return x * torch.sigmoid(y).view(*y.shape, *([1] * self.dim))

    def extra_repr(self) -> str:
        return f"channels={self.channels}, k={self.conv.kernel_size[0]}"
