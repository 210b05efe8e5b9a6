"""The three encoder-decoders of Roy et al. (MICCAI 2018 / TMI 2019): U-Net, FC-DenseNet, SD-Net."""
from __future__ import annotations

from functools import partial

from ..blocks import check_block_attention, create_block, is_inner_recalibration
from ..blocks.conv import DenseBlock, SDNetBlock, UNetBlock
from .encoder_decoder import EncoderDecoder
from .registry import register_model

DEPTH = 4  # encoder blocks; inputs must be divisible by 2**DEPTH = 16


def _stage_block(default, block: str | None, attention: str, dim: int, attention_kwargs: dict):
    """(block factory, attention after each stage, its options) for ``block`` (None: the
    architecture's own block ``default``). A recalibration that lives inside a residual block
    (CMPE-SE) goes into the block, with its options, and the stages get no separate attention."""
    error = check_block_attention(block, attention)
    if error:
        raise ValueError(error)
    if block is None:
        return default, attention, attention_kwargs
    if is_inner_recalibration(attention):
        return partial(create_block, block, dim=dim, recalibration=attention,
                       **attention_kwargs), "none", {}
    return partial(create_block, block, dim=dim), attention, attention_kwargs


@register_model("unet", size_multiple=2 ** DEPTH)
def unet(in_channels: int, num_classes: int, attention: str = "scse", dim: int = 2,
         width: int = 64, width_growth: int = 2, dropout: float = 0.0,
         bottleneck_attention: bool = True, placement: str = "all", block: str | None = None,
         **attention_kwargs) -> EncoderDecoder:
    """U-Net: 4 x (conv3-BN-ReLU)x2 encoder blocks, bottleneck, 4 decoder blocks with transposed
    conv upsampling; ``width`` filters at the first level, times ``width_growth`` per level.
    ``block`` (``create_block`` name) replaces the double conv in every stage."""
    widths = [width * width_growth ** i for i in range(DEPTH)]
    factory, attention, attention_kwargs = _stage_block(partial(UNetBlock, dim=dim), block, attention, dim,
                                      attention_kwargs)
    return EncoderDecoder(in_channels, num_classes, widths, width * width_growth ** DEPTH,
                          factory, attention, dim, upsampling="transpose",
                          bottleneck_attention=bottleneck_attention, dropout=dropout,
                          placement=placement, **attention_kwargs)


@register_model("densenet", size_multiple=2 ** DEPTH)
def densenet(in_channels: int, num_classes: int, attention: str = "scse", dim: int = 2,
             width: int = 64, kernel_size: int = 5, dropout: float = 0.2,
             bottleneck_attention: bool = True, placement: str = "all", **attention_kwargs) -> EncoderDecoder:
    """FC-DenseNet as in QuickNAT / the scSE papers: dense blocks of ``width`` (64) filters with
    5x5 kernels, max-pool with indices, max-unpool, skip concatenation, dropout 0.2.
    Takes no ``block``: the dense block is what makes it FC-DenseNet (another block in its place
    gives SD-Net's wiring with that block: use ``sdnet`` with ``block=``)."""
    error = check_block_attention(None, attention)
    if error:
        raise ValueError(error)
    block = partial(DenseBlock, dim=dim, kernel_size=kernel_size)
    return EncoderDecoder(in_channels, num_classes, [width] * DEPTH, width, block, attention, dim,
                          upsampling="unpool", bottleneck_attention=bottleneck_attention,
                          dropout=dropout, placement=placement, **attention_kwargs)


@register_model("sdnet", size_multiple=2 ** DEPTH)
def sdnet(in_channels: int, num_classes: int, attention: str = "scse", dim: int = 2,
          width: int = 64, kernel_size: int = 5, dropout: float = 0.0,
          bottleneck_attention: bool = True, placement: str = "all", block: str | None = None,
          **attention_kwargs) -> EncoderDecoder:
    """SD-Net: conv5x5(64)-PReLU-BN blocks, max-pool with indices, max-unpool, skip concat.
    ``block`` (``create_block`` name) replaces the conv-PReLU-BN of every stage."""
    factory, attention, attention_kwargs = _stage_block(partial(SDNetBlock, dim=dim, kernel_size=kernel_size),
                                      block, attention, dim, attention_kwargs)
    return EncoderDecoder(in_channels, num_classes, [width] * DEPTH, width, factory, attention, dim,
                          upsampling="unpool", bottleneck_attention=bottleneck_attention,
                          dropout=dropout, placement=placement, **attention_kwargs)
