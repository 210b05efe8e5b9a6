"""smp and MONAI networks with our attention plugged in (:func:`scse_seg.plug.add_attention`), so
training and the comparison grid run on networks people already use.

Names: ``smp:<Class>`` (e.g. ``smp:FPN``, with ``encoder_name``, random init) and ``monai:<Class>``
(``monai:UNet``, ``monai:BasicUNet``, ``monai:DynUNet``, 2D or 3D, channel widths from ``width``);
lower-case aliases ``smp_fpn``, ``monai_dynunet``... where the name is free (``smp_unet`` is our own
decoder on an smp encoder, so smp's Unet is ``smp:Unet`` only). Attention goes after every encoder
stage and decoder block (``placement="all"``, the papers' placement; ``model.placement`` picks
``encoder`` or ``decoder`` alone, as :func:`add_attention`'s ``where``).
"""
from __future__ import annotations

from functools import partial

from torch import nn

from ..plug import add_attention
from ..plug.sites import SMP_DECODER
from .registry import MODELS, register_model
from .smp_decoder import _encoder_multiple

MONAI = ("UNet", "BasicUNet", "DynUNet")
DEPTH = 4  # MONAI networks: 4 downsamplings, inputs divisible by 16 (as our paper models)


def _plug(model: nn.Module, attention: str, placement: str, size_multiple: int, in_channels: int,
          dim: int, attention_kwargs: dict) -> nn.Module:
    model.size_multiple = size_multiple
    if attention not in (None, "none"):
        import torch

        probe = torch.zeros(1, in_channels, *([2 * size_multiple] * dim))
        add_attention(model, attention, where=placement, example_input=probe, **attention_kwargs)
    return model


def build_smp(cls: str, in_channels: int, num_classes: int, attention: str = "scse", dim: int = 2,
              encoder_name: str = "resnet34", encoder_depth: int = 5, placement: str = "all",
              width=None, dropout=None, bottleneck_attention=None, smp_kwargs: dict | None = None,
              **attention_kwargs) -> nn.Module:
    """smp.<cls> (random init, smp's default decoder widths; ``width``, ``dropout`` and
    ``bottleneck_attention`` of our architectures do not apply and are ignored)."""
    if dim != 2:
        raise ValueError(f"smp:{cls} is 2D only; use a monai:* or paper architecture for dim=3")
    import segmentation_models_pytorch as smp

    kw = dict(encoder_name=encoder_name, encoder_weights=None, in_channels=in_channels,
              classes=num_classes, **(smp_kwargs or {}))
    if cls != "DPT":
        kw["encoder_depth"] = encoder_depth
    model = getattr(smp, cls)(**kw)
    return _plug(model, attention, placement, 2 ** encoder_depth, in_channels, 2, attention_kwargs)


def build_monai(cls: str, in_channels: int, num_classes: int, attention: str = "scse", dim: int = 2,
                width: int = 16, dropout: float | None = None, placement: str = "all",
                bottleneck_attention=None, **attention_kwargs) -> nn.Module:
    """MONAI <cls> with ``width`` channels at full resolution, doubling per level (4 levels)."""
    from monai.networks import nets

    drop = dropout or 0.0
    widths = [width * 2 ** i for i in range(DEPTH + 1)]
    if cls == "UNet":
        model = nets.UNet(dim, in_channels, num_classes, channels=widths, strides=[2] * DEPTH,
                          num_res_units=2, dropout=drop)
    elif cls == "BasicUNet":
        model = nets.BasicUNet(dim, in_channels, num_classes, features=(*widths, width),
                               dropout=drop)
    else:
        model = nets.DynUNet(dim, in_channels, num_classes, kernel_size=[3] * (DEPTH + 1),
                             strides=[1] + [2] * DEPTH, upsample_kernel_size=[2] * DEPTH,
                             filters=widths, dropout=drop or None)
    return _plug(model, attention, placement, 2 ** DEPTH, in_channels, dim, attention_kwargs)


def _register(name: str, fn, size_multiple) -> None:
    fn.__doc__ = fn.func.__doc__
    register_model(name, size_multiple=size_multiple)(fn)


for _cls in SMP_DECODER:
    if _cls == "DPT":  # needs a timm ViT encoder ("tu-vit_..."): use add_attention on smp.DPT
        continue
    _fn = partial(build_smp, _cls)
    _register(f"smp:{_cls}", _fn, _encoder_multiple)
    if f"smp_{_cls.lower()}" not in MODELS and _cls != "Unet":
        _register(f"smp_{_cls.lower()}", _fn, _encoder_multiple)
for _cls in MONAI:
    _fn = partial(build_monai, _cls)
    _register(f"monai:{_cls}", _fn, 2 ** DEPTH)
    _register(f"monai_{_cls.lower()}", _fn, 2 ** DEPTH)


def is_plugged_arch(name: str) -> bool:
    """True for the smp/MONAI names registered here (they take ``encoder_name`` / ``width``)."""
    return name.startswith(("smp:", "monai:", "monai_")) or (
        name.startswith("smp_") and name != "smp_unet")
