"""torchrun with 2 CPU processes (gloo): identical weights on both ranks, equal to one process
doing the same step on the same global batch, only rank 0 writes files, and --resume works."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from helpers import ROOT

from scse_seg.config import build_config, parse_override
from scse_seg.data.prepare import prepare_data
from scse_seg.training import SegmentationLoss, Trainer, median_frequency_weights
from scse_seg.training.distributed import DistInfo

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available in this torch build")

PER_RANK_BATCH = 4
# Every augmentation probability at 0: data.augment={} would NOT switch augmentation off, since a
# dict value is merged into the default dict (affine 0.5, brightness_contrast 0.3, noise 0.2).
NO_AUGMENT = "data.augment={affine: 0, elastic: 0, flip: false, brightness_contrast: 0, noise: 0}"


def _overrides(data, out, epochs=1):
    return [f"data.path={data}", f"out={out}", f"train.epochs={epochs}",
            "train.max_steps_per_epoch=1", f"train.batch_size={PER_RANK_BATCH}", "model.width=4",
            NO_AUGMENT, "train.progress=false", "train.device=cpu",
            # SGD: the update is linear in the gradient (Adam's first step is ~lr*sign(g), which
            # turns float rounding in near-zero gradients into lr-sized differences). A large lr
            # makes the step large against the float tolerance; the small grad_clip is active
            # (the gradient norm is ~0.05), so clipping of the averaged gradient is checked too.
            "train.optimizer=sgd", "train.lr=1.0", "train.grad_clip=0.01"]


def _torchrun(run_dir, dump, args, resume=False):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "ddp_worker.py"), str(run_dir), str(dump),
           *(["--resume"] if resume else []), *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    w0 = torch.load(dump / "rank0.pt", weights_only=True)
    w1 = torch.load(dump / "rank1.pt", weights_only=True)
    writes = [json.loads((dump / f"rank{k}_writes.json").read_text()) for k in (0, 1)]
    return r, w0, w1, writes


@pytest.fixture(scope="module")
def ddp_run(tiny_phantom, tmp_path_factory):
    """One torchrun launch (2 ranks, 1 epoch of 1 step), shared by the tests below."""
    tmp = tmp_path_factory.mktemp("ddp")
    run_dir = tmp / "run"
    return (run_dir, tmp, *_torchrun(run_dir, tmp / "dump", _overrides(tiny_phantom, run_dir)))


def test_torchrun_two_processes(tiny_phantom, ddp_run):
    run_dir, tmp, r, w0, w1, writes = ddp_run
    # (a) both ranks hold identical parameters
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k
    # (c) only rank 0 wrote into the run folder
    assert writes[1] == []
    assert any(p.endswith("last.pt") or ".last.pt." in p for p in writes[0])
    assert "batch 4/process x 2 = 8 global" in r.stdout

    # (b) one process, same initial weights, same 8 samples: mean of the two half-batch
    # gradients (DDP's all-reduce average of the per-rank losses, each a mean over its own 4
    # samples; BatchNorm statistics and the batch soft Dice stay per rank, as DDP without
    # SyncBatchNorm does) -> gradient clipping of that average -> one optimiser step
    cfg = build_config([], [parse_override(o) for o in _overrides(tiny_phantom, tmp / "r")])
    data = prepare_data(cfg, progress=False)
    assert data.train_set.transform is None  # really no augmentation (see NO_AUGMENT)
    trainer = Trainer(cfg, tmp / "ref")
    model, opt, _ = trainer._build(data)  # seeds with cfg.seed before building, as fit() does
    init = {k: v.detach().clone() for k, v in model.named_parameters()}
    w = torch.as_tensor(median_frequency_weights(data.class_counts), dtype=torch.float32)
    loss_fn = SegmentationLoss(w, cfg.loss.boundary_weight, cfg.loss.dice_weight)
    torch.manual_seed(cfg.seed * 1000 + 1)  # fit() re-seeds every epoch (dropout, if any)
    opt.zero_grad()
    for rank in (0, 1):
        sampler = torch.utils.data.DistributedSampler(data.train_set, num_replicas=2, rank=rank,
                                                      shuffle=True, seed=cfg.seed)
        sampler.set_epoch(1)  # fit() calls set_epoch(epoch) with epochs counted from 1
        idx = list(sampler)[:PER_RANK_BATCH]
        x = torch.stack([data.train_set[i][0] for i in idx])
        y = torch.stack([data.train_set[i][1] for i in idx])
        (loss_fn(model(x), y) / 2).backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
    assert norm > cfg.train.grad_clip  # clipping is active in this step
    opt.step()
    # the step is large against the tolerance, so a wrong gradient cannot pass unnoticed
    assert max((w0[k] - init[k]).abs().max().item() for k in init) > 1e-3
    for k, v in model.named_parameters():
        torch.testing.assert_close(v.detach(), w0[k], rtol=1e-5, atol=1e-6, msg=k)


def test_torchrun_resume(tiny_phantom, ddp_run):
    """--resume under DDP: every rank loads last.pt (model, optimizer, scheduler), training goes
    on from epoch 2 only, the ranks stay identical, and rank 1 still writes nothing."""
    run_dir, tmp, *_ = ddp_run
    r, w0, w1, writes = _torchrun(run_dir, tmp / "dump_resumed",
                                  _overrides(tiny_phantom, run_dir, epochs=2), resume=True)
    assert "epoch 2/2" in r.stdout and "epoch 1/2" not in r.stdout
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k
    assert writes[1] == []
    ckpt = torch.load(run_dir / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and [row["epoch"] for row in ckpt["history"]] == [1, 2]


def test_sync_batchnorm_on_cpu_is_a_config_error(tiny_phantom, tmp_path):
    from scse_seg.errors import ConfigError

    cfg = build_config([], [parse_override(o) for o in
                            [*_overrides(tiny_phantom, tmp_path / "r"), "train.sync_batchnorm=true"]])
    trainer = Trainer(cfg, tmp_path / "r")
    trainer.info = DistInfo(launched=True)  # as under torchrun
    with pytest.raises(ConfigError, match="train.sync_batchnorm"):
        trainer._build(prepare_data(cfg, progress=False))
