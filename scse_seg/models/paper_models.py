"""The three encoder-decoders of Roy et al. (MICCAI 2018 / TMI 2019): U-Net, FC-DenseNet, SD-Net."""
from __future__ import annotations

from functools import partial

from ..blocks.conv import DenseBlock, SDNetBlock, UNetBlock
from .encoder_decoder import EncoderDecoder
from .registry import register_model

DEPTH = 4  # encoder blocks; inputs must be divisible by 2**DEPTH = 16


@register_model("unet")
def unet(in_channels: int, num_classes: int, attention: str = "scse", dim: int = 2,
         width: int = 64, width_growth: int = 2, dropout: float = 0.0,
         bottleneck_attention: bool = True, placement: str = "all", **attention_kwargs) -> EncoderDecoder:
    """U-Net: 4 x (conv3-BN-ReLU)x2 encoder blocks, bottleneck, 4 decoder blocks with transposed
    conv upsampling; ``width`` filters at the first level, times ``width_growth`` per level."""
    widths = [width * width_growth ** i for i in range(DEPTH)]
    return EncoderDecoder(in_channels, num_classes, widths, width * width_growth ** DEPTH,
                          partial(UNetBlock, dim=dim), attention, dim, upsampling="transpose",
                          bottleneck_attention=bottleneck_attention, dropout=dropout,
                          placement=placement, **attention_kwargs)


@register_model("densenet")
def densenet(in_channels: int, num_classes: int, attention: str = "scse", dim: int = 2,
             width: int = 64, kernel_size: int = 5, dropout: float = 0.2,
             bottleneck_attention: bool = True, placement: str = "all", **attention_kwargs) -> EncoderDecoder:
    """FC-DenseNet as in QuickNAT / the scSE papers: dense blocks of ``width`` (64) filters with
    5x5 kernels, max-pool with indices, max-unpool, skip concatenation, dropout 0.2."""
    block = partial(DenseBlock, dim=dim, kernel_size=kernel_size)
    return EncoderDecoder(in_channels, num_classes, [width] * DEPTH, width, block, attention, dim,
                          upsampling="unpool", bottleneck_attention=bottleneck_attention,
                          dropout=dropout, placement=placement, **attention_kwargs)


@register_model("sdnet")
def sdnet(in_channels: int, num_classes: int, attention: str = "scse", dim: int = 2,
          width: int = 64, kernel_size: int = 5, dropout: float = 0.0,
          bottleneck_attention: bool = True, placement: str = "all", **attention_kwargs) -> EncoderDecoder:
    """SD-Net: conv5x5(64)-PReLU-BN blocks, max-pool with indices, max-unpool, skip concat."""
    block = partial(SDNetBlock, dim=dim, kernel_size=kernel_size)
    return EncoderDecoder(in_channels, num_classes, [width] * DEPTH, width, block, attention, dim,
                          upsampling="unpool", bottleneck_attention=bottleneck_attention,
                          dropout=dropout, placement=placement, **attention_kwargs)
