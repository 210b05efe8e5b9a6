"""Parameter counts of every architecture x attention, and the overhead over the vanilla net."""
from __future__ import annotations

from .registry import create_model

PAPER_ARCHS = ("unet", "densenet", "sdnet")


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def parameter_table(archs=PAPER_ARCHS + ("smp_unet",), attentions=("none", "cse", "sse", "scse",
                    "cbam"), in_channels: int = 1, num_classes: int = 28, dim: int = 2,
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


def format_table(rows: list[dict]) -> str:
    lines = ["| arch | attention | parameters | overhead vs none |", "|---|---|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['arch']} | {r['attention']} | {r['params']:,} | "
                     f"{r['overhead_pct']:+.2f}% |")
    return "\n".join(lines)
