"""A sweep worker: take a trial, run it in its own process, tell Optuna how it ended; repeat.

`octft sweep launch` starts these as `python -m octft.sweep.workers SPEC --worker-index I ...`. A trial
process that runs out of memory, segfaults or aborts in XLA fails that trial only: the worker records
the exit code or signal and the last lines the process wrote (redacted) as `fail_reason`, ends its
MLflow run FAILED, and takes the next trial.

While a trial runs, the worker writes the trial's heartbeat to the storage. If the worker dies (killed,
host lost), the heartbeat stops, and the next launch or any live worker marks the trial FAIL and
queues one retry. Trial processes stay in the worker's process group: kill the group, not the worker
alone, or an orphaned trial keeps training.

Devices: each worker owns `devices_per_trial` devices, and a trial trains data-parallel over them;
`octft.train.devices.trial_device_env` says which, by environment variables of the trial process.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import optuna
from optuna.storages import RDBStorage
from optuna.trial import TrialState

from octft.sweep.study import (
    DEFAULT_HEARTBEAT_S,
    load_launch_spec,
    open_storage,
    reap_stale_trials,
    study_lock,
    sweep_tracking_uri,
    take_trial,
    worker_seed_offset,
)
from octft.sweep.tracking import settle_run, update_parent_best
from octft.train.devices import trial_device_env
from octft.track import redact

STDERR_TAIL_LINES = 20
# Which chips a trial process gets is a device fact, kept torch-free beside the runtime.
device_env = trial_device_env


@contextlib.contextmanager
def heartbeat(storage: RDBStorage, trial_id: int) -> Iterator[None]:
    """Record the trial's heartbeat every `heartbeat_interval` seconds while the block runs."""
    interval = storage.get_heartbeat_interval()
    if not interval:
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        while True:
            try:
                storage.record_heartbeat(trial_id)
            except Exception as error:  # a storage hiccup; the grace period covers a few missed beats
                print(f"heartbeat of trial id {trial_id} failed: {redact(str(error))}", file=sys.stderr, flush=True)
            if stop.wait(interval):
                return

    thread = threading.Thread(target=beat, name=f"heartbeat-{trial_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def describe_exit(returncode: int, log_path: Path, lines: int = STDERR_TAIL_LINES) -> str:
    """Why a trial process failed: its exit code or signal and the last `lines` it wrote, redacted."""
    if returncode < 0:
        name = signal.Signals(-returncode).name if -returncode in signal.valid_signals() else str(-returncode)
        hint = " (the out-of-memory killer sends SIGKILL)" if -returncode == signal.SIGKILL else ""
        head = f"trial process killed by signal {name}{hint}"
    else:
        head = f"trial process exited with code {returncode}"
    tail = log_path.read_text(errors="replace").splitlines()[-lines:] if log_path.is_file() else []
    text = head + (":\n" + "\n".join(tail) if tail else "")
    return str(redact(text))[-4000:]


def run_trial_process(
    *, spec_path: str, trial_id: int, run_dir: Path, worker_index: int, devices_per_trial: int,
    sweep_overrides: Sequence[str], experiment_overrides: Sequence[str],
) -> tuple[int, dict | None]:
    """Run `python -m octft.sweep.trial` for one trial; return its exit code and its outcome.json (or None)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    outcome_path = run_dir / "outcome.json"
    outcome_path.unlink(missing_ok=True)
    command = [
        sys.executable, "-m", "octft.sweep.trial", spec_path, "--trial-id", str(trial_id), "--run-dir", str(run_dir),
        *[f"--sweep-override={text}" for text in sweep_overrides],
        *[f"--override={text}" for text in experiment_overrides],
    ]
    env = dict(os.environ, **device_env(worker_index, devices_per_trial), PYTHONUNBUFFERED="1")
    with open(run_dir / "trial.log", "ab") as log:
        returncode = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, check=False).returncode
    outcome = json.loads(outcome_path.read_text()) if outcome_path.is_file() else None
    return returncode, outcome


def tell_outcome(
    study: optuna.Study, trial: optuna.trial.Trial, returncode: int, outcome: dict | None, log_path: Path, metric: str
) -> tuple[TrialState, str | None]:
    """Store the outcome's user attrs and tell Optuna COMPLETE, PRUNED or FAIL; return the state and reason."""
    if outcome is not None:
        for key in ("best_epoch", "epochs_run", "best_metrics"):
            if key in outcome:
                trial.set_user_attr(key, outcome[key])
    status = (outcome or {}).get("status")
    if returncode == 0 and status in ("completed", "early_stopped") and outcome.get("best_value") is not None:
        value = outcome["best_metrics"].get(metric, outcome["best_value"])
        study.tell(trial, float(value), state=TrialState.COMPLETE)
        return TrialState.COMPLETE, outcome.get("stop_reason")
    if returncode == 0 and status == "pruned":
        study.tell(trial, state=TrialState.PRUNED)
        return TrialState.PRUNED, outcome.get("stop_reason")
    if returncode == 0:
        reason = f"trial process ended without a usable outcome ({outcome!r}); see {log_path}"
    elif outcome is not None and outcome.get("status") == "failed" and outcome.get("stop_reason"):
        reason = f"{outcome['stop_reason']} (exit code {returncode}; log {log_path})"
    else:
        reason = describe_exit(returncode, log_path)
    reason = str(redact(reason))
    trial.set_user_attr("fail_reason", reason)
    study.tell(trial, state=TrialState.FAIL)
    return TrialState.FAIL, reason


def run_worker(
    spec_path: str,
    *,
    worker_index: int,
    study_dir: Path,
    launch_index: int = 0,
    n_trials: int | None,
    devices_per_trial: int = 1,
    heartbeat_interval: int = DEFAULT_HEARTBEAT_S,
    grace_period: int | None = None,
    deadline: float | None = None,
    sweep_overrides: Sequence[str] = (),
    experiment_overrides: Sequence[str] = (),
) -> int:
    """Run trials of the study until the budget is spent (or `deadline`, a time.time()); return how many ran."""
    from octft.sweep.pruners import build_pruner
    from octft.sweep.spec import build_sampler

    spec, _, _ = load_launch_spec(spec_path, [*sweep_overrides, *experiment_overrides])
    tracking_uri = sweep_tracking_uri(spec)
    storage = open_storage(spec.storage, heartbeat_interval=heartbeat_interval, grace_period=grace_period)
    study = optuna.load_study(
        study_name=spec.study_name, storage=storage,
        sampler=build_sampler(spec, seed_offset=worker_seed_offset(launch_index, worker_index)), pruner=build_pruner(spec),
    )
    parent_run_id = str(study.user_attrs["mlflow_parent_run_id"])
    metric = spec.objective.metric
    done = 0
    while deadline is None or time.time() < deadline:
        reap_stale_trials(study, storage, tracking_uri)
        with study_lock(storage, spec.study_name), warnings.catch_warnings():
            # Optuna warns that heartbeats are meant for Study.optimize; this loop beats for its trials itself.
            warnings.filterwarnings("ignore", message="Heartbeat of storage")
            trial = take_trial(study, n_trials)
        if trial is None:
            break
        with heartbeat(storage, trial._trial_id):
            frozen = storage.get_trial(trial._trial_id)
            if frozen.system_attrs.get("retry_history"):
                # A retry inherits the dead trial's user attrs (its run id, epochs, reason): they are not this run's.
                for key in frozen.user_attrs:
                    trial.set_user_attr(key, None)
                trial.set_user_attr("retry_of", frozen.system_attrs["retry_history"][0])
            from octft.sweep.space import suggest

            suggest(trial, spec.space)  # sampled here, in the worker whose sampler sees the whole study
            run_dir = study_dir / f"trial-{trial.number}"
            print(f"worker {worker_index}: trial {trial.number} starts ({run_dir})", flush=True)
            try:
                returncode, outcome = run_trial_process(
                    spec_path=spec_path, trial_id=trial._trial_id, run_dir=run_dir, worker_index=worker_index,
                    devices_per_trial=devices_per_trial, sweep_overrides=sweep_overrides,
                    experiment_overrides=experiment_overrides,
                )
            except KeyboardInterrupt:
                trial.set_user_attr("fail_reason", "interrupted (Ctrl-C)")
                study.tell(trial, state=TrialState.FAIL)
                run_id = storage.get_trial(trial._trial_id).user_attrs.get("mlflow_run_id")
                settle_run(tracking_uri, run_id, TrialState.FAIL, "interrupted (Ctrl-C)")
                raise
            state, reason = tell_outcome(study, trial, returncode, outcome, run_dir / "trial.log", metric)
        run_id = storage.get_trial(trial._trial_id).user_attrs.get("mlflow_run_id")
        settle_run(tracking_uri, run_id, state, reason)
        update_parent_best(tracking_uri, parent_run_id, study, metric)
        done += 1
        print(f"worker {worker_index}: trial {trial.number} {state.name}" + (f": {reason.splitlines()[0]}" if reason else ""),
              flush=True)
    return done


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m octft.sweep.workers", description=__doc__.split("\n")[0])
    parser.add_argument("spec")
    parser.add_argument("--worker-index", type=int, required=True)
    parser.add_argument("--launch-index", type=int, default=0)
    parser.add_argument("--study-dir", required=True)
    parser.add_argument("--n-trials", type=int)
    parser.add_argument("--devices-per-trial", type=int, default=1)
    parser.add_argument("--heartbeat-interval", type=int, default=DEFAULT_HEARTBEAT_S)
    parser.add_argument("--grace-period", type=int)
    parser.add_argument("--deadline", type=float)
    parser.add_argument("--sweep-override", action="append", default=[])
    parser.add_argument("--override", action="append", default=[], dest="overrides")
    args = parser.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        run_worker(
            args.spec, worker_index=args.worker_index, launch_index=args.launch_index, study_dir=Path(args.study_dir), n_trials=args.n_trials,
            devices_per_trial=args.devices_per_trial, heartbeat_interval=args.heartbeat_interval,
            grace_period=args.grace_period, deadline=args.deadline, sweep_overrides=args.sweep_override,
            experiment_overrides=args.overrides,
        )
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
