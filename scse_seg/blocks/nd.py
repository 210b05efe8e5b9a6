"""Dimension-generic layer lookup, so every block is written once for 2D and 3D."""
from __future__ import annotations

from torch import nn

_LAYERS = {
    2: dict(conv=nn.Conv2d, conv_t=nn.ConvTranspose2d, bn=nn.BatchNorm2d, maxpool=nn.MaxPool2d,
            maxunpool=nn.MaxUnpool2d, dropout=nn.Dropout2d, avgpool=nn.AdaptiveAvgPool2d,
            maxpool_global=nn.AdaptiveMaxPool2d),
    3: dict(conv=nn.Conv3d, conv_t=nn.ConvTranspose3d, bn=nn.BatchNorm3d, maxpool=nn.MaxPool3d,
            maxunpool=nn.MaxUnpool3d, dropout=nn.Dropout3d, avgpool=nn.AdaptiveAvgPool3d,
            maxpool_global=nn.AdaptiveMaxPool3d),
}


def check_dim(dim: int) -> int:
    if dim not in _LAYERS:
        raise ValueError(f"dim must be 2 or 3, got {dim!r}")
    return dim


def layer(kind: str, dim: int) -> type[nn.Module]:
    """Return the ``nn`` class of ``kind`` (conv, bn, maxpool, ...) for ``dim`` spatial dims."""
    return _LAYERS[check_dim(dim)][kind]


def spatial_dims(dim: int) -> tuple[int, ...]:
    """Axes of the spatial dimensions of an N, C, *spatial tensor."""
    return tuple(range(2, 2 + check_dim(dim)))


def batch_norm_any_batch(bn: nn.modules.batchnorm._BatchNorm, z):
    """``bn(z)``, except that a training batch of one sample (whose statistics over a pooled,
    1-element-per-channel descriptor do not exist) is normalised with the running statistics
    instead of raising. Used by the attention paths of SK and split attention, whose BN sees one
    value per channel and sample."""
    import torch.nn.functional as F

    if bn.training and z.shape[0] * z[0, 0].numel() == 1:
        return F.batch_norm(z, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0,
                            bn.eps)
    return bn(z)
