"""Registries of what users name by string: attention types, conv blocks (here) and
architectures (:mod:`scse_seg.models.registry`), one small class for all, as timm and smp do."""
from __future__ import annotations

from typing import Any, Callable

from torch import nn


class Registry:
    """Names -> factories (with optional recorded properties), for one kind of thing."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Callable[..., Any]] = {}
        self._props: dict[str, dict[str, Any]] = {}

    def register(self, name: str, **props):
        """Decorator: make ``name`` buildable; ``props`` are recorded (see :meth:`prop`)."""

        def deco(fn):
            self.add(name, fn, **props)
            return fn

        return deco

    def add(self, name: str, fn: Callable[..., Any], **props) -> None:
        if name in self._entries:
            raise KeyError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = fn
        self._props[name] = props

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def get(self, name: str) -> Callable[..., Any]:
        if name not in self._entries:
            raise ValueError(f"unknown {self.kind} {name!r}; valid names: {', '.join(self.names())}")
        return self._entries[name]

    def prop(self, name: str, key: str, default: Any = None) -> Any:
        return self._props[name].get(key, default) if name in self._props else default


ATTENTIONS = Registry("attention")
BLOCKS = Registry("block")


def register_attention(name: str):
    """Class decorator: make ``name`` available to :func:`create_attention`."""
    return ATTENTIONS.register(name)


def attention_names() -> list[str]:
    return ATTENTIONS.names()


def _key(name: str | None) -> str:
    return "none" if name is None else str(name).lower()


def is_inner_recalibration(name: str | None) -> bool:
    """True for attentions that recalibrate inside a residual block (they see both the identity
    and the residual branch, e.g. CMPE-SE) and so cannot follow an arbitrary block."""
    return _key(name) in ATTENTIONS and bool(getattr(ATTENTIONS.get(_key(name)),
                                                     "inside_residual", False))


def accepted_options(name: str | None) -> tuple[str, ...]:
    """The keyword options attention ``name`` takes (its class's ``accepted_kwargs``)."""
    return tuple(getattr(ATTENTIONS.get(_key(name)), "accepted_kwargs", ()))


def attention_options(name: str | None, options: dict) -> dict:
    """The part of model-wide attention ``options`` (e.g. ``reduction`` and ``fusion`` of a config)
    that attention ``name`` takes, so one setting serves every type; an option that no attention
    takes (a misspelling) raises."""
    known = set().union(*(accepted_options(n) for n in attention_names()))
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"unknown attention option(s) {', '.join(unknown)}; valid options: "
                         f"{', '.join(sorted(known))}")
    accepted = accepted_options(name)
    return {k: v for k, v in options.items() if k in accepted}


def _build(name: str | None, channels: int, dim: int, kwargs: dict) -> nn.Module:
    cls = ATTENTIONS.get(_key(name))
    kwargs = {k: v for k, v in kwargs.items() if v is not None}  # None: the attention's own default
    accepted = accepted_options(name)
    wrong = sorted(set(kwargs) - set(accepted))
    if wrong:
        raise ValueError(f"attention {_key(name)!r} takes no option {', '.join(wrong)}; valid "
                         f"options: {', '.join(accepted) or 'none'}")
    return cls(channels, dim=dim, **kwargs)


def create_attention(name: str | None, channels: int, dim: int = 2, **kwargs) -> nn.Module:
    """Build the attention block ``name`` for a ``channels``-wide, ``dim``-D feature map.

    ``None``/"none" gives an identity. Keyword arguments (``reduction``, ``fusion``...) go to the
    block; one it does not take raises a ValueError naming those it does (filter model-wide
    settings with :func:`attention_options`); an option given as ``None`` means the block's own
    default, so a saved config's ``reduction: null`` rebuilds the same network. Recalibrations
    that live inside a residual block (``cmpe_se*``) are refused here: build them with
    ``create_block("residual", ..., recalibration=name)``.
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
    return BLOCKS.register(name)


def block_names() -> list[str]:
    return BLOCKS.names()


def recalibrating_blocks() -> list[str]:
    """Blocks that accept an inside recalibration (``recalibration=`` option)."""
    return [n for n in block_names() if getattr(BLOCKS.get(n), "accepts_recalibration", False)]


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
    return BLOCKS.get(name)(in_channels, out_channels, dim=dim, **kwargs)
