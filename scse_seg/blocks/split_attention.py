"""Split attention convolution (Zhang et al., "ResNeSt: Split-Attention Networks", 2020).

``radix`` branches of the same conv, computed as one grouped conv (groups = cardinality x radix)
with BN and ReLU; the branches are summed, globally average-pooled, reduced by a grouped 1x1 conv
(with BN and ReLU) to ``max(in_channels * radix / reduction, 32)`` and expanded back to
radix x C; a softmax over the radix axis within each cardinal group (a sigmoid when radix = 1)
weights the branches, whose weighted sum is the output. SK generalised to R branches with
cardinality groups. Defaults as in ResNeSt (radix 2, cardinality 1, reduction 4). Same
computation as timm's ``SplitAttn(norm_layer=BatchNorm2d)`` (the test checks it).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .nd import batch_norm_any_batch, check_dim, layer, spatial_dims
from .registry import register_block


class SplitAttentionConv(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, dim: int = 2, radix: int = 2,
                 cardinality: int = 1, reduction: float = 4, min_width: int = 32,
                 kernel_size: int = 3):
        super().__init__()
        if radix < 1 or cardinality < 1:
            raise ValueError(f"radix and cardinality must be >= 1, got {radix}, {cardinality}")
        if in_channels % (cardinality * radix) or out_channels % cardinality:
            raise ValueError(f"radix x cardinality ({radix} x {cardinality}) must divide the input "
                             f"channels and cardinality the output ({in_channels} -> {out_channels})")
        self.dim, self.dims = check_dim(dim), spatial_dims(dim)
        self.radix, self.cardinality = radix, cardinality
        conv, bn = layer("conv", dim), layer("bn", dim)
        mid = out_channels * radix
        width = max(int(in_channels * radix // reduction), min_width)
        width = cardinality * math.ceil(width / cardinality)
        self.conv = conv(in_channels, mid, kernel_size, padding=kernel_size // 2,
                         groups=cardinality * radix, bias=False)
        self.bn0 = bn(mid)
        self.fc1 = conv(out_channels, width, 1, groups=cardinality)
        self.bn1 = bn(width)
        self.fc2 = conv(width, mid, 1, groups=cardinality)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn0(self.conv(x)))
        n, rc = x.shape[:2]
        c, ones = rc // self.radix, [1] * self.dim
        if self.radix > 1:
            x = x.view(n, self.radix, c, *x.shape[2:])
            gap = x.sum(dim=1)
        else:
            gap = x
        gap = gap.mean(dim=self.dims, keepdim=True)
        attn = self.fc2(torch.relu(batch_norm_any_batch(self.bn1, self.fc1(gap))))
        if self.radix == 1:
            return x * torch.sigmoid(attn)
        attn = attn.view(n, self.cardinality, self.radix, -1).transpose(1, 2).softmax(dim=1)
        return (x * attn.reshape(n, self.radix, c, *ones)).sum(dim=1)


@register_block("splat")
class SplitAttentionBlock(nn.Sequential):
    """The U-Net double conv with its second conv-BN-ReLU replaced by a split attention conv. As in
    ResNeSt, where the split attention conv follows a conv that sets the width, the first conv
    stays plain: the grouped conv needs a width divisible by radix x cardinality, which the
    network's input (1 channel) is not."""

    def __init__(self, in_channels: int, out_channels: int, dim: int = 2, **kwargs):
        conv, bn = layer("conv", dim), layer("bn", dim)
        super().__init__(conv(in_channels, out_channels, 3, padding=1, bias=False),
                         bn(out_channels), nn.ReLU(inplace=True),
                         SplitAttentionConv(out_channels, out_channels, dim, **kwargs))
