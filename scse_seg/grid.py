"""The papers' experiment as a resumable grid: architectures x attentions x seeds (x folds of a
K-fold cross-validation, x the values of swept config keys), identical split and schedule for
every variant, every run evaluated on its held-out volumes, one report.

``blocks`` (optional) crosses conv blocks with the attentions: a plain entry (``sk``) is run with
every attention, an entry ``block+attention`` (``residual+cmpe_se1``, ``sk+none``) only with that
attention. The first entry must be plain: its variants are labelled by attention alone and its
``none`` run is the baseline; the others are labelled ``block+attention`` in the report.

This module trains (``training``) and evaluates (``evaluation``), so it sits above both."""
from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from .config import build_config, load_yaml, parse_override
from .errors import ConfigError, UserError
from .runtime import show_progress

GRID_KEYS = {"archs", "attns", "blocks", "seeds", "out", "surface", "nsd_tolerance", "tta", "folds",
             "sweep", "ablate", "test", "slurm"}
# keys that change only the attention blocks: the vanilla (none) run is the same for every value,
# so it is trained once and serves as the baseline of each swept setting
ATTENTION_ONLY_KEYS = {"model.reduction", "model.min_hidden", "model.fusion", "model.bottleneck_attention",
                       "model.placement"}


@dataclass
class GridSpec:
    archs: list[str] = field(default_factory=lambda: ["unet"])
    attns: list[str] = field(default_factory=lambda: ["none", "cse", "sse", "scse"])
    blocks: list[str] = field(default_factory=list)  # empty: each architecture's own block
    seeds: int = 1
    out: Path = Path("runs/compare")
    surface: bool = False
    nsd_tolerance: float = 1.0  # mm, the normalised surface Dice's (with surface)
    tta: bool = False
    test: Path | None = None  # a separate labelled test set every variant is also scored on
    folds: int | None = None  # K-fold cross-validation over subjects (None: one split)
    sweep: dict = field(default_factory=dict)  # config key -> list of values (crossed)
    ablate: dict = field(default_factory=dict)  # config key -> values tried one key at a time
    shard: tuple[int, int] | None = None  # (i, n): this process trains/evaluates runs i, i+n, ...
    base: dict = field(default_factory=dict)  # training config applied to every run
    overrides: list[dict] = field(default_factory=list)
    progress: bool = True
    slurm: dict = field(default_factory=dict)  # submitit/SLURM job parameters (compare.py --executor)

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
        if getattr(args, "blocks", None):
            spec.blocks = args.blocks.split(",")
        if args.seeds is not None:
            spec.seeds = args.seeds
        if args.out:
            spec.out = args.out
        if getattr(args, "folds", None) is not None:
            spec.folds = args.folds
        if spec.folds is None:  # data.folds in the config (or an override) means cross-validation
            data_folds = _data_folds([spec.base, *(parse_override(o) for o in args.overrides)])
            if data_folds is not None:
                spec.folds = data_folds
        for group in getattr(args, "sweep", None) or []:
            for item in [group] if isinstance(group, str) else group:
                spec.sweep.update(parse_sweep(item))
        for group in getattr(args, "ablate", None) or []:
            for item in [group] if isinstance(group, str) else group:
                spec.ablate.update(parse_sweep(item))
        if getattr(args, "shard", None):
            spec.shard = parse_shard(args.shard)
        spec.surface = spec.surface or args.surface
        if getattr(args, "test", None):
            spec.test = args.test
        if spec.test is not None:
            from .data.msd import read_test_set

            spec.test = Path(spec.test)
            read_test_set(spec.test)  # a wrong --test fails now, not after the training
        if getattr(args, "nsd_tolerance", None) is not None:
            spec.nsd_tolerance = args.nsd_tolerance
        from .metrics import check_nsd_tolerance

        spec.nsd_tolerance = check_nsd_tolerance(spec.nsd_tolerance)
        spec.tta = spec.tta or args.tta
        spec.progress = not args.no_progress
        spec.out = Path(spec.out)
        if isinstance(spec.archs, str):
            spec.archs = spec.archs.split(",")
        if isinstance(spec.attns, str):
            spec.attns = spec.attns.split(",")
        if isinstance(spec.blocks, str):
            spec.blocks = spec.blocks.split(",")
        from .models import resolve_model_name

        # one spelling per architecture/attention, so run folders do not depend on the case typed
        spec.archs = [resolve_model_name(a.strip()) or a.strip() for a in spec.archs]
        spec.attns = [str(t).strip().lower() for t in spec.attns]
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
        if spec.folds is not None and (not isinstance(spec.folds, int) or spec.folds < 2):
            raise ConfigError(f"compare.folds must be an integer of at least 2, got {spec.folds!r}")
        for name in ("sweep", "ablate"):
            value = getattr(spec, name)
            if not isinstance(value, dict) or not all(isinstance(v, list) and v
                                                      for v in value.values()):
                raise ConfigError(f"compare.{name} must map config keys to non-empty lists of "
                                  "values, e.g. {model.reduction: [2, 8, 16]}")
        both = set(spec.sweep) & set(spec.ablate)
        if both:
            raise ConfigError(f"{sorted(both)} is both swept and ablated; use --sweep (crossed) "
                              "or --ablate (one key at a time) for a key, not both")
        if not isinstance(spec.seeds, int) or spec.seeds < 1:
            raise ConfigError(f"compare.seeds must be a positive integer, got {spec.seeds!r}")
        if "none" not in spec.attns:
            raise ConfigError("compare.attns must include 'none' (the vanilla baseline every "
                              "variant is compared against)")
        if spec.blocks and "+" in spec.blocks[0]:
            raise ConfigError(f"compare.blocks: the first entry ({spec.blocks[0]!r}) is the "
                              "baseline's block and must be a plain block name, e.g. double_conv")
        for arch in spec.archs:  # validate every combination before training anything
            for block, attn in spec.variants():
                for setting in spec.settings():
                    cfg = spec.config(arch, attn, 0, 0 if spec.folds else None, setting, block)
                    if spec.tta:
                        from .evaluation.runs import tta_flip_axes

                        tta_flip_axes(cfg, f"{arch}+{spec.variant_label(block, attn)}")
        return spec

    def variants(self) -> list[tuple[str | None, str]]:
        """(block, attention) pairs; block None = the architecture's own block."""
        if not self.blocks:
            return [(None, a) for a in self.attns]
        out = []
        for entry in self.blocks:
            block, plus, attn = entry.partition("+")
            out += [(block, attn)] if plus else [(block, a) for a in self.attns]
        return out

    def variant_label(self, block: str | None, attn: str) -> str:
        """Name of a variant in the report: the attention for the first (baseline) block,
        ``block+attention`` for the others."""
        return attn if block is None or block == self.blocks[0] else f"{block}+{attn}"

    def settings(self) -> list[dict]:
        """Every combination of the swept values ([{}] without a sweep); with ``ablate``, each of
        them as configured, then with one ablated key changed at a time (an ablation study:
        every setting differs from the configured one in exactly one key)."""
        keys = list(self.sweep)
        crossed = [dict(zip(keys, vals)) for vals in itertools.product(*self.sweep.values())]
        single = [{k: v} for k, vals in self.ablate.items() for v in vals]
        return [{**c, **one} for c in crossed for one in [{}, *single]]

    def folds_list(self) -> list[int | None]:
        return list(range(self.folds)) if self.folds else [None]

    def label(self, arch: str, setting: dict) -> str:
        """The report's architecture label: the architecture plus its swept setting."""
        if not setting:
            return arch
        return f"{arch} [{', '.join(f'{k}={_fmt_value(v)}' for k, v in setting.items())}]"

    def config(self, arch: str, attn: str, seed: int, fold: int | None = None,
               setting: dict | None = None, block: str | None = None):
        setting = dict(setting or {})
        if attn == "none":  # the vanilla network does not depend on attention-only keys
            setting = {k: v for k, v in setting.items() if k not in ATTENTION_ONLY_KEYS}
        name = "-".join([arch, *([block] if block else []), attn,
                         *(f"{k.split('.')[-1]}={_fmt_value(v)}" for k, v in setting.items())])
        name += (f"-f{fold}" if fold is not None else "") + f"-s{seed}"
        model = {"arch": arch, "attention": attn, **({"block": block} if block else {})}
        run = {"model": model, "seed": seed,
               "out": str(self.out / "runs" / name), "experiment": "compare"}
        if fold is not None:
            run["data"] = {"folds": self.folds, "fold": fold}
        swept = [parse_override(f"{k}={yaml.safe_dump(v, default_flow_style=True).strip()}")
                 for k, v in setting.items()]
        return build_config([], [self.base, *self.overrides, *swept, run])

    def runs(self) -> list[tuple[str, str, int, int | None, dict, str | None]]:
        """(arch, attention, seed, fold, setting, block) of every run the report needs, in
        order."""
        return [(a, t, s, f, st, b) for s in range(self.seeds) for f in self.folds_list()
                for a in self.archs for st in self.settings() for b, t in self.variants()]


def _fmt_value(v) -> str:
    return yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("\n...").strip()


def parse_sweep(text: str) -> dict:
    """``model.reduction=2,8,16`` -> ``{"model.reduction": [2, 8, 16]}`` (values parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"sweep {text!r} must look like key=v1,v2,..., e.g. model.reduction=2,8,16")
    key, raw = text.split("=", 1)
    values = []
    for part in raw.split(","):
        try:
            values.append(yaml.safe_load(part) if part.strip() else None)
        except yaml.YAMLError:
            values.append(part)
    parse_override(f"{key}={raw.split(',')[0]}")  # key syntax check
    return {key.strip(): values}


def parse_shard(text: str) -> tuple[int, int]:
    """``"1/3"`` -> ``(1, 3)``: the second of three processes sharing one grid."""
    try:
        i, n = (int(x) for x in str(text).split("/"))
    except ValueError:
        i, n = -1, 0
    if not (n >= 1 and 0 <= i < n):
        raise ConfigError(f"--shard {text!r} must be I/N with 0 <= I < N, e.g. 0/2 and 1/2 for "
                          "two processes")
    return i, n


def _data_folds(layers: list[dict]):
    """The last ``data.folds`` set by the config layers, or None."""
    folds = None
    for layer in layers:
        data = layer.get("data") if isinstance(layer, dict) else None
        if isinstance(data, dict) and data.get("folds") is not None:
            folds = data["folds"]
    return folds


def _run_state(run_dir: Path, epochs: int) -> str:
    """'done', 'partial' or 'new' from the run folder's last checkpoint."""
    last = run_dir / "last.pt"
    if not last.is_file():
        return "new"
    from .fileio import load_checkpoint

    epoch = int(load_checkpoint(last).get("epoch", 0))
    return "done" if epoch >= epochs else "partial"


def grid_runs(spec: GridSpec) -> dict:
    """Run folder -> training config of every run the grid needs, in grid order (a vanilla run
    serves every attention-only setting); under ``spec.shard`` only this shard's."""
    unique = {}
    for arch, attn, seed, fold, setting, block in spec.runs():
        cfg = spec.config(arch, attn, seed, fold, setting, block)
        cfg.train.progress = False
        unique.setdefault(cfg.out, cfg)
    if spec.shard:  # several processes share the grid: each trains and evaluates its own runs
        i, n = spec.shard
        unique = {k: v for j, (k, v) in enumerate(unique.items()) if j % n == i}
    return unique


def run_state(cfg) -> str:
    """'done', 'partial' or 'new': how far the run of training config ``cfg`` got."""
    return _run_state(Path(cfg.out), cfg.train.epochs)


def train_run(cfg) -> None:
    """Train the run of ``cfg`` to its last epoch: from scratch, resumed from its last.pt, or
    not at all when it is finished."""
    from .training import Trainer

    state = run_state(cfg)
    if state != "done":
        Trainer(cfg, Path(cfg.out), resume=(state == "partial")).fit()


def evaluate_cached(run_dir: Path, spec: GridSpec):
    """The run's evaluation on its held-out volumes, from its eval.json when that was made from
    the same checkpoint and options, else computed and cached there."""
    from .evaluation.runs import evaluate_run

    run_dir = Path(run_dir)
    cache = run_dir / "eval.json"
    key = eval_key(run_dir, spec)
    res = _load_eval(cache, key)
    if res is None:
        t0 = time.perf_counter()
        res = evaluate_run(run_dir, tta_flip=spec.tta, surface=spec.surface, progress=False,
                           nsd_tolerance=spec.nsd_tolerance)
        _save_eval(cache, res, key, time.perf_counter() - t0)
    return res


def run_grid(spec: GridSpec, evaluate: bool = True) -> Path:
    """Train every missing run, then evaluate every run (cached in its eval.json), then report."""
    from tqdm.auto import tqdm

    from .fileio import check_writable_folder, os_error_text

    t_start = time.perf_counter()
    check_writable_folder(spec.out, "the comparison")  # before hours of training, not after
    combos = spec.runs()
    unique = grid_runs(spec)
    bar = tqdm(list(unique.values()), desc="training grid", unit="run",
               disable=not show_progress(spec.progress))
    for cfg in bar:
        bar.set_postfix_str(f"{Path(cfg.out).name} ({run_state(cfg)})")
        train_run(cfg)
    # created only now: a grid that fails on its input (e.g. a wrong --data) leaves nothing
    spec.out.mkdir(parents=True, exist_ok=True)
    if not evaluate:
        return spec.out
    bar = tqdm(list(unique), desc="evaluating grid", unit="run", disable=not show_progress(spec.progress))
    evaluated = {out: evaluate_cached(Path(out), spec) for out in bar}
    if spec.shard:  # the report needs every run: written by an invocation without --shard
        _add_wall_time(spec.out, time.perf_counter() - t_start)  # counted in the report's total
        return spec.out
    results = [replace(evaluated[spec.config(a, t, s, f, st, b).out], arch=spec.label(a, st),
                       attention=spec.variant_label(b, t))
               for a, t, s, f, st, b in combos]
    test_out = test_folder(spec) if spec.test is not None else None
    test_results = _evaluate_on_test(spec, combos, test_out.name) if test_out else None
    from .evaluation.compare_report import small_sample_notes, summary_rows, write_comparison

    rows = summary_rows(results)  # once: the notes and the report share the bootstrap
    for note in small_sample_notes(rows):
        print(f"note: {note}", flush=True)
    try:
        wall = _add_wall_time(spec.out, time.perf_counter() - t_start)
        write_comparison(results, spec, wall_seconds=wall, rows=rows)
        if test_results is not None:
            rows = summary_rows(test_results)
            for note in small_sample_notes(rows):
                print(f"note ({test_out.name}): {note}", flush=True)
            write_comparison(test_results, spec, out=test_out, wall_seconds=wall,
                             test_path=spec.test, rows=rows)
    except OSError as e:
        raise UserError(f"could not write the comparison into {spec.out} ({os_error_text(e)}); "
                        "every run and its eval.json are kept: free disk space and rerun the "
                        "same command (it only writes the report)") from None
    return spec.out


def test_folder(spec: GridSpec) -> Path:
    """Where the report on ``spec.test`` goes: ``OUT/test-NAME`` beside the held-out report."""
    from .data.msd import read_test_set

    ds, _ = read_test_set(spec.test)
    return spec.out / f"test-{Path(ds.root).name}"


def _evaluate_on_test(spec: GridSpec, combos, name: str) -> list:
    """Every variant and seed scored on ``spec.test``: one run, or under K-fold
    cross-validation the ensemble of its K fold runs (softmax averaged, as nnU-Net predicts a
    test set). Cached per ensemble in its first run's folder."""
    from tqdm.auto import tqdm

    from .evaluation.runs import evaluate_run
    from .fileio import file_sha256

    groups: dict[tuple, list] = {}
    for a, t, s, f, st, b in combos:
        label = (spec.label(a, st), spec.variant_label(b, t), s)
        groups.setdefault(label, [])
        out = spec.config(a, t, s, f, st, b).out
        if out not in groups[label]:
            groups[label].append(out)
    done: dict[tuple, object] = {}
    results = []
    for (arch, attn, _), members in tqdm(groups.items(), desc=f"scoring on {name}", unit="model",
                                         disable=not show_progress(spec.progress)):
        members = tuple(sorted(members))
        if members not in done:
            cache = Path(members[0]) / f"eval-{name}.json"
            key = dict(test=str(spec.test.resolve()), tta=spec.tta, surface=spec.surface,
                       nsd_tolerance=spec.nsd_tolerance if spec.surface else None,
                       members=[[m, file_sha256(Path(m) / "last.pt")] for m in members])
            res = _load_eval(cache, key)
            if res is None:
                t0 = time.perf_counter()
                res = evaluate_run(list(members), test_path=spec.test, tta_flip=spec.tta,
                                   surface=spec.surface, progress=False,
                                   nsd_tolerance=spec.nsd_tolerance)
                _save_eval(cache, res, key, time.perf_counter() - t0)
            done[members] = res
        results.append(replace(done[members], arch=arch, attention=attn))
    return results


def _add_wall_time(out: Path, seconds: float) -> float:
    """Accumulate this invocation's wall time in out/timing.json; return the total, so that a
    grid resumed after an interruption still reports what the whole grid cost."""
    import fcntl

    from .fileio import atomic_write_text

    f = out / "timing.json"
    with open(out / ".timing.lock", "w") as lock:  # shards finishing together: no lost entry
        fcntl.flock(lock, fcntl.LOCK_EX)
        runs = json.loads(f.read_text()).get("invocations_s", []) if f.is_file() else []
        runs.append(round(seconds, 1))
        atomic_write_text(f, json.dumps({"invocations_s": runs, "total_s": round(sum(runs), 1)}))
    return sum(runs)


def eval_key(run_dir: Path, spec: GridSpec, checkpoint: str = "last.pt") -> dict:
    """Everything an evaluation's numbers depend on: the checkpoint's content (a run resumed to
    more epochs has another last.pt), the evaluation options and the volumes scored."""
    from .evaluation.runs import read_split
    from .fileio import file_sha256

    split = read_split(run_dir / "split.json")
    return dict(checkpoint=checkpoint, sha256=file_sha256(run_dir / checkpoint), tta=spec.tta,
                surface=spec.surface, nsd_tolerance=spec.nsd_tolerance if spec.surface else None,
                dataset_root=split.get("dataset_root"), volumes=split["val"])


def _load_eval(path: Path, key: dict):
    """The cached evaluation if it was made with exactly ``key``; None (re-evaluate) when it is
    missing, truncated or stale."""
    from .evaluation.runs import RunEvaluation

    try:
        saved = json.loads(path.read_text())
        if saved.get("key") != key:
            return None
        return RunEvaluation(**saved["result"])
    except (OSError, ValueError, TypeError, KeyError, AttributeError, RecursionError):
        return None


def _save_eval(path: Path, ev, key: dict, seconds: float) -> None:
    from .fileio import atomic_write_text

    d = dict(ev.__dict__)
    d.pop("example", None)
    atomic_write_text(path, json.dumps(dict(key=key, eval_seconds=seconds, result=d),
                                       default=float))


__all__ = ["GridSpec", "run_grid", "UserError"]
