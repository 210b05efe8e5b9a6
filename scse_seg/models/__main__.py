"""``python -m scse_seg.models``: parameter count and attention overhead of every architecture,
and the parameters of every attention and conv block at ``--block-channels`` (64) channels."""
import argparse

from .summary import PAPER_ARCHS, block_parameter_table, format_block_table, format_table, parameter_table

parser = argparse.ArgumentParser(prog="python -m scse_seg.models", description=__doc__)
parser.add_argument("--classes", type=int, default=28, help="number of output classes (default 28)")
parser.add_argument("--in-channels", type=int, default=1)
parser.add_argument("--dim", type=int, default=2, choices=(2, 3))
parser.add_argument("--reduction", type=float, default=16, help="SE reduction ratio r (default 16)")
parser.add_argument("--block-channels", type=int, default=64,
                    help="width of the per-block parameter table (default 64)")
parser.add_argument("--no-smp", action="store_true", help="skip the smp_unet (resnet34) rows")
parser.add_argument("--no-bottleneck-attention", action="store_true",
                    help="attention after encoder and decoder blocks only (the papers' text); "
                         "default: also at the bottleneck (the authors' code, library default)")
args = parser.parse_args()
kw = {"bottleneck_attention": False} if args.no_bottleneck_attention else {}
# smp_unet has no separate bottleneck block (its deepest encoder stage is recalibrated always)
archs = PAPER_ARCHS if (args.no_smp or args.dim == 3 or args.no_bottleneck_attention) \
    else PAPER_ARCHS + ("smp_unet",)
print(format_table(parameter_table(archs, in_channels=args.in_channels, num_classes=args.classes,
                                   dim=args.dim, reduction=args.reduction, **kw)))
print(f"\nPer block, C = {args.block_channels} (in = out), dim = {args.dim}, reduction "
      f"{args.reduction:g} for the attentions and CMPE-SE, papers' defaults otherwise:\n")
print(format_block_table(block_parameter_table(args.block_channels, args.dim, args.reduction)))
