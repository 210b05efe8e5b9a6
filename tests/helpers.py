"""Shared helpers for the end-to-end tests: a tiny phantom and fast training settings."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

# Tiny and fast on 2 CPU cores: 4 small volumes, width-4 networks, 3 steps per epoch.
FAST = ["model.width=4", "train.batch_size=8", "train.max_steps_per_epoch=3",
        "train.val_batch_size=64", "data.augment={affine: 0.5, noise: 0.5}", "--no-progress"]


def phantom_args(root: Path) -> list[str]:
    return ["--data", str(root)]


def run_cli(args: list[str], env: dict | None = None, timeout: int = 300):
    """Run train_seg.py in a subprocess (exit status and stderr as a user sees them)."""
    return subprocess.run([sys.executable, str(ROOT / "train_seg.py"), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT,
                          # same thread count as this process (conftest), so that runs compared
                          # bit for bit with an in-process reference reduce in the same order
                          env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()),
                               **(env or {})})


def copy_smp_scse_weights(ours, theirs) -> None:
    """Copy smp's ``SCSEModule`` weights (1x1 convs) into our ConcurrentSE (linear cSE layers)."""
    c1, c2 = theirs.cSE[1], theirs.cSE[3]
    with torch.no_grad():
        ours.cse.excite.fc1.weight.copy_(c1.weight.flatten(1))
        ours.cse.excite.fc1.bias.copy_(c1.bias)
        ours.cse.excite.fc2.weight.copy_(c2.weight.flatten(1))
        ours.cse.excite.fc2.bias.copy_(c2.bias)
        ours.sse.conv.weight.copy_(theirs.sSE[0].weight)
        ours.sse.conv.bias.copy_(theirs.sSE[0].bias)


def model_from_checkpoint(run_dir: Path, in_channels: int):
    """A 2D run's network rebuilt from its last.pt with create_model alone (no
    scse_seg.predictor): the independent reference the by-hand prediction tests compare with."""
    from scse_seg.models import create_model

    ck = torch.load(Path(run_dir) / "last.pt", weights_only=True)
    m = ck["config"]["model"]
    model = create_model(m["arch"], in_channels, ck["num_classes"], m["attention"], 2,
                         width=m["width"], reduction=m["reduction"], fusion=m["fusion"],
                         bottleneck_attention=m["bottleneck_attention"])
    model.load_state_dict(ck["model"])
    return model.eval(), ck
