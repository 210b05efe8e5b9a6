"""Where the decoder blocks (and encoder stages) are in networks people already use.

Only *where* is written here, as module names; the channel counts are measured by a shape probe
(:mod:`scse_seg.plug.insert`). A site either recalibrates the output tensor of a module, or (for
encoders that return a list of stage features, as every segmentation_models_pytorch encoder does)
element ``index`` of the list a module returns.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

WHERE = ("decoder", "encoder", "all", "smp")


@dataclass
class Site:
    name: str  # readable: module path, plus "[i]" for element i of a returned list
    module: nn.Module
    index: int | None = None


# segmentation_models_pytorch: decoder sites as names under ``model.decoder``. "*" expands to every
# child of a ModuleList/ModuleDict, in order; names that the built model lacks are left out (PAN has
# gau3/gau2/gau1 only for deep enough encoders).
SMP_DECODER = {
    "Unet": ["blocks.*"],
    "UnetPlusPlus": ["blocks.*"],
    "FPN": ["p5", "p4", "p3", "p2"],  # the top-down pyramid
    "Linknet": ["blocks.*"],
    "MAnet": ["blocks.*"],
    "PAN": ["fpa", "gau3", "gau2", "gau1"],
    "DeepLabV3Plus": ["aspp", "block2"],  # ASPP, then the block that fuses it with the skip
    "DeepLabV3": [""],  # one-stage decoder (ASPP head): its output
    "PSPNet": [""],  # one-stage decoder (pyramid pooling): its output
    "UPerNet": ["psp", "fpn_lateral_blocks.*"],  # pyramid pooling, then the top-down path
    "Segformer": ["mlp_stage.*", "fuse_stage"],
    "DPT": ["fusion_blocks.*"],
}
# smp's own ``decoder_attention_type`` sites: the skip concatenation (attention1, used only where a
# skip exists) and the block output (attention2), in UnetDecoderBlock and Unet++'s DecoderBlock.
SMP_OWN = {"Unet": ["blocks.*.attention1", "blocks.*.attention2"],
           "UnetPlusPlus": ["blocks.*.attention1", "blocks.*.attention2"]}
# encoders whose stage features are not a plain list: DPT's ViT returns (features, prefix tokens)
SMP_NO_ENCODER = {"DPT": "its ViT encoder returns token maps of one resolution, not stage features"}


def _expand(root: nn.Module, pattern: str) -> list[str]:
    """Module names under ``root`` matching ``pattern`` ("*" = every child), in registration order."""
    names = [""]
    for part in pattern.split(".") if pattern else []:
        nxt = []
        for n in names:
            mod = root.get_submodule(n) if n else root
            if part == "*":
                nxt += [f"{n}.{c}" if n else c for c, _ in mod.named_children()]
            elif hasattr(mod, part) and isinstance(getattr(mod, part), nn.Module):
                nxt.append(f"{n}.{part}" if n else part)
        names = nxt
    return names


def _named(model: nn.Module, prefix: str, patterns: list[str]) -> list[Site]:
    root = model.get_submodule(prefix)
    out = []
    for p in patterns:
        for n in _expand(root, p):
            full = ".".join(x for x in (prefix, n) if x)
            out.append(Site(full, model.get_submodule(full)))
    # interleave smp's attention1/attention2 per block (same order as smp runs them)
    return sorted(out, key=lambda s: _order(model, s.name))


def _order(model: nn.Module, name: str) -> int:
    for i, (n, _) in enumerate(model.named_modules()):
        if n == name:
            return i
    raise KeyError(name)


def _smp_class(model: nn.Module) -> str | None:
    try:
        import segmentation_models_pytorch as smp
    except ImportError:  # pragma: no cover - smp is a dependency
        return None
    for name in SMP_DECODER:
        cls = getattr(smp, name, None)
        if cls is not None and type(model) is cls:
            return name
    return None


def _monai_class(model: nn.Module) -> str | None:
    from monai.networks import nets

    for name in ("UNet", "BasicUNet", "DynUNet"):
        if type(model) is getattr(nets, name):
            return name
    return None


def _monai_unet_levels(model: nn.Module) -> tuple[list[str], list[str]]:
    """MONAI UNet nests ``Sequential(down, SkipConnection(inner), up)`` per level: the downs are
    the encoder stages, the ups the decoder blocks except the top one, which outputs the logits."""
    from monai.networks.layers import SkipConnection

    down, up, name, seq = [], [], "model", model.model
    while isinstance(seq, nn.Sequential) and len(seq) == 3 and isinstance(seq[1], SkipConnection):
        down.append(f"{name}.0")
        up.append(f"{name}.2")
        name, seq = f"{name}.1.submodule", seq[1].submodule
    return down, up[1:][::-1]  # decoder sites deepest first, in the order they run


def _monai_sites(model: nn.Module, cls: str, part: str) -> list[str]:
    if cls == "UNet":
        down, up = _monai_unet_levels(model)
        return down if part == "encoder" else up
    if cls == "BasicUNet":
        return (["conv_0", "down_1", "down_2", "down_3", "down_4"] if part == "encoder"
                else ["upcat_4", "upcat_3", "upcat_2", "upcat_1"])
    # DynUNet
    if part == "encoder":
        return ["input_block"] + [f"downsamples.{i}" for i in range(len(model.downsamples))]
    return [f"upsamples.{i}" for i in range(len(model.upsamples))]


def architecture(model: nn.Module) -> str | None:
    """"smp:Unet", "monai:DynUNet"... for a supported network, else None."""
    if (c := _smp_class(model)) is not None:
        return f"smp:{c}"
    if (c := _monai_class(model)) is not None:
        return f"monai:{c}"
    return None


def find_sites(model: nn.Module, where) -> list[Site]:
    """Sites of ``model`` for ``where``: "decoder", "encoder", "all", "smp" (smp's own two sites
    in Unet/Unet++), or a list of submodule names for any other network."""
    if not isinstance(where, str):
        names = list(where)
        missing = [n for n in names if not _has(model, n)]
        if missing:
            raise ValueError(f"where: no submodule named {missing}; names look like "
                             f"{[n for n, _ in list(model.named_modules())[1:4]]}")
        return [Site(n, model.get_submodule(n)) for n in names]
    if where not in WHERE:
        raise ValueError(f"unknown where={where!r}; valid: {', '.join(WHERE)} or a list of "
                         "submodule names")
    arch = architecture(model)
    if arch is None:
        raise ValueError(f"{type(model).__name__} is not a known architecture (supported: "
                         f"{', '.join(supported())}); pass where=[submodule names] to choose the "
                         "sites yourself")
    lib, cls = arch.split(":")
    if where == "smp":
        if cls not in SMP_OWN or lib != "smp":
            raise ValueError(f"where='smp' reproduces smp's decoder_attention_type sites, which "
                             f"only {', '.join(SMP_OWN)} have; {cls} has none")
        return _named(model, "decoder", SMP_OWN[cls])
    parts = ["encoder", "decoder"] if where == "all" else [where]
    sites: list[Site] = []
    for part in parts:
        if lib == "monai":
            sites += [Site(n, model.get_submodule(n)) for n in _monai_sites(model, cls, part)]
        elif part == "decoder":
            sites += _named(model, "decoder", SMP_DECODER[cls])
        else:
            if cls in SMP_NO_ENCODER:
                raise ValueError(f"smp {cls}: no encoder sites, {SMP_NO_ENCODER[cls]}; use "
                                 "where='decoder'")
            n_feats = len(model.encoder.out_channels)
            # feature 0 is the input image itself
            sites += [Site(f"encoder[{i}]", model.encoder, i) for i in range(1, n_feats)]
    return sites


def _has(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False


def supported() -> list[str]:
    return [f"smp:{c}" for c in SMP_DECODER] + ["monai:UNet", "monai:BasicUNet", "monai:DynUNet"]
