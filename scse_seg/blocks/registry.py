"""Registries of attention types and of conv blocks, so models and configs name them by string
(like timm layers)."""
from __future__ import annotations

from typing import Callable

from torch import nn

_ATTENTION: dict[str, Callable[..., nn.Module]] = {}
_BLOCKS: dict[str, Callable[..., nn.Module]] = {}


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


def is_inner_recalibration(name: str | None) -> bool:
    """True for attentions that recalibrate inside a residual block (they see both the identity
    and the residual branch, e.g. CMPE-SE) and so cannot follow an arbitrary block."""
    cls = _ATTENTION.get("none" if name is None else str(name).lower())
    return bool(getattr(cls, "inside_residual", False))


def _build(name: str | None, channels: int, dim: int, kwargs: dict) -> nn.Module:
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


def create_attention(name: str | None, channels: int, dim: int = 2, **kwargs) -> nn.Module:
    """Build the attention block ``name`` for a ``channels``-wide, ``dim``-D feature map.

    ``None``/"none" gives an identity. Extra keyword arguments (``reduction``, ``fusion``...) go to
    the block; options valid for some other type are ignored, so one model-level setting serves all
    types, while a misspelt option raises. Recalibrations that live inside a residual block
    (``cmpe_se*``) are refused here: build them with ``create_block("residual", ...,
    recalibration=name)``.
    """
    if is_inner_recalibration(name):
        raise ValueError(f"attention {name!r} recalibrates inside a residual block; use it with "
                         f"block='residual' (valid blocks: {', '.join(recalibrating_blocks())})")
    return _build(name, channels, dim, kwargs)


def create_recalibration(name: str, channels: int, dim: int = 2, **kwargs) -> nn.Module:
    """Build an inside-a-residual-block recalibration (``forward(residual, identity)``)."""
    if not is_inner_recalibration(name):
        raise ValueError(f"{name!r} is not a residual-block recalibration; valid: "
                         f"{', '.join(n for n in attention_names() if is_inner_recalibration(n))}")
    return _build(name, channels, dim, kwargs)


def register_block(name: str):
    """Class decorator: make ``name`` available to :func:`create_block`."""

    def deco(cls):
        if name in _BLOCKS:
            raise KeyError(f"block {name!r} is already registered")
        _BLOCKS[name] = cls
        return cls

    return deco


def block_names() -> list[str]:
    return sorted(_BLOCKS)


def recalibrating_blocks() -> list[str]:
    """Blocks that accept an inside recalibration (``recalibration=`` option)."""
    return [n for n in block_names() if getattr(_BLOCKS[n], "accepts_recalibration", False)]


def check_block_attention(block: str | None, attention: str | None) -> str | None:
    """The error message if ``attention`` cannot be used with ``block`` (None = the
    architecture's own block), else None."""
    if is_inner_recalibration(attention) and block not in recalibrating_blocks():
        return (f"attention {attention!r} recalibrates inside a residual block and needs one of "
                f"the blocks {', '.join(recalibrating_blocks())}, got "
                + ("the architecture's own block" if block is None else f"block {block!r}"))
    return None


def create_block(name: str, in_channels: int, out_channels: int, dim: int = 2,
                 **kwargs) -> nn.Module:
    """Build conv block ``name`` mapping ``in_channels`` to ``out_channels`` at the same spatial
    size (one encoder/decoder stage of a U-Net-like network). ``kwargs`` are the block's options
    (``radix``, ``cardinality``, ``recalibration``...)."""
    if name not in _BLOCKS:
        raise ValueError(f"unknown block {name!r}; valid names: {', '.join(block_names())}")
    return _BLOCKS[name](in_channels, out_channels, dim=dim, **kwargs)
