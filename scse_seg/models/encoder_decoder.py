"""Generic encoder-decoder with an attention block after every encoder and decoder block.

U-Net, FC-DenseNet and SD-Net differ only in their conv block, width schedule and in how they go
down and up (max-pool + transposed conv vs. max-pool with indices + max-unpool); this module holds
the shared wiring so that the attention placement is written once:

    encoder stage:  block -> attention -> dropout  (this map is the skip)  -> pool
    bottleneck:     block -> attention (optional)  -> dropout
    decoder stage:  up -> concat(skip, up) -> block -> attention -> dropout

``placement`` restricts the encoder/decoder attention to one side for ablations ("all" is the
papers' placement: after every encoder and decoder block).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from ..blocks import create_attention
from ..blocks.nd import check_dim, layer

PLACEMENTS = ("all", "encoder", "decoder")
BlockFactory = Callable[[int, int], nn.Module]  # (in_channels, out_channels) -> block


class Stage(nn.Module):
    """One block followed by its own attention instance and dropout."""

    def __init__(self, block: nn.Module, attention: nn.Module, dropout: nn.Module):
        super().__init__()
        self.block, self.attention, self.dropout = block, attention, dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.attention(self.block(x)))


class EncoderDecoder(nn.Module):
    """Encoder-decoder of ``len(widths)`` levels plus a bottleneck.

    Args:
        widths: output channels of each encoder block; ``bottleneck_width`` for the bottleneck.
        block: factory ``(in_ch, out_ch) -> nn.Module`` for every encoder/decoder/bottleneck block.
        upsampling: ``"unpool"`` (max-unpool with the encoder's pooling indices, as DenseNet and
            SD-Net in the papers) or ``"transpose"`` (2x2 transposed conv, as U-Net).
        placement: ``"all"`` (encoder and decoder blocks), ``"encoder"`` or ``"decoder"``; the
            bottleneck is governed by ``bottleneck_attention`` alone.
    """

    def __init__(self, in_channels: int, num_classes: int, widths: Sequence[int],
                 bottleneck_width: int, block: BlockFactory, attention: str = "scse", dim: int = 2,
                 upsampling: str = "transpose", bottleneck_attention: bool = True,
                 dropout: float = 0.0, placement: str = "all", **attention_kwargs):
        super().__init__()
        self.dim, self.attention_name = check_dim(dim), attention
        self.depth = len(widths)
        # every spatial size must survive ``depth`` 2x poolings: training, validation, evaluation
        # and prediction pad their inputs to this multiple
        self.size_multiple = 2 ** self.depth
        if upsampling not in ("unpool", "transpose"):
            raise ValueError(f"upsampling must be 'unpool' or 'transpose', got {upsampling!r}")
        if upsampling == "unpool" and any(w != bottleneck_width for w in widths):
            raise ValueError("max-unpool needs the same width at every level")
        self.upsampling = upsampling
        if placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {', '.join(PLACEMENTS)}, got {placement!r}")
        self.placement = placement
        # Validate the attention name/options once, before building anything.
        create_attention(attention, widths[0], dim, **attention_kwargs)

        def attn(ch: int, side: str | None = None) -> nn.Module:  # None: the bottleneck
            if side is not None and placement not in ("all", side):
                return create_attention("none", ch, dim)
            return create_attention(attention, ch, dim, **attention_kwargs)

        def drop() -> nn.Module:
            return layer("dropout", dim)(dropout) if dropout > 0 else nn.Identity()

        self.encoders = nn.ModuleList()
        ch = in_channels
        for w in widths:
            self.encoders.append(Stage(block(ch, w), attn(w, "encoder"), drop()))
            ch = w
        self.pool = layer("maxpool", dim)(2, 2, return_indices=(upsampling == "unpool"))
        self.bottleneck = Stage(block(ch, bottleneck_width),
                                attn(bottleneck_width) if bottleneck_attention
                                else create_attention("none", bottleneck_width, dim), drop())
        ch = bottleneck_width
        self.ups = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for w in reversed(widths):
            if upsampling == "transpose":
                self.ups.append(layer("conv_t", dim)(ch, w, 2, stride=2))
                up_ch = w
            else:
                self.ups.append(layer("maxunpool", dim)(2, 2))
                up_ch = ch
            self.decoders.append(Stage(block(w + up_ch, w), attn(w, "decoder"), drop()))
            ch = w
        self.classifier = layer("conv", dim)(ch, num_classes, 1)

    def attention_modules(self) -> list[nn.Module]:
        """Every attention instance, encoder to decoder (for tests and summaries)."""
        stages = [*self.encoders, self.bottleneck, *self.decoders]
        return [s.attention for s in stages]

    def _check_size(self, x: torch.Tensor) -> None:
        if x.dim() != self.dim + 2:
            raise ValueError(f"expected a {self.dim + 2}D input (N, C, *spatial) for dim={self.dim}, "
                             f"got shape {tuple(x.shape)}")
        f = self.size_multiple
        bad = [s for s in x.shape[2:] if s % f]
        if bad:
            raise ValueError(f"spatial size {tuple(x.shape[2:])} must be divisible by {f}; "
                             f"pad or crop the input (e.g. monai.transforms.DivisiblePad({f}))")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_size(x)
        skips, indices = [], []
        for enc in self.encoders:
            x = enc(x)
            skips.append(x)
            if self.upsampling == "unpool":
                x, idx = self.pool(x)
                indices.append(idx)
            else:
                x = self.pool(x)
        x = self.bottleneck(x)
        for i, (up, dec) in enumerate(zip(self.ups, self.decoders)):
            skip = skips[-1 - i]
            if self.upsampling == "unpool":
                x = up(x, indices[-1 - i], output_size=skip.shape[2:])
            else:
                x = up(x)
            x = dec(torch.cat([skip, x], dim=1))
        return self.classifier(x)


__all__ = ["EncoderDecoder", "Stage"]
