"""Registry of attention types, so models and configs name attention by string (like timm layers)."""
from __future__ import annotations

from typing import Callable

from torch import nn

_ATTENTION: dict[str, Callable[..., nn.Module]] = {}


def register_attention(name: str):
    """Class decorator: make ``name`` available to :func:`create_attention`."""

    def deco(cls):
        if name in _ATTENTION:
            raise KeyError(f"attention {name!r} is already registered")
        _ATTENTION[name] = cls
        return cls

    return deco


def attention_names() -> list[str]:
    return sorted(_ATTENTION)


def create_attention(name: str | None, channels: int, dim: int = 2, **kwargs) -> nn.Module:
    """Build the attention block ``name`` for a ``channels``-wide, ``dim``-D feature map.

    ``None``/"none" gives an identity. Extra keyword arguments (``reduction``, ``fusion``...) go to
    the block; options valid for some other type are ignored, so one model-level setting serves all
    types, while a misspelt option raises.
    """
    key = "none" if name is None else str(name).lower()
    if key not in _ATTENTION:
        raise ValueError(f"unknown attention {name!r}; valid names: {', '.join(attention_names())}")
    known = set().union(*(getattr(c, "accepted_kwargs", ()) for c in _ATTENTION.values()))
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise TypeError(f"unknown attention option(s) {unknown}; valid options: {sorted(known)}")
    cls = _ATTENTION[key]
    accepted = getattr(cls, "accepted_kwargs", ())
    return cls(channels, dim=dim, **{k: v for k, v in kwargs.items() if k in accepted})
