"""`octft sweep launch SPEC`: resolve the plan once, create or resume the study, run its workers.

    >>> result = launch("sweeps/demo.yaml", workers=2, overrides=["data.uri=/data/aireadi"])  # doctest: +SKIP

The launch is worker 0 itself: it resolves the launch plan (`octft.sweep.plan`), starts its runner (`make_runner`:
a warm runner's imports overlap the rest), creates or resumes the study and its MLflow parent run, writes the plan,
starts workers 1.. as processes (`python -m octft.sweep.worker PLAN --worker-index I --wait-for-launch`: they start
their runners meanwhile), fails the trials whose worker died (each retried once), enqueues a warm start, audits and
prepares the data once, tells the workers to go, then runs trials in this process. Running the same command on
every host of a pod slice adds that host's workers to the same study, as long as every host reaches the same
storage (PostgreSQL).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import optuna
from optuna.trial import TrialState

from octft.redaction import redact
from octft.sweep.plan import LaunchPlan, RunnerKind, base_config, resolve_plan, split_overrides
from octft.sweep.runners import InProcessRunner, Runner, make_runner
from octft.sweep.storage import DEFAULT_HEARTBEAT_S, open_study_storage, study_lock
from octft.sweep.study import create_or_load_study, reap_stale_trials
from octft.sweep.tracking import update_parent_best, update_parent_note
from octft.sweep.warmstart import WarmStartError, warm_start
from octft.sweep.worker import best_so_far, run_worker
from octft.track.mlflow_store import MlflowStore
from octft.data.dataset import DataSetup, prepare_data
from octft.train.provenance import run_provenance


@dataclass
class LaunchResult:
    study_name: str
    study_dir: Path
    parent_run_id: str
    worker_exit_codes: list[int]
    counts: dict[str, int]  # trials per state after the launch
    reaped: list[int]  # trials found dead at launch (FAIL, retried)
    enqueued: list[dict[str, Any]] = field(default_factory=list)  # warm-start parameter sets enqueued now
    plan_path: Path | None = None
    metric: str = ""  # the study's objective
    best: tuple[int, float] | None = None  # the study's best trial and its value, None while none is COMPLETE
    seconds: float = 0.0  # the launch's trials, from the first worker's go
    probe: bool = False  # a probe study: its heads feed an LP-FT study, which is the one to promote

    def summary(self) -> str:
        """The study's end in one line: `study demo: 4 complete, 2 pruned in 98 s; best: trial 3,
        val/balanced_accuracy=0.741`."""
        counts = ", ".join(f"{count} {state.lower()}" for state, count in self.counts.items() if count)
        best = ("no trial complete" if self.best is None
                else f"best: trial {self.best[0]}, {self.metric}={self.best[1]:.3f}")
        return f"study {self.study_name}: {counts or 'no trials'} in {self.seconds:.0f} s; {best}"


def next_command(result: LaunchResult, spec_path: str | Path, overrides: Sequence[str] = (),
                 storage: str | None = None) -> str:
    """What to run once a study ends: `octft promote SPEC` with the launch's sweep overrides (its budget aside) and
    storage, or, when no trial completed, `octft sweep status` to see why. A probe study's next step is an LP-FT
    study from its best head: promoting the probe would spend the test split (one scoring per split) on a head.

    >>> next_command(result, "sweeps/demo.yaml", ["n_trials=8", "data.uri=/data"])   # doctest: +SKIP
    'octft promote sweeps/demo.yaml'
    """
    if result.probe and result.best is not None:
        return (f"an LP-FT study with init.head_from: {spec_path} (as sweeps/demo_lpft.yaml has), then promote "
                "that study; promoting this probe study would spend the test split on a head")
    sweep_overrides = [text for text in split_overrides(overrides)[0] if text.split("=", 1)[0].strip() != "n_trials"]
    words = ["octft", "promote"] if result.best is not None else ["octft", "sweep", "status"]
    words += [str(spec_path), *sweep_overrides]
    if storage:
        words += ["--storage", str(redact(storage))]
    return shlex.join(words)


def launch(
    spec_path: str | Path,
    *,
    n_trials: int | None = None,
    workers: int = 1,
    devices_per_trial: int | None = None,
    storage: str | None = None,
    overrides: Sequence[str] = (),
    heartbeat_interval: int = DEFAULT_HEARTBEAT_S,
    grace_period: int | None = None,
    enqueue_from: str | None = None,
    enqueue_top: int = 3,
    fresh_process_per_trial: bool = False,
    runner: RunnerKind | None = None,
    verbose: bool = False,
) -> LaunchResult:
    """Create or resume the study of `spec_path` and run its trials until the budget is spent.

    `overrides`: key=value pairs; sweep-file keys (n_trials, fixed.*, sampler.*, ...) change the spec, all others
    the base experiment of every trial (e.g. data.uri=/data/aireadi). `enqueue_from`: an earlier sweep file or
    `models:/NAME@champion` whose params are tried first (`octft.sweep.warmstart`). `devices_per_trial=None`: on a TPU
    host its chips divided among the workers, elsewhere 1. `fresh_process_per_trial`: a new runner for every trial.
    `runner`: where trials train, when not the study's default (`octft.sweep.plan.resolve_plan`; tests run them
    in-process). `verbose`: every worker also prints its trials' starts and epochs (`octft.sweep.worker.run_worker`).
    """
    plan, _ = resolve_plan(spec_path, storage=storage, overrides=overrides,
                           n_trials=n_trials, workers=workers, devices_per_trial=devices_per_trial,
                           heartbeat_interval=heartbeat_interval, grace_period=grace_period,
                           fresh_process_per_trial=fresh_process_per_trial, runner=runner)
    return run_launch(plan, make_runner(plan, 0), enqueue_from=enqueue_from, enqueue_top=enqueue_top, verbose=verbose)


def run_launch(plan: LaunchPlan, runner: Runner, *, enqueue_from: str | None = None, enqueue_top: int = 3,
               verbose: bool = False) -> LaunchResult:
    """The launch of a resolved `plan`, worker 0's `runner` made (and a warm one started) first: its start overlaps
    this. `octft sweep launch` makes the runner before it imports this module."""
    spec, settings = plan.spec(), plan.launch
    workers: list[subprocess.Popen] = []
    try:
        rdb = open_study_storage(plan.storage_url(), heartbeat_interval=settings.heartbeat_interval,
                                 grace_period=settings.grace_period)
        study, plan = create_or_load_study(plan, rdb)
        plan.write()
        workers = [_start_worker(plan, index, verbose) for index in range(1, settings.workers)]
        store = MlflowStore(plan.tracking_url())
        store.reopen_run(plan.parent_run_id)
        reaped = reap_stale_trials(study, rdb, store)
        if reaped:
            print(f"trials {reaped} of study {spec.study_name!r} lost their worker: marked FAIL, retried once", flush=True)
        setup = prepare_study_data(plan, runner)
        enqueued = []
        if enqueue_from:
            with study_lock(rdb, spec.study_name):  # two hosts launching together enqueue each set once
                enqueued = warm_start(study, spec, enqueue_from, top=enqueue_top, store=store,
                                      parent_run_id=plan.parent_run_id, provenance=study_provenance(plan, setup))
            print(f"warm start from {enqueue_from}: {len(enqueued)} parameter sets enqueued"
                  + "".join(f"\n  {entry['origin']}" for entry in enqueued), flush=True)
    except BaseException:
        for worker in workers:
            _release(worker, go=False)  # it closes its runner and exits without taking a trial
        runner.close(timeout=0)
        for worker in workers:
            _wait_or_kill(worker, timeout=60)
        raise
    for worker in workers:
        _release(worker, go=True)
    started = time.perf_counter()
    try:
        codes = [_run_here(plan, runner, verbose), *(worker.wait() for worker in workers)]
    except KeyboardInterrupt:
        # The workers got the same Ctrl-C (one process group); give them a moment to tell Optuna.
        for worker in workers:
            worker.wait(timeout=60)
        # Trials still RUNNING belong to another launch (another host) that keeps the parent run open.
        if not any(trial.state == TrialState.RUNNING for trial in study.get_trials(deepcopy=False)):
            store.end_run(plan.parent_run_id, "KILLED", "interrupted (Ctrl-C)")
        raise
    result = _finish(study, plan, store, codes, reaped, enqueued)
    result.seconds = time.perf_counter() - started
    return result


def _start_worker(plan: LaunchPlan, index: int, verbose: bool) -> subprocess.Popen:
    """Worker `index` as a process: it starts its runner now and takes trials once `_release` says go."""
    return subprocess.Popen(
        [sys.executable, "-m", "octft.sweep.worker", str(plan.path), "--worker-index", str(index), "--wait-for-launch",
         *(["--verbose"] if verbose else [])],
        env=dict(os.environ, **plan.store_environment()), stdin=subprocess.PIPE, text=True)


def _release(worker: subprocess.Popen, *, go: bool) -> None:
    with contextlib.suppress(BrokenPipeError, OSError):  # a worker that died already says so by its exit code
        worker.stdin.write("go\n" if go else "")
        worker.stdin.close()


def _wait_or_kill(worker: subprocess.Popen, timeout: float) -> None:
    try:
        worker.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        worker.kill()
        worker.wait()


def prepare_study_data(plan: LaunchPlan, runner: Runner) -> DataSetup | None:
    """Audit and prepare the data once, before any trial starts: the preparation plan (files and bytes to fetch, the
    prepared cache's size) is printed and a disk that cannot hold it is refused now, and every runner's own data
    check then finds each volume prepared. (A space that samples `data.*` keys leaves it to each trial: None.)"""
    spec = plan.spec()
    if any(name.startswith("data.") for name in spec.space):
        return None
    data = base_config(spec, plan.experiment_overrides).data
    print(f"study {spec.study_name!r}: auditing and preparing the data once for every trial", flush=True)
    if isinstance(runner, InProcessRunner):
        return runner.prepare(data, plan)  # kept in the runner's cache: its first trial audits nothing again
    return prepare_data(data, progress=True)


def study_provenance(plan: LaunchPlan, setup: DataSetup | None) -> dict[str, str]:
    """The provenance tags (`octft.train.provenance`) every trial of the study will record: what a warm start's
    sources must match."""
    if setup is None:
        raise WarmStartError(f"study {plan.study_name!r} samples data.* keys, so its trials' data differ and no warm-start "
                             "source can be checked against them; drop --enqueue-from or fix the data keys")
    return run_provenance(base_config(plan.spec(), plan.experiment_overrides), setup.prepared.volumes)


def _run_here(plan: LaunchPlan, runner: Runner, verbose: bool) -> int:
    """Worker 0 in the launch's process: its exit code as a worker process's would be (a bug in the worker prints
    its traceback and gives 1; the other workers go on)."""
    try:
        run_worker(plan, 0, runner, verbose=verbose)
    except Exception:
        traceback.print_exc()
        return 1
    return 0


def _finish(study: optuna.Study, plan: LaunchPlan, store: MlflowStore, codes: list[int], reaped: list[int],
            enqueued: list) -> LaunchResult:
    spec = plan.spec()
    trials = study.get_trials(deepcopy=False)
    counts = {state.name: sum(1 for trial in trials if trial.state == state) for state in TrialState}
    update_parent_best(store, plan.parent_run_id, study, spec.objective.metric)  # the last trials' results
    update_parent_note(store, study, spec)
    if not counts["RUNNING"] and not counts["WAITING"]:
        store.end_run(plan.parent_run_id, "FINISHED")
    return LaunchResult(spec.study_name, Path(plan.study_dir), plan.parent_run_id, codes, counts, reaped, enqueued,
                        plan.path, spec.objective.metric, best_so_far(study), probe=plan.is_probe())
