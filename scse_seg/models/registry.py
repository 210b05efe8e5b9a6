"""Registry of architectures, so configs and the CLI name a model by string."""
from __future__ import annotations

import inspect
from typing import Callable

from torch import nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str):
    def deco(fn):
        if name in _MODELS:
            raise KeyError(f"model {name!r} is already registered")
        _MODELS[name] = fn
        return fn

    return deco


def model_names() -> list[str]:
    return sorted(_MODELS)


def resolve_model_name(name: str) -> str | None:
    """The registered spelling of ``name``, matched case-insensitively (``UNet`` -> ``unet``,
    ``smp:fpn`` -> ``smp:FPN``); None when no architecture has that name."""
    if name in _MODELS:
        return name
    by_lower = {k.lower(): k for k in _MODELS}
    return by_lower.get(str(name).lower())


def block_archs() -> list[str]:
    """Architectures whose stage block can be chosen (``block=`` option)."""
    return [n for n in model_names() if "block" in inspect.signature(_MODELS[n]).parameters]


def create_model(arch: str, in_channels: int = 1, num_classes: int = 2, attention: str = "scse",
                 dim: int = 2, **kwargs) -> nn.Module:
    """Build architecture ``arch`` with ``attention`` after every encoder and decoder block.

    ``kwargs`` are architecture options (``width``, ``bottleneck_attention``, ``dropout``...) and
    attention options (``reduction``, ``fusion``), e.g.
    ``create_model("densenet", 1, 28, attention="scse", fusion="max", reduction=2)``;
    ``block`` (a ``create_block`` name, e.g. ``"sk"``) replaces the conv block of the
    architectures in :func:`block_archs`.
    """
    name = resolve_model_name(arch)
    if name is None:
        raise ValueError(f"unknown architecture {arch!r}; valid names: {', '.join(model_names())}")
    if kwargs.get("block") is not None and name not in block_archs():
        raise ValueError(f"architecture {arch!r} takes no block option; architectures with a "
                         f"choosable block: {', '.join(block_archs())}")
    if kwargs.get("block", "") is None:
        kwargs.pop("block")
    return _MODELS[name](in_channels=in_channels, num_classes=num_classes, attention=attention,
                         dim=dim, **kwargs)
