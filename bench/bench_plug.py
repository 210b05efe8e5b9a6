"""Training-step overhead of scSE plugged into smp and MONAI networks (scse_seg.plug), side by
side with smp's own ``decoder_attention_type="scse"`` where smp has it (Unet, Unet++).

    python bench/bench_plug.py smp --out bench/results/cpu-plug-smp
    python bench/bench_plug.py monai --out bench/results/cpu-plug-monai

Rows per architecture, timed interleaved (ABC then CBA, as bench/run.py): ``none`` (the network as
its library builds it), ``plug scse`` (:func:`add_attention` after every decoder block, our
defaults: max fusion, reduction 2) and, for Unet/Unet++, ``plug scse@smp`` (add fusion, reduction
16 at smp's two sites) and ``smp scse`` (smp's own SCSEModule at the same sites). A step is
forward + cross-entropy + backward + AdamW on a fixed random batch. Writes report.md and plug.csv.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.common import (  # noqa: E402
    PeakMemory,
    Timing,
    environment,
    markdown_table,
    measure,
    write_csv,
)
from scse_seg.plug import add_attention  # noqa: E402
from scse_seg.plug.sites import SMP_DECODER, SMP_OWN  # noqa: E402

MONAI = ("UNet", "BasicUNet", "DynUNet")
COLUMNS = [("arch", "arch", -1), ("variant", "variant", -1), ("sites", "sites", 0),
           ("params_M", "params (M)", 3), ("ms_rep1", "ms/step rep 1", 1),
           ("ms_rep2", "ms/step rep 2", 1), ("ms", "ms/step (median)", 1),
           ("peak_MiB", "peak MiB", 0), ("overhead_pct", "overhead vs none %", 1)]


def build(lib: str, arch: str, variant: str, a):
    torch.manual_seed(0)
    if lib == "smp":
        import segmentation_models_pytorch as smp

        kw = dict(encoder_weights=None, in_channels=1, classes=a.classes)
        if arch == "DPT":
            kw.update(encoder_name="tu-vit_tiny_patch16_224", dynamic_img_size=True)
        else:
            kw.update(encoder_name=a.encoder)
        if variant == "smp scse":
            kw["decoder_attention_type"] = "scse"
        model = getattr(smp, arch)(**kw)
    else:
        from scse_seg.models.plugged import build_monai

        model = build_monai(arch, 1, a.classes, attention="none", dim=a.dim, width=a.width)
    sites = 0
    if variant == "plug scse":
        sites = len(add_attention(model, "scse", where="decoder").rows)
    elif variant == "plug scse@smp":
        sites = len(add_attention(model, "scse", where="smp", fusion="add", reduction=16).rows)
    elif variant == "smp scse":
        sites = sum(1 for n, m in model.named_modules() if n.endswith((".attention1", ".attention2"))
                    and any(True for _ in m.parameters()))
    return model, sites


class Step:
    def __init__(self, lib, arch, variant, a):
        self.model, self.sites = build(lib, arch, variant, a)
        self.model.train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        dim = 2 if lib == "smp" else a.dim
        size = a.size if lib == "smp" else a.monai_size
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(a.batch, 1, *([size] * dim), generator=g)
        self.y = torch.randint(0, a.classes, (a.batch, *([size] * dim)), generator=g)
        self.params = sum(p.numel() for p in self.model.parameters())

    def __call__(self):
        self.opt.zero_grad(set_to_none=True)
        F.cross_entropy(self.model(self.x), self.y).backward()
        self.opt.step()


def bench_arch(lib: str, arch: str, a) -> list[dict]:
    variants = ["none", "plug scse"]
    if lib == "smp" and arch in SMP_OWN:
        variants += ["plug scse@smp", "smp scse"]
    steps, mem = [], []
    for v in variants:
        s = Step(lib, arch, v, a)
        with PeakMemory("cpu") as m:
            for _ in range(max(1, a.warmup)):
                s()
        steps.append(s)
        mem.append(m.mib)
    reps = [[] for _ in steps]
    order = list(range(len(steps)))
    for o in (order, order[::-1]):
        for i in o:
            reps[i] += measure(steps[i], "cpu", 0, a.iters, reps=1).reps
    rows = []
    for v, s, r, mib in zip(variants, steps, reps, mem):
        t = Timing(r)
        rows.append(dict(arch=f"{lib}:{arch}" + ("" if lib == "smp" else f" {a.dim}D"), variant=v,
                         sites=s.sites, params_M=s.params / 1e6, ms_rep1=t.medians[0],
                         ms_rep2=t.medians[1], ms=t.median, peak_MiB=mib))
    base = rows[0]["ms"]
    for row in rows:
        row["overhead_pct"] = 100 * (row["ms"] / base - 1)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(prog="python bench/bench_plug.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("lib", choices=("smp", "monai"))
    p.add_argument("--archs", nargs="+", help="default: every supported one of the library")
    p.add_argument("--encoder", default="resnet34", help="smp encoder (default resnet34; DPT: "
                                                       "tu-vit_tiny_patch16_224)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--size", type=int, default=128, help="smp: 2D slice size (default 128)")
    p.add_argument("--dim", type=int, default=3, choices=(2, 3), help="MONAI: 2 or 3 (default 3)")
    p.add_argument("--width", type=int, default=16, help="MONAI: channels at full resolution")
    p.add_argument("--monai-size", type=int, default=64, help="MONAI: input size (default 64)")
    p.add_argument("--classes", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=3, help="timed steps per repetition (2 reps)")
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    archs = a.archs or (list(SMP_DECODER) if a.lib == "smp" else list(MONAI))
    rows = []
    for arch in archs:
        rows += bench_arch(a.lib, arch, a)
        print(f"[plug] {rows[-1]['arch']}: " + ", ".join(
            f"{r['variant']} {r['ms']:.0f} ms ({r['overhead_pct']:+.1f}%)"
            for r in rows if r["arch"] == rows[-1]["arch"]), flush=True)
        if a.out:
            write_csv(rows, a.out / "plug.csv")
    env = environment("cpu")
    setting = (f"batch {a.batch}, " + (f"{a.size}x{a.size} slices, encoder {a.encoder}" if a.lib == "smp"
               else f"{a.dim}D, {a.monai_size}^{a.dim} inputs, width {a.width}")
               + f", {a.classes} classes, fp32, 1 warm-up + 2 x {a.iters} timed steps")
    report = "\n\n".join([
        "# scSE plugged into " + ("segmentation_models_pytorch" if a.lib == "smp" else "MONAI"),
        "Command: `python bench/bench_plug.py " + " ".join(sys.argv[1:] if argv is None else argv)
        + "`", "Setting: " + setting,
        "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()),
        "Peak memory: " + PeakMemory.source("cpu"), markdown_table(rows, COLUMNS)])
    print(report)
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "report.md").write_text(report + "\n")


if __name__ == "__main__":
    main()
