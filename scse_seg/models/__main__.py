"""``python -m scse_seg.models``: parameter count and attention overhead of every architecture."""
import argparse

from .summary import PAPER_ARCHS, format_table, parameter_table

parser = argparse.ArgumentParser(prog="python -m scse_seg.models", description=__doc__)
parser.add_argument("--classes", type=int, default=28, help="number of output classes (default 28)")
parser.add_argument("--in-channels", type=int, default=1)
parser.add_argument("--dim", type=int, default=2, choices=(2, 3))
parser.add_argument("--reduction", type=float, default=2, help="SE reduction ratio r (default 2)")
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
