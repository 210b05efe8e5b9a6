"""The README is a manual that stays true: its install and test commands are the ones CI runs,
its lists of names are the registries', its troubleshooting messages are the real ones, and its
recipes run as written. (The predict/evaluate/export commands run in test_predict.py, the
add_attention examples in test_plug.py.)"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from helpers import FAST, ROOT
from test_bad_input import _break

from scse_seg.cli import main

README = (ROOT / "README.md").read_text()


def section(title: str) -> str:
    start = README.index(f"\n## {title}")
    end = README.find("\n## ", start + 1)
    return README[start:end if end > 0 else None]


def code_blocks(text: str, lang: str) -> list[str]:
    return [re.sub(r"^  ", "", b, flags=re.M) if b.startswith("  ") else b
            for b in re.findall(rf"```{lang}\n(.*?)\s*```", text, flags=re.S)]


def test_ci_runs_the_readme_test_command():
    ci = [line for line in (ROOT / ".ci/run").read_text().splitlines()
          if line.strip() and not line.startswith(("#", "set ", "cd "))]
    assert ci == [code_blocks(section("Install"), "bash")[1].strip()]


def _listed(bullet_start: str) -> set[str]:
    line = next(b for b in section("Library use").split("\n* ") if b.startswith(bullet_start))
    return set(re.findall(r"`([\w:]+)`", line.split(":", 1)[1]))


def test_lists_of_names_are_the_registries():
    from scse_seg.blocks import attention_names, block_names
    from scse_seg.models import model_names

    assert set(attention_names()) <= _listed("Attentions")
    assert set(block_names()) <= _listed("Conv blocks")
    canonical = {n for n in model_names() if ":" in n or not n.startswith(("smp_", "monai_"))}
    assert canonical | {"smp_unet"} <= _listed("Architectures")


# ------------------------------------------------------------------ troubleshooting

ROWS = [r for r in section("Troubleshooting").splitlines() if r.startswith("| ") and "`error:" in r]

# README row -> the broken input that produces it (test_bad_input's cases, and a few with a run)
CASES = {
    "dataset folder missing": "folder_missing", "`dataset.json` missing": "json_missing",
    "`dataset.json` not JSON": "json_invalid", "entry names a missing file": "entry_missing_file",
    "truncated / corrupt NIfTI": "truncated_nifti", "image/label shapes differ": "shape_mismatch",
    "image/label affines differ": "affine_mismatch",
    "label value not in `dataset.json`": "undeclared_label", "NaN/Inf voxels": "nan_voxels",
    "undeclared channels": "multichannel_4d", "path leaving the dataset": "path_escapes",
    "unknown config key": "unknown_config_key", "value out of range": "negative_epochs",
    "wrong type": "wrong_type", "unknown attention": "unknown_attention_key",
    "size the network cannot take": "patch_not_multiple",
    "malformed override": "bad_override_syntax",
    "`--out` already holds a run": "run_exists", "`--resume` with other settings": "resume_block",
    "corrupt checkpoint": "corrupt_checkpoint", "a second run on one folder": "locked",
    "NaN/Inf loss": "nan_loss",
}


@pytest.fixture(scope="module")
def trained(tiny_phantom, tmp_path_factory):
    out = tmp_path_factory.mktemp("readme") / "run"
    assert main(["--data", str(tiny_phantom), "--epochs", "1", "--out", str(out), *FAST]) == 0
    return out


def _error(kind, data, tmp_path, trained, capsys) -> str:
    run = tmp_path / "run"
    base = ["--data", str(data), "--epochs", "1", "--out", str(run), *FAST]
    if kind in ("run_exists", "resume_block", "corrupt_checkpoint", "locked"):
        shutil.copytree(trained, run)
    if kind == "run_exists":
        argv = base
    elif kind == "resume_block":
        argv = ["--resume", str(run), "--block", "sk"]
    elif kind == "corrupt_checkpoint":
        (run / "last.pt").write_bytes(b"garbage")
        argv = ["--resume", str(run), "--epochs", "2"]
    elif kind == "nan_loss":
        argv = [*base, "train.lr=1e30", "train.grad_clip=null"]
    elif kind == "locked":
        from scse_seg.fileio import RunLock

        with RunLock(run):
            assert main(["--resume", str(run), "--epochs", "2", "--no-progress"]) == 2
        return capsys.readouterr().err.strip()
    else:
        argv = [*base, *_break(kind, data, tmp_path)[0]]
    assert main(argv) == 2
    return capsys.readouterr().err.strip()


@pytest.mark.parametrize("row", ROWS, ids=[r.split(" | ")[0][2:] for r in ROWS])
def test_troubleshooting_row_is_the_real_message(row, tiny_phantom, trained, tmp_path, capsys):
    problem, shown = (c.strip() for c in row.strip("|").split(" | ", 1))
    assert problem in CASES, f"add a case producing {problem!r} to CASES"
    data = tmp_path / "data"
    shutil.copytree(tiny_phantom, data)
    err = _error(CASES[problem], data, tmp_path, trained, capsys)
    pattern = ".*?".join(re.escape(p) for p in shown.strip("`").split("…"))
    assert len(err.splitlines()) == 1 and re.fullmatch(pattern, err), f"\nREADME: {shown}\nreal:   {err}"


def test_every_case_has_a_row():
    assert set(CASES) == {r.strip("|").split(" | ", 1)[0].strip() for r in ROWS}


# ------------------------------------------------------------------ recipes


def test_plain_folder_recipe_makes_a_dataset(tmp_path, monkeypatch):
    from scse_seg.data import load_case, read_msd

    rng = np.random.default_rng(0)
    for sub in ("images", "labels"):
        (tmp_path / "my_scans" / sub).mkdir(parents=True)
    for name in ("a", "b", "c"):
        lab = np.zeros((16, 16, 16), np.uint8)
        lab[4:12, 4:12, 4:12] = 1
        img = (lab * 100 + rng.normal(size=lab.shape) * 10).astype(np.float32)
        nib.save(nib.Nifti1Image(img, np.eye(4)), str(tmp_path / f"my_scans/images/{name}.nii.gz"))
        nib.save(nib.Nifti1Image(lab, np.eye(4)), str(tmp_path / f"my_scans/labels/{name}.nii.gz"))
    code = code_blocks(section("Train on your own data"), "python")[0]
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    ds = read_msd(tmp_path / "MyDataset")
    assert [c.name for c in ds.cases] == ["a", "b", "c"] and ds.class_names == ["background", "structure"]
    vol = load_case(ds.cases[1], ds)
    assert vol.label.sum() == 8 ** 3 and vol.image.shape == (16, 16, 16)


def test_import_works_from_the_folder_that_holds_the_clone(tmp_path):
    """A clone folder named scse_seg in the current folder must not shadow the library."""
    (tmp_path / "scse_seg").symlink_to(ROOT)
    r = subprocess.run([sys.executable, "-c", "import scse_seg; print(callable(scse_seg.load_model))"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "True", r.stderr[-1000:] + "\nreinstall with the README's install "\
        "command (--config-settings editable_mode=compat)"

