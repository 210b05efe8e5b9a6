"""Insert attention blocks into an existing network without changing its class or its weights' names.

Each site gets its own block, built by :func:`scse_seg.blocks.create_attention` for the channel
count a shape probe measured (forward hooks on one dummy input, in eval mode, no gradients). The
blocks live in one ``ModuleDict`` on the root module (``model.plugged_attention``), so parameters,
``state_dict``, ``.to()``, DDP and optimisers see them; a forward hook on each site's module feeds
that module's output through its block. Every original parameter keeps its name, so a checkpoint of
the unmodified network loads with ``strict=False`` and reports exactly the new keys missing.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..blocks import create_attention
from .sites import Site, find_sites

ATTR = "plugged_attention"
UNUSED = "the output does not depend on it"


class _RecalibrateOutput:
    """Forward hook: replace the module's output ``y`` by ``block(y)``."""

    def __init__(self, block: nn.Module):
        self.block = block

    def __call__(self, module, args, output):
        return self.block(output)


class _RecalibrateItems:
    """Forward hook for modules returning a list of maps (smp encoders): ``y[i] = block_i(y[i])``."""

    def __init__(self, blocks: dict[int, nn.Module]):
        self.blocks = blocks

    def __call__(self, module, args, output):
        out = list(output)
        for i, block in self.blocks.items():
            out[i] = block(out[i])
        return type(output)(out) if isinstance(output, tuple) else out


@dataclass
class SiteRow:
    site: str
    key: str  # name of the block in model.plugged_attention
    channels: int
    dim: int
    block: str
    params: int


@dataclass
class AttentionReport:
    """What :func:`add_attention` did; ``print(report)`` shows it as a table."""

    attention: str
    options: dict
    rows: list[SiteRow] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (site, why)

    @property
    def params_added(self) -> int:
        return sum(r.params for r in self.rows)

    @property
    def new_keys(self) -> list[str]:
        """state_dict keys the insertion added (those a pre-insertion checkpoint lacks)."""
        return list(self._new_keys)

    _new_keys: list[str] = field(default_factory=list, repr=False)

    def __str__(self) -> str:
        head = ("site", "channels", "dim", "block", "params")
        body = [(r.site, str(r.channels), f"{r.dim}D", r.block, f"{r.params:,}") for r in self.rows]
        widths = [max(len(x) for x in col) for col in zip(head, *body)]
        fmt = lambda row: "  ".join(x.ljust(w) if i < 4 else x.rjust(w)  # noqa: E731
                                    for i, (x, w) in enumerate(zip(row, widths)))
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        lines = [f"add_attention: {self.attention}" + (f" ({opts})" if opts else "")
                 + f", {len(self.rows)} sites, {self.params_added:,} parameters added",
                 fmt(head), "  ".join("-" * w for w in widths), *map(fmt, body)]
        lines += [f"skipped {s}: {why}" for s, why in self.skipped]
        return "\n".join(lines)


def _default_input(model: nn.Module, size: int | None) -> torch.Tensor:
    first = next((m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))), None)
    if first is None:
        raise ValueError("cannot guess an input for the shape probe (no Conv2d/Conv3d found); pass "
                         "example_input=")
    dim = 3 if isinstance(first, nn.Conv3d) else 2
    if size is None:
        mult = int(getattr(model, "size_multiple", 0) or 0)
        size = max(128 if dim == 2 else 32, 2 * mult)
    p = next(model.parameters())
    return torch.zeros(1, first.in_channels, *([size] * dim), device=p.device, dtype=p.dtype)


def _probe(model: nn.Module, sites: list[Site], x: torch.Tensor) -> list[list[tuple]]:
    """Per site, ``(channels, ndim, used)`` for each time it ran during one forward of ``x``;
    ``used``: the model's output depends on that map (smp's FPN, for one, never reads the
    stride-2 encoder feature, and a block there would get no gradient)."""
    seen: list[list[tuple]] = [[] for _ in sites]
    maps: list[list[torch.Tensor]] = [[] for _ in sites]
    handles = []
    for i, s in enumerate(sites):
        def hook(module, args, output, i=i, index=s.index):
            y = output if index is None else output[index]
            seen[i].append((y.shape[1], y.dim()) if torch.is_tensor(y) else (None, None))
            if not torch.is_tensor(y):
                return None
            # a copy stands where the block's output will: is *it* read (not just the map, which
            # later encoder stages read anyway)?
            maps[i].append(y := y.clone())
            if index is None:
                return y
            out = list(output)
            out[index] = y
            return type(output)(out) if isinstance(output, tuple) else out
        handles.append(s.module.register_forward_hook(hook))
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()  # batch norm statistics must not move
        with torch.enable_grad():
            out = model(x.detach().clone().requires_grad_(True))
            outs = [t for t in (out if isinstance(out, (list, tuple)) else [out]) if torch.is_tensor(t)]
            flat = [m for ms in maps for m in ms]
            grads = torch.autograd.grad(sum(o.float().sum() for o in outs), flat,
                                        allow_unused=True) if flat else []
    except Exception as e:
        raise ValueError(f"shape probe failed on an input of shape {tuple(x.shape)} ({e}); pass "
                         "example_input= a tensor the model accepts") from e
    finally:
        for h in handles:
            h.remove()
        for m, t in modes.items():
            m.training = t
    used = iter(g is not None for g in grads)
    return [[(c, d, next(used) if c is not None else False) for c, d in calls] for calls in seen]


def _key(site: str) -> str:
    return site.replace("[", ".").replace("]", "").replace(".", "__")


def add_attention(model: nn.Module, attention: str = "scse", where="decoder",
                  example_input: torch.Tensor | None = None, **options) -> AttentionReport:
    """Insert a distinct ``attention`` block after every decoder block of ``model`` (in place).

    ``where``: "decoder", "encoder" (every encoder stage's output), "all", "smp" (smp's own
    ``decoder_attention_type`` sites in Unet/Unet++), or a list of submodule names (any network).
    ``options`` go to :func:`scse_seg.blocks.create_attention` (``reduction``, ``fusion``...).
    ``add_attention(unet, "scse", where="smp", fusion="add", reduction=16)`` gives the same
    numbers as smp's ``decoder_attention_type="scse"`` with the same weights (Roy et al. 2018's
    add-fusion scSE at smp's two sites per block).
    """
    if isinstance(model, nn.Sequential):
        raise ValueError("the model is an nn.Sequential, which would run the attention blocks as "
                         "layers; wrap it in a Module (class Net(nn.Module) with self.body = ...)")
    sites = find_sites(model, where)
    x = _default_input(model, None) if example_input is None else example_input
    seen = _probe(model, sites, x)
    existing = getattr(model, ATTR, None)
    if existing is None:
        existing = nn.ModuleDict()
    elif not isinstance(existing, nn.ModuleDict):
        raise ValueError(f"model already has an attribute {ATTR!r} that is not ours")
    p = next(model.parameters())
    report = AttentionReport(str(attention), dict(options))
    per_module: dict[int, tuple[nn.Module, dict[int, nn.Module]]] = {}
    added: dict[str, nn.Module] = {}
    for s, calls in zip(sites, seen):
        if not calls:
            report.skipped.append((s.name, "not run by the forward pass"))
            continue
        if len(calls) > 1:
            report.skipped.append((s.name, f"module runs {len(calls)} times per forward (shared)"))
            continue
        channels, ndim, used = calls[0]
        if channels is None:
            report.skipped.append((s.name, "output is not a tensor"))
            continue
        if channels == 0 or not used:
            report.skipped.append((s.name, UNUSED))
            continue
        key = _key(s.name)
        if key in existing:
            raise ValueError(f"site {s.name} already has attention (model.{ATTR}[{key!r}])")
        block = create_attention(attention, channels, ndim - 2, **options).to(p.device, p.dtype)
        added[key] = block
        report.rows.append(SiteRow(s.name, key, channels, ndim - 2, type(block).__name__,
                                   sum(q.numel() for q in block.parameters())))
        if s.index is None:
            s.module.register_forward_hook(_RecalibrateOutput(block))
        else:
            per_module.setdefault(id(s.module), (s.module, {}))[1][s.index] = block
    for module, blocks in per_module.values():
        module.register_forward_hook(_RecalibrateItems(blocks))
    for key, block in added.items():
        existing[key] = block
        report._new_keys += [f"{ATTR}.{key}.{k}" for k in block.state_dict()]
    if ATTR not in model._modules:
        model.add_module(ATTR, existing)
    return report
