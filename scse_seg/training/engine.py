"""Training engine: the epoch loop, validation Dice, logging, a checkpoint every epoch.

One ``Trainer`` serves 2D slice training (the papers' setting) and 3D patch training, single
process or DDP under torchrun. Every epoch re-seeds all random generators from ``seed + epoch``,
so a run resumed from its last checkpoint ends with exactly the weights of an uninterrupted run
(deterministic CPU mode). Data preparation lives in :mod:`scse_seg.data.prepare`, checkpoint
state and the resume check in :mod:`.checkpoint`, optimizer and schedule in :mod:`.optim`.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import random
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..config import Config, save_config
from ..data.prepare import PreparedData, prepare_data
from ..data.slices import AXIS_INDEX
from ..errors import ConfigError, UserError
from ..fileio import RunLock, atomic_write_text, load_checkpoint, save_checkpoint
from ..inference import predict_volume_2d, predict_volume_3d
from ..metrics import dice_counts, dice_from_counts
from ..runtime import resolve_device, show_progress
from . import distributed as ddp
from .checkpoint import check_compatible, restore, rng_state, set_rng_state, training_state
from .losses import SegmentationLoss, class_weights
from .optim import build_optimizer, build_scheduler, continue_schedule


class NumericalError(UserError):
    """Loss became NaN/Inf: training stops, the last good checkpoint is kept."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """Train ``cfg`` into ``run_dir``; ``resume=True`` continues from ``run_dir/last.pt``."""

    def __init__(self, cfg: Config, run_dir: str | Path | None = None, resume: bool = False):
        self.cfg = cfg
        self.run_dir = Path(run_dir) if run_dir else cfg.run_dir()
        self.resume = resume
        self.info = ddp.detect()
        self.device = resolve_device(cfg.train.device)
        if self.info.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.info.local_rank)
            torch.cuda.set_device(self.device)
        self.progress = cfg.train.progress

    # ----------------------------------------------------------------- checks before any work
    def _resolve_resume(self) -> None:
        """--resume on a run stopped before its first checkpoint (it has config.yaml, no last.pt)
        starts it again from epoch 1: nothing is lost. Decided on every rank alike."""
        if self.resume and not (self.run_dir / "last.pt").is_file() \
                and (self.run_dir / "config.yaml").is_file():
            if self.info.is_main:
                print(f"[scse_seg] {self.run_dir} has no checkpoint yet (stopped during epoch 1); "
                      "starting it from epoch 1", flush=True)
            self.resume = False

    def _check_data(self) -> None:
        """Read dataset.json (cheap) before looking at the run folder, so that a wrong --data
        reports the data, not a run-folder clash."""
        if self.cfg.data.path is not None:
            from ..data import read_msd

            read_msd(Path(self.cfg.data.path))

    def _check_run_dir(self) -> None:
        last = self.run_dir / "last.pt"
        if self.resume and not last.is_file():
            raise UserError(f"--resume: {last} not found; the run folder holds no checkpoint "
                            "(start a new run with --out instead)")
        if not self.resume and last.exists():
            raise UserError(f"run folder {self.run_dir} already holds a run; resume it with "
                            f"--resume {self.run_dir} or choose another --out (nothing was "
                            "overwritten)")

    # ----------------------------------------------------------------- settings
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

    def _memory_format(self):
        return torch.channels_last if self.cfg.model.dim == 2 else torch.channels_last_3d

    def _set_deterministic(self) -> None:
        if not self.cfg.train.deterministic:
            return
        torch.use_deterministic_algorithms(True, warn_only=True)
        # max_unpool (densenet, sdnet) warns on every call in deterministic mode; on CPU it is
        # deterministic (the bit-exact resume tests check it); on CUDA say so once, below
        warnings.filterwarnings("ignore", message="max_unpooling.*does not have a "
                                "deterministic implementation")
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = False
            note = cuda_reproducibility_note(self.cfg.model.arch)
            if note and self.info.is_main:
                print(f"[scse_seg] note: {note}", flush=True)

    # ----------------------------------------------------------------- set-up
    def _build(self, data: PreparedData):
        """Model (seeded with ``seed``), optimizer and schedule."""
        cfg, tc = self.cfg, self.cfg.train
        torch.manual_seed(cfg.seed)
        model = cfg.model.build(data.in_channels, data.num_classes).to(self.device)
        if self.info.enabled and tc.sync_batchnorm:
            if self.device.type != "cuda":  # SyncBatchNorm raises on CPU tensors in forward
                raise ConfigError("config key 'train.sync_batchnorm': SyncBatchNorm needs CUDA "
                                  f"devices, this run is on {self.device}; set it to false")
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        if self._channels_last():
            model = model.to(memory_format=self._memory_format())
        opt = build_optimizer(model, tc)
        return model, opt, build_scheduler(opt, tc)

    def _load_resume_checkpoint(self) -> dict | None:
        if not self.resume:
            return None
        ckpt = load_checkpoint(self.run_dir / "last.pt")
        if self.info.is_main:
            done, step = int(ckpt["epoch"]), int(ckpt.get("step", 0))
            where = f"epoch {done + 1}" + (f", step {step + 1} (mid-epoch checkpoint)"
                                           if step else "")
            print(f"[scse_seg] resuming {self.run_dir} from {where}: {done} of "
                  f"{self.cfg.train.epochs} epochs done", flush=True)
        return ckpt

    def _class_weights(self, data: PreparedData) -> torch.Tensor | None:
        """Computed once on rank 0 and broadcast to every rank (on self.device: an NCCL process
        group moves CUDA tensors only)."""
        if self.cfg.loss.class_weighting == "none":
            return None
        w = torch.zeros(data.num_classes, dtype=torch.float32, device=self.device)
        if self.info.is_main:
            w.copy_(torch.as_tensor(class_weights(data.sample_class_counts,
                                                  self.cfg.loss.class_weighting)))
        return ddp.broadcast_(w, self.info)

    def _write_run_files(self, data: PreparedData, weights: torch.Tensor | None) -> None:
        """config.yaml, split.json and class_weights.json: what the run was, before epoch 1."""
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for tmp in self.run_dir.glob(".*.tmp"):  # temp files of a write killed half-way
            tmp.unlink(missing_ok=True)
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

    def _distribute(self, model, data: PreparedData):
        """(the network to train: DDP-wrapped under torchrun, the sampler that shards the data)."""
        if not self.info.enabled:
            return model, None
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        sampler = torch.utils.data.DistributedSampler(
            data.train_set, num_replicas=self.info.world_size, rank=self.info.rank, shuffle=True,
            seed=self.cfg.seed, drop_last=False)
        return net, sampler

    def _loader(self, data: PreparedData, sampler, epoch: int) -> DataLoader:
        """This epoch's batches, in an order fixed by ``seed`` and ``epoch`` alone."""
        tc, seed = self.cfg.train, self.cfg.seed * 1000 + epoch
        seed_everything(seed)
        _reseed_augmentation(data.train_set, seed)
        if sampler is not None:
            sampler.set_epoch(epoch)
        # a last batch of one sample cannot be batch-normalised where the map is 1 voxel (the
        # bottleneck of a 16-voxel patch): drop it; any other remainder is trained on
        per_rank = len(sampler) if sampler is not None else len(data.train_set)
        drop_single = tc.batch_size > 1 and per_rank % tc.batch_size == 1
        return DataLoader(data.train_set, batch_size=tc.batch_size, shuffle=sampler is None,
                          sampler=sampler, num_workers=tc.num_workers,
                          generator=torch.Generator().manual_seed(seed),
                          pin_memory=self.device.type == "cuda", drop_last=drop_single,
                          worker_init_fn=_worker_init, persistent_workers=False)

    def _announce(self, data: PreparedData) -> None:
        """One line saying what is trained where (after every input check: an error stays the
        only line on stderr), and a warning when the CPU is already busy."""
        cfg, info, batch = self.cfg, self.info, self.cfg.train.batch_size
        busy = busy_warning(torch.get_num_threads(), self.device)
        if busy:
            print(f"warning: {busy}", file=sys.stderr, flush=True)
        channels = f", {data.in_channels} channels" if data.in_channels > 1 else ""
        print(f"[scse_seg] {cfg.model.arch}+{cfg.model.attention} dim={cfg.model.dim} | "
              f"{len(data.train_set)} training samples, {len(data.val_volumes)} validation "
              f"volumes, {data.num_classes} classes{channels} | batch {batch}/process x "
              f"{info.world_size} = {batch * info.world_size} global | device "
              f"{self.device} | run folder {self.run_dir}", flush=True)

    # ----------------------------------------------------------------- main loop
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
        ckpt = self._load_resume_checkpoint()
        self._set_deterministic()
        data = prepare_data(cfg, info.is_main, self.progress, barrier=lambda: ddp.barrier(info))
        if ckpt is not None:
            check_compatible(ckpt, cfg, data, self.run_dir)
        weights = self._class_weights(data)
        self.data = data
        self.model, self.opt, self.sched = self._build(data)
        self.scaler = torch.amp.GradScaler("cuda", enabled=(self._amp_dtype() == torch.float16))
        loss_fn = SegmentationLoss(weights, cfg.loss.boundary_weight,
                                   cfg.loss.dice_weight).to(self.device)
        start_epoch, start_step, self.best, self.history = 1, 0, -1.0, []
        if ckpt is not None:
            restore(ckpt, self.model, self.opt, self.sched, self.scaler)
            continue_schedule(self.opt, self.sched, tc)
            start_epoch, self.best = int(ckpt["epoch"]) + 1, float(ckpt["best_dice"])
            self.history, start_step = list(ckpt.get("history", [])), int(ckpt.get("step", 0))
        if info.is_main:
            self._write_run_files(data, weights)
            self._announce(data)
        net, sampler = self._distribute(self.model, data)
        tb = _tensorboard(self.run_dir) if info.is_main else None
        for epoch in range(start_epoch, tc.epochs + 1):
            loader = self._loader(data, sampler, epoch)
            resume_at = (start_step, ckpt.get("partial"), ckpt.get("rng")) \
                if epoch == start_epoch and start_step else None
            t0 = time.perf_counter()
            loss, samples, skipped, before = self._train_epoch(net, loader, loss_fn, epoch,
                                                               resume_at)
            self.sched.step()
            row, improved = self._epoch_row(epoch, loss, samples, skipped,
                                            time.perf_counter() - t0 + before)
            if info.is_main:
                self._save_epoch(row, improved, tb)
            ddp.barrier(info)
        if tb is not None:
            tb.close()
        best_epoch = next((int(r["epoch"]) for r in self.history if r["val_dice"] == self.best),
                          None)
        return dict(run_dir=str(self.run_dir), history=self.history, best_dice=self.best,
                    best_epoch=best_epoch, class_names=data.class_names, config=cfg.to_dict())

    def _state(self, epoch_done: int, **extra) -> dict:
        return training_state(self.model, self.opt, self.sched, self.scaler, self.cfg, self.data,
                              epoch_done, self.best, self.history, **extra)

    def _save_mid_epoch(self, epoch: int, step: int, partial: dict) -> None:
        """last.pt after ``step`` steps of ``epoch``: what resuming there needs (the epoch's
        data order is replayed from its seed; the RNG state is restored)."""
        if self.info.is_main:
            save_checkpoint(self._state(epoch - 1, step=step, partial=partial, rng=rng_state()),
                            self.run_dir / "last.pt")

    def _epoch_row(self, epoch: int, loss: float, samples: int, skipped: int,
                   seconds: float) -> tuple[dict, bool]:
        """Validate: the epoch's log row (appended to the history) and whether its Dice is the
        best so far."""
        dice = dice_from_counts(self._validate(self.model, self.data))  # (V, K)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            per_class = np.nanmean(dice[:, 1:], axis=0) if len(dice) else np.array([])
            mean = float(np.nanmean(np.nanmean(dice[:, 1:], axis=1))) if len(dice) \
                else float("nan")
        row = dict(epoch=epoch, train_loss=loss, val_dice=mean, lr=self.opt.param_groups[0]["lr"],
                   seconds=seconds,
                   samples_per_s=samples * self.info.world_size / max(seconds, 1e-9),
                   skipped_batches=skipped)
        row.update({f"dice_{n}": float(d) for n, d in zip(self.data.class_names[1:], per_class)})
        self.history.append(row)
        improved = mean > self.best
        self.best = max(self.best, mean) if not math.isnan(mean) else self.best
        return row, improved

    def _save_epoch(self, row: dict, improved: bool, tb) -> None:
        epoch = row["epoch"]
        end_state = self._state(epoch)
        # best.pt before last.pt: a kill during either write leaves last.pt at the previous
        # epoch, so --resume redoes this epoch and writes both again
        if improved:
            save_checkpoint(end_state, self.run_dir / "best.pt")
        save_checkpoint(end_state, self.run_dir / "last.pt")
        _write_log(self.run_dir / "log.csv", self.history)
        if tb is not None:
            for k, v in row.items():
                if k != "epoch":
                    tb.add_scalar(k, v, epoch)
        print(f"epoch {epoch}/{self.cfg.train.epochs}  loss {row['train_loss']:.4f}  val Dice "
              f"{row['val_dice']:.4f}  ({row['samples_per_s']:.1f} samples/s)", flush=True)

    def _train_epoch(self, net, loader, loss_fn, epoch, resume_at=None):
        """One epoch; ``resume_at = (steps done, their loss/count stats, RNG state)`` continues
        it from a mid-epoch checkpoint. Returns (mean loss, samples, skipped batches, seconds
        spent before the checkpoint)."""
        tc = self.cfg.train
        from tqdm.auto import tqdm

        net.train()
        total, count, skipped, before, done = 0.0, 0, 0, 0.0, 0
        steps = len(loader) if tc.max_steps_per_epoch is None \
            else min(len(loader), tc.max_steps_per_epoch)
        batches = iter(loader)
        if resume_at is not None:
            done, partial, rng = resume_at
            for _ in range(done):  # the same batches in the same order, augmentation included
                next(batches)
            set_rng_state(rng)  # as after step `done` of the uninterrupted run (dropout, ...)
            total, count, skipped = float(partial["total"]), int(partial["count"]), \
                int(partial["skipped"])
            before = float(partial["seconds"])
        bar = tqdm(total=steps, initial=done, desc=f"epoch {epoch}", unit="batch", leave=False,
                   disable=not show_progress(self.progress and self.info.is_main))
        t0 = time.perf_counter()
        for step, (x, y) in enumerate(batches, start=done + 1):
            if step > steps:
                break
            loss = self._step(net, x, y, loss_fn, epoch, step)
            if loss is None:
                skipped += 1
                continue
            total += loss * x.shape[0]
            count += x.shape[0]
            bar.set_postfix(loss=f"{total / count:.4f}",
                            speed=f"{count / (before + time.perf_counter() - t0):.1f}/s")
            bar.update(1)
            if tc.checkpoint_every_steps and step % tc.checkpoint_every_steps == 0 \
                    and step < steps:
                self._save_mid_epoch(epoch, step, dict(total=total, count=count, skipped=skipped,
                                                       seconds=before + time.perf_counter() - t0))
        bar.close()
        stats = ddp.all_reduce_sum(torch.tensor([total, count], dtype=torch.float64,
                                                device=self.device), self.info)
        total, n_all = stats.tolist()
        return total / max(n_all, 1), count, skipped, before

    def _step(self, net, x, y, loss_fn, epoch: int, step: int) -> float | None:
        """One optimiser step; the batch's loss, or None for a skipped non-finite one."""
        tc, opt, scaler = self.cfg.train, self.opt, self.scaler
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        if self._channels_last():
            x = x.contiguous(memory_format=self._memory_format())
        amp_dtype = self._amp_dtype()
        with torch.autocast(self.device.type, dtype=amp_dtype or torch.float32,
                            enabled=amp_dtype is not None):
            loss = loss_fn(net(x), y)
        if not torch.isfinite(loss):
            if tc.nan_policy == "skip":
                opt.zero_grad(set_to_none=True)
                return None
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
        return loss.item()

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
            "times slower. On a shared machine set train.threads=1 (README: Quick start)")


def cuda_reproducibility_note(arch: str) -> str | None:
    """What deterministic mode cannot make bit-reproducible on CUDA (printed once per run)."""
    if arch in ("densenet", "sdnet"):
        return (f"{arch} uses max_unpool, which has no deterministic CUDA kernel: CUDA runs of it "
                "are not bit-reproducible (CPU runs and the other architectures are)")
    return None


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
