"""What a new user hit on a fresh clone (issue 10, item 4): names, run folders, paths, threads,
messages, mid-epoch checkpoints, the end-of-run summary and curves."""
import signal
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import FAST, ROOT, phantom_args, run_cli

from scse_seg.cli import main
from scse_seg.config import Config, build_config
from scse_seg.fileio import load_checkpoint

sys.path.insert(0, str(ROOT / "eval"))


def _same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------ names, errors, paths


@pytest.mark.parametrize("args, needle", [
    (["--attn", "se"], "error: --attn: unknown attention 'se'; valid: cbam, cmpe_se1, "),
    (["--arch", "vnet"], "error: --arch: unknown architecture 'vnet'; valid: "),
    (["--block", "dense"], "error: --block: unknown block 'dense'; valid: double_conv, "),
])
def test_unknown_name_is_one_line(tiny_phantom, tmp_path, capsys, args, needle):
    code = main([*phantom_args(tiny_phantom), "--out", str(tmp_path / "run"), *FAST, *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith(needle) and len(err.splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def test_config_names_case_insensitive():
    cfg = build_config([], [{"model": {"arch": "UNet", "attention": "SCSE"}}])
    assert (cfg.model.arch, cfg.model.attention) == ("unet", "scse")


def test_default_run_folder_names_dataset_and_settings():
    assert Config().run_dir() == Path("runs/phantom-unet-scse-2d-w16-s0")
    cfg = build_config([], [{"data": {"path": "/d/Task04_Hippocampus"}, "seed": 2,
                             "model": {"dim": 3, "width": 8, "attention": "cse"}}])
    assert cfg.run_dir() == Path("runs/Task04_Hippocampus-unet-cse-3d-w8-s2")
    cfg = build_config([], [{"data": {"folds": 5, "fold": 1}, "model": {"placement": "decoder"}}])
    assert cfg.run_dir() == Path("runs/phantom-unet-scse@decoder-2d-w16-s0-fold1of5")
    cfg = build_config([ROOT / "configs" / "hippocampus.yaml"])
    assert cfg.run_dir() == Path("runs/hippocampus-Task04_Hippocampus-unet-scse-2d-w32-s0")


def test_bad_data_reported_before_run_folder_clash(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "last.pt").write_bytes(b"x")
    code = main(["--data", str(tmp_path / "nowhere"), "--out", str(out), *FAST])
    err = capsys.readouterr().err
    assert code == 2 and "nowhere not found" in err and "already holds a run" not in err, err


def test_config_paths_resolve_from_project_root_or_config_folder(tmp_path, monkeypatch):
    # a config outside any project: relative to its own folder
    (tmp_path / "exp").mkdir()
    cfg_file = tmp_path / "exp" / "my.yaml"
    cfg_file.write_text("data: {path: data, phantom_dir: ph}\nout: runs/a\n")
    monkeypatch.chdir(tmp_path)  # somewhere else than the config's folder
    cfg = build_config([cfg_file])
    assert (cfg.data.path, cfg.data.phantom_dir, cfg.out) == (
        str(tmp_path / "exp" / "data"), str(tmp_path / "exp" / "ph"), str(tmp_path / "exp/runs/a"))
    # inside a project (pyproject.toml above): from the project root, as the shipped configs are
    # written; absolute paths and command-line overrides are left alone
    proj = tmp_path / "proj"
    (proj / "configs").mkdir(parents=True)
    (proj / "pyproject.toml").write_text("")
    (proj / "configs" / "c.yaml").write_text("data: {path: ../shared/x, phantom_dir: /abs}\n")
    cfg = build_config([proj / "configs" / "c.yaml"])
    assert (cfg.data.path, cfg.data.phantom_dir) == (str(proj / "../shared/x"), "/abs")
    cfg = build_config([proj / "configs" / "c.yaml"], [{"data": {"path": "rel"}}])
    assert cfg.data.path == "rel"
    shipped = build_config([ROOT / "configs" / "hippocampus.yaml"])
    assert Path(shipped.data.path).resolve() == \
        (ROOT.parent / "shared" / "data" / "Task04_Hippocampus").resolve()


def test_config_data_path_from_another_folder_trains(tiny_phantom, tmp_path, monkeypatch):
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "data").symlink_to(tiny_phantom, target_is_directory=True)
    cfg_file = tmp_path / "exp" / "my.yaml"
    cfg_file.write_text("data: {path: data}\nout: runs/a\ntrain: {epochs: 1}\n")
    monkeypatch.chdir(tmp_path)
    assert main(["--config", str(cfg_file), *FAST]) == 0
    assert (tmp_path / "exp" / "runs" / "a" / "last.pt").is_file()


def test_ctrl_c_names_the_real_run_folder(tiny_phantom, tmp_path, capsys, monkeypatch):
    from scse_seg.training import Trainer

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "fit", interrupted)
    out = tmp_path / "run"
    assert main([*phantom_args(tiny_phantom), "--out", str(out), *FAST]) == 130
    assert f"--resume {out}" in capsys.readouterr().err


def test_compare_creates_nothing_on_bad_data(tmp_path, capsys):
    import compare

    out = tmp_path / "cmp"
    code = compare.main(["--data", str(tmp_path / "nowhere"), "--attns", "none,scse",
                         "--out", str(out), "--no-progress"])
    assert code == 2 and "nowhere not found" in capsys.readouterr().err
    assert not out.exists()


# ------------------------------------------------------------------ threads, warnings


def test_train_threads_applies_and_restores(tiny_phantom, tmp_path, monkeypatch):
    from scse_seg.training import engine

    seen = []
    real = engine.prepare_data

    def spy(*a, **k):
        seen.append(torch.get_num_threads())
        return real(*a, **k)

    monkeypatch.setattr(engine, "prepare_data", spy)
    before = torch.get_num_threads()
    assert main([*phantom_args(tiny_phantom), "--epochs", "1", "--out", str(tmp_path / "r"),
                 "train.threads=1", *FAST]) == 0
    assert seen == [1] and torch.get_num_threads() == before


def test_busy_machine_warning(monkeypatch):
    from scse_seg.training.engine import busy_warning

    cpu = torch.device("cpu")
    monkeypatch.setattr("os.getloadavg", lambda: (50.0, 50.0, 50.0))
    assert "train.threads=1" in busy_warning(2, cpu)
    assert busy_warning(1, cpu) is None and busy_warning(2, torch.device("cuda")) is None
    monkeypatch.setattr("os.getloadavg", lambda: (0.0, 0.0, 0.0))
    assert busy_warning(2, cpu) is None


def test_max_unpool_warning_silenced_on_cpu(tiny_phantom, tmp_path):
    r = run_cli([*phantom_args(tiny_phantom), "--arch", "sdnet", "--epochs", "1",
                 "--out", str(tmp_path / "sd"), *FAST])
    assert r.returncode == 0, r.stderr
    assert "max_unpool" not in r.stderr and "deterministic" not in r.stderr, r.stderr
    from scse_seg.training.engine import cuda_reproducibility_note

    assert "max_unpool" in cuda_reproducibility_note("densenet")
    assert cuda_reproducibility_note("unet") is None


# ------------------------------------------------------------------ end of run


def test_run_summary_curves_and_dataset_json(tiny_phantom, tmp_path, capsys):
    """Capitalised names and --data .../dataset.json are accepted; the run ends with its own
    curves.png and a done: line that says which epoch and checkpoint each number is."""
    out = tmp_path / "run"
    assert main(["--data", str(tiny_phantom / "dataset.json"), "--arch", "UNet", "--attn", "SCSE",
                 "--epochs", "2", "--out", str(out), *FAST]) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert (saved["model"]["arch"], saved["model"]["attention"]) == ("unet", "scse")
    assert saved["data"]["path"] == str(tiny_phantom)
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    done = capsys.readouterr().out.strip().splitlines()[-1]
    assert done.startswith("done: validation Dice ") and "at the last epoch (2, last.pt)" in done
    assert "(best.pt)" in done and "use last.pt" in done and str(out) in done


# ------------------------------------------------------------------ mid-epoch checkpoints


@pytest.mark.parametrize("kill_at, epoch_done, step", [(2, 0, 1), (6, 1, 1)])
def test_mid_epoch_checkpoint_resumes_exactly(tiny_phantom, tmp_path, kill_at, epoch_done, step):
    """train.checkpoint_every_steps=1, 3 steps per epoch; checkpoint writes are e1 s1, e1 s2,
    e1 best, e1 last, e2 s1, e2 s2, ...: killed during write `kill_at`, the run holds the
    mid-epoch checkpoint before it, resumes there and ends bit-identical to an uninterrupted run
    without mid-epoch checkpoints."""
    ref = tmp_path / "ref"
    assert main([*phantom_args(tiny_phantom), "--epochs", "2", "--out", str(ref), *FAST]) == 0
    out = tmp_path / "killed"
    r = run_cli([*phantom_args(tiny_phantom), "--epochs", "2", "--out", str(out), *FAST,
                 "train.checkpoint_every_steps=1"],
                env={"SCSE_SEG_FAILPOINT": f"checkpoint_write:{kill_at}"})
    assert r.returncode == -signal.SIGKILL
    ck = load_checkpoint(out / "last.pt")
    assert (ck["epoch"], ck["step"]) == (epoch_done, step)
    r = run_cli(["--resume", str(out), "--no-progress"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0].startswith(
        f"[scse_seg] resuming {out} from epoch {epoch_done + 1}, step {step + 1}"), r.stdout
    _same_weights(load_checkpoint(out / "last.pt")["model"], load_checkpoint(ref / "last.pt")["model"])
    a, b = load_checkpoint(out / "last.pt")["history"], load_checkpoint(ref / "last.pt")["history"]
    assert [(h["epoch"], h["train_loss"], h["val_dice"]) for h in a] == \
        [(h["epoch"], h["train_loss"], h["val_dice"]) for h in b]
