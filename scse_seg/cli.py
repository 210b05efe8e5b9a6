"""Command line of ``train_seg.py``: config files, flags and key=value overrides -> Trainer."""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

from .errors import UserError

EPILOG = """examples:
  python train_seg.py --attn scse                       # built-in phantom, U-Net + scSE
  python train_seg.py --arch densenet --attn cse --data ../shared/data/Task04_Hippocampus
  python train_seg.py --arch unet --block sk --attn scse   # selective-kernel blocks + scSE
  python train_seg.py --config configs/hippocampus.yaml train.lr=3e-4 model.width=32
  python train_seg.py --resume runs/phantom-unet-scse-2d-w16-s0 --epochs 20
  torchrun --nproc_per_node=2 train_seg.py --config configs/lpba40.yaml

Any config key can be set as key=value (dotted, e.g. train.batch_size=8); see configs/default.yaml
for every key. Relative paths inside a config file (data.path, data.phantom_dir, out) start from
the project root (the folder above the file holding pyproject.toml), paths on the command line
from the current folder. Errors in input files or settings print one line and exit with status 2."""


def build_parser() -> argparse.ArgumentParser:
    from .blocks import attention_names, block_names
    from .models import model_names

    p = argparse.ArgumentParser(
        prog="train_seg.py", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Train a segmentation network with squeeze-and-excitation recalibration "
                    "(cSE / sSE / scSE, Roy et al. 2018/2019) on 2D slices or 3D patches.")
    p.add_argument("--config", action="append", default=[], metavar="FILE",
                   help="YAML config file (repeatable; later files override earlier ones)")
    p.add_argument("--arch", help=f"architecture: {', '.join(model_names())} (model.arch)")
    p.add_argument("--attn", "--attention", dest="attn",
                   help=f"attention after every encoder/decoder block: "
                        f"{', '.join(attention_names())} (model.attention)")
    p.add_argument("--block",
                   help=f"conv block of every stage: {', '.join(block_names())}; cmpe_se* "
                        "attentions need residual (model.block; unet and sdnet; default: the "
                        "architecture's own)")
    p.add_argument("--data", metavar="PATH",
                   help="dataset folder in MSD/nnU-Net layout (imagesTr/, labelsTr/, "
                        "dataset.json); default: the built-in synthetic phantom (data.path)")
    p.add_argument("--epochs", type=int, help="number of epochs (train.epochs)")
    p.add_argument("--dim", type=int, choices=(2, 3), help="2 = slices, 3 = patches (model.dim)")
    p.add_argument("--seed", type=int, help="random seed (seed)")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (train.device)")
    p.add_argument("--out", metavar="DIR",
                   help="run folder (default runs/DATASET-ARCH-ATTN-DIMd-wWIDTH-sSEED, prefixed "
                        "with a config's experiment name)")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue the run in RUN_DIR from its last checkpoint; flags given here "
                        "(e.g. --epochs) override its saved config")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (train.progress)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="override any config key, e.g. train.lr=3e-4 data.axis=axial")
    return p


def _check_name(flag: str, value: str | None, valid: list[str], what: str) -> None:
    """--arch / --attn: names are case-insensitive; an unknown one is a one-line error."""
    if value is not None and value.lower() not in {v.lower() for v in valid}:
        raise UserError(f"{flag}: unknown {what} {value!r}; valid: {', '.join(valid)} "
                        "(case-insensitive)")


def config_from_args(args):
    from .blocks import attention_names, block_names
    from .config import build_config, parse_override
    from .models import model_names

    _check_name("--arch", args.arch, model_names(), "architecture")
    _check_name("--attn", args.attn, attention_names(), "attention")
    _check_name("--block", args.block, block_names(), "block")
    files = list(args.config)
    saved = None
    overrides = []  # flags first, then key=value (the most specific) last
    flags = {}
    for flag, key in (("arch", "model.arch"), ("attn", "model.attention"), ("block", "model.block"),
                      ("data", "data.path"),
                      ("epochs", "train.epochs"), ("dim", "model.dim"), ("seed", "seed"),
                      ("device", "train.device"), ("out", "out")):
        value = getattr(args, flag)
        if value is not None:
            flags[key] = value
    if args.no_progress:
        flags["train.progress"] = False
    if args.resume:
        saved = Path(args.resume) / "config.yaml"
        if not saved.is_file():
            raise UserError(f"--resume {args.resume}: {saved} not found; pass the folder of an "
                            "earlier run (it holds config.yaml and last.pt)")
        flags["out"] = str(args.resume)
    for key, value in flags.items():
        node: dict = {}
        cur = node
        parts = key.split(".")
        for part in parts[:-1]:
            cur = cur.setdefault(part, {})
        cur[parts[-1]] = value
        overrides.append(node)
    overrides += [parse_override(o) for o in args.overrides]
    return build_config(files, overrides, saved=saved)


def done_line(result: dict) -> str:
    """The closing summary: which epoch's Dice is shown, and which checkpoint evaluation uses."""
    h = result["history"]
    last, best_epoch = h[-1] if h else {}, result.get("best_epoch")
    return (f"done: validation Dice {float(last.get('val_dice', float('nan'))):.4f} at the last "
            f"epoch ({last.get('epoch', '?')}, last.pt), best {result['best_dice']:.4f} at epoch "
            f"{best_epoch} (best.pt); eval/evaluate.py, predict.py and compare.py use last.pt "
            f"(--checkpoint best.pt for the best); run folder {result['run_dir']}")


def write_curves(result: dict) -> Path | None:
    """The run's own loss / Dice curves (run_dir/curves.png); a missing plotting backend only
    costs the figure, never the run."""
    try:
        from .evaluation.plots import training_curves

        cfg = result.get("config") or {}
        model = cfg.get("model", {})
        name = f"{model.get('arch', 'run')}"
        return training_curves({name: {model.get("attention", ""): [result["history"]]}},
                               Path(result["run_dir"]) / "curves.png")
    except ImportError as e:  # matplotlib missing
        print(f"warning: curves.png not written ({e})", file=sys.stderr)
        return None
    except OSError as e:  # full disk: the run itself is saved
        raise UserError(f"could not write {Path(result['run_dir']) / 'curves.png'} "
                        f"({e.strerror or e}); the run finished and its checkpoints are saved: "
                        "free disk space and rerun the same command with --resume to redraw it"
                        ) from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    run_dir = args.resume or args.out or "RUN_DIR"
    try:
        from .training import Trainer

        cfg = config_from_args(args)
        run_dir = cfg.run_dir()
        result = Trainer(cfg, run_dir, resume=bool(args.resume)).fit()
        if os.environ.get("RANK", "0") == "0":  # under torchrun, one summary line, from rank 0
            write_curves(result)
            print(done_line(result))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"interrupted; resume with: python train_seg.py --resume {run_dir}", file=sys.stderr)
        return 130
    return 0
