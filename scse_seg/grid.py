"""The papers' experiment as a resumable grid: architectures x attentions x seeds, identical
split and schedule, every run evaluated on the same held-out volumes, one report."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from .config import build_config, load_yaml, parse_override
from .errors import ConfigError, UserError

GRID_KEYS = {"archs", "attns", "seeds", "out", "surface", "tta"}


@dataclass
class GridSpec:
    archs: list[str] = field(default_factory=lambda: ["unet"])
    attns: list[str] = field(default_factory=lambda: ["none", "cse", "sse", "scse"])
    seeds: int = 1
    out: Path = Path("runs/compare")
    surface: bool = False
    tta: bool = False
    base: dict = field(default_factory=dict)  # training config applied to every run
    overrides: list[dict] = field(default_factory=list)
    progress: bool = True

    @classmethod
    def from_args(cls, args) -> "GridSpec":
        spec = cls()
        if args.config:
            raw = load_yaml(args.config)
            grid = raw.pop("compare", {}) or {}
            unknown = set(grid) - GRID_KEYS
            if unknown:
                raise ConfigError(f"unknown key(s) {sorted(unknown)} in the 'compare' section of "
                                  f"{args.config}; valid: {sorted(GRID_KEYS)}")
            spec.base = raw
            for k, v in grid.items():
                setattr(spec, k, v)
        if args.archs:
            spec.archs = args.archs.split(",")
        if args.attns:
            spec.attns = args.attns.split(",")
        if args.seeds is not None:
            spec.seeds = args.seeds
        if args.out:
            spec.out = args.out
        spec.surface = spec.surface or args.surface
        spec.tta = spec.tta or args.tta
        spec.progress = not args.no_progress
        spec.out = Path(spec.out)
        if isinstance(spec.archs, str):
            spec.archs = spec.archs.split(",")
        if isinstance(spec.attns, str):
            spec.attns = spec.attns.split(",")
        spec.overrides = [parse_override(o) for o in args.overrides]
        flags = {}
        if args.data:
            flags.setdefault("data", {})["path"] = args.data
        if args.epochs is not None:
            flags.setdefault("train", {})["epochs"] = args.epochs
        if args.device:
            flags.setdefault("train", {})["device"] = args.device
        if flags:
            spec.overrides.append(flags)
        if not isinstance(spec.seeds, int) or spec.seeds < 1:
            raise ConfigError(f"compare.seeds must be a positive integer, got {spec.seeds!r}")
        if "none" not in spec.attns:
            raise ConfigError("compare.attns must include 'none' (the vanilla baseline every "
                              "variant is compared against)")
        for arch in spec.archs:  # validate every combination before training anything
            for attn in spec.attns:
                spec.config(arch, attn, 0)
        return spec

    def config(self, arch: str, attn: str, seed: int):
        run = {"model": {"arch": arch, "attention": attn}, "seed": seed,
               "out": str(self.out / "runs" / f"{arch}-{attn}-s{seed}"),
               "experiment": "compare"}
        return build_config([], [self.base, *self.overrides, run])


def _run_state(run_dir: Path, epochs: int) -> str:
    """'done', 'partial' or 'new' from the run folder's last checkpoint."""
    last = run_dir / "last.pt"
    if not last.is_file():
        return "new"
    from .fileio import load_checkpoint

    epoch = int(load_checkpoint(last).get("epoch", 0))
    return "done" if epoch >= epochs else "partial"


def run_grid(spec: GridSpec, evaluate: bool = True) -> Path:
    """Train every missing run, then evaluate every run (cached in its eval.json), then report."""
    from tqdm.auto import tqdm

    from .evaluation.runs import evaluate_run
    from .training import Trainer

    t_start = time.perf_counter()
    spec.out.mkdir(parents=True, exist_ok=True)
    combos = [(a, t, s) for s in range(spec.seeds) for a in spec.archs for t in spec.attns]
    bar = tqdm(combos, desc="training grid", unit="run", disable=not spec.progress)
    for arch, attn, seed in bar:
        cfg = spec.config(arch, attn, seed)
        cfg.train.progress = False
        run_dir = Path(cfg.out)
        state = _run_state(run_dir, cfg.train.epochs)
        bar.set_postfix_str(f"{arch}+{attn} seed {seed} ({state})")
        if state != "done":
            Trainer(cfg, run_dir, resume=(state == "partial")).fit()
    if not evaluate:
        return spec.out
    results = []
    bar = tqdm(combos, desc="evaluating grid", unit="run", disable=not spec.progress)
    for arch, attn, seed in bar:
        run_dir = Path(spec.config(arch, attn, seed).out)
        cache = run_dir / "eval.json"
        res = None
        if cache.is_file():
            saved = json.loads(cache.read_text())
            if saved.get("tta") == spec.tta and saved.get("surface") == spec.surface:
                res = _from_cache(saved["result"])
        if res is None:
            t0 = time.perf_counter()
            res = evaluate_run(run_dir, tta_flip=spec.tta, surface=spec.surface, progress=False)
            _save_eval(cache, res, spec, time.perf_counter() - t0)
        results.append(res)
    from .evaluation.compare_report import write_comparison

    write_comparison(results, spec, wall_seconds=_add_wall_time(spec.out, time.perf_counter() - t_start))
    return spec.out


def _add_wall_time(out: Path, seconds: float) -> float:
    """Accumulate this invocation's wall time in out/timing.json; return the total, so that a
    grid resumed after an interruption still reports what the whole grid cost."""
    from .fileio import atomic_write_text

    f = out / "timing.json"
    runs = json.loads(f.read_text()).get("invocations_s", []) if f.is_file() else []
    runs.append(round(seconds, 1))
    atomic_write_text(f, json.dumps({"invocations_s": runs, "total_s": round(sum(runs), 1)}))
    return sum(runs)


def _save_eval(path: Path, ev, spec: GridSpec, seconds: float) -> None:
    from .fileio import atomic_write_text

    d = dict(ev.__dict__)
    d.pop("example", None)
    atomic_write_text(path, json.dumps(dict(tta=spec.tta, surface=spec.surface,
                                            eval_seconds=seconds, result=d), default=float))


def _from_cache(d: dict):
    from .evaluation.runs import RunEvaluation

    return RunEvaluation(**d)


__all__ = ["GridSpec", "run_grid", "UserError"]
