"""Architectures: shapes for every arch x attention x dim, attention placement and overhead."""
import pytest
import torch

from scse_seg.blocks import attention_names
from scse_seg.models import EncoderDecoder, count_parameters, create_model, model_names
from scse_seg.models.summary import parameter_table

PAPER = ["unet", "densenet", "sdnet"]
SMALL = dict(width=4)


def _input(dim, n=2, size=16):
    return torch.randn(n, 1, *([size] * dim))


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("attention", ["none", "cse", "sse", "scse", "cbam"])
@pytest.mark.parametrize("arch", PAPER)
def test_forward_backward_shapes(arch, attention, dim):
    torch.manual_seed(0)
    model = create_model(arch, 1, 3, attention=attention, dim=dim, **SMALL)
    x = _input(dim)
    y = model(x)
    assert y.shape == (2, 3, *x.shape[2:])
    y.mean().backward()
    model.eval()
    with torch.no_grad():
        assert model(_input(dim, n=1)).shape == (1, 3, *x.shape[2:])  # odd batch, eval mode


@pytest.mark.parametrize("attention", ["none", "scse"])
def test_smp_unet(attention):
    model = create_model("smp_unet", 1, 4, attention=attention, encoder_name="resnet18")
    x = torch.randn(1, 1, 64, 64)
    y = model(x)
    assert y.shape == (1, 4, 64, 64)
    y.mean().backward()
    with pytest.raises(ValueError, match="2D only"):
        create_model("smp_unet", 1, 4, dim=3)


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("arch", PAPER + ["smp_unet"])
@pytest.mark.parametrize("attention", ["cse", "sse", "scse", "cbam"])
def test_every_attention_used_and_distinct(arch, attention, dim):
    """The authors' code built unused and shared SE layers; every parameter of every one of ours
    must get a non-zero gradient, in 2D and in 3D."""
    if arch == "smp_unet" and dim == 3:
        pytest.skip("smp encoders are 2D only")
    torch.manual_seed(0)
    kw = dict(encoder_name="resnet18") if arch == "smp_unet" else SMALL
    model = create_model(arch, 1, 3, attention=attention, dim=dim, **kw)
    mods = model.attention_modules()
    expected = 10 if arch == "smp_unet" else 9  # smp: 5 encoder stages + 5 decoder blocks
    assert len(mods) == expected
    assert len({id(m) for m in mods}) == len(mods)
    with torch.no_grad():  # positive biases: no MLP unit starts dead (a ReLU at 0 passes no
        for m in mods:      # gradient, which says nothing about the wiring tested here)
            for name, p in m.named_parameters():
                if name.endswith("bias"):
                    p.fill_(1.0)
    size = 64 if arch == "smp_unet" else (32 if dim == 2 else 16)
    n = 2 if dim == 2 else 3  # 3D: 16^3 pools to 1 voxel; BatchNorm needs > 1 value per channel
    model(torch.randn(n, 1, *([size] * dim))).square().mean().backward()
    for i, m in enumerate(mods):
        params = dict(m.named_parameters())
        assert params, f"attention {i} has no parameters"
        for name, p in params.items():
            assert p.grad is not None, f"attention {i} {name} is not in the graph"
            assert p.grad.abs().sum() > 0, f"attention {i} {name} got a zero gradient"


def test_bottleneck_attention_option():
    on = create_model("unet", 1, 2, "scse", **SMALL)
    off = create_model("unet", 1, 2, "scse", bottleneck_attention=False, **SMALL)
    assert count_parameters(on) > count_parameters(off)
    assert type(off.bottleneck.attention).__name__ == "NoAttention"


def test_input_size_checked():
    model = create_model("sdnet", 1, 2, "scse", **SMALL)
    assert model(torch.randn(1, 1, 48, 80)).shape[-2:] == (48, 80)  # any multiple of 16
    with pytest.raises(ValueError, match="divisible by 16"):
        model(torch.randn(1, 1, 40, 40))


def test_unknown_arch_and_attention():
    with pytest.raises(ValueError, match="valid names"):
        create_model("vnet", 1, 2)
    with pytest.raises(ValueError, match="valid names"):
        create_model("unet", 1, 2, attention="se")
    assert set(PAPER) <= set(model_names())
    assert {"none", "cse", "sse", "scse", "cbam"} <= set(attention_names())


def test_parameter_overhead_matches_paper_range():
    """scSE costs 0.3-3% extra parameters with 64 filters and r=2 (papers: about 1.5%) when placed
    after every encoder and decoder block only, as the papers' text says. The library default
    (README "Attention placement") also recalibrates the bottleneck, as the authors' QuickNAT code
    does; for U-Net's 1024-channel bottleneck that alone adds one scSE of 1024 channels (~3.4%)."""
    paper = parameter_table(PAPER, ("none", "scse"), num_classes=28, reduction=2,
                            bottleneck_attention=False)
    default = parameter_table(PAPER, ("none", "scse"), num_classes=28, reduction=2)
    params = {(t, r["arch"], r["attention"]): r["params"] for t, rows in (("paper", paper),
              ("default", default)) for r in rows}
    c = 1024  # cSE: C -> C/2 -> C linear layers with biases; sSE: a 1x1 conv C -> 1 with bias
    assert params["default", "unet", "scse"] - params["paper", "unet", "scse"] == \
        (c * c // 2 + c // 2) + (c // 2 * c + c) + (c + 1)
    for row in paper:
        if row["attention"] == "scse":
            assert 0.3 <= row["overhead_pct"] <= 3.0, row
    assert all(isinstance(m, EncoderDecoder) for m in [create_model(a, 1, 2, **SMALL) for a in PAPER])


def test_registry_records_size_multiple_without_building():
    """2 ** downsamplings: 4 max-pools in the paper networks and MONAI's 4 levels (16), smp's
    resnet34 has 5 stride-2 stages (32), 4 with encoder_depth=4 (16); the registry's figure is
    what the built model checks its input against."""
    from scse_seg.models import size_multiple

    expected = {"unet": 16, "densenet": 16, "sdnet": 16, "smp_unet": 32, "smp:FPN": 32,
                "monai:DynUNet": 16, "UNet": 16}
    for arch, value in expected.items():
        assert size_multiple(arch) == value, arch
    assert size_multiple("smp_unet", encoder_depth=4) == 16
    for arch in ("unet", "smp_unet", "smp:FPN", "monai:DynUNet"):
        kw = {} if arch.startswith("smp") else dict(width=4)
        assert create_model(arch, 1, 2, "scse", **kw).size_multiple == size_multiple(arch), arch
    with pytest.raises(ValueError, match="unknown architecture 'unt'; valid names: .*unet"):
        size_multiple("unt")
