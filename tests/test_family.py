"""The SE family's successors (issue 14): ECA, Project & Excite, CMPE-SE, and the conv blocks
(residual, selective kernel, split attention). References: timm's EcaModule, SelectiveKernel and
SplitAttn (weights copied, 2D to 1e-6); 3D checked against 2D on maps constant along depth; P&E and
CMPE-SE against forwards written out by hand in numpy (float64) on C = 4, 3x3 maps."""
import math

import numpy as np
import pytest
import torch
from timm.layers import EcaModule, SelectiveKernel, SplitAttn

from scse_seg.blocks import block_names, create_attention, create_block, create_recalibration
from scse_seg.blocks.eca import eca_kernel_size
from scse_seg.blocks.selective_kernel import SelectiveKernelConv
from scse_seg.blocks.split_attention import SplitAttentionConv
from scse_seg.errors import ConfigError
from scse_seg.models import count_parameters, create_model

TOL = dict(rtol=1e-6, atol=1e-6)


def _copy_from(ours: torch.nn.Module, ref: torch.nn.Module) -> None:
    """Copy ``ref``'s parameters and buffers into ``ours`` in registration order (the two modules
    list the same tensors in the same order; 1x1 convs vs linears differ only in shape)."""
    mine, theirs = list(ours.state_dict().items()), list(ref.state_dict().items())
    assert len(mine) == len(theirs)
    with torch.no_grad():
        for (k, a), (k2, b) in zip(mine, theirs):
            assert a.numel() == b.numel(), (k, k2)
            a.copy_(b.reshape(a.shape))


def _randomise_bn(module: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


def _lift_to_3d(m2: torch.nn.Module, m3: torch.nn.Module) -> None:
    """Give the 3D module the 2D module's weights, every kxk kernel placed in the centre depth
    slice of a kxkxk kernel: on a map constant along depth, the 3D output is then the 2D output
    at every depth (zero padding only touches the zero slices)."""
    with torch.no_grad():
        for (_, a), (_, b) in zip(m3.state_dict().items(), m2.state_dict().items()):
            if a.dim() == 5:
                a.zero_()
                a[..., a.shape[-1] // 2] = b
            else:
                a.copy_(b)


def _depth_constant(x2: torch.Tensor, depth: int = 5) -> torch.Tensor:
    return x2.unsqueeze(-1).expand(*x2.shape, depth).contiguous()


def _check_3d_against_2d(m2, m3, x, depth=5):
    """3D on a depth-constant map == 2D at every depth (float64: batch statistics over D times
    more elements round differently in float32, ~3e-6)."""
    m2, m3, x = m2.double(), m3.double(), x.double()
    torch.testing.assert_close(m3(_depth_constant(x, depth)), _depth_constant(m2(x), depth),
                               rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- ECA

@pytest.mark.parametrize("channels,k", [(64, 3), (256, 5), (16, 3), (4, 1)])
def test_eca_kernel_size_from_paper(channels, k):
    # t = int(|(log2 C + 1) / 2|), odd: C=64 -> 3.5 -> 3; C=256 -> 4.5 -> 4 -> 5; C=4 -> 1.5 -> 1
    assert eca_kernel_size(channels) == k


@pytest.mark.parametrize("channels", [64, 256])
def test_eca_matches_timm_and_3d(channels):
    torch.manual_seed(0)
    ours, ref = create_attention("eca", channels, 2), EcaModule(channels)
    _copy_from(ours, ref)
    x = torch.randn(2, channels, 7, 6)
    torch.testing.assert_close(ours(x), ref(x), **TOL)
    ours3 = create_attention("eca", channels, 3)
    ours3.load_state_dict(ours.state_dict())
    _check_3d_against_2d(ours, ours3, x)
    assert count_parameters(ours) == eca_kernel_size(channels)


# ---------------------------------------------------------------- selective kernel

@pytest.mark.parametrize("train", [True, False])
def test_sk_matches_timm_and_3d(train):
    torch.manual_seed(0)
    ours = SelectiveKernelConv(8, 16, dim=2)  # d = max(16 / 16, 32) = 32
    ref = SelectiveKernel(8, 16, rd_channels=32, split_input=False)
    _randomise_bn(ref)
    _copy_from(ours, ref)
    ours.train(train), ref.train(train)
    x = torch.randn(3, 8, 9, 7)
    torch.testing.assert_close(ours(x), ref(x), **TOL)
    ours3 = SelectiveKernelConv(8, 16, dim=3).train(train)
    _lift_to_3d(ours, ours3)
    _check_3d_against_2d(ours, ours3, x)


# ---------------------------------------------------------------- split attention

@pytest.mark.parametrize("radix,cardinality", [(2, 1), (1, 1), (4, 2)])
@pytest.mark.parametrize("train", [True, False])
def test_splat_matches_timm_and_3d(radix, cardinality, train):
    torch.manual_seed(0)
    ours = SplitAttentionConv(64, 64, dim=2, radix=radix, cardinality=cardinality)
    ref = SplitAttn(64, 64, radix=radix, groups=cardinality, norm_layer=torch.nn.BatchNorm2d)
    _randomise_bn(ref)
    _copy_from(ours, ref)
    ours.train(train), ref.train(train)
    x = torch.randn(2, 64, 6, 5)
    torch.testing.assert_close(ours(x), ref(x), **TOL)
    ours3 = SplitAttentionConv(64, 64, dim=3, radix=radix, cardinality=cardinality).train(train)
    _lift_to_3d(ours, ours3)
    _check_3d_against_2d(ours, ours3, x, depth=4)


# ---------------------------------------------------------------- Project & Excite, by hand

def _sigmoid(a):
    return 1.0 / (1.0 + np.exp(-a))


def _pe_by_hand(x, w1, b1, w2, b2):
    """Rickmann et al. 2019 written out: per voxel, z[c] = sum over axes of the mean of x[c] over
    the other axes at that voxel's coordinate; gate = sigmoid(W2 relu(W1 z + b1) + b2)."""
    n, c, *sp = x.shape
    out = np.zeros_like(x)
    for i in range(n):
        for idx in np.ndindex(*sp):
            z = np.zeros(c)
            for axis, coord in enumerate(idx):
                sl = [slice(None)] * len(sp)
                sl[axis] = coord
                z += np.array([x[i, ch][tuple(sl)].mean() for ch in range(c)])
            g = _sigmoid(w2 @ np.maximum(w1 @ z + b1, 0) + b2)
            out[(i, slice(None), *idx)] = x[(i, slice(None), *idx)] * g
    return out


@pytest.mark.parametrize("dim", [2, 3])
def test_project_excite_by_hand(dim):
    torch.manual_seed(0)
    pe = create_attention("pe", 4, dim, reduction=2).double()
    x = torch.randn(2, 4, *([3] * dim), dtype=torch.float64, requires_grad=True)
    y = pe(x)
    w1 = pe.reduce.weight.detach().flatten(1).numpy()
    w2 = pe.expand.weight.detach().flatten(1).numpy()
    expected = _pe_by_hand(x.detach().numpy(), w1, pe.reduce.bias.detach().numpy(), w2,
                           pe.expand.bias.detach().numpy())
    np.testing.assert_allclose(y.detach().numpy(), expected, rtol=1e-10, atol=1e-12)
    y.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in pe.parameters())
    assert x.grad.abs().sum() > 0


# ---------------------------------------------------------------- CMPE-SE, by hand

def _bn_train(a, axis_channel, weight, bias, eps=1e-5):
    """Batch norm with batch statistics (biased variance) over every axis but ``axis_channel``."""
    axes = tuple(i for i in range(a.ndim) if i != axis_channel)
    shape = [1] * a.ndim
    shape[axis_channel] = -1
    mean, var = a.mean(axis=axes).reshape(shape), a.var(axis=axes).reshape(shape)
    return (a - mean) / np.sqrt(var + eps) * weight.reshape(shape) + bias.reshape(shape)


def _conv2d_valid(img, kernels):
    """img: N x H x W (one input channel); kernels: M x kh x kw -> N x M x H' x W' (correlation)."""
    n, h, w = img.shape
    m, kh, kw = kernels.shape
    out = np.zeros((n, m, h - kh + 1, w - kw + 1))
    for i in range(h - kh + 1):
        for j in range(w - kw + 1):
            out[:, :, i, j] = np.einsum("nab,mab->nm", img[:, i:i + kh, j:j + kw], kernels)
    return out


def _cmpe_gate_by_hand(name, mod, z_res, z_id):
    """Hu et al. 2018 / the authors' MXNet blocks, written out for one batch (train-mode BN)."""
    p = {k: v.detach().numpy() for k, v in mod.state_dict().items()}
    if name == "cmpe_se1":
        a = np.maximum(z_res @ p["fc_res.weight"].T, 0)
        b = np.maximum(z_id @ p["fc_id.weight"].T, 0)
        return _sigmoid(np.concatenate([a, b], 1) @ p["fc.weight"].T)
    n, c = z_res.shape
    if name == "cmpe_se2":
        image = np.stack([z_res, z_id], axis=-1)  # N x C x 2: row = channel, columns res | id
        k = p["maps.0.weight"][:, 0]  # M x 1 x 2
        maps = _conv2d_valid(image, k)
    else:
        fold = mod.fold
        rows = []  # row 2g: residual channels of group g, row 2g+1: their identity partners
        for g in range(fold):
            sl = slice(g * c // fold, (g + 1) * c // fold)
            rows += [z_res[:, sl], z_id[:, sl]]
        image = np.stack(rows, axis=1)  # N x 2k x C/k
        maps = _conv2d_valid(np.pad(image, ((0, 0), (1, 1), (1, 1))), p["maps.0.weight"][:, 0])
    maps = _bn_train(maps, 1, p["maps.1.weight"], p["maps.1.bias"])
    flat = maps.mean(axis=1).reshape(n, -1)
    hidden = np.maximum(flat @ p["excite.0.weight"].T, 0)
    return _sigmoid(hidden @ p["excite.2.weight"].T)


@pytest.mark.parametrize("name", ["cmpe_se1", "cmpe_se2", "cmpe_se3"])
def test_cmpe_se_by_hand(name):
    torch.manual_seed(0)
    mod = create_recalibration(name, 4, 2, reduction=2).double()
    if name == "cmpe_se3":
        assert mod.fold == 1  # C = 4: a 2 x 4 inner image (|2*1 - 4| = |2*2 - 2|, smaller k wins)
    res = torch.randn(3, 4, 3, 3, dtype=torch.float64)
    idn = torch.randn(3, 4, 3, 3, dtype=torch.float64)
    out = mod(res, idn)
    gate = _cmpe_gate_by_hand(name, mod, res.mean((2, 3)).numpy(), idn.mean((2, 3)).numpy())
    np.testing.assert_allclose(out.detach().numpy(), res.numpy() * gate[:, :, None, None],
                               rtol=1e-10, atol=1e-12)


def test_cmpe_se3_fold_layout():
    """C = 8, fold 2 -> a 4 x 4 image: residual channels 0-3, their identities, then 4-7, ..."""
    mod = create_recalibration("cmpe_se3", 8, 2)
    assert mod.fold == 2
    z_res, z_id = torch.arange(8.0)[None], 100 + torch.arange(8.0)[None]
    expected = torch.tensor([[0, 1, 2, 3], [100, 101, 102, 103], [4, 5, 6, 7],
                             [104, 105, 106, 107]], dtype=torch.float32)
    assert torch.equal(mod.inner_image(z_res, z_id)[0, 0], expected)


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("name", ["cmpe_se1", "cmpe_se2", "cmpe_se3"])
def test_cmpe_se_in_residual_block_gradients(name, dim):
    torch.manual_seed(0)
    block = create_block("residual", 4, 8, dim, recalibration=name, reduction=2)
    x = torch.randn(2, 4, *([3] * dim), requires_grad=True)
    block(x).square().sum().backward()
    for pname, p in block.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname
    # the identity branch feeds the gate: changing only the shortcut changes the recalibration
    r = torch.randn(2, 8, *([3] * dim))
    a, b = torch.randn(2, 8, *([3] * dim)), torch.randn(2, 8, *([3] * dim))
    assert not torch.allclose(block.recalibration(r, a), block.recalibration(r, b))


# ---------------------------------------------------------------- registry, models, config

@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("name", ["double_conv", "residual", "sk", "splat"])
def test_blocks_shape_grad_and_batch_of_one(name, dim):
    torch.manual_seed(0)
    block = create_block(name, 1, 8, dim)
    x = torch.randn(2, 1, *([6] * dim))
    y = block(x)
    assert y.shape == (2, 8, *([6] * dim))
    y.mean().backward()
    assert all(p.grad is not None for p in block.parameters())
    block(torch.randn(1, 1, *([6] * dim))).mean().backward()  # last batch of an epoch may be 1


def test_block_registry_names():
    assert set(block_names()) >= {"double_conv", "residual", "sk", "splat"}
    with pytest.raises(ValueError, match="double_conv"):
        create_block("resnet", 4, 4)


def test_double_conv_is_the_unet_block():
    torch.manual_seed(0)
    a = create_model("unet", 1, 3, "scse", 2, width=4)
    torch.manual_seed(0)
    b = create_model("unet", 1, 3, "scse", 2, width=4, block="double_conv")
    x = torch.randn(2, 1, 32, 32)
    assert torch.equal(a(x), b(x))


@pytest.mark.parametrize("arch", ["unet", "sdnet"])
@pytest.mark.parametrize("block,attention", [("sk", "scse"), ("splat", "eca"),
                                             ("residual", "cmpe_se2"), ("residual", "pe")])
def test_models_take_blocks(arch, block, attention):
    torch.manual_seed(0)
    model = create_model(arch, 1, 3, attention, 2, width=4, block=block)
    y = model(torch.randn(2, 1, 32, 32))
    assert y.shape == (2, 3, 32, 32)
    y.mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_cmpe_needs_residual_block():
    with pytest.raises(ValueError, match="residual"):
        create_model("unet", 1, 3, "cmpe_se1", 2, width=4)
    with pytest.raises(ValueError, match="residual"):
        create_model("unet", 1, 3, "cmpe_se1", 2, width=4, block="sk")
    with pytest.raises(ValueError, match="residual"):
        create_attention("cmpe_se3", 8)
    with pytest.raises(ValueError, match="unet"):
        create_model("densenet", 1, 3, "none", 2, width=4, block="sk")


@pytest.mark.parametrize("overrides,key,needle", [
    (["model.attention=cmpe_se1"], "model.attention", "residual"),
    (["model.attention=cmpe_se1", "model.block=sk"], "model.attention", "residual"),
    (["model.block=resnet"], "model.block", "double_conv"),
    (["model.arch=densenet", "model.block=sk"], "model.block", "unet"),
])
def test_config_rejects_bad_block(overrides, key, needle):
    from scse_seg.config import build_config, parse_override

    with pytest.raises(ConfigError, match=key) as e:
        build_config([], [parse_override(o) for o in overrides])
    assert needle in str(e.value)


def test_cli_block_flag():
    from scse_seg.cli import build_parser, config_from_args

    args = build_parser().parse_intermixed_args(["--block", "residual", "--attn", "cmpe_se3"])
    cfg = config_from_args(args)
    assert (cfg.model.block, cfg.model.attention) == ("residual", "cmpe_se3")
    assert "residual" in str(cfg.run_dir())
    model = cfg.model.build(1, 3)
    assert type(model.encoders[0].block).__name__ == "ResidualBlock"
    assert model.encoders[0].block.recalibration is not None


def test_grid_blocks_variants_and_labels(tmp_path):
    import argparse

    from scse_seg.grid import GridSpec

    def args(**kw):
        base = dict(config=None, archs=None, attns="none,scse", blocks=None, seeds=1,
                    out=str(tmp_path), surface=False, tta=False, no_progress=True, overrides=[],
                    data=None, epochs=None, device=None, folds=None, sweep=None)
        return argparse.Namespace(**{**base, **kw})

    spec = GridSpec.from_args(args(blocks="double_conv,residual+cmpe_se1,sk+none,splat"))
    assert spec.variants() == [("double_conv", "none"), ("double_conv", "scse"),
                               ("residual", "cmpe_se1"), ("sk", "none"),
                               ("splat", "none"), ("splat", "scse")]
    assert [spec.variant_label(b, a) for b, a in spec.variants()] == [
        "none", "scse", "residual+cmpe_se1", "sk+none", "splat+none", "splat+scse"]
    assert spec.config("unet", "cmpe_se1", 0, block="residual").model.block == "residual"
    assert GridSpec.from_args(args()).variants() == [(None, "none"), (None, "scse")]
    with pytest.raises(ConfigError, match="first entry"):
        GridSpec.from_args(args(blocks="sk+none,double_conv"))
    with pytest.raises(ConfigError, match="residual"):
        GridSpec.from_args(args(blocks="double_conv,sk+cmpe_se1"))


def test_parameter_counts_at_64():
    """Hand counts at C = 64 (in = out = 64): ECA k = 3; P&E r=2: 64*32+32 + 32*64+64;
    CMPE-SE1 r=16: 2*64*4 + 8*64; SK conv: 2 branches x (9*64*64 + 2*64) + 64*32 + 2*32 + 32*128."""
    assert count_parameters(create_attention("eca", 64)) == 3
    assert count_parameters(create_attention("pe", 64)) == 64 * 32 + 32 + 32 * 64 + 64
    assert count_parameters(create_recalibration("cmpe_se1", 64)) == 2 * 64 * 4 + 8 * 64
    sk = 2 * (9 * 64 * 64 + 2 * 64) + 64 * 32 + 2 * 32 + 32 * 128
    assert count_parameters(SelectiveKernelConv(64, 64)) == sk
    # splat conv, radix 2: grouped conv 64 -> 128 (groups 2), BN, fc1 64 -> 32 (+bias), BN,
    # fc2 32 -> 128 (+bias)
    splat = 128 * 32 * 9 + 2 * 128 + 64 * 32 + 32 + 2 * 32 + 32 * 128 + 128
    assert count_parameters(SplitAttentionConv(64, 64)) == splat
    assert math.isclose(count_parameters(create_block("double_conv", 64, 64)),
                        2 * (9 * 64 * 64 + 2 * 64))


# ---------------------------------------------------------------- bench/bench_family.py

def test_bench_family_smoke_and_saved_bytes():
    import sys

    from helpers import ROOT

    sys.path.insert(0, str(ROOT))
    from bench import bench_family

    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    one_map = x.numel() * 4
    assert bench_family.saved_bytes(torch.nn.Sigmoid(), x) == one_map  # keeps its output
    assert bench_family.saved_bytes(torch.nn.Sequential(torch.nn.Sigmoid(), torch.nn.Sigmoid()),
                                    x) == 2 * one_map
    assert bench_family.saved_bytes(torch.nn.Conv2d(3, 3, 1), x) == 0  # input and weight only
    threads = torch.get_num_threads()
    try:
        result = bench_family.main(["--size", "32", "--width", "4", "--max-channels", "8",
                                    "--warmup", "0", "--iters", "1", "--threads", "1"],
                                   log=lambda *_: None)
    finally:
        torch.set_num_threads(threads)
    rows = result["rows"]
    shapes = {r["shape"] for r in rows}
    assert len(rows) == len(shapes) * len(bench_family.ATTENTIONS + bench_family.STAGES)
    assert all(r["saved_MB"] > 0 and r["fb_ms"] > 0 for r in rows)
    assert all(r["fb_vs_ref"] == 1.0 for r in rows if r["variant"] in ("scse", "double_conv+scse"))
    assert "## stages" in result["report"] and "residual+cmpe_se3" in result["report"]
