"""What each SE block of a trained network does: the gates it learned, and what removing it costs.

SENet explains its blocks by their excitations (Hu et al., TPAMI 2019, section 7.2): early ones
are class-agnostic, later ones class-specific, the last ones saturate near 1 and can be removed
at little cost. This measures the same for every cSE / sSE / scSE block of a segmentation network
(ours, or an smp/MONAI model given blocks by :func:`scse_seg.plug.add_attention`), over labelled
volumes:

* cSE: the gate's mean, its spread across channels, the fractions near 0 (< 0.1) and near 1
  (> 0.9); how much it changes between the network's inputs (slices of a 2D network, volumes of
  a 3D one) and between the structures they show (class specificity);
* sSE: the mean gate inside each structure and in the background (does it highlight anatomy?);
* knock-out: mean Dice with one gate replaced by its mean over the volumes (a constant
  recalibration), and with the whole block removed (its output replaced by its input).

Everything is measured on the network's own grid: the run's resampling, 2D slices (or a whole 3D
volume) padded as in inference, the padding left out of every statistic.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..blocks.se import ChannelSE, ConcurrentSE, SpatialSE

NEAR = 0.1  # a gate below NEAR is "near 0", above 1 - NEAR "near 1"
SATURATED = 0.9  # a cSE gate with at least this fraction near 1 is saturated (SENet's last blocks)
CONSTANT = 0.01  # ... and one changing less than this between inputs acts as a fixed scale
HIGHLIGHT = 0.1  # an sSE gate at least this much higher in structures than outside highlights them


@dataclass
class Site:
    """One SE block of a network: its module path, the block, and the gates it has."""

    name: str
    module: nn.Module
    gates: tuple[str, ...]  # ("cse",), ("sse",) or ("cse", "sse")


def gate_sites(model: nn.Module) -> list[Site]:
    """Every cSE / sSE / scSE block of ``model`` (scSE's inner blocks not again), in module order;
    :func:`inspect_gates` reorders them as the forward pass calls them."""
    sites, inner = [], set()
    for name, m in model.named_modules():
        if id(m) in inner:
            continue
        if isinstance(m, ConcurrentSE):
            inner.update({id(m.cse), id(m.sse)})
            sites.append(Site(name, m, ("cse", "sse")))
        elif isinstance(m, ChannelSE):
            sites.append(Site(name, m, ("cse",)))
        elif isinstance(m, SpatialSE):
            sites.append(Site(name, m, ("sse",)))
    return sites


@dataclass
class Volume:
    """One labelled volume on the network's grid: image (C, X, Y, Z) normalised, label (X, Y, Z)."""

    name: str
    image: np.ndarray
    label: np.ndarray


@dataclass
class _Accumulator:
    """Running sums of one block's gates over every input of the volumes."""

    num_classes: int
    cse: list = field(default_factory=list)  # (N, C) gates of inputs showing anatomy
    cse_counts: list = field(default_factory=list)  # (N, K) voxels of each class in those inputs
    sse_sum: np.ndarray | None = None  # per class: sum of the sSE gate, voxel count
    sse_n: np.ndarray | None = None
    sse_near: np.ndarray = field(default_factory=lambda: np.zeros(2))  # voxels near 0, near 1
    overlay: tuple | None = None  # (gate map, label) of the example input, at the gate's size

    def add(self, gates: dict, labels: torch.Tensor, example: int | None) -> None:
        k = self.num_classes
        if "cse" in gates:
            g = gates["cse"].detach().float().cpu()
            counts = torch.stack([(labels == c).flatten(1).sum(1) for c in range(k)], 1)
            keep = counts[:, 1:].sum(1) > 0
            self.cse.append(g[keep])
            self.cse_counts.append(counts[keep].double())
        if "sse" in gates:
            g = gates["sse"].detach().float().cpu()[:, 0]
            lab = nn.functional.interpolate(labels[:, None].float(), size=g.shape[1:],
                                            mode="nearest")[:, 0].long()
            valid = lab >= 0
            s = torch.bincount(lab[valid], weights=g[valid].double(), minlength=k)[:k]
            n = torch.bincount(lab[valid], minlength=k)[:k]
            if self.sse_sum is None:
                self.sse_sum, self.sse_n = np.zeros(k), np.zeros(k)
            self.sse_sum += s.numpy()
            self.sse_n += n.numpy()
            gv = g[valid]
            self.sse_near += [(gv < NEAR).sum().item(), (gv > 1 - NEAR).sum().item()]
            if example is not None:
                self.overlay = (g[example].numpy(), lab[example].numpy())

    def cse_mean_vector(self) -> torch.Tensor | None:
        return torch.cat(self.cse).mean(0) if self.cse and sum(len(c) for c in self.cse) else None

    def sse_mean(self) -> float | None:
        return None if self.sse_sum is None else float(self.sse_sum.sum() / max(self.sse_n.sum(), 1))


def cse_statistics(gates: torch.Tensor, counts: torch.Tensor) -> dict:
    """Statistics of cSE gates ``gates`` (N inputs, C channels), ``counts`` (N, K) voxels of each
    class (0 = background) in each input. ``input_std``: per channel, the standard deviation over
    inputs, averaged over channels; ``structure_std``: the same over structures of each
    structure's mean gate (inputs weighted by that structure's voxels); ``specificity``: their
    ratio, the share of the gate's change that follows which structures are shown."""
    g = gates.double()
    out = dict(cse_mean=g.mean().item(), cse_channel_spread=g.mean(0).std(unbiased=False).item(),
               cse_near0=(g < NEAR).double().mean().item(),
               cse_near1=(g > 1 - NEAR).double().mean().item(),
               cse_input_std=g.std(0, unbiased=False).mean().item() if len(g) > 1 else 0.0)
    w = counts[:, 1:].double()
    present = w.sum(0) > 0
    if int(present.sum()) >= 2:
        w = w[:, present]
        per_structure = (w.T @ g) / w.sum(0)[:, None]  # (structures, C)
        out["cse_structure_std"] = per_structure.std(0, unbiased=False).mean().item()
    else:
        out["cse_structure_std"] = 0.0
    out["cse_specificity"] = out["cse_structure_std"] / out["cse_input_std"] \
        if out["cse_input_std"] > 0 else 0.0
    out["saturated"] = out["cse_near1"] >= SATURATED
    out["constant"] = out["cse_input_std"] < CONSTANT
    return out


def sse_statistics(gate_sum: np.ndarray, voxels: np.ndarray, near: np.ndarray) -> dict:
    """Statistics of sSE gates from per-class sums and voxel counts (class 0 = background) and
    the voxels near 0 and near 1: the mean inside structures, in the background, their contrast."""
    total = max(voxels.sum(), 1)
    inside = gate_sum[1:].sum() / max(voxels[1:].sum(), 1)
    background = gate_sum[0] / max(voxels[0], 1)
    out = dict(sse_mean=gate_sum.sum() / total, sse_near0=near[0] / total, sse_near1=near[1] / total,
               sse_in_structures=inside, sse_background=background, sse_contrast=inside - background)
    out = {k: float(v) for k, v in out.items()}
    out["highlights"] = out["sse_contrast"] >= HIGHLIGHT
    return out


def _pad(x: torch.Tensor, multiple: int, fill) -> tuple[torch.Tensor, list]:
    from ..inference import _pad_to_at_least

    return _pad_to_at_least(x, (1,) * (x.dim() - 2), multiple, fill)


class _Network:
    """Runs a model over volumes on its grid as inference does (2D: batches of slices along
    ``axis``; 3D: the whole volume), telling the hooks which labels each input shows."""

    def __init__(self, model: nn.Module, dim: int, axis: int, multiple: int, device, batch_size: int):
        self.model, self.dim, self.axis = model, dim, axis
        self.multiple, self.device, self.batch_size = multiple, device, batch_size
        self.labels: torch.Tensor | None = None  # (N, *spatial) of the current input, -1 = padding
        self.example: int | None = None  # index in the current batch of the overlay's input
        self.example_image: np.ndarray | None = None  # that input's first channel, padded

    def inputs(self, vol: Volume, example_slice: int | None):
        """(image batch, label batch, index of the example input) for each forward pass."""
        from ..data.slices import channel_pad_values

        img = torch.as_tensor(vol.image, dtype=torch.float32)
        lab = torch.as_tensor(vol.label.astype(np.int64))
        fill = channel_pad_values(vol.image)
        if self.dim == 3:
            x, _ = _pad(img[None], self.multiple, fill)
            y, crop = _pad(lab[None, None].float(), self.multiple, -1)
            yield x, y[:, 0].long(), crop, 0
            return
        img = img.movedim(self.axis + 1, 0)  # (S, C, a, b)
        lab = lab.movedim(self.axis, 0)
        for start in range(0, img.shape[0], self.batch_size):
            x, _ = _pad(img[start:start + self.batch_size], self.multiple, fill)
            y, crop = _pad(lab[start:start + self.batch_size, None].float(), self.multiple, -1)
            ex = None
            if example_slice is not None and start <= example_slice < start + len(x):
                ex = example_slice - start
            yield x, y[:, 0].long(), crop, ex

    @torch.no_grad()
    def predict(self, vol: Volume, example_slice: int | None = None) -> np.ndarray:
        """Class indices (X, Y, Z) of ``vol``."""
        outs = []
        for x, y, crop, ex in self.inputs(vol, example_slice):
            self.labels, self.example = y, ex
            if ex is not None:
                self.example_image = x[ex, 0].numpy()
            logits = self.model(x.to(self.device))
            outs.append(logits[(Ellipsis, *crop)].argmax(1).cpu())
        self.labels = self.example = None
        if self.dim == 3:
            return outs[0][0].numpy()
        return np.moveaxis(torch.cat(outs).numpy(), 0, self.axis)


def _mean_dice(pred: np.ndarray, label: np.ndarray, num_classes: int) -> float:
    from ..metrics import dice_per_class

    return float(np.nanmean(dice_per_class(pred, label, num_classes)[1:]))


@dataclass
class GateReport:
    """The inspector's results: one row per block, per-structure sSE means, knock-outs."""

    blocks: list[dict]  # block, order, gates, channels, statistics (see cse/sse_statistics)
    sse_structures: list[dict]  # block, structure, mean_gate, voxels
    knockouts: list[dict]  # block, gate, replacement, dice, delta
    dice: float  # mean Dice of the intact network over the volumes
    volumes: list[str]
    class_names: list[str]
    overlays: dict = field(default_factory=dict)  # block -> (image slice, gate map, label)
    example: str = ""  # the overlay's volume and slice


def inspect_gates(model: nn.Module, volumes: list[Volume], class_names: list[str], dim: int = 2,
                  axis: int = 2, multiple: int = 16, knockout: bool = True, device=None,
                  batch_size: int = 32, progress: bool = True) -> GateReport:
    """Measure every SE block of ``model`` over ``volumes`` (see the module docstring)."""
    from tqdm.auto import tqdm

    from ..evaluation.plots import best_slice

    sites = gate_sites(model)
    if not sites:
        raise ValueError("the network has no cSE, sSE or scSE block to inspect")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    net = _Network(model, dim, axis, multiple, device, batch_size)
    k = len(class_names)
    acc = {s.name: _Accumulator(k) for s in sites}
    order: list[str] = []

    def capture(site):
        def hook(module, inputs, output):
            if site.name not in order:
                order.append(site.name)
            acc[site.name].add(module.gates(inputs[0]), net.labels, net.example)
        return hook

    ex_slice = best_slice(volumes[0].label, axis) if dim == 2 else None
    steps = len(volumes) * (1 + (sum(len(s.gates) + 1 for s in sites) if knockout else 0))
    bar = tqdm(total=steps, desc="inspecting gates", leave=False, disable=not progress)
    handles = [s.module.register_forward_hook(capture(s)) for s in sites]
    dice = []
    try:
        for i, vol in enumerate(volumes):
            dice.append(_mean_dice(net.predict(vol, ex_slice if i == 0 else None), vol.label, k))
            bar.update()
    finally:
        for h in handles:
            h.remove()
    sites = sorted((s for s in sites if s.name in order), key=lambda s: order.index(s.name))
    blocks, structures, overlays = [], [], {}
    for i, s in enumerate(sites):
        a = acc[s.name]
        row = dict(order=i + 1, block=s.name, gates="+".join(s.gates),
                   channels=int(getattr(s.module, "channels", 0)))
        if "cse" in s.gates and a.cse_mean_vector() is not None:
            row.update(cse_statistics(torch.cat(a.cse), torch.cat(a.cse_counts)))
        if "sse" in s.gates and a.sse_sum is not None:
            row.update(sse_statistics(a.sse_sum, a.sse_n, a.sse_near))
            structures += [dict(block=s.name, structure=class_names[c], mean_gate=a.sse_sum[c] / a.sse_n[c],
                                voxels=int(a.sse_n[c])) for c in range(k) if a.sse_n[c] > 0]
            if a.overlay is not None:
                overlays[s.name] = a.overlay
        blocks.append(row)
    knockouts = []
    if knockout:
        base = float(np.mean(dice))
        for s in sites:
            a = acc[s.name]
            means = {"cse": a.cse_mean_vector(), "sse": a.sse_mean()}
            for gate in (*s.gates, "block"):
                if gate != "block" and means[gate] is None:
                    bar.update(len(volumes))
                    continue
                h = s.module.register_forward_hook(_knockout(gate, means.get(gate)))
                try:
                    d = []
                    for vol in volumes:
                        d.append(_mean_dice(net.predict(vol), vol.label, k))
                        bar.update()
                finally:
                    h.remove()
                knockouts.append(dict(block=s.name, gate=gate,
                                      replacement="removed" if gate == "block" else "mean",
                                      dice=float(np.mean(d)), delta=float(np.mean(d)) - base))
    bar.close()
    model.train(was_training)
    example = ""
    if dim == 2 and net.example_image is not None:
        overlays = {n: (net.example_image, g, lab) for n, (g, lab) in overlays.items()}
        example = f"{volumes[0].name}, slice {ex_slice} along axis {axis}"
    else:
        overlays = {}
    return GateReport(blocks, structures, knockouts, float(np.mean(dice)), [v.name for v in volumes],
                      list(class_names), overlays, example)


def _knockout(gate: str, mean):
    """A forward hook replacing one gate of a block by its mean (``gate`` "cse"/"sse"), or the
    block's output by its input (``gate`` "block")."""
    def hook(module, inputs, output):
        x = inputs[0]
        if gate == "block":
            return x
        gates = module.gates(x)
        g = gates[gate]
        gates[gate] = mean.to(g).expand_as(g) if torch.is_tensor(mean) else torch.full_like(g, mean)
        return module.recalibrate(x, gates)
    return hook


def run_volumes(run, max_volumes: int | None = None) -> list[Volume]:
    """The volumes of an opened run (:func:`scse_seg.evaluation.runs.open_run`) on its network's
    grid: normalised, and resampled as in training (labels nearest)."""
    from ..data.msd import channels_first
    from ..data.resample import resample_volume

    dc = run.cfg.data
    out = []
    for name in run.val[:max_volumes]:
        vol = run.load(name)
        img, lab = channels_first(vol.image), vol.label
        if run.loaded.resampled:
            img, lab, _ = resample_volume(img, lab, vol.affine, dc.zoom, dc.target_spacing)
        out.append(Volume(name, np.asarray(img, dtype=np.float32), np.asarray(lab)))
    return out


GATE_FILES = ("summary.md", "blocks.csv", "sse_structures.csv", "knockout.csv", "gates.png",
              "knockout.png", "sse_structures.png", "sse_overlay.png")


def _csv(rows: list[dict]) -> str:
    import csv
    import io

    buf = io.StringIO()
    keys = list(dict.fromkeys(k for r in rows for k in r))
    w = csv.DictWriter(buf, keys, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in r.items()})
    return buf.getvalue()


def _fmt(v, points: bool = False) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "—"
    return f"{100 * v:+.2f}" if points else f"{v:.2f}"


def summary_markdown(report: GateReport, heading: str, about: str = "") -> str:
    """The inspector's Markdown summary: one table row per block and the findings in words."""
    ko = {(k["block"], k["gate"]): k["delta"] for k in report.knockouts}
    lines = [f"# {heading}", "", *( [about, ""] if about else []),
             f"{len(report.volumes)} volume{'s' * (len(report.volumes) != 1)}; mean Dice of the intact "
             f"network {report.dice:.4f} (on the network's grid). Knock-outs: change in mean Dice in "
             "points when one gate is replaced by its mean over these volumes, or the block removed.",
             "", "| # | block | C | cSE mean | cSE >0.9 | cSE change over inputs | over structures | "
             "sSE in structures | sSE background | sSE contrast | Δ cSE→mean | Δ sSE→mean | Δ removed |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for b in report.blocks:
        n = b["block"]
        lines.append(f"| {b['order']} | `{n}` | {b['channels']} | {_fmt(b.get('cse_mean'))} | "
                     f"{_fmt(b.get('cse_near1'))} | {_fmt(b.get('cse_input_std'))} | "
                     f"{_fmt(b.get('cse_structure_std'))} | {_fmt(b.get('sse_in_structures'))} | "
                     f"{_fmt(b.get('sse_background'))} | {_fmt(b.get('sse_contrast'))} | "
                     f"{_fmt(ko.get((n, 'cse')), True)} | {_fmt(ko.get((n, 'sse')), True)} | "
                     f"{_fmt(ko.get((n, 'block')), True)} |")

    def which(pred):
        names = [str(b["order"]) for b in report.blocks if pred(b)]
        return ", ".join(names) if names else "none"

    lines += ["", "Findings (blocks by number):",
              f"- saturated cSE (at least {SATURATED:.0%} of its gates above {1 - NEAR:g}): "
              f"{which(lambda b: b.get('saturated'))}; nearly constant (changes by less than "
              f"{CONSTANT:g} between inputs, a fixed per-channel scale): "
              f"{which(lambda b: b.get('constant'))}",
              f"- sSE highlighting structures (gate at least {HIGHLIGHT:g} higher inside than outside): "
              f"{which(lambda b: b.get('highlights'))}"]
    if report.knockouts:
        lines += [f"- removing the block costs more than 1 Dice point: "
                  f"{which(lambda b: ko.get((b['block'], 'block'), 0) < -0.01)}; changes Dice by less "
                  f"than 0.1 point: {which(lambda b: abs(ko.get((b['block'], 'block'), 1)) < 0.001)}"]
    lines += ["", "Figures: `gates.png` (statistics per block), `knockout.png`, `sse_structures.png`, "
              f"`sse_overlay.png` (gate maps on {report.example or 'an example input'}); CSV: "
              "`blocks.csv`, `sse_structures.csv`, `knockout.csv`.", ""]
    return "\n".join(lines)


def write_gate_report(report: GateReport, out, heading: str, about: str = "") -> list:
    """Write :data:`GATE_FILES` into ``out`` all at once (a failure leaves nothing); figures a
    network has nothing for (no sSE, no knock-outs) are skipped. Returns the paths written."""
    from pathlib import Path

    from ..fileio import StagedFiles, atomic_write_text
    from . import gate_plots as P

    out = Path(out)
    order = [b["block"] for b in report.blocks]
    written = []
    with StagedFiles(out) as staged:
        def put(name, write):
            write(staged.path(out / name))
            written.append(out / name)

        put("summary.md", lambda p: atomic_write_text(p, summary_markdown(report, heading, about)))
        put("blocks.csv", lambda p: atomic_write_text(p, _csv(report.blocks)))
        put("gates.png", lambda p: P.gate_heatmap(report.blocks, p, heading))
        if report.sse_structures:
            put("sse_structures.csv", lambda p: atomic_write_text(p, _csv(report.sse_structures)))
            put("sse_structures.png", lambda p: P.sse_structure_bars(report.sse_structures, order,
                                                                     report.class_names, p, heading))
        if report.overlays:
            put("sse_overlay.png", lambda p: P.gate_overlays(report.overlays, order, p,
                                                             f"{heading}: {report.example}"))
        if report.knockouts:
            put("knockout.csv", lambda p: atomic_write_text(p, _csv(report.knockouts)))
            put("knockout.png", lambda p: P.knockout_bars(report.knockouts, order, p, heading))
        staged.commit()
    return written


__all__ = ["GATE_FILES", "GateReport", "Site", "Volume", "cse_statistics", "gate_sites", "inspect_gates",
           "run_volumes", "sse_statistics", "summary_markdown", "write_gate_report"]
