"""Our attention decoder on any segmentation-models-pytorch encoder ("pluggable decoder").

The encoder comes from ``smp.encoders.get_encoder(..., weights=None)`` (never downloads). Attention
recalibrates every encoder stage's output (the skip and the head) and every decoder block's output,
so placement matches the paper architectures. Decoder blocks are our ``UNetBlock`` after nearest
upsampling and skip concatenation, as in smp's own Unet.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..blocks import create_attention
from ..blocks.conv import UNetBlock
from .registry import register_model


class SMPEncoderUNet(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, attention: str = "scse", dim: int = 2,
                 encoder_name: str = "resnet34", encoder_depth: int = 5,
                 decoder_channels: Sequence[int] = (256, 128, 64, 32, 16),
                 encoder_weights: str | None = None, **attention_kwargs):
        super().__init__()
        if dim != 2:
            raise ValueError("smp encoders are 2D only: use dim=2 with smp_unet, or unet/densenet/"
                             "sdnet for dim=3")
        if len(decoder_channels) != encoder_depth:
            raise ValueError(f"decoder_channels needs {encoder_depth} entries (encoder_depth)")
        import segmentation_models_pytorch as smp

        self.encoder = smp.encoders.get_encoder(encoder_name, in_channels=in_channels,
                                                depth=encoder_depth, weights=encoder_weights)
        enc_ch = list(self.encoder.out_channels)[1:]  # [0] is the input itself
        self.size_multiple = 2 ** encoder_depth  # inputs are padded to this (32 for depth 5)
        self.encoder_attention = nn.ModuleList(
            create_attention(attention, c, 2, **attention_kwargs) for c in enc_ch)
        skip_ch = enc_ch[:-1][::-1] + [0]
        in_ch = enc_ch[-1]
        self.blocks, self.decoder_attention = nn.ModuleList(), nn.ModuleList()
        for skip, out in zip(skip_ch, decoder_channels):
            self.blocks.append(UNetBlock(in_ch + skip, out, dim=2))
            self.decoder_attention.append(create_attention(attention, out, 2, **attention_kwargs))
            in_ch = out
        self.head = nn.Conv2d(in_ch, num_classes, 3, padding=1)

    def attention_modules(self) -> list[nn.Module]:
        return [*self.encoder_attention, *self.decoder_attention]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % self.size_multiple or x.shape[-2] % self.size_multiple:
            raise ValueError(f"spatial size {tuple(x.shape[2:])} must be divisible by "
                             f"{self.size_multiple} for this encoder")
        feats = [a(f) for a, f in zip(self.encoder_attention, self.encoder(x)[1:])]
        skips = feats[:-1][::-1]
        x = feats[-1]
        for i, (block, attn) in enumerate(zip(self.blocks, self.decoder_attention)):
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
            if i < len(skips):
                x = torch.cat([x, skips[i]], dim=1)
            x = attn(block(x))
        return self.head(x)


def _encoder_multiple(encoder_depth: int = 5, **_) -> int:
    return 2 ** encoder_depth  # one stride-2 stage per encoder level


@register_model("smp_unet", size_multiple=_encoder_multiple)
def smp_unet(in_channels: int, num_classes: int, attention: str = "scse", dim: int = 2,
             encoder_name: str = "resnet34", encoder_depth: int = 5,
             decoder_channels: Sequence[int] = (256, 128, 64, 32, 16),
             encoder_weights: str | None = None, **attention_kwargs) -> SMPEncoderUNet:
    """U-Net decoder with our attention blocks on an smp encoder (``encoder_name``, default
    resnet34, random init)."""
    return SMPEncoderUNet(in_channels, num_classes, attention, dim, encoder_name, encoder_depth,
                          decoder_channels, encoder_weights, **attention_kwargs)
