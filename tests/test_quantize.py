"""int8 export (eval/export.py --int8): ONNX Runtime static quantization agrees with fp32 on a toy,
calibrates on the run's own preprocessing, and refuses bad input with one error line."""
import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import FAST, ROOT

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
sys.path.insert(0, str(ROOT / "eval"))


@pytest.mark.parametrize("variant", ["conv", "all"])
def test_int8_scse_unet_agrees_with_fp32_on_a_toy(variant, tmp_path):
    """A width-8 scSE U-Net with random weights, calibrated on 64 inputs of the kind it is then
    tested on: the int8 logits' RMS error within 5% of the fp32 logits' spread (measured: 3.4%
    for both variants), the same class at >= 97% of pixels (measured: all)."""
    import onnxruntime as ort

    from scse_seg.export import export_onnx, export_program
    from scse_seg.models import create_model
    from scse_seg.quantize import quantize_onnx

    torch.manual_seed(0)
    model = create_model("unet", 1, 4, "scse", 2, width=8).eval()
    fp32 = tmp_path / "model.onnx"
    export_onnx(export_program(model, 2, 16), fp32, 2, 16)
    g = torch.Generator().manual_seed(1)

    def blobs(n):  # smooth images, like normalised scans more than white noise is
        x = torch.randn(n, 1, 8, 8, generator=g)
        return torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear").numpy()

    quantize_onnx(fp32, tmp_path / "int8.onnx", [blobs(16) for _ in range(4)], variant)
    x = blobs(8)
    a = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
    b = ort.InferenceSession(str(tmp_path / "int8.onnx"),
                             providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
    assert np.sqrt(((a - b) ** 2).mean()) <= 0.05 * a.std()
    assert (a.argmax(1) == b.argmax(1)).mean() >= 0.97
    with torch.no_grad():
        assert np.allclose(a, model(torch.from_numpy(x)).numpy(), atol=1e-4)  # fp32 ONNX is the model


@pytest.fixture(scope="module")
def run(tiny_phantom, tmp_path_factory):
    from scse_seg.cli import main

    out = tmp_path_factory.mktemp("q") / "tiny"
    assert main(["--data", str(tiny_phantom), "--epochs", "1", "--out", str(out), "--attn", "scse",
                 *FAST]) == 0
    return out


def test_calibration_reads_the_runs_training_volumes_as_inference_does(run):
    """Calibration inputs are slices of the run's training volumes (split.json), z-scored over
    the nonzero voxels and centre-padded with the slice volume's minimum, as by hand here."""
    from scse_seg.predictor import load_model
    from scse_seg.quantize import calibration_inputs

    loaded = load_model(run, device="cpu")
    split = json.loads((run / "split.json").read_text())
    batches = calibration_inputs(loaded, run, count=10, batch=4)
    assert [b.shape[0] for b in batches] == [4, 4, 2]
    m = loaded.size_multiple
    first = batches[0][0, 0]
    assert first.shape[0] % m == 0 and first.shape[0] >= 2 * m
    from scse_seg.data import read_msd

    ds = read_msd(split["dataset_root"])
    first_case = next(c for c in ds.cases if c.name in set(split["train"]))
    x = np.asarray(nib.load(str(first_case.image)).dataobj, dtype=np.float64)
    fg = x[x != 0]
    z = (x - fg.mean()) / fg.std()
    s = z[:, 0, :]  # coronal: the first slice of np.linspace over the volume
    pad = [((t - n) // 2, t - n - (t - n) // 2) for n, t in zip(s.shape, first.shape)]
    expected = np.pad(s, pad, constant_values=z.min())
    assert np.allclose(first, expected, atol=1e-4)


def test_export_int8_end_to_end_and_the_reference_script(run, tiny_phantom, tmp_path, capsys):
    import export

    out = tmp_path / "x"
    assert export.main([str(run), str(out), "--int8", "--calibration-count", "64"]) == 0
    assert f"wrote {out / 'model_int8.onnx'}" in capsys.readouterr().out
    pre = json.loads((out / "preprocessing.json").read_text())
    assert pre["int8"]["variant"] == "conv" and pre["int8"]["calibration_inputs"] == 64
    image = next((tiny_phantom / "imagesTr").iterdir())
    labels = {}
    for flag in ([], ["--int8"]):
        dst = tmp_path / f"s{len(flag)}.nii.gz"
        r = subprocess.run([sys.executable, str(ROOT / "eval/apply_exported.py"), str(out), str(image),
                            str(dst), *flag], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        labels[len(flag)] = np.asarray(nib.load(str(dst)).dataobj)
    assert (labels[0] == labels[1]).mean() >= 0.97


def test_int8_refuses_calibration_data_of_other_classes(run, tmp_path, capsys):
    import export

    from scse_seg.data import generate_phantom

    other = generate_phantom(tmp_path / "other", n_cases=2, shape=(32, 32, 32), seed=1)
    meta = json.loads((other / "dataset.json").read_text())
    meta["labels"]["10"] = "liver"  # same label values, another structure
    (other / "dataset.json").write_text(json.dumps(meta))
    assert export.main([str(run), str(tmp_path / "x"), "--int8", "--calibration", str(other)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "classes" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_int8_without_onnxruntime_is_one_error_line(run, tmp_path):
    code = ("import sys; sys.modules['onnxruntime'] = None; sys.path.insert(0, 'eval'); import export; "
            f"sys.exit(export.main([{str(run)!r}, {str(tmp_path / 'x')!r}, '--int8']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       cwd=ROOT)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == ["error: --int8 needs onnxruntime: pip install -e \".[export]\""]
    assert not (tmp_path / "x").exists()
