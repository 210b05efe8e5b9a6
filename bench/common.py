"""Shared pieces of the benchmarks: settings, timing, memory, and writing the tables.

Timing: ``warmup`` untimed calls, then ``reps`` (2) repetitions of ``iters`` timed calls each; a
figure is the median of a repetition, and both repetitions are reported so the noise is visible.
On CUDA each call is bracketed by CUDA events (read after one synchronize at the end of the
repetition); on CPU by ``time.perf_counter`` (CPU ops are synchronous).
"""
from __future__ import annotations

import csv
import gc
import os
import platform
import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LAYOUTS = ("nchw", "channels_last")


@dataclass(frozen=True)
class Setting:
    """One point of the settings grid: every row of a table is measured under one of these."""

    device: str
    dtype: str = "fp32"      # fp32, or bf16 under autocast (parameters stay fp32)
    layout: str = "nchw"     # nchw or channels_last
    compile: bool = False    # torch.compile the model / block

    @property
    def label(self) -> str:
        return f"{self.dtype} · {self.layout} · {'compiled' if self.compile else 'eager mode'}"

    def autocast(self):
        if self.dtype == "fp32":
            return nullcontext()
        return torch.autocast(device_type=torch.device(self.device).type, dtype=DTYPES[self.dtype])

    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.layout == "channels_last" else torch.contiguous_format

    def columns(self) -> dict:
        return {"dtype": self.dtype, "layout": self.layout, "compile": self.compile}


@dataclass(frozen=True)
class Workload:
    """What the networks are run on: ``batch`` one-channel ``size``² slices, ``classes`` outputs;
    ``width`` of the paper architectures, ``encoder`` of smp_unet and of the smp anchor."""

    batch: int = 2
    size: int = 128
    classes: int = 28
    width: int = 64
    encoder: str = "resnet34"
    in_channels: int = 1


def synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    """Per-call times in ms, one list per repetition."""

    reps: list[list[float]]

    @property
    def medians(self) -> list[float]:
        return [statistics.median(r) for r in self.reps]

    @property
    def median(self) -> float:
        """Median over every timed call of every repetition: the figure the ratios use."""
        return statistics.median([t for r in self.reps for t in r])

    @property
    def noise(self) -> float:
        """Spread of the repetition medians, relative to the overall median."""
        m = self.medians
        return (max(m) - min(m)) / self.median if self.median > 0 else 0.0


def measure(fn: Callable[[], object], device: str, warmup: int, iters: int, reps: int = 2) -> Timing:
    """Time ``fn()``: ``warmup`` untimed calls, then ``reps`` x ``iters`` timed calls."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    cuda = torch.device(device).type == "cuda"
    out = []
    for _ in range(reps):
        if cuda:
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                      for _ in range(iters)]
            for start, end in events:
                start.record()
                fn()
                end.record()
            torch.cuda.synchronize(device)
            out.append([start.elapsed_time(end) for start, end in events])
        else:
            times = []
            for _ in range(iters):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
            out.append(times)
    return Timing(out)


def saved_for_backward(fn: Callable[[], object], exclude: Iterable[torch.Tensor] = ()
                       ) -> tuple[int, list[int]]:
    """(total bytes, bytes per storage, largest first) of the tensors autograd saves for
    backward while ``fn()`` runs, counted exactly with ``saved_tensors_hooks``; each storage
    counted once (a tensor saved by two nodes, or a view, is one allocation); ``exclude`` (the
    parameters, resident anyway) left out."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in skip:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values()), sorted(seen.values(), reverse=True)


def free_memory(device: str) -> None:
    """CUDA: collect garbage and return cached blocks, so a peak counts one row alone. CPU: rely
    on reference counting (a full ``gc.collect`` costs ~0.2 s with torch and smp loaded)."""
    if torch.device(device).type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def _proc_status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _malloc_trim() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class PeakMemory:
    """Peak growth of memory over the ``with`` block, in MiB (``None`` when unknown).

    CUDA: ``torch.cuda.max_memory_allocated`` after a reset, minus what was allocated at the
    start. CPU: growth of the peak resident set (Linux ``VmHWM``, reset via
    ``/proc/self/clear_refs``, after ``malloc_trim`` hands freed heap back); only approximate,
    since the allocator may still serve the block from memory it kept.
    """

    def __init__(self, device: str):
        self.device, self.mib = device, None
        self.cuda = torch.device(device).type == "cuda"

    @staticmethod
    def source(device: str) -> str:
        if torch.device(device).type == "cuda":
            return "torch.cuda.max_memory_allocated (exact)"
        return "peak RSS growth, Linux VmHWM (approximate)"

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            _malloc_trim()  # hand freed heap pages back, so this block's allocations count again
            self._start = _proc_status_kib("VmRSS")
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # reset VmHWM to the current RSS
            except OSError:
                self._start = None
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.mib = (torch.cuda.max_memory_allocated(self.device) - self._start) / 2 ** 20
        elif self._start is not None:
            hwm = _proc_status_kib("VmHWM")
            self.mib = None if hwm is None else max(0, hwm - self._start) / 1024
        return False


def copy_bandwidth(device: str, nbytes: int, warmup: int = 2, iters: int = 10) -> tuple[float, Timing]:
    """Memory bandwidth in bytes/s from a large device-to-device copy (reads + writes ``nbytes``
    each); returns (bandwidth from the overall median, timing)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    timing = measure(lambda: dst.copy_(src), device, warmup, iters)
    return 2 * src.numel() * src.element_size() / (timing.median * 1e-3), timing


def environment(device: str) -> dict:
    """What the numbers were measured on."""
    env = {"torch": torch.__version__, "python": platform.python_version(),
           "host": platform.node(), "cpu threads": torch.get_num_threads()}
    if torch.device(device).type == "cuda":
        env["device"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    else:
        env["device"] = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:
        env["triton"] = "not importable"
    return env


def fmt(value, digits: int = 2) -> str:
    if value is None or value == "":
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(rows: Sequence[dict], columns: Sequence[tuple[str, str, int]]) -> str:
    """``columns``: (key, header, digits)."""
    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |",
             "|" + "|".join("---" if d < 0 else "---:" for _, _, d in columns) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(k), max(d, 0)) for k, _, d in columns) + " |")
    return "\n".join(lines)


def sectioned_markdown(rows: Sequence[dict], columns, settings: Iterable[Setting]) -> str:
    """One table per setting (rows carry the setting's columns), each under its label."""
    parts = []
    for s in settings:
        sub = [r for r in rows if all(r.get(k) == v for k, v in s.columns().items())]
        if sub:
            parts.append(f"#### {s.label}\n\n{markdown_table(sub, columns)}")
    return "\n\n".join(parts)


def write_csv(rows: Sequence[dict], path: Path) -> None:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in keys})
