"""A comparison grid as one submitit job per run: a SLURM job array, or local processes.

Each job trains its run (resuming from ``last.pt`` when there is one) and caches its evaluation
in the run's ``eval.json``, exactly as ``compare.py --shard`` does in one process; the report is
then written in the submitting process from the cached evaluations. A job that SLURM preempts or
stops at its time limit is requeued by submitit's checkpoint hook and resumes from the run's
last checkpoint, so no finished epoch is trained twice. Jobs live in ``OUT/jobs/``: submitit's
logs and ``runs.json`` (run folder -> job id), which ``--status`` reads.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from .errors import UserError
from .grid import GridSpec, evaluate_cached, grid_runs, run_grid, run_state, train_run

EXECUTORS = ("local", "slurm")
# keys of compare.slurm that submitit's AutoExecutor takes as they are; others get "slurm_"
GENERIC = {"timeout_min", "mem_gb", "nodes", "cpus_per_task", "gpus_per_node", "tasks_per_node",
           "name"}


def _submitit():
    try:
        import submitit
    except ImportError:
        raise UserError("--executor needs submitit: pip install -e \".[cluster]\" (or pip install "
                        "submitit)") from None
    return submitit


class RunJob:
    """One run of the grid as a submitit job: train (or resume) it, then cache its evaluation.
    ``checkpoint`` is submitit's preemption/timeout hook: requeue the same call, which resumes."""

    def __init__(self, spec: GridSpec):
        self.spec = spec

    def __call__(self, cfg) -> str:
        train_run(cfg)
        evaluate_cached(Path(cfg.out), self.spec)
        return str(cfg.out)

    def checkpoint(self, cfg):
        return _submitit().helpers.DelayedSubmission(RunJob(self.spec), cfg)


def slurm_parameters(options: dict) -> dict:
    """compare.slurm / --slurm options as submitit's AutoExecutor parameters: generic ones
    (timeout_min, mem_gb, cpus_per_task, gpus_per_node...) as they are, the rest (partition,
    account, qos...) with the "slurm_" prefix."""
    return {(k if k in GENERIC or k.startswith("slurm_") else f"slurm_{k}"): v for k, v in options.items()}


def _jobs_file(spec: GridSpec) -> Path:
    return spec.out / "jobs" / "runs.json"


def _read_jobs(spec: GridSpec) -> dict:
    try:
        return json.loads(_jobs_file(spec).read_text())
    except (OSError, ValueError):
        return {}


def _alive(job_id: str, executor: str, folder: Path) -> bool:
    """Whether a job without a result is still queued or running: a local job's process (its id
    is the PID) exists; SLURM does not report it ended."""
    if executor == "local":
        import os

        try:
            os.kill(int(job_id), 0)
            return True
        except (OSError, ValueError):
            return False
    state = _submitit().SlurmJob(folder, job_id).state
    return state.split()[0] not in {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY",
                                    "NODE_FAIL", "PREEMPTED", "BOOT_FAIL", "DEADLINE"}


def _job_outcome(folder: Path, job_id: str, executor: str = "local") -> tuple[str, str]:
    """('success' | 'error' | 'pending', log tail) of a submitted job, from submitit's files:
    no result yet is 'pending' while the job lives, an 'error' once it is gone (killed)."""
    from submitit.core.utils import JobPaths

    paths = JobPaths(folder, job_id, task_id=0)
    tail = ""
    for log in (paths.stderr, paths.stdout):
        if log.is_file():
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
            break
    if not paths.result_pickle.is_file():
        return ("pending" if _alive(job_id, executor, folder) else "error"), tail
    import pickle

    try:
        outcome, _ = pickle.loads(paths.result_pickle.read_bytes())
    except Exception:  # a half-written result: the job did not finish cleanly
        return "error", tail
    return ("success" if outcome == "success" else "error"), tail


class _Adopted:
    """A job an earlier invocation submitted that is still queued or running: waited for, not
    submitted again (two jobs must never train one run)."""

    def __init__(self, job_id: str, executor: str, folder: Path):
        self.job_id, self.executor, self.folder = job_id, executor, folder

    def done(self) -> bool:
        return not _alive(self.job_id, self.executor, self.folder)


def grid_status(spec: GridSpec) -> list[tuple[str, str]]:
    """(run folder, state) of every run: done, failed, submitted (queued or running),
    interrupted (a partial run with no job pending) or not started."""
    jobs = _read_jobs(spec)
    folder = spec.out / "jobs"
    out = []
    for run, cfg in grid_runs(spec).items():
        state = run_state(cfg)
        if state == "done":
            out.append((run, "done"))
            continue
        outcome = _job_outcome(folder, jobs[run]["job"], jobs[run]["executor"])[0] \
            if run in jobs else None
        if outcome == "error":
            out.append((run, "failed"))
        elif outcome == "pending":
            out.append((run, "submitted"))
        else:
            out.append((run, "interrupted" if state == "partial" else "not started"))
    return out


def run_grid_with(spec: GridSpec, executor: str, parallel: int | None = None,
                  slurm: dict | None = None) -> Path:
    """Submit every unfinished run of ``spec`` as a job (at most ``parallel`` at once), wait
    for them, then write the report from their cached evaluations (:func:`run_grid`). Failed
    jobs are listed by run folder with the tail of their log; rerunning the command resubmits
    only what is not finished."""
    if executor not in EXECUTORS:
        raise UserError(f"unknown --executor {executor!r}; valid: {', '.join(EXECUTORS)}")
    if parallel is not None and parallel < 1:
        raise UserError(f"--parallel must be at least 1, got {parallel}")
    submitit = _submitit()
    from tqdm.auto import tqdm

    from .fileio import atomic_write_text, check_writable_folder
    from .runtime import show_progress

    check_writable_folder(spec.out, "the comparison")
    runs = grid_runs(spec)
    pending = [cfg for cfg in runs.values()
               if run_state(cfg) != "done" or not (Path(cfg.out) / "eval.json").is_file()]
    folder = spec.out / "jobs"
    folder.mkdir(parents=True, exist_ok=True)
    ex = submitit.AutoExecutor(folder=folder, cluster=executor)
    params = dict(slurm_parameters(slurm or {}), name="scse_seg-grid")
    if executor == "slurm" and parallel:
        params["slurm_array_parallelism"] = parallel
    ex.update_parameters(**params)
    jobs = _read_jobs(spec)
    window = len(pending) if executor == "slurm" else (parallel or 1)  # local: one at a time
    queue, running, failed = [], [], []
    for cfg in pending:  # a job still alive from an earlier invocation is waited for
        job = jobs.get(str(cfg.out))
        if job and _job_outcome(folder, job["job"], job["executor"])[0] == "pending":
            running.append((cfg, _Adopted(job["job"], job["executor"], folder)))
        else:
            queue.append(cfg)
    window = max(window - len(running), 0) if executor == "local" else window
    bar = tqdm(total=len(pending), desc=f"grid on {executor}", unit="run",
               disable=not show_progress(spec.progress))

    def submit(cfgs):
        new = ex.map_array(RunJob(spec), cfgs) if len(cfgs) > 1 else [ex.submit(RunJob(spec), cfgs[0])]
        for cfg, job in zip(cfgs, new):
            jobs[str(cfg.out)] = {"job": str(job.job_id), "executor": executor}
            running.append((cfg, job))
        atomic_write_text(_jobs_file(spec), json.dumps(jobs, indent=1))

    if queue and window:
        submit([queue.pop(0) for _ in range(min(window, len(queue)))])
    while running:
        for cfg, job in list(running):
            if not job.done():
                continue
            running.remove((cfg, job))
            bar.update()
            outcome, tail = _job_outcome(folder, str(job.job_id), getattr(job, "executor", executor))
            if outcome != "success":
                failed.append((str(cfg.out), tail))
            if queue:
                submit([queue.pop(0)])
        time.sleep(0.5)
    bar.close()
    if failed:
        lines = "\n".join(f"  {run}:\n    " + tail.replace("\n", "\n    ") for run, tail in failed)
        raise UserError(f"{len(failed)} of {len(pending)} runs failed (logs in {folder}):\n{lines}\n"
                        "fix the cause and run the same command again: finished runs are kept, "
                        "failed ones resubmitted")
    if spec.shard:
        return spec.out
    return run_grid(spec)


__all__ = ["EXECUTORS", "RunJob", "grid_status", "run_grid_with", "slurm_parameters"]
