"""Every architecture takes every volume size: training, validation, evaluation and prediction
pad to the model's ``size_multiple`` (16 for the paper nets, 32 for smp's resnet34), with one
padding rule (the volume's minimum), and 3D volumes smaller than the patch are padded."""
import json

import numpy as np
import pytest
import torch

from scse_seg.config import build_config, parse_override
from scse_seg.data import SliceDataset, generate_phantom, load_case, read_msd
from scse_seg.data.patches import PatchDataset
from scse_seg.evaluation.runs import evaluate_run
from scse_seg.inference import predict_volume_2d, predict_volume_3d
from scse_seg.models import create_model, model_names
from scse_seg.models.plugged import is_plugged_arch
from scse_seg.training import Trainer

DEFAULT_SHAPE = (64, 64, 48)  # the built-in phantom's (coronal slices 64 x 48)
ODD_SHAPE = (35, 51, 35)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    root = tmp_path_factory.mktemp("sizes")
    return {shape: generate_phantom(root / "x".join(map(str, shape)), n_cases=2, shape=shape)
            for shape in (DEFAULT_SHAPE, ODD_SHAPE)}


def _config(data, out, *overrides):
    base = [f"data.path={data}", f"out={out}", "model.width=4", "train.epochs=1",
            "train.batch_size=4", "train.max_steps_per_epoch=1", "train.progress=false",
            "data.augment={affine: 0}"]
    return build_config([], [parse_override(o) for o in [*base, *overrides]])


# smp:*/monai:* networks (models/plugged.py) share one code path: one of each stands for all
ARCHS = [a for a in model_names() if not is_plugged_arch(a)] + ["smp:FPN", "monai:DynUNet"]


def test_size_multiple_of_every_arch():
    for arch in ARCHS:
        kw = {} if arch == "smp_unet" else dict(width=4)
        model = create_model(arch, 1, 3, "scse", 2, **kw)
        expected = 32 if arch.startswith("smp") else 16  # resnet34: 5 stride-2 stages; paper: 4 pools
        assert model.size_multiple == expected, arch
    assert create_model("smp_unet", 1, 3, encoder_depth=4,
                        decoder_channels=(64, 32, 16, 8)).size_multiple == 16


@pytest.mark.parametrize("shape", [DEFAULT_SHAPE, ODD_SHAPE], ids=["default", "odd"])
@pytest.mark.parametrize("arch", ARCHS)
def test_every_arch_trains_and_evaluates_any_size(arch, shape, phantoms, tmp_path):
    out = tmp_path / "run"
    cfg = _config(phantoms[shape], out, f"model.arch={arch}")
    result = Trainer(cfg, out).fit()
    assert np.isfinite(result["history"][0]["train_loss"])
    res = evaluate_run(out, progress=False)
    assert len({r["volume"] for r in res.rows}) == 1 and len(res.rows) == 10
    assert all(np.isfinite(r["dice"]) or r["status"] == "absent" for r in res.rows)


def test_3d_any_size_and_patch_larger_than_volume(phantoms, tmp_path):
    """A patch larger than every volume is padded (not refused); odd volumes are predicted."""
    for patch in ([16, 16, 16], [48, 64, 48]):
        out = tmp_path / f"p{patch[0]}"
        cfg = _config(phantoms[ODD_SHAPE], out, "model.dim=3", f"data.patch_size={patch}",
                      "data.samples_per_volume=2")
        Trainer(cfg, out).fit()
        res = evaluate_run(out, progress=False)
        assert len(res.rows) == 10


def test_class_weights_file_records_the_rule(phantoms, tmp_path):
    out = tmp_path / "w"
    Trainer(_config(phantoms[ODD_SHAPE], out, "loss.class_weighting=median_frequency_present"),
            out).fit()
    saved = json.loads((out / "class_weights.json").read_text())
    assert saved["class_weighting"] == "median_frequency_present" and len(saved["weights"]) == 11


class Recorder(torch.nn.Module):
    """Predicts background everywhere and keeps every input it was given."""

    size_multiple = 16

    def __init__(self):
        super().__init__()
        self.inputs = []

    def forward(self, x):
        self.inputs.append(x.clone())
        return torch.zeros(x.shape[0], 2, *x.shape[2:])


def test_one_padding_rule_2d(phantoms):
    """The network sees the same padded slice at training and at inference."""
    ds = read_msd(phantoms[ODD_SHAPE])
    vol = load_case(ds.cases[0], ds)
    vol.image = vol.image - 3.0  # a minimum that is neither 0 nor on every border
    for axis in (0, 1, 2):
        inplane = [s for i, s in enumerate(vol.image.shape) if i != axis]
        size = tuple(-(-s // 16) * 16 for s in inplane)
        train = SliceDataset([vol], axis=axis, size=size)
        model = Recorder()
        predict_volume_2d(model, vol.image, axis, batch_size=64)
        seen = torch.cat(model.inputs)[:, 0].numpy()
        np.testing.assert_array_equal(seen, train.images)
        assert seen.min() == pytest.approx(float(vol.image.min()))


def test_one_padding_rule_3d(phantoms):
    """A volume smaller than the patch: the training patch is the padded volume inference sees."""
    ds = read_msd(phantoms[ODD_SHAPE])
    vol = load_case(ds.cases[0], ds)
    vol.image = vol.image - 3.0
    patch = (48, 64, 48)
    train_img, _ = PatchDataset([vol], patch_size=patch, samples_per_volume=1)[0]
    model = Recorder()
    predict_volume_3d(model, vol.image, roi_size=patch, sw_batch_size=1)
    np.testing.assert_array_equal(model.inputs[0][0].numpy(), train_img.numpy())
