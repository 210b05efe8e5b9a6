"""The SE family's successors (issue 14) side by side with cSE / scSE (ratios to scSE):
forward+backward time and the bytes autograd saves for the backward, at the attention shapes of
the bench's networks.

    python bench/run.py family --device cpu --out bench/results/cpu

Two tables. *Attentions* on a C x H x W map: cse and scse (the reference), eca, pe. *Stages*: a
conv block C -> C with what follows it in a network stage: double_conv (+ cse / scse: today's
U-Net stage), residual, residual + cmpe_se1/2/3, sk, splat. Saved bytes: every tensor autograd
keeps for the backward, counted once per storage, without the input map and the parameters
(memory the block adds on top of the map it is given); also as a multiple of the map's size.
Times are medians of ``iters`` calls, two repetitions (rep 1 / rep 2 show the noise).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from .bench_blocks import attention_shapes
from .common import Workload, environment, markdown_table, measure, write_csv

ATTENTIONS = ("cse", "scse", "eca", "pe")
STAGES = ("double_conv", "double_conv+cse", "double_conv+scse", "residual", "residual+cmpe_se1",
          "residual+cmpe_se2", "residual+cmpe_se3", "sk", "splat")
COLUMNS = [("kind", "kind", -1), ("variant", "variant", -1), ("shape", "map (N×C×H×W)", -1),
           ("params", "parameters", 0), ("fb_ms_rep1", "fwd+bwd ms rep 1", 2),
           ("fb_ms_rep2", "fwd+bwd ms rep 2", 2), ("fb_vs_ref", "time vs ref", 2),
           ("saved_MB", "saved for backward MB", 2), ("saved_maps", "saved / map size", 2),
           ("saved_vs_ref", "saved vs ref", 2)]


def make(variant: str, channels: int, dim: int = 2, reduction: float = 2) -> nn.Module:
    """An attention (``eca``) or a stage (``double_conv+scse``, ``residual+cmpe_se1``, ``sk``)."""
    from scse_seg.blocks import create_attention, create_block, is_inner_recalibration
    from scse_seg.blocks.registry import attention_options

    def attention(name):
        return create_attention(name, channels, dim,
                                **attention_options(name, {"reduction": reduction}))

    if variant in ATTENTIONS:
        return attention(variant)
    block, _, attn = variant.partition("+")
    if attn and is_inner_recalibration(attn):
        return create_block(block, channels, channels, dim, recalibration=attn,
                            reduction=reduction)
    conv = create_block(block, channels, channels, dim)
    if not attn:
        return conv
    return nn.Sequential(conv, attention(attn))


def saved_bytes(module: nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd saves for the backward of ``module(x)``, each storage once, without ``x``
    and the parameters."""
    skip = {x.untyped_storage().data_ptr()} | {p.untyped_storage().data_ptr()
                                               for p in module.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return sum(seen.values())


def run_family(shapes: Sequence[tuple], device: str = "cpu", variants=ATTENTIONS + STAGES,
               warmup: int = 1, iters: int = 5, log=print, on_row=None) -> list[dict]:
    rows = []
    for shape in shapes:
        ref, first = {}, len(rows)
        for variant in variants:
            torch.manual_seed(0)
            kind = "attention" if variant in ATTENTIONS else "stage"
            m = make(variant, shape[1]).to(device).train()
            x = torch.randn(shape, device=device).requires_grad_()
            dy = torch.randn(shape, device=device)
            inputs = [x, *m.parameters()]
            t = measure(lambda m=m, x=x, inputs=inputs, dy=dy: torch.autograd.grad(m(x), inputs, dy),
                        device, warmup, iters)
            saved = saved_bytes(m, x)
            row = dict(kind=kind, variant=variant, shape="×".join(map(str, shape)),
                       params=sum(p.numel() for p in m.parameters()),
                       fb_ms=t.median, fb_ms_rep1=t.medians[0], fb_ms_rep2=t.medians[1],
                       saved_MB=saved / 1e6, saved_maps=saved / (x.numel() * x.element_size()))
            if variant in ("scse", "double_conv+scse"):
                ref[kind] = row
            rows.append(row)
            log(f"[family] {row['shape']} {variant}: fwd+bwd {t.median:.2f} ms, "
                f"saved {row['saved_MB']:.2f} MB")
            if on_row:
                on_row(rows)
        for row in rows[first:]:  # ratios to the reference of the same kind and shape
            r = ref.get(row["kind"])
            row["fb_vs_ref"] = row["fb_ms"] / r["fb_ms"] if r else None
            row["saved_vs_ref"] = row["saved_MB"] / r["saved_MB"] if r and r["saved_MB"] else None
    if on_row:
        on_row(rows)
    return rows


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench/run.py family", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--archs", nargs="+", default=["unet"],
                   help="networks whose attention shapes are benchmarked (default unet)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--max-channels", type=int, default=None,
                   help="skip shapes wider than this (quick runs)")
    p.add_argument("--variants", nargs="+", default=list(ATTENTIONS + STAGES),
                   choices=ATTENTIONS + STAGES)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", type=Path, help="folder for family.md and family.csv")
    return p


def main(argv: Sequence[str] | None = None, log=print) -> dict:
    import shlex

    args = parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Workload(batch=args.batch, size=args.size, width=args.width)
    shapes = [(args.batch, *e["chw"]) for e in attention_shapes(args.archs, work, args.device)
              if args.max_channels is None or e["chw"][0] <= args.max_channels]
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    save = (lambda rows: write_csv(rows, args.out / "family.csv")) if args.out else None
    rows = run_family(shapes, args.device, args.variants, args.warmup, args.iters, log, save)
    env = environment(args.device)
    ref_note = ("time / saved vs ref: relative to `scse` (attentions) and to `double_conv+scse` "
                "(stages: today's U-Net stage with scSE) at the same shape.")
    report = (
        "# SE family: blocks side by side (issue 14)\n\n"
        f"- command: `python bench/run.py family {shlex.join(argv or [])}`\n"
        f"- environment: {', '.join(f'{k} {v}' for k, v in env.items())}\n"
        f"- {torch.get_num_threads()} torch threads; fp32, NCHW, eager, training mode; "
        f"shapes: attention inputs of {', '.join(args.archs)} at batch {args.batch}, "
        f"{args.size}² slices, width {args.width}\n- {ref_note}\n\n"
        + "\n\n".join(f"## {kind}s\n\n" + markdown_table([r for r in rows if r['kind'] == kind],
                                                          COLUMNS)
                      for kind in ("attention", "stage")) + "\n")
    if args.out:
        (args.out / "family.md").write_text(report)
        log(f"wrote {args.out}/family.md")
    log(report)
    return {"rows": rows, "report": report}


if __name__ == "__main__":
    main()
