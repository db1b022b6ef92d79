"""A sweep worker: take a trial, hand it to its warm trial runner, tell Optuna how it ended; repeat.

`octft sweep launch` is worker 0 itself (`run_worker` in its process) and starts workers 1.. as
`python -m octft.sweep.workers --worker-index I --study-dir D ...` first thing, writing the launch record's
path to their input once the study is open and the data prepared. A worker imports neither torch nor
torch_xla: it starts its runner (`octft.sweep.trial`) at once, a child process that imports while the launch
works and keeps its imports, compiled graphs and data setup from trial to trial; then it samples each
trial's params, turns them into the trial's overrides once and hands them to the runner. A runner that
runs out of memory,
segfaults or aborts in XLA fails that trial only: the worker records the exit code or signal and the last
lines of the trial's log (redacted) as `fail_reason`, ends its MLflow run FAILED, and the next trial
starts a new runner (`--fresh-process-per-trial`: a new runner for every trial). The runner ends each
trial's MLflow run itself and updates the parent run's best; the worker imports MLflow only to settle a
run its runner could not end as the trial ended.

While a trial runs, the worker writes the trial's heartbeat to the storage. If the worker dies (killed,
host lost), the heartbeat stops, and the next launch or any live worker marks the trial FAIL and
queues one retry. Runners stay in the worker's process group: kill the group, not the worker
alone, or an orphaned runner keeps training.

Devices: each worker owns `devices_per_trial` devices, and a trial trains data-parallel over them;
`octft.train.devices.trial_device_env` says which, by environment variables of the trial runner.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TextIO

import optuna
from optuna.storages import RDBStorage
from optuna.trial import TrialState

from octft.sweep.spec import SweepSpec
from octft.sweep.study import DEFAULT_HEARTBEAT_S, LaunchRecord, next_trial, open_worker_study, reap_stale_trials
from octft.sweep.tracking import RUN_STATUS_OF, settle_run
from octft.train.devices import trial_device_env
from octft.sweep.trial import TrialOutcome, TrialRequest
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


class TrialRunner:
    """The worker's handle on its warm trial runner (`python -m octft.sweep.trial`), started on first use.

    `run` hands the runner one trial and returns its outcome. A runner that dies mid-trial fails that
    trial with its exit described from the trial's log, and the next `run` starts a new runner.
    """

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env = env
        self.log_path = log_path  # the runner's own output between trials (imports, warnings)
        self.process: subprocess.Popen | None = None
        self._replies = None

    def start(self) -> None:
        """Start the runner now (its imports run while the worker opens the study); `run` starts it otherwise."""
        if self.process is not None:
            return
        read_fd, write_fd = os.pipe()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "octft.sweep.trial", "--reply-fd", str(write_fd)],
                stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, env=self.env, pass_fds=(write_fd,),
                text=True,
            )
        os.close(write_fd)  # the runner holds the only write end: its death reads as end of file here
        self._replies = os.fdopen(read_fd, "r")

    def run(self, request: TrialRequest) -> TrialOutcome:
        self.start()
        log_path = Path(request.run_dir) / "trial.log"
        try:
            self.process.stdin.write(request.to_json() + "\n")
            self.process.stdin.flush()
            line = self._replies.readline()
        except BrokenPipeError:
            line = ""
        if line:
            return TrialOutcome.from_json(line)
        returncode = self.process.wait()
        self._forget()
        return TrialOutcome(status="failed", stop_reason=describe_exit(returncode, log_path), runner_pid=None)

    def stop(self, timeout: float = 60) -> None:
        """End the runner: close its input (it exits after its current trial), kill it if it does not."""
        if self.process is None:
            return
        with contextlib.suppress(BrokenPipeError, OSError):
            self.process.stdin.close()
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._forget()

    def _forget(self) -> None:
        if self._replies is not None:
            self._replies.close()
        if self.process is not None and self.process.stdin is not None:
            with contextlib.suppress(BrokenPipeError, OSError):
                self.process.stdin.close()
        self.process, self._replies = None, None


def tell_outcome(
    study: optuna.Study, trial: optuna.trial.Trial, outcome: TrialOutcome, log_path: Path, metric: str
) -> tuple[TrialState, str | None]:
    """Store the outcome's user attrs and tell Optuna COMPLETE, PRUNED or FAIL; return the state and reason."""
    if outcome.epochs_run is not None:
        trial.set_user_attr("best_epoch", outcome.best_epoch)
        trial.set_user_attr("epochs_run", outcome.epochs_run)
        trial.set_user_attr("best_metrics", outcome.best_metrics)
    trial.set_user_attr("xla_compiles", outcome.compiles)
    trial.set_user_attr("xla_compile_seconds", round(outcome.compile_seconds, 3))
    trial.set_user_attr("epoch_seconds", round(outcome.epoch_seconds, 3))
    trial.set_user_attr("runner_trials", outcome.runner_trials)
    trial.set_user_attr("runner_rss_bytes", outcome.runner_rss_bytes)
    if outcome.succeeded:
        value = outcome.best_metrics.get(metric, outcome.best_value)
        study.tell(trial, float(value), state=TrialState.COMPLETE)
        return TrialState.COMPLETE, outcome.stop_reason
    if outcome.status == "pruned":
        study.tell(trial, state=TrialState.PRUNED)
        return TrialState.PRUNED, outcome.stop_reason
    if outcome.status != "failed":
        reason = f"trial ended without a usable outcome ({outcome.status}, best value {outcome.best_value}); see {log_path}"
    elif outcome.runner_pid is not None:  # the runner survived: the trial raised
        reason = f"{outcome.stop_reason} (log {log_path})"
    else:
        reason = str(outcome.stop_reason)
    reason = str(redact(reason))
    trial.set_user_attr("fail_reason", reason)
    study.tell(trial, state=TrialState.FAIL)
    return TrialState.FAIL, reason


def run_worker(
    record: LaunchRecord | TextIO,
    *,
    worker_index: int,
    runner: TrialRunner | None = None,
    runner_log: Path | None = None,
    storage_url: str | None = None,
    n_trials: int | None,
    devices_per_trial: int = 1,
    heartbeat_interval: int = DEFAULT_HEARTBEAT_S,
    grace_period: int | None = None,
    deadline: float | None = None,
    fresh_process_per_trial: bool = False,
) -> int:
    """Run trials of the study until the budget is spent (or `deadline`, a time.time()); return how many ran.

    `record`: the launch's record, or a stream to read its path from (one line, which `launch` writes once
    the study is open and the data prepared; when the stream ends first, the worker takes no trial).
    `runner`: one already started (the launch starts worker 0's before it opens the study); else one is made
    with its output in `runner_log` (default `<study dir>/runner-<worker_index>.log`). `storage_url`: default
    $OCTFT_OPTUNA_STORAGE (the launch sets it): it is not part of `record`.
    """
    from octft.sweep.space import suggest

    if runner is None:
        if runner_log is None:
            runner_log = Path(record.study_dir) / f"runner-{worker_index}.log"
        runner = TrialRunner(dict(os.environ, **device_env(worker_index, devices_per_trial), PYTHONUNBUFFERED="1"),
                             runner_log)
    done = 0
    try:
        # Started first: its imports (torch, MLflow: most of a worker's start) overlap the launch's own work.
        runner.start()
        if not isinstance(record, LaunchRecord):
            line = record.readline().strip()
            if not line:  # the launch failed before its workers were needed, and says why
                runner.stop(timeout=0)  # no trial to finish: do not wait for its imports
                return done
            record = LaunchRecord.read(Path(line))
        study, storage, spec = open_worker_study(record, worker_index, heartbeat_interval=heartbeat_interval,
                                                 grace_period=grace_period, storage_url=storage_url)
        metric = spec.objective.metric
        while deadline is None or time.time() < deadline:
            reap_stale_trials(study, storage, record.tracking_uri)
            trial = next_trial(study, storage, n_trials)
            if trial is None:
                break
            with heartbeat(storage, trial._trial_id):
                frozen = storage.get_trial(trial._trial_id)
                if frozen.system_attrs.get("retry_history"):
                    # A retry inherits the dead trial's user attrs (its run id, epochs, reason): they are not this run's.
                    for key in frozen.user_attrs:
                        trial.set_user_attr(key, None)
                    trial.set_user_attr("retry_of", frozen.system_attrs["retry_history"][0])
                trial.set_user_attr("worker", worker_index)
                params = suggest(trial, spec.space)  # sampled here, in the worker whose sampler sees the whole study
                request = trial_request(record, spec, trial, params)
                print(f"worker {worker_index}: trial {trial.number} starts ({request.run_dir})", flush=True)
                try:
                    outcome = runner.run(request)
                except KeyboardInterrupt:
                    trial.set_user_attr("fail_reason", "interrupted (Ctrl-C)")
                    study.tell(trial, state=TrialState.FAIL)
                    run_id = storage.get_trial(trial._trial_id).user_attrs.get("mlflow_run_id")
                    settle_run(record.tracking_uri, run_id, TrialState.FAIL, "interrupted (Ctrl-C)")
                    raise
                if fresh_process_per_trial:
                    runner.stop()
                state, reason = tell_outcome(study, trial, outcome, Path(request.run_dir) / "trial.log", metric)
            if outcome.run_status != RUN_STATUS_OF.get(state):  # the runner died, or its run ended otherwise
                run_id = storage.get_trial(trial._trial_id).user_attrs.get("mlflow_run_id")
                settle_run(record.tracking_uri, run_id, state, reason)
            done += 1
            print(f"worker {worker_index}: trial {trial.number} {state.name}" + (f": {reason.splitlines()[0]}" if reason else ""),
                  flush=True)
    finally:
        runner.stop()
    return done


def trial_request(record: LaunchRecord, spec: SweepSpec, trial: optuna.trial.Trial, params: dict) -> TrialRequest:
    """The trial's overrides, made once from its params, and everything its runner reports to; also stored
    on the trial (`overrides`, `replay`, `run_dir`) so `octft sweep show` replays exactly this."""
    run_dir = (Path(record.study_dir) / f"trial-{trial.number}").resolve()
    trial_overrides = spec.trial_overrides(params)
    trial.set_user_attr("run_dir", str(run_dir))
    trial.set_user_attr("overrides", trial_overrides)
    trial.set_user_attr("replay", spec.replay_command(params, extra=record.experiment_overrides))
    return TrialRequest(
        trial_id=trial._trial_id, number=trial.number, run_dir=str(run_dir), base=spec.base,
        overrides=[*trial_overrides, *record.experiment_overrides], study_name=spec.study_name,
        tracking_uri=record.tracking_uri, mlflow_experiment=spec.mlflow.experiment,
        parent_run_id=record.parent_run_id, metric=spec.objective.metric, sweep=record.spec,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m octft.sweep.workers", description=__doc__.split("\n")[0])
    parser.add_argument("launch_record", nargs="?",
                        help="the launch's record (JSON); without it, its path is read from stdin (octft sweep launch writes it)")
    parser.add_argument("--worker-index", type=int, required=True)
    parser.add_argument("--study-dir", type=Path, help="where the runner's log goes (default: the record's study_dir)")
    parser.add_argument("--n-trials", type=int)
    parser.add_argument("--devices-per-trial", type=int, default=1)
    parser.add_argument("--heartbeat-interval", type=int, default=DEFAULT_HEARTBEAT_S)
    parser.add_argument("--grace-period", type=int)
    parser.add_argument("--deadline", type=float)
    parser.add_argument("--fresh-process-per-trial", action="store_true")
    args = parser.parse_args(argv)
    if args.launch_record is None and args.study_dir is None:
        parser.error("--study-dir is needed when the launch record comes on stdin")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        run_worker(
            LaunchRecord.read(Path(args.launch_record)) if args.launch_record else sys.stdin,
            worker_index=args.worker_index,
            runner_log=args.study_dir / f"runner-{args.worker_index}.log" if args.study_dir else None,
            n_trials=args.n_trials, devices_per_trial=args.devices_per_trial, heartbeat_interval=args.heartbeat_interval,
            grace_period=args.grace_period, deadline=args.deadline, fresh_process_per_trial=args.fresh_process_per_trial,
        )
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
