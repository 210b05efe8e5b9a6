"""The gate inspector (eval/gates.py) on hand-built cases whose statistics are known exactly, and
end to end on a trained run and a plugged MONAI network."""
import sys

import numpy as np
import pytest
import torch
from helpers import FAST, ROOT
from torch import nn

from scse_seg.blocks import create_attention
from scse_seg.evaluation.gates import Volume, cse_statistics, gate_sites, inspect_gates

sys.path.insert(0, str(ROOT / "eval"))


class _Net(nn.Module):
    """conv -> one SE block -> conv: the smallest network with a block to inspect."""

    def __init__(self, block: nn.Module, width: int, classes: int = 2, dim: int = 2):
        super().__init__()
        conv = nn.Conv2d if dim == 2 else nn.Conv3d
        self.stem, self.block, self.head = conv(1, width, 1), block, conv(width, classes, 1)

    def forward(self, x):
        return self.head(self.block(self.stem(x)))


def _volumes(n=2, shape=(14, 12, 6), seed=0):
    """Random images, label 1 where the image is positive (so structures vary between slices)."""
    g = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = g.standard_normal((1, *shape)).astype(np.float32)
        out.append(Volume(f"v{i}", img, (img[0] > 0.5).astype(np.int64)))
    return out


def test_constant_gates_are_saturated_and_their_knockout_changes_nothing():
    """A cSE whose last layer has zero weights and bias 30 gates every channel by sigmoid(30),
    exactly 1.0 in float32, for every input: saturated, constant, and replacing the gate by its
    mean or removing the block leaves every prediction as it was."""
    torch.manual_seed(0)
    cse = create_attention("cse", 4, reduction=1)
    with torch.no_grad():
        cse.excite.fc2.weight.zero_()
        cse.excite.fc2.bias.fill_(30.0)
    net = _Net(cse, 4)
    rep = inspect_gates(net, _volumes(), ["background", "blob"], dim=2, axis=2, multiple=4,
                        progress=False)
    (row,) = rep.blocks
    assert row["block"] == "block" and row["gates"] == "cse" and row["channels"] == 4
    assert row["cse_mean"] == 1.0 and row["cse_near1"] == 1.0 and row["cse_near0"] == 0.0
    assert row["cse_input_std"] == 0.0 and row["cse_channel_spread"] == 0.0
    assert row["saturated"] and row["constant"]
    assert {(k["gate"], k["replacement"]) for k in rep.knockouts} == {("cse", "mean"), ("block", "removed")}
    assert all(k["delta"] == 0.0 and k["dice"] == rep.dice for k in rep.knockouts)


def test_an_sse_gate_of_one_inside_and_zero_outside_shows_full_contrast():
    """sSE with conv weight 1, bias 0 on an image of +20 inside the structure and -20 outside:
    the gate is sigmoid(+-20), 1 inside and 0 outside to 1e-8. The background's voxel count is
    the volume's own, so padding (to a multiple of 16) is left out."""
    sse = create_attention("sse", 1)
    with torch.no_grad():
        sse.conv.weight.fill_(1.0)
        sse.conv.bias.zero_()
    net = nn.Sequential(sse, nn.Conv2d(1, 2, 1))
    with torch.no_grad():  # class 1 where the recalibrated input is positive
        net[1].weight.copy_(torch.tensor([0.0, 1.0]).view(2, 1, 1, 1))
        net[1].bias.zero_()
    label = np.zeros((10, 12, 5), np.int64)
    label[3:7, 4:9] = 1
    img = np.where(label == 1, 20.0, -20.0).astype(np.float32)[None]
    rep = inspect_gates(net, [Volume("box", img, label)], ["background", "box"], dim=2, axis=2,
                        multiple=16, progress=False)
    (row,) = rep.blocks
    assert row["sse_in_structures"] == pytest.approx(1.0, abs=1e-8)
    assert row["sse_background"] == pytest.approx(0.0, abs=1e-8)
    assert row["sse_contrast"] == pytest.approx(1.0, abs=1e-8) and row["highlights"]
    counts = {r["structure"]: r["voxels"] for r in rep.sse_structures}
    assert counts == {"background": int((label == 0).sum()), "box": int((label == 1).sum())}
    assert rep.dice == pytest.approx(1.0)
    assert set(rep.overlays) == {"0"}  # the example slice's gate map, for the overlay figure
    image, gate, lab = rep.overlays["0"]
    assert gate.shape == lab.shape == image.shape == (16, 16)


def test_cse_statistics_by_hand():
    """Two channels that swap with the structure shown: inputs 0-1 show structure 1 with gates
    (0, 1), inputs 2-3 structure 2 with (1, 0). Each channel's gate is 0,0,1,1 over the inputs
    (std 0.5) and 0 vs 1 between the structures (std 0.5): all of its change follows the
    structure (specificity 1); half the gates are near 0, half near 1; both channels average 0.5
    (spread 0)."""
    g = torch.tensor([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
    counts = torch.tensor([[90, 10, 0], [80, 20, 0], [70, 0, 30], [60, 0, 40]])
    s = cse_statistics(g, counts)
    assert s["cse_input_std"] == pytest.approx(0.5) and s["cse_structure_std"] == pytest.approx(0.5)
    assert s["cse_specificity"] == pytest.approx(1.0)
    assert s["cse_near0"] == 0.5 and s["cse_near1"] == 0.5
    assert s["cse_mean"] == 0.5 and s["cse_channel_spread"] == 0.0
    assert not s["saturated"] and not s["constant"]
    # the same gates for both structures: they change between inputs, not with the structure
    s = cse_statistics(torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]),
                       torch.tensor([[90, 10, 0], [90, 10, 0], [70, 0, 30], [70, 0, 30]]))
    assert s["cse_structure_std"] == pytest.approx(0.0) and s["cse_specificity"] == pytest.approx(0.0)


def test_plugged_monai_3d_network_blocks_in_forward_order():
    """A MONAI BasicUNet given scSE by add_attention, in 3D: every inserted block is found, named by
    its path, ordered as the forward pass calls them, and knocked out."""
    from monai.networks import nets

    from scse_seg.plug import add_attention

    torch.manual_seed(0)
    model = nets.BasicUNet(3, 1, 2, features=(4, 4, 8, 16, 32, 4))
    add_attention(model, "scse", where="all", example_input=torch.zeros(1, 1, 32, 32, 32))
    sites = gate_sites(model)
    assert sites and all(s.gates == ("cse", "sse") for s in sites)
    rep = inspect_gates(model, _volumes(1, (32, 32, 32)), ["background", "blob"], dim=3,
                        multiple=16, progress=False)
    assert [b["block"] for b in rep.blocks] == [f"plugged_attention.{n}" for n in (
        "conv_0", "down_1", "down_2", "down_3", "down_4", "upcat_4", "upcat_3", "upcat_2", "upcat_1")]
    assert len(rep.knockouts) == 3 * len(sites)  # cSE -> mean, sSE -> mean, removed


def test_blocks_are_reported_in_the_order_the_forward_pass_calls_them():
    class Reversed(nn.Module):  # defines "late" first, calls "early" first
        def __init__(self):
            super().__init__()
            self.late, self.early = create_attention("cse", 2, reduction=1), create_attention("sse", 2)
            self.stem, self.head = nn.Conv2d(1, 2, 1), nn.Conv2d(2, 2, 1)

        def forward(self, x):
            return self.head(self.late(self.early(self.stem(x))))

    net = Reversed()
    assert [s.name for s in gate_sites(net)] == ["late", "early"]
    rep = inspect_gates(net, _volumes(1), ["background", "blob"], multiple=4, knockout=False,
                        progress=False)
    assert [(b["order"], b["block"], b["gates"]) for b in rep.blocks] == [(1, "early", "sse"),
                                                                          (2, "late", "cse")]
    assert rep.knockouts == []


@pytest.fixture(scope="module")
def run(tiny_phantom, tmp_path_factory):
    from scse_seg.cli import main

    out = tmp_path_factory.mktemp("gates") / "tiny"
    assert main(["--data", str(tiny_phantom), "--epochs", "1", "--out", str(out), "--attn", "scse",
                 *FAST]) == 0
    return out


def test_cli_writes_the_report_and_refuses_to_overwrite_it(run, tmp_path, capsys):
    import gates

    out = tmp_path / "report"
    assert gates.main([str(run), "--out", str(out), "--no-progress"]) == 0
    assert "9 blocks inspected on 1 volume (" in capsys.readouterr().out  # U-Net: 4 + 1 + 4
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["summary.md", "blocks.csv", "sse_structures.csv", "knockout.csv", "gates.png",
         "knockout.png", "sse_structures.png", "sse_overlay.png"])
    summary = (out / "summary.md").read_text()
    assert "reduction 16, fusion add" in summary and "`bottleneck.attention`" in summary
    assert len([ln for ln in summary.splitlines() if ln.startswith("| ") and "`" in ln]) == 9
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert gates.main([str(run), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: gate report ") and "--overwrite" in err and len(err.splitlines()) == 1
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_cli_refuses_a_run_without_se_gates(tiny_phantom, tmp_path, capsys):
    import gates

    from scse_seg.cli import main

    run = tmp_path / "vanilla"
    assert main(["--data", str(tiny_phantom), "--epochs", "1", "--out", str(run), "--attn", "none",
                 *FAST]) == 0
    capsys.readouterr()
    assert gates.main([str(run), "--out", str(tmp_path / "r"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "'none'" in err and not (tmp_path / "r").exists()
