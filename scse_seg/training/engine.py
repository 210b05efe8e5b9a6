"""Training engine: data preparation, the epoch loop, validation Dice, logging, checkpoints.

One ``Trainer`` serves 2D slice training (the papers' setting) and 3D patch training, single
process or DDP under torchrun. Every epoch re-seeds all random generators from ``seed + epoch``,
so a run resumed from its last checkpoint ends with exactly the weights of an uninterrupted run
(deterministic CPU mode).
"""
from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import random
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..config import Config, config_from_dict, save_config
from ..data.slices import AXIS_INDEX
from ..errors import ConfigError, DataError, UserError
from ..fileio import RunLock, atomic_write_text, load_checkpoint, save_checkpoint
from ..inference import predict_volume_2d, predict_volume_3d
from ..metrics import dice_counts, dice_from_counts
from ..runtime import resolve_device, show_progress
from . import distributed as ddp
from .losses import SegmentationLoss, class_weights

CHECKPOINT_VERSION = 1


class NumericalError(UserError):
    """Loss became NaN/Inf: training stops, the last good checkpoint is kept."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class PreparedData:
    train_set: torch.utils.data.Dataset
    val_volumes: list
    class_names: list[str]
    label_values: list[int]
    class_counts: np.ndarray  # (K,) voxels of each class in the training samples as fed
    split: dict = field(default_factory=dict)
    dataset_root: str = ""
    sample_class_counts: np.ndarray | None = None  # (samples, K): what class weights come from
    channel_names: list[str] = field(default_factory=list)  # dataset.json's; [] = one channel

    @property
    def in_channels(self) -> int:
        """The network's input channels: the dataset's (each case is checked to hold them)."""
        return max(1, len(self.channel_names))

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def prepare_data(cfg: Config, info: ddp.DistInfo, progress: bool = True,
                 multiple: int | None = None) -> PreparedData:
    """Read the dataset (or generate the built-in phantom), split volumes, build the train set.

    Slices are padded to a multiple of ``multiple`` (default: the model's ``size_multiple``); 3D
    volumes smaller than the patch are padded. Class voxel counts are taken on the training
    samples as the loss sees them (after skip_empty and pad/crop, before random augmentation)."""
    from .. import data as D

    dc = cfg.data
    multiple = multiple or cfg.model.size_multiple()
    _check_sizes(cfg, multiple)
    if dc.path is None:
        root = Path(dc.phantom_dir) if dc.phantom_dir else \
            Path.home() / ".cache" / "scse_seg" / \
            f"phantom_n{dc.phantom_cases}_{'x'.join(map(str, dc.phantom_shape))}_s{dc.phantom_seed}"
        if info.is_main:
            D.generate_phantom(root, n_cases=dc.phantom_cases, shape=tuple(dc.phantom_shape),
                               seed=dc.phantom_seed)
        ddp.barrier(info)
    else:
        root = Path(dc.path)
    ds = D.read_msd(root)
    if info.is_main:
        for w in ds.orphans:
            print(f"warning: {w}", file=sys.stderr)
    cases = list(ds.cases)
    if dc.max_cases is not None:
        cases = cases[: dc.max_cases]
    if len(cases) < 2:
        raise DataError(f"dataset {root} has {len(cases)} usable case(s); training needs at least "
                        "2 (one for validation)")
    names = [c.name for c in cases]
    if dc.folds is not None:
        if len(names) < dc.folds:
            raise ConfigError(f"config key 'data.folds': {dc.folds} folds need at least {dc.folds} "
                              f"cases, dataset {root} has {len(names)}")
        train_names, val_names = D.kfold_split(names, dc.folds, dc.fold, dc.split_seed)
    else:
        train_names, val_names = D.split_cases(names, dc.val_fraction, dc.split_seed)
    by_name = {c.name: c for c in cases}
    from tqdm.auto import tqdm

    def load(names, what):
        it = tqdm(names, desc=f"loading {what} volumes", disable=not show_progress(progress and info.is_main),
                  leave=False)
        return [D.resample_case(D.load_case(by_name[n], ds), dc.zoom, dc.target_spacing)
                for n in it]

    train_vols, val_vols = load(train_names, "train"), load(val_names, "val")
    k = len(ds.class_names)
    if cfg.model.dim == 2:
        size = tuple(dc.slice_size) if dc.slice_size else \
            _fit_size(train_vols + val_vols, dc.axis, multiple)
        train_set = D.SliceDataset(train_vols, axis=dc.axis, size=size,
                                   transform=D.build_augmentation(dc.augment),
                                   skip_empty=dc.skip_empty)
    else:
        train_set = D.PatchDataset(train_vols, patch_size=tuple(dc.patch_size),
                                   samples_per_volume=dc.samples_per_volume, seed=cfg.seed)
    sample_counts = train_set.label_counts(k)
    counts = sample_counts.sum(0).astype(np.float64)
    if len(train_set) == 0:
        raise DataError(f"no training samples left from {root} after filtering "
                        "(data.skip_empty / data.max_cases); relax the filters")
    split = {"train": train_names, "val": val_names}
    if dc.folds is not None:
        split.update(folds=dc.folds, fold=dc.fold)
    return PreparedData(train_set, val_vols, list(ds.class_names), list(ds.label_values), counts,
                        split, str(root), sample_counts, list(ds.channel_names))


def _check_sizes(cfg: Config, multiple: int) -> None:
    """data.slice_size (2D) / data.patch_size (3D) must be sizes the network can take."""
    dc, key = cfg.data, "data.slice_size" if cfg.model.dim == 2 else "data.patch_size"
    sizes = dc.slice_size if cfg.model.dim == 2 else dc.patch_size
    if sizes and any(s % multiple for s in sizes):
        fixed = [int(math.ceil(s / multiple) * multiple) for s in sizes]
        raise ConfigError(f"config key '{key}' {list(sizes)}: {cfg.model.arch} needs sizes that "
                          f"are multiples of {multiple} (it downsamples {multiple}x); use e.g. "
                          f"{fixed}")


def _fit_size(volumes, axis: str, multiple: int = 16) -> tuple[int, int]:
    """Smallest in-plane size that holds every slice and is a multiple of ``multiple``."""
    a = AXIS_INDEX[axis]
    inplane = [[s for i, s in enumerate(v.image.shape[-3:]) if i != a] for v in volumes]
    h = max(p[0] for p in inplane)
    w = max(p[1] for p in inplane)
    return (int(math.ceil(h / multiple) * multiple), int(math.ceil(w / multiple) * multiple))


class Trainer:
    """Train ``cfg`` into ``run_dir``; ``resume=True`` continues from ``run_dir/last.pt``."""

    def __init__(self, cfg: Config, run_dir: str | Path | None = None, resume: bool = False):
        self.cfg = cfg
        self.run_dir = Path(run_dir) if run_dir else cfg.run_dir()
        self.resume = resume
        self.info = ddp.detect()
        tc = cfg.train
        self.device = resolve_device(tc.device)
        if self.info.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.info.local_rank)
            torch.cuda.set_device(self.device)
        self.progress = tc.progress

    # ----------------------------------------------------------------- set-up
    def _resolve_resume(self) -> None:
        """--resume on a run stopped before its first checkpoint (it has config.yaml, no last.pt)
        starts it again from epoch 1: nothing is lost. Decided on every rank alike."""
        if self.resume and not (self.run_dir / "last.pt").is_file() \
                and (self.run_dir / "config.yaml").is_file():
            if self.info.is_main:
                print(f"[scse_seg] {self.run_dir} has no checkpoint yet (stopped during epoch 1); "
                      "starting it from epoch 1", flush=True)
            self.resume = False

    def _check_run_dir(self) -> None:
        last = self.run_dir / "last.pt"
        if self.resume and not last.is_file():
            raise UserError(f"--resume: {last} not found; the run folder holds no checkpoint "
                            "(start a new run with --out instead)")
        if not self.resume and last.exists():
            raise UserError(f"run folder {self.run_dir} already holds a run; resume it with "
                            f"--resume {self.run_dir} or choose another --out (nothing was "
                            "overwritten)")

    def _amp_dtype(self):
        amp = self.cfg.train.amp
        if self.device.type != "cuda" or amp == "none":
            return None
        return torch.float16 if amp == "fp16" else torch.bfloat16

    def _channels_last(self) -> bool:
        """``train.channels_last`` applies on CUDA, and on CPU for 2D networks, where it made
        the training step 3-30% faster on this project's 2-core CPU with each setting
        bit-reproducible (bench/results/cpu-defaults); 3D on CPU is unmeasured, kept NCHW."""
        return self.cfg.train.channels_last and (self.device.type == "cuda"
                                                 or self.cfg.model.dim == 2)

    def _build(self, data: PreparedData):
        cfg, tc = self.cfg, self.cfg.train
        torch.manual_seed(cfg.seed)
        model = cfg.model.build(data.in_channels, data.num_classes).to(self.device)
        if self.info.enabled and tc.sync_batchnorm:
            if self.device.type != "cuda":  # SyncBatchNorm raises on CPU tensors in forward
                raise ConfigError("config key 'train.sync_batchnorm': SyncBatchNorm needs CUDA "
                                  f"devices, this run is on {self.device}; set it to false")
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        if self._channels_last():
            model = model.to(memory_format=torch.channels_last if cfg.model.dim == 2
                             else torch.channels_last_3d)
        if tc.optimizer == "sgd":
            opt = torch.optim.SGD(model.parameters(), lr=tc.lr, momentum=tc.momentum,
                                  weight_decay=tc.weight_decay, nesterov=True)
        else:
            cls = torch.optim.AdamW if tc.optimizer == "adamw" else torch.optim.Adam
            opt = cls(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(tc))
        return model, opt, sched

    # ----------------------------------------------------------------- main loop
    def _check_data(self) -> None:
        """Read dataset.json (cheap) before looking at the run folder, so that a wrong --data
        reports the data, not a run-folder clash."""
        if self.cfg.data.path is not None:
            from ..data import read_msd

            read_msd(Path(self.cfg.data.path))

    def fit(self) -> dict:
        info = self.info
        self._resolve_resume()
        self._check_data()
        with RunLock(self.run_dir) if info.is_main else contextlib.nullcontext():
            if info.is_main:  # under the lock: a second process cannot pass this check at once
                self._check_run_dir()
            threads = torch.get_num_threads()
            if self.cfg.train.threads:
                torch.set_num_threads(self.cfg.train.threads)
            ddp.init(info, self.device)
            try:
                return self._fit()
            finally:
                ddp.cleanup(info)
                torch.set_num_threads(threads)  # library use: leave the caller's setting

    def _fit(self) -> dict:
        cfg, tc, info = self.cfg, self.cfg.train, self.info
        ckpt = None
        if self.resume:
            ckpt = load_checkpoint(self.run_dir / "last.pt")
            if info.is_main:
                done, step = int(ckpt["epoch"]), int(ckpt.get("step", 0))
                where = f"epoch {done + 1}" + (f", step {step + 1} (mid-epoch checkpoint)"
                                               if step else "")
                print(f"[scse_seg] resuming {self.run_dir} from {where}: {done} of {tc.epochs} "
                      "epochs done", flush=True)
        if tc.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            # max_unpool (densenet, sdnet) warns on every call in deterministic mode; on CPU it is
            # deterministic (the bit-exact resume tests check it); on CUDA say so once, below
            warnings.filterwarnings("ignore", message="max_unpooling.*does not have a "
                                    "deterministic implementation")
            if self.device.type == "cuda":
                torch.backends.cudnn.benchmark = False
                note = cuda_reproducibility_note(cfg.model.arch)
                if note and info.is_main:
                    print(f"[scse_seg] note: {note}", flush=True)
        data = prepare_data(cfg, info, self.progress)
        if info.is_main and self.run_dir.is_dir():  # temp files of a write killed half-way
            for tmp in self.run_dir.glob(".*.tmp"):
                tmp.unlink(missing_ok=True)
        if ckpt is not None:
            _check_compatible(ckpt, cfg, data, self.run_dir)
        # class weights: computed once on rank 0, broadcast to every rank (on self.device: an
        # NCCL process group moves CUDA tensors only)
        weights = None
        if cfg.loss.class_weighting != "none":
            w = torch.zeros(data.num_classes, dtype=torch.float32, device=self.device)
            if info.is_main:
                w.copy_(torch.as_tensor(class_weights(data.sample_class_counts,
                                                      cfg.loss.class_weighting)))
            weights = ddp.broadcast_(w, info)
        model, opt, sched = self._build(data)
        self.model, self.data = model, data
        loss_fn = SegmentationLoss(weights, cfg.loss.boundary_weight,
                                   cfg.loss.dice_weight).to(self.device)
        scaler = torch.amp.GradScaler("cuda", enabled=(self._amp_dtype() == torch.float16))
        start_epoch, best, history = 1, -1.0, []
        start_step, partial = 0, None
        if ckpt is not None:
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
            sched.load_state_dict(ckpt["scheduler"])
            if "scaler" in ckpt and ckpt["scaler"]:
                scaler.load_state_dict(ckpt["scaler"])
            start_epoch, best = int(ckpt["epoch"]) + 1, float(ckpt["best_dice"])
            # the schedule may have changed (e.g. --epochs extended): recompute this epoch's lr
            f = _lr_lambda(tc)
            sched.base_lrs = [tc.lr] * len(opt.param_groups)  # train.lr may be overridden too
            for group in opt.param_groups:
                group["lr"], group["initial_lr"] = tc.lr * f(sched.last_epoch), tc.lr
            history = list(ckpt.get("history", []))
            start_step, partial = int(ckpt.get("step", 0)), ckpt.get("partial")
        if info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
            atomic_write_text(self.run_dir / "split.json", json.dumps(
                dict(dataset_root=str(Path(data.dataset_root).resolve()), **data.split), indent=1))
            atomic_write_text(self.run_dir / "class_weights.json", json.dumps({
                "class_names": data.class_names, "label_values": data.label_values,
                "class_weighting": cfg.loss.class_weighting,
                "counted_on": "training samples as fed (after skip_empty and pad/crop, before "
                              "random augmentation; 3D: training volumes padded to the patch)",
                "voxel_counts": data.class_counts.tolist(),
                "weights": None if weights is None else weights.tolist()}, indent=1))
        net = model
        if info.enabled:
            net = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        sampler = None
        if info.enabled:
            sampler = torch.utils.data.DistributedSampler(
                data.train_set, num_replicas=info.world_size, rank=info.rank, shuffle=True,
                seed=cfg.seed, drop_last=False)
        per_proc = tc.batch_size
        # a last batch of one sample cannot be batch-normalised where the map is 1 voxel (the
        # bottleneck of a 16-voxel patch): drop it; any other remainder is trained on
        per_rank = len(sampler) if sampler is not None else len(data.train_set)
        drop_single = per_proc > 1 and per_rank % per_proc == 1
        if info.is_main:  # after every input check: an error stays the only line on stderr
            busy = busy_warning(torch.get_num_threads(), self.device)
            if busy:
                print(f"warning: {busy}", file=sys.stderr, flush=True)
            print(f"[scse_seg] {cfg.model.arch}+{cfg.model.attention} dim={cfg.model.dim} | "
                  f"{len(data.train_set)} training samples, {len(data.val_volumes)} validation "
                  f"volumes, {data.num_classes} classes"
                  f"{f', {data.in_channels} channels' if data.in_channels > 1 else ''} | batch "
                  f"{per_proc}/process x "
                  f"{info.world_size} = {per_proc * info.world_size} global | device "
                  f"{self.device} | run folder {self.run_dir}", flush=True)
        tb = _tensorboard(self.run_dir) if info.is_main else None

        def state(epoch_done: int, **extra) -> dict:
            return dict(version=CHECKPOINT_VERSION, model=model.state_dict(),
                        optimizer=opt.state_dict(), scheduler=sched.state_dict(),
                        scaler=scaler.state_dict() if scaler.is_enabled() else {},
                        epoch=epoch_done, best_dice=best, config=cfg.to_dict(),
                        class_names=data.class_names, label_values=data.label_values,
                        history=history, arch=cfg.model.arch,
                        attention=cfg.model.attention, num_classes=data.num_classes,
                        in_channels=data.in_channels, channel_names=data.channel_names, **extra)

        def save_mid_epoch(epoch: int, step: int, partial_stats: dict) -> None:
            """last.pt after ``step`` steps of ``epoch``: what resuming there needs (the
            epoch's data order is replayed from its seed; the RNG state is restored)."""
            if info.is_main:
                save_checkpoint(state(epoch - 1, step=step, partial=partial_stats,
                                      rng=_rng_state()), self.run_dir / "last.pt")

        for epoch in range(start_epoch, tc.epochs + 1):
            seed_everything(cfg.seed * 1000 + epoch)
            _reseed_augmentation(data.train_set, cfg.seed * 1000 + epoch)
            gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
            if sampler is not None:
                sampler.set_epoch(epoch)
            loader = DataLoader(data.train_set, batch_size=per_proc, shuffle=sampler is None,
                                sampler=sampler, num_workers=tc.num_workers, generator=gen,
                                pin_memory=self.device.type == "cuda", drop_last=drop_single,
                                worker_init_fn=_worker_init, persistent_workers=False)
            t0 = time.perf_counter()
            resume_at = (start_step, partial, ckpt.get("rng")) \
                if epoch == start_epoch and start_step else None
            train_loss, n_samples, skipped, before = self._train_epoch(
                net, loader, opt, scaler, loss_fn, epoch, save_mid_epoch, resume_at)
            sched.step()
            train_time = time.perf_counter() - t0 + before
            per_volume = self._validate(model, data)
            dice = dice_from_counts(per_volume)  # (V, K)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                per_class = np.nanmean(dice[:, 1:], axis=0) if len(dice) else np.array([])
                mean_dice = float(np.nanmean(np.nanmean(dice[:, 1:], axis=1))) if len(dice) \
                    else float("nan")
            row = dict(epoch=epoch, train_loss=train_loss, val_dice=mean_dice,
                       lr=opt.param_groups[0]["lr"], seconds=train_time,
                       samples_per_s=n_samples * info.world_size / max(train_time, 1e-9),
                       skipped_batches=skipped)
            row.update({f"dice_{n}": float(d) for n, d in zip(data.class_names[1:], per_class)})
            history.append(row)
            improved = mean_dice > best
            best = max(best, mean_dice) if not math.isnan(mean_dice) else best
            if info.is_main:
                end_state = state(epoch)
                # best.pt before last.pt: a kill during either write leaves last.pt at the
                # previous epoch, so --resume redoes this epoch and writes both again
                if improved:
                    save_checkpoint(end_state, self.run_dir / "best.pt")
                save_checkpoint(end_state, self.run_dir / "last.pt")
                _write_log(self.run_dir / "log.csv", history)
                if tb is not None:
                    for k, v in row.items():
                        if k != "epoch":
                            tb.add_scalar(k, v, epoch)
                print(f"epoch {epoch}/{tc.epochs}  loss {train_loss:.4f}  val Dice "
                      f"{mean_dice:.4f}  ({row['samples_per_s']:.1f} samples/s)", flush=True)
            ddp.barrier(info)
        if tb is not None:
            tb.close()
        best_epoch = next((int(r["epoch"]) for r in history if r["val_dice"] == best), None)
        return dict(run_dir=str(self.run_dir), history=history, best_dice=best,
                    best_epoch=best_epoch, class_names=data.class_names, config=cfg.to_dict())

    def _train_epoch(self, net, loader, opt, scaler, loss_fn, epoch, save_mid_epoch=None,
                     resume_at=None):
        """One epoch; ``resume_at = (steps done, their loss/count stats, RNG state)`` continues
        it from a mid-epoch checkpoint. Returns (mean loss, samples, skipped batches, seconds
        spent before the checkpoint)."""
        tc, info = self.cfg.train, self.info
        from tqdm.auto import tqdm

        net.train()
        amp_dtype = self._amp_dtype()
        cl = self._channels_last()
        fmt = torch.channels_last if self.cfg.model.dim == 2 else torch.channels_last_3d
        total, count, skipped, before = 0.0, 0, 0, 0.0
        steps = len(loader) if tc.max_steps_per_epoch is None \
            else min(len(loader), tc.max_steps_per_epoch)
        batches = iter(loader)
        done = 0
        if resume_at is not None:
            done, partial, rng = resume_at
            for _ in range(done):  # the same batches in the same order, augmentation included
                next(batches)
            _set_rng_state(rng)  # as after step `done` of the uninterrupted run (dropout, ...)
            total, count, skipped = float(partial["total"]), int(partial["count"]), \
                int(partial["skipped"])
            before = float(partial["seconds"])
        every = tc.checkpoint_every_steps
        bar = tqdm(total=steps, initial=done, desc=f"epoch {epoch}", unit="batch", leave=False,
                   disable=not show_progress(self.progress and info.is_main))
        t0 = time.perf_counter()
        for step, (x, y) in enumerate(batches, start=done + 1):
            if step > steps:
                break
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            if cl:
                x = x.contiguous(memory_format=fmt)
            with torch.autocast(self.device.type, dtype=amp_dtype or torch.float32,
                                enabled=amp_dtype is not None):
                loss = loss_fn(net(x), y)
            if not torch.isfinite(loss):
                if tc.nan_policy == "skip":
                    skipped += 1
                    opt.zero_grad(set_to_none=True)
                    continue
                raise NumericalError(
                    f"loss is {loss.item()} at epoch {epoch}, step {step}; training stopped and "
                    f"the last good checkpoint ({self.run_dir / 'last.pt'}) was kept. Lower "
                    "train.lr, check the data, or set train.nan_policy=skip")
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if tc.grad_clip:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(net.parameters(), tc.grad_clip)
            scaler.step(opt)
            scaler.update()
            total += loss.item() * x.shape[0]
            count += x.shape[0]
            bar.set_postfix(loss=f"{total / count:.4f}",
                            speed=f"{count / (before + time.perf_counter() - t0):.1f}/s")
            bar.update(1)
            if every and save_mid_epoch is not None and step % every == 0 and step < steps:
                save_mid_epoch(epoch, step, dict(total=total, count=count, skipped=skipped,
                                                 seconds=before + time.perf_counter() - t0))
        bar.close()
        stats = ddp.all_reduce_sum(torch.tensor([total, count], dtype=torch.float64,
                                                device=self.device), info)
        total, n_all = stats.tolist()
        return total / max(n_all, 1), count, skipped, before

    @torch.no_grad()
    def _validate(self, model, data: PreparedData) -> np.ndarray:
        """Per-volume (V, K, 3) Dice counts on the held-out volumes; each rank predicts a shard
        of the volumes and the counts are summed across ranks (all_reduce)."""
        info, cfg = self.info, self.cfg
        k = data.num_classes
        counts = torch.zeros(len(data.val_volumes), k, 3, dtype=torch.float64, device=self.device)
        was_training = model.training
        model.eval()
        for i, vol in enumerate(data.val_volumes):
            if i % info.world_size != info.rank:
                continue
            if cfg.model.dim == 2:
                pred = predict_volume_2d(model, vol.image, AXIS_INDEX[cfg.data.axis],
                                         batch_size=cfg.train.val_batch_size, device=self.device)
            else:
                pred = predict_volume_3d(model, vol.image, roi_size=tuple(cfg.data.patch_size),
                                         device=self.device)
            pred = torch.as_tensor(np.asarray(pred), device=self.device).long()
            ref = torch.as_tensor(vol.label, device=self.device).long()
            counts[i] = dice_counts(pred, ref, k)
        model.train(was_training)
        return ddp.all_reduce_sum(counts, info).cpu().numpy()


def _rng_state() -> dict:
    """Every global random generator's state, in types ``torch.load(weights_only=True)`` reads."""
    np_state = np.random.get_state(legacy=False)
    out = dict(torch=torch.get_rng_state(), python=list(random.getstate()[1]),
               numpy=dict(key=torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                          pos=int(np_state["state"]["pos"]), has_gauss=int(np_state["has_gauss"]),
                          gauss=float(np_state["gauss"])))
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def _set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate((3, tuple(int(v) for v in st["python"]), None))
    n = st["numpy"]
    np.random.set_state(dict(bit_generator="MT19937", state=dict(
        key=n["key"].numpy().astype(np.uint32), pos=n["pos"]), has_gauss=n["has_gauss"],
        gauss=n["gauss"]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def busy_warning(threads: int, device: torch.device) -> str | None:
    """A CPU run with several threads on a machine already busy: OpenMP threads that wait for
    each other's cores make training many times slower (issue 10: 2.5-7 vs 57-59 samples/s)."""
    if device.type != "cpu" or threads <= 1 or not hasattr(os, "getloadavg"):
        return None
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = os.getloadavg()[0]
    if load < (cpus or 1):
        return None
    return (f"the machine is busy (load average {load:.1f} on {cpus} CPUs) and this run uses "
            f"{threads} threads; with other jobs competing for the cores, CPU training can be many "
            "times slower. On a shared machine set train.threads=1 (README: Shared machines)")


def cuda_reproducibility_note(arch: str) -> str | None:
    """What deterministic mode cannot make bit-reproducible on CUDA (printed once per run)."""
    if arch in ("densenet", "sdnet"):
        return (f"{arch} uses max_unpool, which has no deterministic CUDA kernel: CUDA runs of it "
                "are not bit-reproducible (CPU runs and the other architectures are)")
    return None


def _lr_lambda(tc):
    def f(epoch: int) -> float:  # called with the number of finished epochs
        if tc.warmup_epochs and epoch < tc.warmup_epochs:
            return (epoch + 1) / tc.warmup_epochs
        t = min(1.0, epoch / max(1, tc.epochs))
        if tc.scheduler == "cosine":
            return 0.5 * (1 + math.cos(math.pi * t))
        if tc.scheduler == "poly":
            return (1 - t) ** 0.9
        if tc.scheduler == "step":
            return tc.gamma ** (epoch // tc.step_size)
        return 1.0

    return f


def _reseed_augmentation(dataset, seed: int) -> None:
    tf = getattr(dataset, "transform", None)
    if tf is not None and hasattr(tf, "set_random_seed"):
        tf.set_random_seed(seed)


def _worker_init(worker_id: int) -> None:
    info = torch.utils.data.get_worker_info()
    seed = int(info.seed % 2**31)
    random.seed(seed)
    np.random.seed(seed)
    _reseed_augmentation(info.dataset, seed)


def _check_compatible(ckpt: dict, cfg: Config, data: PreparedData, run_dir: Path) -> None:
    """--resume must continue the same model on the same label set."""
    want = dict(arch=cfg.model.arch, attention=cfg.model.attention,
                num_classes=data.num_classes, in_channels=data.in_channels)
    for key, value in want.items():
        have = ckpt.get(key, 1 if key == "in_channels" else None)  # older runs: one channel
        if have != value:
            raise ConfigError(f"--resume {run_dir}: the checkpoint has {key}={have!r} "
                              f"but this run has {key}={value!r}; resume with the original "
                              "settings or start a new run with --out")
    saved = config_from_dict(ckpt["config"]).to_dict()
    now = cfg.to_dict()
    # the whole model config (any key changes the weights' meaning), and what fixes the data
    keys = [("model", k) for k in sorted(set(saved["model"]) | set(now["model"]))] + \
        [("train", "optimizer"), ("data", "folds"), ("data", "fold")]
    for section, key in keys:
        old, new = saved[section].get(key), now[section].get(key)
        if old != new:
            raise ConfigError(f"--resume {run_dir}: {section}.{key} was {old!r} in the checkpoint "
                              f"but is {new!r} now; resume with the original setting or start a "
                              "new run with --out")


def _write_log(path: Path, history: list[dict]) -> None:
    try:
        _write_csv(path, history)
    except OSError as e:
        raise UserError(f"could not write {path} ({e.strerror or e}); this epoch's checkpoint "
                        f"was saved: free disk space and resume with --resume {path.parent}"
                        ) from None


def _write_csv(path: Path, history: list[dict]) -> None:
    keys: list[str] = []
    for row in history:
        keys += [k for k in row if k not in keys]
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(history)
    atomic_write_text(path, buf.getvalue())


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(str(run_dir / "tensorboard"))
    except Exception:  # tensorboard not installed: CSV log only
        return None
