"""add_attention on smp and MONAI networks: every supported architecture x dim x attention keeps
its output shape, grows by exactly the inserted blocks, trains every block; "none" is bit-identical;
smp's own decoder_attention_type="scse" is reproduced; the unmodified state_dict still loads."""
import copy
import csv
import re
import sys

import pytest
import torch
from helpers import FAST, ROOT, copy_smp_scse_weights

from scse_seg.blocks import create_attention
from scse_seg.plug import ATTR, add_attention, find_sites, supported
from scse_seg.plug.insert import UNUSED
from scse_seg.plug.sites import SMP_DECODER

sys.path.insert(0, str(ROOT / "eval"))

SMP = list(SMP_DECODER)
MONAI = [("UNet", 2), ("UNet", 3), ("BasicUNet", 2), ("BasicUNet", 3), ("DynUNet", 2), ("DynUNet", 3)]
CASES = [("smp", a, 2) for a in SMP] + [("monai", a, d) for a, d in MONAI]
ATTS = ["scse", "cse", "sse", "cbam"]
DEC = (16, 8, 8, 4, 4)  # small smp decoders


def _build(lib, arch, dim):
    torch.manual_seed(0)
    if lib == "monai":
        from monai.networks import nets

        if arch == "UNet":
            return nets.UNet(dim, 1, 3, channels=(4, 8, 16, 32), strides=(2, 2, 2), num_res_units=1)
        if arch == "BasicUNet":
            return nets.BasicUNet(dim, 1, 3, features=(4, 4, 8, 16, 32, 4))
        return nets.DynUNet(dim, 1, 3, kernel_size=[3] * 4, strides=[1, 2, 2, 2],
                            upsample_kernel_size=[2] * 3, filters=[4, 8, 16, 32])
    import segmentation_models_pytorch as smp

    if arch == "DPT":
        return smp.DPT(encoder_name="tu-vit_tiny_patch16_224", encoder_weights=None, in_channels=1,
                       classes=3, dynamic_img_size=True, decoder_intermediate_channels=(8, 8, 8, 8),
                       decoder_fusion_channels=8)
    small = {"Unet": dict(decoder_channels=DEC), "UnetPlusPlus": dict(decoder_channels=DEC),
             "MAnet": dict(decoder_channels=DEC, decoder_pab_channels=8),
             "FPN": dict(decoder_pyramid_channels=16, decoder_segmentation_channels=32),
             "PAN": dict(decoder_channels=8), "DeepLabV3Plus": dict(decoder_channels=16),
             "DeepLabV3": dict(decoder_channels=16), "PSPNet": dict(psp_out_channels=16),
             "UPerNet": dict(decoder_channels=16), "Segformer": dict(decoder_segmentation_channels=8)}
    return getattr(smp, arch)(encoder_name="resnet18", encoder_weights=None, in_channels=1, classes=3,
                              **small.get(arch, {}))


_CACHE = {}


def _model(lib, arch, dim):
    if (lib, arch, dim) not in _CACHE:
        _CACHE[lib, arch, dim] = _build(lib, arch, dim)
    return copy.deepcopy(_CACHE[lib, arch, dim])


def _input(lib, arch, dim, n=2):
    size = {"PAN": 128, "DPT": 32, "BasicUNet": 32}.get(arch, 64 if lib == "smp" else 16)
    return torch.randn(n, 1, *([size] * dim), generator=torch.Generator().manual_seed(1))


def _count(m):
    return sum(p.numel() for p in m.parameters())


def _where(arch):
    return "decoder" if arch == "DPT" else "all"


@pytest.mark.parametrize("attention", ATTS)
@pytest.mark.parametrize("lib,arch,dim", CASES, ids=lambda v: str(v))
def test_plugged_shape_params_and_gradients(lib, arch, dim, attention):
    model = _model(lib, arch, dim)
    x = _input(lib, arch, dim)
    before, n_before = model(x).shape, _count(model)
    opts = dict(reduction=4) if attention != "sse" else {}
    report = add_attention(model, attention, where=_where(arch), example_input=x[:1], **opts)
    assert type(model).__name__ == arch  # same class
    assert report.rows
    # only encoder features the decoder never reads are left out (e.g. FPN: stride 2)
    assert all(site.startswith("encoder[") and why == UNUSED for site, why in report.skipped)
    # one distinct block per site, each exactly as big as a freshly built block of that width
    blocks = list(getattr(model, ATTR).values())
    assert len(blocks) == len(report.rows) == len({id(b) for b in blocks})
    fresh = [_count(create_attention(attention, r.channels, dim, **opts)) for r in report.rows]
    assert _count(model) - n_before == sum(fresh) == report.params_added > 0
    assert all(r.dim == dim for r in report.rows)
    y = model(x)
    assert y.shape == before
    y.square().mean().backward()
    for row, block in zip(report.rows, blocks):
        grads = [p.grad for p in block.parameters()]
        assert all(g is not None for g in grads), row.site
        assert sum(g.abs().sum() for g in grads) > 0, f"{row.site}: zero gradient"


def test_channels_found_by_probe_match_the_constructor_arguments():
    """The probe measures what the constructors were told: smp Unet's decoder_channels, MONAI
    BasicUNet's features (upcat_4..1 = features[3], [2], [1], [5]) and encoder widths."""
    r = add_attention(_model("smp", "Unet", 2), "scse", where="decoder")
    assert [row.channels for row in r.rows] == list(DEC)
    r = add_attention(_model("monai", "BasicUNet", 3), "scse", where="all",
                      example_input=torch.zeros(1, 1, 32, 32, 32))
    assert [row.channels for row in r.rows] == [4, 4, 8, 16, 32, 16, 8, 4, 4]
    assert [row.site for row in r.rows][-4:] == ["upcat_4", "upcat_3", "upcat_2", "upcat_1"]
    # hand count of one scSE block at C=16 and the default r=16: fc 16*1+1 + 1*16+16, sSE conv
    # 16+1 -> 66
    assert r.rows[3].params == 66


@pytest.mark.parametrize("lib,arch,dim", CASES, ids=lambda v: str(v))
def test_none_is_bit_identical_and_state_dict_round_trip(lib, arch, dim):
    base = _model(lib, arch, dim).eval()
    x = _input(lib, arch, dim)
    with torch.no_grad():
        ref = base(x)
        none = copy.deepcopy(base)
        add_attention(none, "none", where=_where(arch), example_input=x[:1])
        assert torch.equal(none(x), ref)
    plugged = copy.deepcopy(base)
    report = add_attention(plugged, "scse", where=_where(arch), example_input=x[:1])
    original = base.state_dict()
    # the unmodified checkpoint loads; exactly the new attention keys are missing
    res = plugged.load_state_dict(original, strict=False)
    assert not res.unexpected_keys
    assert set(res.missing_keys) == set(plugged.state_dict()) - set(original) == set(report.new_keys)
    assert all(k.startswith(ATTR + ".") for k in res.missing_keys)
    # the plugged checkpoint restores a freshly plugged copy exactly
    again = copy.deepcopy(base)
    add_attention(again, "scse", where=_where(arch), example_input=x[:1])
    again.load_state_dict(plugged.state_dict())
    with torch.no_grad():
        assert torch.equal(again(x), plugged(x))
        assert not torch.equal(plugged(x), ref)  # scSE really changed the function


@pytest.mark.parametrize("arch", ["Unet", "UnetPlusPlus"])
def test_reproduces_smp_decoder_attention_scse(arch):
    import segmentation_models_pytorch as smp

    torch.manual_seed(0)
    kw = dict(encoder_name="resnet18", encoder_weights=None, in_channels=1, classes=3,
              decoder_channels=(32, 32, 16, 16, 16))
    theirs = getattr(smp, arch)(decoder_attention_type="scse", **kw).eval()
    ours = getattr(smp, arch)(**kw).eval()
    res = ours.load_state_dict(theirs.state_dict(), strict=False)
    assert not res.missing_keys and all(".attention" in k for k in res.unexpected_keys)
    report = add_attention(ours, "scse", where="smp", fusion="add", reduction=16)
    # smp builds attention1 in the last block too, but never runs it there (no skip)
    last = "x_0_4" if arch == "UnetPlusPlus" else "4"
    assert [s for s, _ in report.skipped] == [f"decoder.blocks.{last}.attention1"]
    for row in report.rows:
        copy_smp_scse_weights(getattr(ours, ATTR)[row.key], theirs.get_submodule(row.site).attention)
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        expected = theirs(x)
        # float32 rounding through UNet++'s nested decoder reaches 2.4e-5 on a few of 24,576
        # outputs (seen with the test run alone); the float64 check below is the equivalence
        torch.testing.assert_close(ours(x), expected, rtol=1e-4, atol=1e-4)
        # in float64 the rounding vanishes: the same function, to 1e-6 (in fact ~1e-15)
        torch.testing.assert_close(ours.double()(x.double()), theirs.double()(x.double()),
                                   rtol=0, atol=1e-6)
        # the sites matter: the same blocks after the decoder blocks only give other numbers
        other = getattr(smp, arch)(**kw).eval()
        other.load_state_dict(theirs.state_dict(), strict=False)
        add_attention(other, "scse", where="decoder", fusion="add", reduction=16)
        assert (other(x) - expected.float()).abs().max() > 1e-3


def test_compile_export_channels_last_amp():
    model = _model("smp", "Unet", 2).eval()
    add_attention(model, "scse", where="all")
    x = _input("smp", "Unet", 2)
    with torch.no_grad():
        ref = model(x)
        import torch._dynamo as dynamo

        explained = dynamo.explain(model)(x)  # the hooks trace into one graph, no breaks
        assert explained.graph_count == 1 and explained.graph_break_count == 0
        torch.testing.assert_close(torch.compile(model, backend="eager")(x), ref)
        exported = torch.export.export(model, (x,))
        assert any(k.startswith(ATTR) for k in exported.state_dict)
        torch.testing.assert_close(exported.module()(x), ref)
        cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
        torch.testing.assert_close(cl(x.to(memory_format=torch.channels_last)), ref,
                                   rtol=1e-4, atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            amp = model(x)
        assert amp.shape == ref.shape and torch.isfinite(amp).all()
        assert (amp.float() - ref).abs().max() < 0.1 * ref.abs().max()


def test_ddp_trains_the_plugged_blocks(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    model = _model("monai", "DynUNet", 3)
    report = add_attention(model, "cse", where="all", example_input=torch.zeros(1, 1, 16, 16, 16))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rdzv'}", rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(model)
        ddp(_input("monai", "DynUNet", 3)).square().mean().backward()
    finally:
        dist.destroy_process_group()
    for row in report.rows:
        block = getattr(model, ATTR)[row.key]
        assert all(p.grad is not None for p in block.parameters())
        assert sum(p.grad.abs().sum() for p in block.parameters()) > 0, row.site


def test_bad_where_and_unknown_network():
    model = _model("monai", "UNet", 2)
    with pytest.raises(ValueError, match="valid: decoder, encoder, all, smp"):
        add_attention(model, "scse", where="decoders")
    with pytest.raises(ValueError, match="only Unet, UnetPlusPlus"):
        add_attention(model, "scse", where="smp")
    with pytest.raises(ValueError, match="not a known architecture"):
        add_attention(torch.nn.Conv2d(1, 4, 3), "scse")
    with pytest.raises(ValueError, match="no submodule named"):
        add_attention(model, "scse", where=["model.9"])
    with pytest.raises(ValueError, match="unknown attention"):
        add_attention(model, "sce")
    add_attention(model, "scse")
    with pytest.raises(ValueError, match="already has attention"):
        add_attention(model, "scse")


def test_any_network_by_submodule_names():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Sequential(torch.nn.Conv2d(1, 6, 3, padding=1), torch.nn.ReLU(),
                                            torch.nn.Conv2d(6, 2, 1))

        def forward(self, x):
            return self.body(x)

    with pytest.raises(ValueError, match="wrap it in a Module"):
        add_attention(Net().body, "scse", where=["1"])
    net = Net()
    report = add_attention(net, "scse", where=["body.1"])
    assert [(r.site, r.channels) for r in report.rows] == [("body.1", 6)]
    text = str(report)
    assert "site" in text and "channels" in text and "ConcurrentSE" in text
    assert net(torch.randn(1, 1, 8, 8)).shape == (1, 2, 8, 8)


def test_every_supported_architecture_is_tested():
    assert {f"{lib}:{a}" for lib, a, _ in CASES} == set(supported())
    assert find_sites(_model("smp", "FPN", 2), "decoder")[0].name == "decoder.p5"


@pytest.mark.parametrize("arch,dim", [("smp:FPN", 2), ("smp_linknet", 2), ("monai_dynunet", 3),
                                      ("monai:BasicUNet", 2)])
def test_registry_builds_plugged_networks(arch, dim):
    from scse_seg.models import create_model

    kw = dict(encoder_name="resnet18") if arch.startswith("smp") else dict(width=4)
    model = create_model(arch, 1, 3, "scse", dim, reduction=2, **kw)
    assert model.size_multiple == (32 if arch.startswith("smp") else 16)
    x = torch.randn(2, 1, *([2 * model.size_multiple] * dim))
    assert model(x).shape == (2, 3, *x.shape[2:])
    assert len(getattr(model, ATTR)) > 0
    vanilla = create_model(arch, 1, 3, "none", dim, **kw)
    assert not hasattr(vanilla, ATTR)
    decoder_only = create_model(arch, 1, 3, "cse", dim, placement="decoder", **kw)
    assert 0 < len(getattr(decoder_only, ATTR)) < len(getattr(model, ATTR))
    assert all(not k.startswith(("encoder", "input", "down", "conv_0"))
               for k in getattr(decoder_only, ATTR))


def _readme_section() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("## Add attention to your own network")
    return text[start:text.index("\n## ", start + 1)]


def test_readme_examples_run_as_written(capsys):
    blocks = re.findall(r"```python\n(.*?)```", _readme_section(), flags=re.S)
    assert len(blocks) == 2  # the smp and the MONAI example
    for code in blocks:
        assert len(code.strip().splitlines()) <= 12
        exec(compile(code, "README.md", "exec"), {})
    assert capsys.readouterr().out.count("parameters added") == 2


def test_readme_table_lists_every_supported_architecture():
    rows = [r for r in _readme_section().splitlines() if r.startswith(("| smp ", "| MONAI "))]
    for name in supported():
        lib, cls = name.split(":")
        assert any(r.lower().startswith(f"| {lib} ") and re.search(rf"\b{cls}\b", r.split("|")[1])
                   for r in rows), f"{name} missing from the README table"


def test_comparison_grid_on_plugged_networks(tiny_phantom, tmp_path):
    """eval/compare.py end to end on two new architectures (smp FPN, MONAI DynUNet), 1 epoch."""
    import compare

    out = tmp_path / "grid"
    args = ["--data", str(tiny_phantom), "--archs", "smp_fpn,monai_dynunet", "--attns", "none,scse",
            "--seeds", "1", "--epochs", "1", "--out", str(out), "model.encoder_name=resnet18", *FAST]
    assert compare.main(args) == 0
    report = (out / "report.md").read_text()
    assert "## smp_fpn" in report and "## monai_dynunet" in report
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert {(r["arch"], r["attention"]) for r in rows} == {
        (a, t) for a in ("smp_fpn", "monai_dynunet") for t in ("none", "scse")}
    ckpt = torch.load(out / "runs" / "smp_fpn-scse-s0" / "last.pt", weights_only=False)
    assert any(k.startswith(ATTR) for k in ckpt["model"])  # the plugged blocks were trained and saved


def test_copies_and_pickles_run_their_own_blocks(tmp_path):
    """The hooks hold their blocks; deepcopy and torch.save/load must carry them together."""
    model = _model("monai", "BasicUNet", 2).eval()
    add_attention(model, "scse", example_input=torch.zeros(1, 1, 32, 32))
    x = _input("monai", "BasicUNet", 2)
    with torch.no_grad():  # the same SE code path as the checks below (no autograd fast path)
        ref = model(x)
    torch.save(model, tmp_path / "m.pt")
    for other in (copy.deepcopy(model), torch.load(tmp_path / "m.pt", weights_only=False)):
        with torch.no_grad():
            for p in getattr(other, ATTR).parameters():
                p.zero_()
            assert not torch.equal(other(x), ref)  # the copy runs its own (zeroed) blocks
            assert torch.equal(model(x), ref)  # and the original is untouched


def test_config_names_the_key_for_3d_smp():
    from scse_seg.config import ModelConfig
    from scse_seg.errors import ConfigError

    ModelConfig(arch="monai:DynUNet", dim=3).validate()
    with pytest.raises(ConfigError, match="model.dim.*smp:FPN is 2D only"):
        ModelConfig(arch="smp:FPN", dim=3).validate()


def test_bench_plug_runs(tmp_path):
    """bench/bench_plug.py end to end at a tiny size (rows and columns only, no timing claims)."""
    sys.path.insert(0, str(ROOT))
    from bench import bench_plug

    bench_plug.main(["smp", "--archs", "Unet", "--encoder", "resnet18", "--size", "64", "--iters",
                     "1", "--out", str(tmp_path / "smp")])
    bench_plug.main(["monai", "--archs", "BasicUNet", "--dim", "2", "--width", "4", "--monai-size",
                     "32", "--iters", "1", "--out", str(tmp_path / "monai")])
    rows = list(csv.DictReader((tmp_path / "smp" / "plug.csv").open()))
    assert [r["variant"] for r in rows] == ["none", "plug scse", "plug scse@smp", "smp scse"]
    assert [r["sites"] for r in rows] == ["0", "5", "9", "10"]
    rows = list(csv.DictReader((tmp_path / "monai" / "plug.csv").open()))
    assert [(r["arch"], r["variant"]) for r in rows] == [("monai:BasicUNet 2D", "none"),
                                                         ("monai:BasicUNet 2D", "plug scse")]
    assert "overhead vs none" in (tmp_path / "monai" / "report.md").read_text()


def test_architecture_names_are_case_insensitive_everywhere(tmp_path):
    import compare

    from scse_seg.config import build_config, parse_override
    from scse_seg.grid import GridSpec
    from scse_seg.models import create_model

    assert build_config([], [parse_override("model.arch=SMP:fpn")]).model.arch == "smp:FPN"
    assert build_config([], [parse_override("model.arch=UNet")]).model.arch == "unet"
    assert type(create_model("SMP:FPN", 1, 2, "none", encoder_name="resnet18",
                             encoder_depth=3)).__name__ == "FPN"
    spec = GridSpec.from_args(compare.build_parser().parse_args(
        ["--archs", "UNet,smp:fpn", "--attns", "None,SCSE", "--out", str(tmp_path)]))
    assert spec.archs == ["unet", "smp:FPN"] and spec.attns == ["none", "scse"]
