"""Attention blocks: formulas, 2D/3D, and numerical agreement with smp and MONAI."""
import pytest
import torch
from helpers import copy_smp_scse_weights

from scse_seg.blocks import (
    CBAM,
    ChannelSE,
    ConcurrentSE,
    SpatialSE,
    attention_names,
    create_attention,
)


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("name", ["none", "cse", "sse", "scse", "cbam"])
def test_shape_and_grad(name, dim):
    x = torch.randn(2, 8, *([8] * dim), requires_grad=True)
    m = create_attention(name, 8, dim=dim)
    y = m(x)
    assert y.shape == x.shape
    y.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_unknown_name_lists_valid():
    with pytest.raises(ValueError) as e:
        create_attention("sce", 8)
    for n in attention_names():
        assert n in str(e.value)


def test_misspelt_option_raises():
    with pytest.raises(ValueError, match="fusoin"):
        create_attention("scse", 8, fusoin="max")


def test_option_the_attention_does_not_take_raises():
    """sSE has no MLP, so ``reduction`` means nothing to it: one line naming what it takes."""
    with pytest.raises(ValueError, match=r"^attention 'sse' takes no option reduction; valid "
                                         r"options: fused$"):
        create_attention("sse", 64, reduction=16)
    with pytest.raises(ValueError, match="valid options: none$"):
        create_attention("none", 8, fusion="max")


def test_option_none_means_the_attentions_own_default():
    """A checkpoint saved with ``reduction: null`` rebuilds scSE at its own r=16 (64 -> 4 hidden
    units) and P&E at its authors' r=2 (64 -> 32), not a TypeError."""
    assert create_attention("scse", 64, reduction=None).cse.excite.fc1.out_features == 4
    assert create_attention("pe", 64, reduction=None).reduce.out_channels == 32


def test_model_wide_options_reach_only_the_attentions_that_take_them():
    """A config's reduction/fusion serve every attention: create_model hands each block only
    its own options (sSE gets none, scSE both) and refuses a name no architecture or attention
    knows."""
    from scse_seg.blocks.registry import attention_options
    from scse_seg.models import create_model

    assert attention_options("sse", {"reduction": 16, "fusion": "add"}) == {}
    assert attention_options("scse", {"reduction": 16}) == {"reduction": 16}
    m = create_model("unet", 1, 2, "sse", width=4, reduction=16, fusion="add")
    assert {type(b).__name__ for b in m.attention_modules()} == {"SpatialSE"}
    m = create_model("unet", 1, 2, "scse", width=4, reduction=4, fusion="add")
    assert all(b.fusion == "add" and b.cse.excite.fc1.out_features == b.channels // 4
               for b in m.attention_modules())
    with pytest.raises(ValueError, match=r"architecture 'unet' takes no option widht; valid options"):
        create_model("unet", 1, 2, "scse", widht=4)


def test_bad_fusion_and_dim():
    with pytest.raises(ValueError, match="fusion"):
        create_attention("scse", 8, fusion="mul")
    with pytest.raises(ValueError, match="dim"):
        create_attention("cse", 8, dim=4)


def test_hidden_width_never_below_one():
    m = create_attention("cse", 3, reduction=16)
    assert m.excite.fc1.out_features == 1
    assert m(torch.randn(1, 3, 4, 4)).shape == (1, 3, 4, 4)


@pytest.mark.parametrize("channels, reduction, floor, hidden", [
    (16, 16, 1, 1), (16, 16, 4, 4), (16, 16, 8, 8), (64, 16, 4, 4), (256, 16, 8, 16),
    (3, 16, 8, 3),  # never wider than the layer itself
])
def test_min_hidden_is_a_floor_on_c_over_r(channels, reduction, floor, hidden):
    for name in ("cse", "scse"):
        m = create_attention(name, channels, reduction=reduction, min_hidden=floor)
        fc1 = (m.cse if name == "scse" else m).excite.fc1
        assert fc1.out_features == hidden
        # C*h + h + h*C + C parameters in the MLP
        assert sum(p.numel() for p in (m.cse if name == "scse" else m).excite.parameters()) == \
            2 * channels * hidden + hidden + channels
    with pytest.raises(ValueError, match="min_hidden"):
        create_attention("cse", 8, min_hidden=0)


def test_min_hidden_reaches_every_block_of_a_model():
    from scse_seg.models import create_model

    m = create_model("unet", 1, 3, "scse", width=16, reduction=16, min_hidden=4)
    widths = {b.channels: b.cse.excite.fc1.out_features for b in m.attention_modules()}
    assert widths == {16: 4, 32: 4, 64: 4, 128: 8, 256: 16}


def test_cse_formula():
    torch.manual_seed(0)
    m = ChannelSE(6, dim=2, reduction=2)
    x = torch.randn(3, 6, 5, 7)
    z = x.mean(dim=(2, 3))
    g = torch.sigmoid(m.excite.fc2(torch.relu(m.excite.fc1(z))))
    torch.testing.assert_close(m(x), x * g[:, :, None, None])


def test_sse_formula_3d():
    m = SpatialSE(4, dim=3)
    x = torch.randn(2, 4, 3, 5, 6)
    g = torch.sigmoid(torch.einsum("ncdhw,c->ndhw", x, m.conv.weight.flatten()) + m.conv.bias)
    torch.testing.assert_close(m(x), x * g[:, None], rtol=1e-5, atol=1e-6)


def test_scse_add_matches_smp():
    from segmentation_models_pytorch.base.modules import SCSEModule

    torch.manual_seed(1)
    theirs = SCSEModule(64, reduction=16).eval()
    ours = ConcurrentSE(64, dim=2, reduction=16, fusion="add").eval()
    copy_smp_scse_weights(ours, theirs)
    x = torch.randn(2, 64, 12, 10)
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=1e-6)


def test_scse_max_formula():
    torch.manual_seed(2)
    m = ConcurrentSE(8, dim=2, fusion="max")
    x = torch.randn(2, 8, 6, 6)
    expected = torch.maximum(m.cse(x), m.sse(x))
    torch.testing.assert_close(m(x), expected)
    # and the two fusions really differ
    m_add = ConcurrentSE(8, dim=2, fusion="add")
    m_add.load_state_dict(m.state_dict())
    assert not torch.allclose(m_add(x), m(x))


@pytest.mark.parametrize("dim", [2, 3])
def test_cse_matches_monai(dim):
    from monai.networks.blocks import ChannelSELayer

    torch.manual_seed(3)
    theirs = ChannelSELayer(spatial_dims=dim, in_channels=16, r=2).eval()
    ours = ChannelSE(16, dim=dim, reduction=2).eval()
    with torch.no_grad():
        ours.excite.fc1.weight.copy_(theirs.fc[0].weight)
        ours.excite.fc1.bias.copy_(theirs.fc[0].bias)
        ours.excite.fc2.weight.copy_(theirs.fc[2].weight)
        ours.excite.fc2.bias.copy_(theirs.fc[2].bias)
    x = torch.randn(2, 16, *([6] * dim))
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("train", [False, True])
def test_cbam_matches_timm(train):
    """CBAM against an independent implementation: timm's CbamModule with our weights copied
    (channel MLP with biases, 7x7 spatial conv without bias + BatchNorm), in eval and train mode
    (BatchNorm on batch statistics)."""
    from timm.layers.cbam import CbamModule

    torch.manual_seed(4)
    ours = CBAM(8, dim=2, reduction=2)
    theirs = CbamModule(8, rd_ratio=0.5, mlp_bias=True)
    with torch.no_grad():
        for b in (ours.spatial[1].weight, ours.spatial[1].bias, ours.spatial[1].running_mean):
            b.uniform_(0.2, 1.0)  # non-default BN state so a mix-up would show
        ours.spatial[1].running_var.uniform_(0.5, 2.0)
        theirs.channel.fc1.weight.copy_(ours.mlp[0].weight[:, :, None, None])
        theirs.channel.fc1.bias.copy_(ours.mlp[0].bias)
        theirs.channel.fc2.weight.copy_(ours.mlp[2].weight[:, :, None, None])
        theirs.channel.fc2.bias.copy_(ours.mlp[2].bias)
        theirs.spatial.conv.conv.weight.copy_(ours.spatial[0].weight)
        bn, tbn = ours.spatial[1], theirs.spatial.conv.bn
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(tbn, name).copy_(getattr(bn, name))
    ours.train(train)
    theirs.train(train)
    x = torch.randn(3, 8, 9, 11)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-6)


def test_config_default_reduction_is_each_attentions_own():
    """``model.reduction: null`` (the default): cSE/scSE take SENet's 16, Project & Excite its
    authors' 2; an explicit value reaches every attention that takes one."""
    from scse_seg.config import ModelConfig

    def hidden(attention, **kw):
        cfg = ModelConfig(attention=attention, width=16, **kw)
        cfg.validate()
        blocks = cfg.build(1, 3).attention_modules()
        first = blocks[0]  # the first encoder block, 16 channels
        layer = {"scse": lambda b: b.cse.excite.fc1, "cse": lambda b: b.excite.fc1,
                 "pe": lambda b: b.reduce}[attention](first)
        return first.channels, layer.out_channels if attention == "pe" else layer.out_features

    assert hidden("scse") == (16, 1) and hidden("cse") == (16, 1)
    assert hidden("pe") == (16, 8)
    assert hidden("pe", reduction=4) == (16, 4) and hidden("scse", reduction=4) == (16, 4)
    assert hidden("scse", min_hidden=4) == (16, 4)
