"""Training-step benchmark: every architecture x attention, plus smp's own scSE Unet as the anchor.

A step is forward + cross-entropy + backward + AdamW, on a random batch of ``batch`` one-channel
``size`` x ``size`` slices and ``classes`` classes. Each attention is also reported as its
overhead over ``none`` of the same architecture under the same setting, timed interleaved with it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .common import (
    PeakMemory,
    Setting,
    Timing,
    Workload,
    free_memory,
    measure,
    saved_for_backward,
    synchronize,
)

ARCHS = ("unet", "densenet", "sdnet", "smp_unet")
PAPER_ARCHS = ("unet", "densenet", "sdnet")
ATTENTIONS = ("none", "cse", "sse", "scse")
ANCHOR = "smp.Unet"  # segmentation_models_pytorch.Unet(encoder), decoder_attention_type None/"scse"

COLUMNS = [  # (key, header, digits; -1 = text, left-aligned)
    ("arch", "arch", -1), ("attention", "attention", -1), ("impl", "impl", -1),
    ("params_M", "params (M)", 3), ("ms_rep1", "ms/step rep 1", 1), ("ms_rep2", "ms/step rep 2", 1),
    ("ms", "ms/step (median)", 1), ("noise_pct", "rep spread %", 1),
    ("slices_per_s", "slices/s", 1), ("peak_MiB", "peak MiB", 0),
    ("saved_MB", "saved for bwd MB", 1),
    ("overhead_pct", "overhead vs none %", 1),
]


@dataclass(frozen=True)
class ModelCase:
    arch: str        # one of ARCHS, or ANCHOR
    attention: str   # one of ATTENTIONS (the anchor: none or scse)
    impl: str        # ours: "torch" (eager formulas), "fast" (PyTorch fast path), "fused"
    #                  (Triton, CUDA); anchor: "smp"
    options: tuple = ()  # attention keyword arguments of our networks, e.g.
    #                      (("reduction", 16), ("fusion", "add")): smp's scSE setting


def model_cases(archs: Sequence[str] = ARCHS, attentions: Sequence[str] = ATTENTIONS,
                fused: bool = False, anchor: bool = True, fast: bool = True) -> list[ModelCase]:
    """The rows of the table: every attention row with the eager formulas (``torch``), and
    ``fast`` the PyTorch fast path / ``fused`` the Triton kernels beside it."""
    cases = []
    extra = (("fast",) if fast else ()) + (("fused",) if fused else ())
    for arch in archs:
        for att in attentions:
            impls = ("torch", *extra) if att != "none" else ("torch",)
            cases += [ModelCase(arch, att, impl) for impl in impls]
    if anchor:
        cases += [ModelCase(ANCHOR, "none", "smp"), ModelCase(ANCHOR, "scse", "smp")]
    return cases


def set_fused(model: nn.Module, fused: bool) -> None:
    """Force every attention block of ``model`` onto the fused kernels or the eager formulas."""
    for m in model.modules():
        if hasattr(m, "fused"):
            m.fused = fused


def build_model(case: ModelCase, work: Workload) -> nn.Module:
    if case.arch == ANCHOR:
        import segmentation_models_pytorch as smp

        return smp.Unet(work.encoder, encoder_weights=None, in_channels=work.in_channels,
                        classes=work.classes,
                        decoder_attention_type=None if case.attention == "none" else case.attention)
    from scse_seg.models import create_model

    kw = {"width": work.width} if case.arch in PAPER_ARCHS else {"encoder_name": work.encoder,
                                                               "encoder_weights": None}
    model = create_model(case.arch, work.in_channels, work.classes, attention=case.attention,
                         dim=2, **kw, **dict(case.options))
    set_fused(model, case.impl in ("fused", "fast"))
    return model


def arch_label(arch: str, work: Workload) -> str:
    if arch == ANCHOR:
        return f"{ANCHOR}({work.encoder}) anchor"
    return f"smp_unet ({work.encoder})" if arch == "smp_unet" else arch


class StepRun:
    """One case ready to train: model on the device, AdamW, a fixed random batch."""

    def __init__(self, case: ModelCase, setting: Setting, work: Workload):
        device, fmt = setting.device, setting.memory_format()
        torch.manual_seed(0)
        self.case, self.setting = case, setting
        self.model = build_model(case, work).to(device, memory_format=fmt).train()
        self.params = sum(p.numel() for p in self.model.parameters())
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.runner = torch.compile(self.model) if setting.compile else self.model
        self.x = torch.randn(work.batch, work.in_channels, work.size, work.size,
                             device=device).contiguous(memory_format=fmt)
        self.y = torch.randint(0, work.classes, (work.batch, work.size, work.size), device=device)
        self.resident_bytes = (sum(p.numel() * p.element_size() for p in self.model.parameters())
                               + sum(t.numel() * t.element_size() for t in (self.x, self.y)))

    def saved_mb(self) -> float:
        """MB autograd saves for backward in one forward (activations; parameters left out)."""
        def fwd():
            with self.setting.autocast():
                return self.runner(self.x)
        return saved_for_backward(fwd, exclude=list(self.model.parameters()))[0] / 1e6

    def step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        with self.setting.autocast():
            loss = F.cross_entropy(self.runner(self.x).float(), self.y)
        loss.backward()
        self.opt.step()


def bench_group(cases: Sequence[ModelCase], setting: Setting, work: Workload, warmup: int = 1,
                iters: int = 5) -> list[dict]:
    """Time ``cases`` (the variants of one architecture) interleaved, so that slow drift of the
    machine (clocks, neighbours) hits them alike: every model is built and warmed up, then
    repetition 1 runs ``iters`` steps of each case in turn, then repetition 2 in reverse order.

    Peak memory of a case: its parameters and batch plus the peak growth over its warm-up steps
    (gradients, AdamW state, activations, workspaces); at least one warm-up step is run."""
    device = setting.device
    free_memory(device)
    runs = [StepRun(case, setting, work) for case in cases]
    mem_mib = []
    for run in runs:
        run.step()  # first step outside the memory window: one-off costs (the fast path's
        #             torch.compile of its steps) are not activation memory
        with PeakMemory(device) as mem:
            for _ in range(max(1, warmup)):
                run.step()
            synchronize(device)
        mem_mib.append(None if mem.mib is None else mem.mib + run.resident_bytes / 2 ** 20)
    saved = [None if setting.compile else run.saved_mb() for run in runs]
    reps: list[list[list[float]]] = [[] for _ in runs]
    forward = list(range(len(runs)))
    for order in (forward, forward[::-1]):  # ABCD then DCBA: a linear drift cancels out
        for i in order:
            reps[i] += measure(runs[i].step, device, 0, iters, reps=1).reps
    rows = []
    for run, rep, mib, sv in zip(runs, reps, mem_mib, saved):
        t = Timing(rep)
        rows.append({
            **setting.columns(), "arch": arch_label(run.case.arch, work),
            "attention": run.case.attention, "impl": run.case.impl, "params_M": run.params / 1e6,
            "ms_rep1": t.medians[0], "ms_rep2": t.medians[1], "ms": t.median,
            "noise_pct": 100 * t.noise, "slices_per_s": work.batch / (t.median * 1e-3),
            "peak_MiB": mib, "saved_MB": sv, "overhead_pct": None, "batch": work.batch, "size": work.size,
            "classes": work.classes})
    return rows


def add_overheads(rows: list[dict]) -> list[dict]:
    """Fill ``overhead_pct``: step time over the ``none`` row of the same arch and setting."""
    def key(r):
        return (r["dtype"], r["layout"], r["compile"], r["arch"])

    base = {key(r): r["ms"] for r in rows if r["attention"] == "none"}
    for r in rows:
        b = base.get(key(r))
        r["overhead_pct"] = None if b is None else 100 * (r["ms"] / b - 1)
    return rows


def run_models(settings: Sequence[Setting], cases: Sequence[ModelCase], work: Workload,
               warmup: int = 1, iters: int = 5, log=print, on_row=None) -> list[dict]:
    """Every case under every setting, each architecture's cases timed together (see
    :func:`bench_group`). ``on_row(rows)`` is called as rows come in (to save partial results)."""
    if work.size % 32:
        raise ValueError(f"size must be divisible by 32 (smp encoders), got {work.size}")
    groups: dict[str, list[ModelCase]] = {}
    for case in cases:
        groups.setdefault(case.arch, []).append(case)
    rows = []
    for s in settings:
        for group in groups.values():
            for row in bench_group(group, s, work, warmup=warmup, iters=iters):
                log(f"[models] {s.label} | {row['arch']} {row['attention']} {row['impl']}: "
                    f"{row['ms']:.1f} ms/step ({row['ms_rep1']:.1f} / {row['ms_rep2']:.1f})")
                rows.append(row)
            if on_row:
                on_row(add_overheads(rows))
    return add_overheads(rows)
