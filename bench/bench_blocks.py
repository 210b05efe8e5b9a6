"""Block micro-benchmark: each attention at the map shapes the architectures really produce,
against the memory-traffic floor.

Shapes come from hooking the attention modules of the built models (one forward at batch 1),
with the batch dimension then set to the benchmark's batch. Floor: the blocks are memory bound;
the fewest bytes a forward can move is 3 map passes (read the map for the squeezes, read it again
and write the output for the excitation), a backward 5 more (read x and dy for the gate
gradients, read them again and write dx), so forward+backward is 8 passes. Bandwidth is measured
by a large copy on the same device. ``none`` (identity) has no floor: its time is the framework's
per-call overhead.
"""
from __future__ import annotations

from collections import Counter
from typing import Sequence

import torch
from torch import nn

from .bench_models import ModelCase, build_model
from .common import DTYPES, Setting, Workload, free_memory, measure, saved_for_backward

BLOCK_ARCHS = ("unet", "densenet", "sdnet")
VARIANTS = ("none", "cse", "sse", "scse_max", "scse_add", "smp_scse")
FUSED_MODES = {"cse": "cse", "sse": "sse", "scse_max": "scse_max", "scse_add": "scse_add"}
FAST_MODES = ("scse_max", "scse_add")  # the CPU fast path's (scse_seg.kernels.cpu_se.MODES)
FWD_PASSES, BWD_PASSES = 3, 5

COLUMNS = [
    ("shape", "map (N×C×H×W)", -1), ("sites", "where (arch×count)", -1),
    ("variant", "block", -1), ("impl", "impl", -1),
    ("fwd_us_rep1", "fwd µs rep 1", 1), ("fwd_us_rep2", "fwd µs rep 2", 1),
    ("fwd_floor_us", "fwd floor µs", 1), ("fwd_ratio", "fwd / floor", 1),
    ("fb_us_rep1", "fwd+bwd µs rep 1", 1), ("fb_us_rep2", "fwd+bwd µs rep 2", 1),
    ("fb_floor_us", "fwd+bwd floor µs", 1), ("fb_ratio", "fwd+bwd / floor", 1),
    ("saved_MB", "saved for bwd MB", 2), ("saved_maps", "map-sized saved", 0),
    ("fused_rel_err", "fused vs eager rel. err", -1),
]


def attention_shapes(archs: Sequence[str], work: Workload, device: str = "cpu") -> list[dict]:
    """Distinct (C, H, W) at the attention modules of ``archs`` for ``work``'s input size, with
    the places producing each: ``[{"chw": (C, H, W), "sites": Counter({arch: count})}]``."""
    found: dict[tuple, Counter] = {}
    for arch in archs:
        model = build_model(ModelCase(arch, "none", "torch"), work).to(device).eval()
        seen = []
        hooks = [m.register_forward_hook(lambda _m, _i, out, seen=seen: seen.append(tuple(out.shape[1:])))
                 for m in model.attention_modules()]
        with torch.no_grad():
            model(torch.zeros(1, work.in_channels, work.size, work.size, device=device))
        for h in hooks:
            h.remove()
        for chw in seen:
            found.setdefault(chw, Counter())[arch] += 1
        del model
        free_memory(device)
    return [{"chw": chw, "sites": found[chw]} for chw in sorted(found, key=lambda s: (s[1:], s[0]),
                                                                  reverse=True)]


class FastPath(nn.Module):
    """An scSE block forced onto the CPU fast path (scse_seg.kernels.cpu_se)."""

    def __init__(self, block: nn.Module, mode: str):
        super().__init__()
        self.block, self.mode = block, mode

    def forward(self, x):
        from scse_seg.kernels import cpu_se
        from scse_seg.kernels.gates import module_params

        if torch.compiler.is_compiling():  # traced: the plain formulas, as the blocks do
            return self.block(x)
        return cpu_se.se_function(x, self.mode, **module_params(self.block, self.mode))


def make_block(variant: str, channels: int, fused: bool = False, fast: bool = False) -> nn.Module:
    """``fast``: the CPU fast path (scSE); ``fused``: the Triton kernels (CUDA); neither: the
    blocks' plain eager formulas."""
    if fast:
        return FastPath(make_block(variant, channels), FUSED_MODES[variant])
    if variant == "smp_scse":
        from segmentation_models_pytorch.base.modules import SCSEModule

        return SCSEModule(channels)  # smp's defaults: reduction 16, additive fusion
    from scse_seg.blocks import create_attention
    from scse_seg.blocks.registry import attention_options

    name, _, fusion = variant.partition("_")
    kw = {"fusion": fusion} if fusion else {}
    return create_attention(name, channels, 2, **attention_options(name, {"fused": fused, **kw}))


def _map(shape, setting: Setting, seed: int = 0) -> torch.Tensor:
    g = torch.Generator(device=setting.device).manual_seed(seed)
    x = torch.randn(shape, generator=g, device=setting.device, dtype=DTYPES[setting.dtype])
    return x.contiguous(memory_format=setting.memory_format())


def time_block(block: nn.Module, shape, setting: Setting, warmup: int, iters: int):
    """(forward timing, forward+backward timing); forward runs with autograd recording, as in
    training; the backward takes the gradients of the map and of every parameter."""
    block = block.to(setting.device, memory_format=setting.memory_format()).train()
    runner = torch.compile(block) if setting.compile else block
    x = _map(shape, setting).requires_grad_()
    dy = _map(shape, setting, seed=1)
    inputs = [x, *block.parameters()]

    def fwd():
        with setting.autocast():
            return runner(x)

    def fwd_bwd():
        with setting.autocast():
            y = runner(x)
        return torch.autograd.grad(y, inputs, dy)

    return (measure(fwd, setting.device, warmup, iters),
            measure(fwd_bwd, setting.device, warmup, iters))


def fused_error(variant: str, shape, setting: Setting) -> float:
    """Largest relative difference (output and every gradient) between the fused kernels and the
    eager block, on the same map and parameters. Runs on CUDA, or on CPU under TRITON_INTERPRET=1
    (a correctness smoke there, never timed)."""
    from scse_seg import kernels

    block = make_block(variant, shape[1], fused=False).to(setting.device)
    x = _map(shape, setting)
    dy = _map(shape, setting, seed=1)
    results = []
    for run in (lambda t: kernels.fused_se(t, block, FUSED_MODES[variant]), block):
        xi = x.detach().clone().requires_grad_()
        with setting.autocast():
            y = run(xi)
        results.append([y, *torch.autograd.grad(y, [xi, *block.parameters()], dy)])
    err = 0.0
    for f, e in zip(*results):
        e = e.double()
        err = max(err, ((f.double() - e).abs().max() / e.abs().max().clamp_min(1e-30)).item())
    return err


def saved(block: nn.Module, shape, setting: Setting) -> tuple[float, int]:
    """(MB saved for backward by one forward of ``block``, how many of them are map-sized)."""
    x = _map(shape, setting).requires_grad_()
    with setting.autocast():
        total, sizes = saved_for_backward(lambda: block(x), exclude=list(block.parameters()))
    map_bytes = x.numel() * x.element_size()
    return total / 1e6, sum(1 for b in sizes if b >= map_bytes // 2)


def _row(setting: Setting, shape, sites: Counter, variant: str, impl: str, t_fwd, t_fb,
         bandwidth: float, err: str | None, saved_mb: float, saved_maps: int) -> dict:
    nbytes = torch.Size(shape).numel() * DTYPES[setting.dtype].itemsize
    has_floor = variant != "none"
    row = {**setting.columns(), "shape": "×".join(map(str, shape)),
           "sites": ", ".join(f"{a}×{n}" for a, n in sites.items()), "variant": variant,
           "impl": "smp" if variant == "smp_scse" else impl, "map_MB": nbytes / 1e6,
           "fused_rel_err": err, "saved_MB": saved_mb, "saved_maps": saved_maps}
    for key, timing, passes in (("fwd", t_fwd, FWD_PASSES), ("fb", t_fb, FWD_PASSES + BWD_PASSES)):
        floor = passes * nbytes / bandwidth * 1e6
        row.update({f"{key}_us_rep1": 1e3 * timing.medians[0],
                    f"{key}_us_rep2": 1e3 * timing.medians[1], f"{key}_us": 1e3 * timing.median,
                    f"{key}_floor_us": floor if has_floor else None,
                    f"{key}_ratio": 1e3 * timing.median / floor if has_floor else None})
    return row


def run_blocks(settings: Sequence[Setting], work: Workload, archs=BLOCK_ARCHS, variants=VARIANTS,
               bandwidth: float = 1.0, fused: bool = False, check_fused: bool = False,
               warmup: int = 5, iters: int = 20, log=print, on_row=None) -> list[dict]:
    """One row per (setting, shape, variant, impl) at ``work.batch`` x the shapes of ``archs``.
    ``bandwidth`` in bytes/s sets the floor. Our blocks are timed as ``torch`` (eager formulas)
    and, for scSE, ``fast`` (the CPU fast path). ``fused``: also time the fused kernels (CUDA).
    ``check_fused``: fill ``fused_rel_err`` (fused kernels vs eager). ``on_row(rows)``: called
    after each row."""
    shapes = attention_shapes(archs, work, device=settings[0].device)
    cpu = torch.device(settings[0].device).type == "cpu"

    def impls(v):
        if v not in FUSED_MODES:
            return ("torch",)
        return ("torch",) + (("fast",) if cpu and v in FAST_MODES else ()) \
            + (("fused",) if fused else ())

    cases = [(v, impl) for v in variants for impl in impls(v)]
    rows = []
    for s in settings:
        for entry in shapes:
            shape = (work.batch, *entry["chw"])
            for variant, impl in cases:
                if variant == "smp_scse" and shape[1] < 16:
                    continue  # smp's reduction 16 needs at least 16 channels
                torch.manual_seed(0)
                block = make_block(variant, shape[1], fused=(impl == "fused"),
                                   fast=(impl == "fast"))
                t_fwd, t_fb = time_block(block, shape, s, warmup, iters)
                saved_mb, saved_maps = saved(block, shape, s)
                err = None
                if check_fused and impl == "torch" and variant in FUSED_MODES:
                    err = f"{fused_error(variant, shape, s):.1e}"
                r = _row(s, shape, entry["sites"], variant, impl, t_fwd, t_fb, bandwidth, err,
                         saved_mb, saved_maps)
                rows.append(r)
                log(f"[blocks] {s.label} | {r['shape']} {variant} {r['impl']}: fwd "
                    f"{r['fwd_us']:.1f} µs, fwd+bwd {r['fb_us']:.1f} µs"
                    + (f", fused err {err}" if err else ""))
                if on_row:
                    on_row(rows)
            free_memory(s.device)
    return rows
