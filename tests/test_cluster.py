"""compare.py --executor: a grid as submitit jobs (its local executor here: separate processes;
SLURM itself is not available in CI)."""
import csv
import subprocess
import sys

import pytest
import torch
from helpers import FAST, ROOT

pytest.importorskip("submitit")
sys.path.insert(0, str(ROOT / "eval"))

GRID = ["--archs", "unet", "--attns", "none,scse", "--folds", "2", "--epochs", "2", *FAST]


def _rows(path):
    with open(path) as f:
        return [{k: v for k, v in r.items() if k != "checkpoint"} for r in csv.DictReader(f)]


def _weights(run):
    return torch.load(run / "last.pt", weights_only=True)["model"]


@pytest.fixture(scope="module")
def inproc(tiny_phantom, tmp_path_factory):
    """The grid trained in this process: the reference of the jobs'."""
    import compare

    out = tmp_path_factory.mktemp("inproc")
    assert compare.main(["--data", str(tiny_phantom), *GRID, "--out", str(out)]) == 0
    return out


def test_local_executor_gives_the_in_process_grid_to_the_last_digit(inproc, tiny_phantom, tmp_path):
    """2 attentions x 2 folds as 4 jobs (2 at once) in their own processes: the same results.csv
    and the same weights as the grid trained in this process (CPU training is deterministic)."""
    import compare

    assert compare.main(["--data", str(tiny_phantom), *GRID, "--out", str(tmp_path / "jobs"),
                         "--executor", "local", "--parallel", "2"]) == 0
    a, b = _rows(inproc / "results.csv"), _rows(tmp_path / "jobs/results.csv")
    assert len(a) == len(b) > 0 and a == b
    runs = sorted(p.name for p in (tmp_path / "jobs/runs").iterdir())
    assert runs == ["unet-none-f0-s0", "unet-none-f1-s0", "unet-scse-f0-s0", "unet-scse-f1-s0"]
    for r in runs:
        w1, w2 = _weights(inproc / "runs" / r), _weights(tmp_path / "jobs/runs" / r)
        assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert (tmp_path / "jobs/jobs/runs.json").is_file()


def test_killed_job_resumes_to_the_same_weights_and_failures_are_named(inproc, tiny_phantom, tmp_path,
                                                                        capsys, monkeypatch):
    """A job SIGKILLed while writing its third checkpoint (epoch 2 of 2) is reported failed by
    run folder, and so by --status; the same command again resumes it from its epoch-1 last.pt
    to the weights of the uninterrupted run (one run of the grid: --shard 0/4)."""
    import compare

    grid = ["--data", str(tiny_phantom), *GRID, "--out", str(tmp_path / "g"), "--shard", "0/4"]
    run = tmp_path / "g/runs/unet-none-f0-s0"
    monkeypatch.setenv("SCSE_SEG_FAILPOINT", "checkpoint_write:3")
    assert compare.main([*grid, "--executor", "local"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: 1 of 1 runs failed") and str(run) in err
    monkeypatch.delenv("SCSE_SEG_FAILPOINT")
    assert compare.main([*grid, "--status"]) == 0
    assert capsys.readouterr().out.splitlines() == [f"failed       {run}", "1 failed"]
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 1
    assert compare.main([*grid, "--executor", "local"]) == 0
    w1, w2 = _weights(inproc / "runs" / run.name), _weights(run)
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert compare.main([*grid, "--status"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "1 done"


def test_status_of_a_grid_not_started(tiny_phantom, tmp_path, capsys):
    import compare

    assert compare.main(["--data", str(tiny_phantom), *GRID, "--out", str(tmp_path / "g"),
                         "--status"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == "4 not started" and len(lines) == 5


def test_status_of_runs_stopped_before_their_last_epoch(inproc, tiny_phantom, capsys):
    """The reference grid's runs finished 2 epochs; asked for 3 they are interrupted (partial,
    no job pending)."""
    import compare

    assert compare.main(["--data", str(tiny_phantom), *GRID, "--epochs", "3", "--out", str(inproc),
                         "--status"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "4 interrupted"


def test_parallel_without_executor_is_refused(tiny_phantom, tmp_path, capsys):
    import compare

    assert compare.main(["--data", str(tiny_phantom), *GRID, "--out", str(tmp_path / "g"),
                         "--parallel", "2"]) == 2
    assert capsys.readouterr().err.startswith("error: --parallel and --slurm go with --executor")
    assert not (tmp_path / "g").exists()


def test_slurm_parameters_are_submitits():
    from scse_seg.cluster import slurm_parameters

    assert slurm_parameters({"partition": "gpu", "gpus_per_node": 1, "timeout_min": 240,
                             "account": "lab", "slurm_qos": "high"}) == {
        "slurm_partition": "gpu", "gpus_per_node": 1, "timeout_min": 240, "slurm_account": "lab",
        "slurm_qos": "high"}


def test_import_does_not_need_submitit():
    code = ("import sys; sys.modules['submitit'] = None; import scse_seg, scse_seg.grid, "
            "scse_seg.cluster; print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "ok", r.stderr[-2000:]


def test_preemption_requeues_the_same_run():
    """submitit calls ``checkpoint`` when SLURM preempts or times out a job: it must requeue the
    same run (which resumes from last.pt, as the killed-job test shows)."""
    import submitit

    from scse_seg.cluster import RunJob
    from scse_seg.grid import GridSpec

    spec, cfg = GridSpec(), object()
    again = RunJob(spec).checkpoint(cfg)
    assert isinstance(again, submitit.helpers.DelayedSubmission)
    assert isinstance(again.function, RunJob) and again.function.spec is spec and again.args == (cfg,)
