"""Launched by torchrun from test_distributed.py: train under DDP (``--resume``: continue the run
in the run folder), then save this rank's parameters and the list of files it opened for writing
inside the run folder.

    ddp_worker.py RUN_DIR DUMP_DIR [--resume] key=value...
"""
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scse_seg.config import build_config, parse_override  # noqa: E402
from scse_seg.training import Trainer  # noqa: E402

run_dir, dump_dir = Path(sys.argv[1]), Path(sys.argv[2])
resume = len(sys.argv) > 3 and sys.argv[3] == "--resume"
overrides = [parse_override(o) for o in sys.argv[4 if resume else 3:]]
rank = int(os.environ["RANK"])
writes = []


def audit(event, args):
    """Record every file this process opens for writing inside the run folder."""
    if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
        path, mode, flags = args[0], args[1], args[2] if len(args) > 2 else 0
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or \
            (isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
        if writing and str(os.fsdecode(path)).startswith(str(run_dir)):
            writes.append(os.fsdecode(path))


sys.addaudithook(audit)
cfg = build_config([], overrides)
trainer = Trainer(cfg, run_dir, resume=resume)
trainer.fit()
dump_dir.mkdir(parents=True, exist_ok=True)
torch.save({k: v.detach().clone() for k, v in trainer.model.named_parameters()},
           dump_dir / f"rank{rank}.pt")
(dump_dir / f"rank{rank}_writes.json").write_text(json.dumps(writes))
