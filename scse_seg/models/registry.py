"""Registry of architectures, so configs and the CLI name a model by string. Each entry records
its ``size_multiple`` (every spatial input size must be a multiple of it: 2 ** the number of
downsamplings), so callers learn it without building the model."""
from __future__ import annotations

import inspect
from typing import Callable, Union

from torch import nn

from ..blocks.registry import Registry, accepted_options, attention_names, attention_options

MODELS = Registry("architecture")
SizeMultiple = Union[int, Callable[..., int]]


def register_model(name: str, size_multiple: SizeMultiple = 16):
    """Decorator: make ``name`` available to :func:`create_model`. ``size_multiple``: an int,
    or a function of the model's options (e.g. ``lambda encoder_depth=5, **_: 2 ** encoder_depth``)."""
    return MODELS.register(name, size_multiple=size_multiple)


def model_names() -> list[str]:
    return MODELS.names()


def resolve_model_name(name: str) -> str | None:
    """The registered spelling of ``name``, matched case-insensitively (``UNet`` -> ``unet``,
    ``smp:fpn`` -> ``smp:FPN``); None when no architecture has that name."""
    if name in MODELS:
        return name
    by_lower = {k.lower(): k for k in MODELS.names()}
    return by_lower.get(str(name).lower())


def _resolve(arch: str) -> str:
    name = resolve_model_name(arch)
    if name is None:
        MODELS.get(arch)  # raises the one-line error naming the valid architectures
    return name


def _own_options(name: str) -> set[str]:
    """The options architecture ``name`` names itself (the rest go to its attention blocks)."""
    return {p.name for p in inspect.signature(MODELS.get(name)).parameters.values()
            if p.kind is not inspect.Parameter.VAR_KEYWORD}


def block_archs() -> list[str]:
    """Architectures whose stage block can be chosen (``block=`` option)."""
    return [n for n in model_names() if "block" in _own_options(n)]


def size_multiple(arch: str, **options) -> int:
    """The multiple every spatial input size of ``create_model(arch, **options)`` must be (16
    for the paper networks, 2 ** encoder_depth = 32 for smp encoders by default)."""
    value = MODELS.prop(_resolve(arch), "size_multiple", 16)
    return int(value(**options) if callable(value) else value)


def create_model(arch: str, in_channels: int = 1, num_classes: int = 2, attention: str = "scse",
                 dim: int = 2, **kwargs) -> nn.Module:
    """Build architecture ``arch`` with ``attention`` after every encoder and decoder block.

    ``kwargs`` are architecture options (``width``, ``bottleneck_attention``, ``dropout``...) and
    attention options (``reduction``, ``fusion``), e.g.
    ``create_model("densenet", 1, 28, attention="scse", fusion="max", reduction=2)``; attention
    options the chosen attention does not take are left out (one model-level setting serves every
    attention), a misspelt one raises. ``block`` (a ``create_block`` name, e.g. ``"sk"``)
    replaces the conv block of the architectures in :func:`block_archs`.
    """
    name = _resolve(arch)
    if kwargs.get("block") is not None and name not in block_archs():
        raise ValueError(f"architecture {arch!r} takes no block option; architectures with a "
                         f"choosable block: {', '.join(block_archs())}")
    if kwargs.get("block", "") is None:
        kwargs.pop("block")
    own = _own_options(name)
    attn_known = set().union(*(accepted_options(n) for n in attention_names()))
    unknown = sorted(set(kwargs) - own - attn_known)
    if unknown:
        valid = sorted((own | attn_known) - {"in_channels", "num_classes", "attention", "dim"})
        raise ValueError(f"architecture {name!r} takes no option {', '.join(unknown)}; valid "
                         f"options: {', '.join(valid)}")
    arch_kw = {k: v for k, v in kwargs.items() if k in own}
    attn_kw = attention_options(attention, {k: v for k, v in kwargs.items() if k not in own})
    return MODELS.get(name)(in_channels=in_channels, num_classes=num_classes, attention=attention,
                            dim=dim, **arch_kw, **attn_kw)
