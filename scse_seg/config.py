"""Experiment configuration: typed sections, YAML files, command-line overrides, strict checking.

A config is ``defaults <- YAML file(s) <- CLI flags <- key=value overrides``. Every key is
declared below with its type, so a typo or a wrong type is rejected with a message that names
the key (``ConfigError``, exit status 2) instead of being silently ignored.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError


@dataclass
class DataConfig:
    path: str | None = None  # MSD/nnU-Net folder; None -> built-in synthetic phantom
    phantom_cases: int = 12
    phantom_shape: list[int] = field(default_factory=lambda: [64, 64, 48])
    phantom_dir: str | None = None  # where the phantom is written; None -> ~/.cache/scse_seg
    phantom_seed: int = 0  # the phantom's subjects (independent of the training seed)
    split_seed: int = 0  # train/validation split; fixed so every variant and seed sees the same
    axis: str = "coronal"  # slice axis for 2D training: sagittal | coronal | axial
    slice_size: list[int] | None = None  # (H, W); None -> smallest model.size_multiple multiple that fits
    val_fraction: float = 0.2  # single split; ignored when data.folds is set
    folds: int | None = None  # K-fold cross-validation over subjects (None: single split)
    fold: int = 0  # which fold is held out (0..folds-1)
    zoom: float | None = None  # resample every volume by this factor (0.5 = half resolution)
    target_spacing: list[float] | None = None  # or to this voxel size in mm (x, y, z)
    max_cases: int | None = None  # use only the first N cases (quick runs)
    skip_empty: bool = False  # drop training slices with background only
    augment: dict[str, Any] = field(default_factory=lambda: {
        "affine": 0.5, "elastic": 0.0, "flip": False, "brightness_contrast": 0.3, "noise": 0.2})
    patch_size: list[int] = field(default_factory=lambda: [32, 32, 32])  # dim=3 patch training
    samples_per_volume: int = 4

    def validate(self):
        if self.path is not None and Path(self.path).name == "dataset.json":
            self.path = str(Path(self.path).parent)  # --data .../dataset.json: use its folder
        _check(self.axis in ("sagittal", "coronal", "axial"), "data.axis",
               f"must be sagittal, coronal or axial, got {self.axis!r}")
        _check(0.0 < self.val_fraction < 1.0, "data.val_fraction", "must be between 0 and 1")
        _check(self.phantom_cases >= 2, "data.phantom_cases", "must be at least 2")
        _check(len(self.phantom_shape) == 3 and min(self.phantom_shape) >= 16,
               "data.phantom_shape", "must be three sizes of at least 16")
        if self.slice_size is not None:
            # multiples of the model's size_multiple: checked by the trainer, which knows it
            _check(len(self.slice_size) == 2 and all(s > 0 for s in self.slice_size),
                   "data.slice_size", "must be two positive sizes, e.g. [64, 64]")
        _check(len(self.patch_size) == 3 and all(s > 0 for s in self.patch_size),
               "data.patch_size", "must be three positive sizes, e.g. [32, 32, 32]")
        _check(self.folds is None or self.folds >= 2, "data.folds",
               "must be at least 2 (or null for a single split)")
        _check(self.fold >= 0 and (self.folds is None or self.fold < self.folds), "data.fold",
               f"must be in 0..{(self.folds or 1) - 1}, got {self.fold}")
        _check(self.zoom is None or 0 < self.zoom <= 4, "data.zoom", "must be in (0, 4], e.g. 0.5")
        _check(self.target_spacing is None or (len(self.target_spacing) == 3
                                                and min(self.target_spacing) > 0),
               "data.target_spacing", "must be three positive voxel sizes in mm, e.g. [1, 1, 1]")
        _check(self.zoom is None or self.target_spacing is None, "data.zoom",
               "set data.zoom or data.target_spacing, not both")
        _check(self.max_cases is None or self.max_cases >= 2, "data.max_cases",
               "must be at least 2 (one training and one validation volume)")
        _check(self.samples_per_volume >= 1, "data.samples_per_volume", "must be at least 1")


@dataclass
class ModelConfig:
    arch: str = "unet"
    attention: str = "scse"
    dim: int = 2
    width: int = 16
    reduction: float | None = None  # None: each attention's own (cse/scse 16, pe 2); TMI 2019: 2
    min_hidden: int = 1  # floor on cSE's hidden width C // r (cse, scse)
    fusion: str = "add"
    bottleneck_attention: bool = True
    placement: str = "all"  # all | encoder | decoder: which blocks get attention (ablations)
    dropout: float | None = None  # None -> the architecture's default
    encoder_name: str = "resnet34"  # smp_unet and smp:* archs only
    block: str | None = None  # conv block of every stage (unet, sdnet); None -> the arch's own

    def validate(self):
        from .blocks import attention_names
        from .models import model_names, resolve_model_name

        # names are case-insensitive: accept SCSE, UNet, smp:fpn, ...
        self.arch = resolve_model_name(self.arch) or str(self.arch)
        self.attention = str(self.attention).lower()
        _check(self.arch in model_names(), "model.arch",
               f"unknown architecture {self.arch!r}; valid: {', '.join(model_names())}")
        _check(self.attention in attention_names(), "model.attention",
               f"unknown attention {self.attention!r}; valid: {', '.join(attention_names())}")
        _check(self.dim in (2, 3), "model.dim", "must be 2 or 3")
        _check(self.width >= 1, "model.width", "must be positive")
        _check(self.reduction is None or self.reduction > 0, "model.reduction",
               "must be positive (or null: each attention's own default)")
        _check(isinstance(self.min_hidden, int) and self.min_hidden >= 1, "model.min_hidden",
               "must be a whole number of at least 1")
        _check(self.fusion in ("max", "add"), "model.fusion", "must be max or add")
        _check(self.placement in ("all", "encoder", "decoder"), "model.placement",
               f"must be all, encoder or decoder, got {self.placement!r}")
        _check(self.placement == "all" or self.arch != "smp_unet", "model.placement",
               "smp_unet supports only placement: all")
        _check(self.dropout is None or 0 <= self.dropout < 1, "model.dropout", "must be in [0, 1)")
        _check(not (self.arch.startswith("smp") and self.dim == 3), "model.dim",
               f"{self.arch} is 2D only; use unet, densenet, sdnet or a monai:* arch for dim: 3")
        self._validate_block()

    def _validate_block(self):
        from .blocks import block_names, check_block_attention
        from .models import block_archs

        if self.block is not None:
            self.block = str(self.block).lower()
            _check(self.block in block_names(), "model.block",
                   f"unknown block {self.block!r}; valid: {', '.join(block_names())}")
            _check(self.arch in block_archs(), "model.block",
                   f"architecture {self.arch!r} has a fixed block; model.block works with "
                   f"{', '.join(block_archs())}")
        error = check_block_attention(self.block, self.attention)
        _check(error is None, "model.attention", f"{error}; set model.block (--block)")

    def size_multiple(self) -> int:
        """The multiple every input size of this model must be (its ``size_multiple``: 16 for
        the paper networks, 2**depth = 32 for smp encoders), as the model registry records it."""
        from .models import size_multiple

        return size_multiple(self.arch)

    def build(self, in_channels: int, num_classes: int):
        from .models import create_model

        se = dict(min_hidden=self.min_hidden, fusion=self.fusion,
                  **({} if self.reduction is None else {"reduction": self.reduction}))
        kw: dict[str, Any] = dict(width=self.width, bottleneck_attention=self.bottleneck_attention, **se)
        if self.placement != "all":
            kw["placement"] = self.placement
        if self.dropout is not None:
            kw["dropout"] = self.dropout
        if self.block is not None:
            kw["block"] = self.block
        if self.arch.startswith("smp"):  # smp_unet and the smp:* networks (models/plugged.py)
            kw = dict(encoder_name=self.encoder_name, **se,
                      **({"placement": self.placement} if self.placement != "all" else {}))
        return create_model(self.arch, in_channels, num_classes, self.attention, self.dim, **kw)


@dataclass
class LossConfig:
    class_weighting: str = "median_frequency"  # median_frequency | median_frequency_present | none
    boundary_weight: float = 0.0  # QuickNAT-style extra weight on label boundaries (0 = off)
    dice_weight: float = 1.0  # 0 -> weighted cross-entropy only

    def validate(self):
        _check(self.class_weighting in ("median_frequency", "median_frequency_present", "none"),
               "loss.class_weighting", "must be median_frequency, median_frequency_present or none")
        _check(self.boundary_weight >= 0, "loss.boundary_weight", "must be >= 0")
        _check(self.dice_weight >= 0, "loss.dice_weight", "must be >= 0")


@dataclass
class TrainConfig:
    epochs: int = 8
    batch_size: int = 16
    optimizer: str = "adam"  # adam | adamw | sgd
    lr: float = 1e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9  # sgd only
    scheduler: str = "cosine"  # cosine | step | poly | none
    step_size: int = 10  # step scheduler
    gamma: float = 0.5  # step scheduler
    warmup_epochs: int = 0
    amp: str = "auto"  # auto (bf16 on CUDA, off on CPU) | bf16 | fp16 | none
    channels_last: bool = True  # CUDA, and CPU for 2D (3D on CPU stays NCHW)
    grad_clip: float | None = 5.0
    num_workers: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    deterministic: bool = True
    nan_policy: str = "stop"  # stop | skip (skip batches whose loss is NaN/Inf)
    max_steps_per_epoch: int | None = None
    val_batch_size: int = 32
    sync_batchnorm: bool = False  # DDP only
    progress: bool = True
    threads: int | None = None  # CPU threads (torch.set_num_threads); None -> PyTorch's default
    checkpoint_every_steps: int | None = None  # also write last.pt every N steps within an epoch

    def validate(self):
        _check(self.epochs >= 1, "train.epochs", f"must be at least 1, got {self.epochs}")
        _check(self.batch_size >= 1, "train.batch_size", "must be at least 1")
        _check(self.optimizer in ("adam", "adamw", "sgd"), "train.optimizer",
               "must be adam, adamw or sgd")
        _check(self.lr > 0, "train.lr", "must be positive")
        _check(self.weight_decay >= 0, "train.weight_decay", "must be >= 0")
        _check(self.scheduler in ("cosine", "step", "poly", "none"), "train.scheduler",
               "must be cosine, step, poly or none")
        _check(self.amp in ("auto", "bf16", "fp16", "none"), "train.amp",
               "must be auto, bf16, fp16 or none")
        _check(self.grad_clip is None or self.grad_clip > 0, "train.grad_clip", "must be positive")
        _check(self.num_workers >= 0, "train.num_workers", "must be >= 0")
        _check(self.nan_policy in ("stop", "skip"), "train.nan_policy", "must be stop or skip")
        _check(self.max_steps_per_epoch is None or self.max_steps_per_epoch >= 1,
               "train.max_steps_per_epoch", "must be at least 1")
        _check(self.warmup_epochs >= 0, "train.warmup_epochs", "must be >= 0")
        _check(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
               "train.device", "must be auto, cpu or cuda[:N]")
        _check(self.threads is None or self.threads >= 1, "train.threads",
               "must be at least 1 (or null for PyTorch's default)")
        _check(self.checkpoint_every_steps is None or self.checkpoint_every_steps >= 1,
               "train.checkpoint_every_steps", "must be at least 1 (or null: epoch ends only)")


@dataclass
class Config:
    experiment: str = "default"
    seed: int = 0
    out: str | None = None  # run folder; None -> runs/{dataset}-{arch}-{attention}-{dim}d-w{width}-s{seed}
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> "Config":
        for section in (self.data, self.model, self.loss, self.train):
            section.validate()
        return self

    def run_dir(self) -> Path:
        """``out``, or a folder named after what makes runs differ: the experiment (when not
        ``default``), dataset, architecture, attention (and its placement unless ``all``),
        2D/3D, width, seed (and fold), e.g. ``runs/Task04_Hippocampus-unet-scse-2d-w16-s0``."""
        if self.out:
            return Path(self.out)
        m = self.model
        data = Path(self.data.path).resolve().name if self.data.path else "phantom"
        prefix = "" if self.experiment == "default" else f"{self.experiment}-"
        attn = m.attention if m.placement == "all" else f"{m.attention}@{m.placement}"
        fold = "" if self.data.folds is None else f"-fold{self.data.fold}of{self.data.folds}"
        block = f"-{m.block}" if m.block else ""
        return Path("runs") / (f"{prefix}{data}-{m.arch}{block}-{attn}-{m.dim}d-w{m.width}"
                               f"-s{self.seed}{fold}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}': {msg}")


def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, t) for t in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is Any:
        return True
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is list:
        (item,) = typing.get_args(tp)
        return isinstance(value, (list, tuple)) and all(_type_ok(v, item) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    return isinstance(value, tp)


def _type_name(tp: Any) -> str:
    return str(tp).replace("typing.", "").replace("<class '", "").replace("'>", "")


def _merge(obj: Any, values: dict, prefix: str = "") -> None:
    """Set ``values`` (nested dict) on dataclass ``obj``, rejecting unknown keys and wrong types."""
    if not isinstance(values, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping")
    hints = typing.get_type_hints(type(obj))
    for key, value in values.items():
        name = f"{prefix}{key}"
        if key not in hints:
            valid = ", ".join(f"{prefix}{k}" for k in hints)
            raise ConfigError(f"unknown config key '{name}'; valid keys here: {valid}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _merge(current, value, f"{name}.")
            continue
        tp = hints[key]
        if isinstance(value, str) and _type_ok(1.0, tp) and not _type_ok(value, tp):
            try:  # PyYAML reads 1e-3 (no dot) as a string
                value = float(value)
            except ValueError:
                pass
        if not _type_ok(value, tp):
            raise ConfigError(f"config key '{name}' must be {_type_name(tp)}, got {value!r}")
        if typing.get_origin(tp) is dict or tp is dict:
            merged = dict(current or {})
            merged.update(value)
            value = merged
        if isinstance(value, tuple):
            value = list(value)
        setattr(obj, key, value)


PATH_KEYS = (("data", "path"), ("data", "phantom_dir"), ("out",), ("compare", "out"))


def project_root(config_file: Path) -> Path:
    """The folder relative paths in ``config_file`` start from: the nearest folder at or above
    it holding ``pyproject.toml`` or ``.git`` (a project checkout), else the file's own folder."""
    folder = config_file.resolve().parent
    for d in (folder, *folder.parents):
        if (d / "pyproject.toml").is_file() or (d / ".git").exists():
            return d
    return folder


def _resolve_paths(data: dict, root: Path) -> None:
    """Make the relative paths written in a config file absolute, from ``root``, so a config
    works from any current folder."""
    for keys in PATH_KEYS:
        node = data
        for k in keys[:-1]:
            node = node.get(k) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(node.get(keys[-1]), str):
            p = Path(node[keys[-1]]).expanduser()
            node[keys[-1]] = str(p if p.is_absolute() else root / p)


def load_yaml(path: str | Path, resolve_paths: bool = True, _chain: tuple = ()) -> dict:
    """Read a config file (following ``base:``). With ``resolve_paths``, relative paths in it
    (data.path, data.phantom_dir, out, compare.out) are taken from the project root, see
    :func:`project_root`; paths given on the command line stay relative to the current folder."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found; see configs/ for examples")
    here = path.resolve()
    if here in _chain:
        loop = " -> ".join(str(p) for p in (*_chain[_chain.index(here):], here))
        raise ConfigError(f"config file {path}: its 'base:' chain loops ({loop}); a base config "
                          "must not extend the file that names it")
    try:
        data = yaml.safe_load(path.read_text())
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not a text file (not UTF-8); pass a YAML "
                          "config such as configs/default.yaml") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys, not {type(data).__name__}")
    base = data.pop("base", None)  # a config may extend another one: base: default.yaml
    if resolve_paths:
        _resolve_paths(data, project_root(path))
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(f"config file {path}: 'base:' must name one config file, got {base!r}")
        parent = load_yaml(path.parent / base, resolve_paths, (*_chain, here))
        return _deep_update(parent, data)
    return data


def _deep_update(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_update(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) \
            else v
    return out


def parse_override(text: str) -> dict:
    """``train.lr=3e-4`` -> ``{"train": {"lr": 3e-4}}`` (value parsed as YAML, safely)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value, e.g. train.lr=0.001")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    node: dict = {}
    cur = node
    parts = key.strip().split(".")
    for p in parts[:-1]:
        cur[p] = {}
        cur = cur[p]
    cur[parts[-1]] = value
    return node


def build_config(files: list[str | Path] = (), overrides: list[dict] = (),
                 saved: str | Path | None = None) -> Config:
    """Defaults <- ``saved`` (a run folder's config.yaml, paths as written) <- ``files`` <-
    ``overrides``."""
    cfg = Config()
    if saved is not None:
        _merge(cfg, load_yaml(saved, resolve_paths=False))
    for f in files:
        _merge(cfg, load_yaml(f))
    for o in overrides:
        _merge(cfg, o)
    return cfg.validate()


def config_from_dict(d: dict) -> Config:
    cfg = Config()
    _merge(cfg, d)
    return cfg.validate()


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
