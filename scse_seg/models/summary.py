"""Parameter counts of every architecture x attention, and the overhead over the vanilla net."""
from __future__ import annotations

from .registry import create_model

PAPER_ARCHS = ("unet", "densenet", "sdnet")


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def parameter_table(archs=PAPER_ARCHS + ("smp_unet",), attentions=("none", "cse", "sse", "scse",
                    "cbam", "eca", "pe"), in_channels: int = 1, num_classes: int = 28, dim: int = 2,
                    **kwargs) -> list[dict]:
    """Rows ``{arch, attention, params, overhead_pct}`` (overhead relative to ``none``)."""
    rows = []
    for arch in archs:
        base = None
        for att in attentions:
            n = count_parameters(create_model(arch, in_channels, num_classes, att, dim, **kwargs))
            base = n if att == "none" else base
            rows.append(dict(arch=arch, attention=att, params=n,
                             overhead_pct=100.0 * (n - base) / base if base else float("nan")))
    return rows


def block_parameter_table(channels: int = 64, dim: int = 2, reduction: float = 16) -> list[dict]:
    """Parameters of every attention on a ``channels``-wide map and of every conv block mapping
    ``channels`` to ``channels`` (CMPE-SE inside the residual block): rows ``{name, kind, params}``.
    Attentions and CMPE-SE use ``reduction``; the other blocks their papers' defaults."""
    from ..blocks import attention_names, block_names, create_attention, create_block, is_inner_recalibration
    from ..blocks.registry import attention_options

    rows = []
    for name in attention_names():
        if name != "none" and not is_inner_recalibration(name):
            m = create_attention(name, channels, dim,
                                 **attention_options(name, {"reduction": reduction}))
            rows.append(dict(name=name, kind="attention", params=count_parameters(m)))
    for name in block_names():
        rows.append(dict(name=name, kind="block", params=count_parameters(
            create_block(name, channels, channels, dim))))
    plain = count_parameters(create_block("residual", channels, channels, dim))
    for name in attention_names():
        if is_inner_recalibration(name):
            n = count_parameters(create_block("residual", channels, channels, dim,
                                              recalibration=name, reduction=reduction))
            rows.append(dict(name=f"residual+{name}", kind="block", params=n,
                             recalibration=n - plain))
    return rows


def format_block_table(rows: list[dict]) -> str:
    lines = ["| block | kind | parameters |", "|---|---|---:|"]
    for r in rows:
        extra = f" (+{r['recalibration']:,} recalibration)" if "recalibration" in r else ""
        lines.append(f"| {r['name']} | {r['kind']} | {r['params']:,}{extra} |")
    return "\n".join(lines)


def format_table(rows: list[dict]) -> str:
    lines = ["| arch | attention | parameters | overhead vs none |", "|---|---|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['arch']} | {r['attention']} | {r['params']:,} | "
                     f"{r['overhead_pct']:+.2f}% |")
    return "\n".join(lines)
