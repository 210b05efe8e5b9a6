"""Optimizer and learning-rate schedule, and how a resumed run continues the schedule."""
from __future__ import annotations

import math

import torch


def build_optimizer(model: torch.nn.Module, tc) -> torch.optim.Optimizer:
    """``train.optimizer``: SGD with Nesterov momentum (the papers' choice), Adam or AdamW."""
    if tc.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=tc.lr, momentum=tc.momentum,
                               weight_decay=tc.weight_decay, nesterov=True)
    cls = torch.optim.AdamW if tc.optimizer == "adamw" else torch.optim.Adam
    return cls(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)


def lr_factor(tc):
    """The factor on ``train.lr`` after a number of finished epochs: linear warm-up, then
    cosine, poly (0.9, nnU-Net's), step, or constant."""
    def f(epoch: int) -> float:
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


def build_scheduler(opt: torch.optim.Optimizer, tc):
    return torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(tc))


def continue_schedule(opt: torch.optim.Optimizer, sched, tc) -> None:
    """After loading a checkpoint: the schedule or ``train.lr`` may have changed (e.g. --epochs
    extended), so this epoch's learning rate is recomputed from the current settings."""
    f = lr_factor(tc)
    sched.base_lrs = [tc.lr] * len(opt.param_groups)
    for group in opt.param_groups:
        group["lr"], group["initial_lr"] = tc.lr * f(sched.last_epoch), tc.lr
