"""A sweep worker: one loop, the same for every trial of every kind (fine-tune or probe).

    ask (under the study lock, within the budget) -> sample the params -> the trial's overrides (exactly what
    `octft sweep show` prints) -> a fresh record and MLflow run -> runner.run(plan, number) -> one TrialOutcome
    -> the record, then Optuna's state, the MLflow run's status and the parent run's best

A probe study's worker with an in-process runner takes up to the sweep's `heads_per_pass` trials at once and hands
them to `runner.run_many`, which trains their heads in one stacked pass; every other step above is per trial.

`octft sweep launch` is worker 0 itself; workers 1.. are `python -m octft.sweep.worker PLAN --worker-index I
--wait-for-launch`, started as soon as the plan is written, so that their imports and runners' starts overlap the
launch's data preparation; they take trials once the launch sends `go` (the data is ready). While
a trial runs, its worker writes the trial's heartbeat to the storage: if the worker dies (killed, host lost), the
next launch or any live worker marks the trial FAIL and queues one retry (`octft.sweep.study.reap_stale_trials`).
A runner ends when its worker does, and a worker a launch started ends when the launch does (`watch_parent`): the
trial then fails (with the reason, retried once), and no MLflow run of it says FINISHED, since only the worker ends a
trial's run, after Optuna has its state.

    >>> run_worker(LaunchPlan.read(path), 0, InProcessRunner())                      # doctest: +SKIP
    8
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import socket
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import optuna
from optuna.storages import RDBStorage
from optuna.trial import TrialState

from octft.config import ConfigError
from octft.console import epoch_lines, log_to, quiet_console
from octft.errors import OctftError
from octft.redaction import redact
from octft.sweep.plan import LaunchPlan
from octft.sweep.records import TrialOutcome, TrialRecord, trial_record
from octft.sweep.lifetime import watch_parent
from octft.sweep.runners import Runner, make_runner
from octft.sweep.space import suggest
from octft.sweep.storage import open_study_storage
from octft.sweep.study import await_running_trials, next_trials, open_worker_study, reap_stale_trials, retry
from octft.sweep.tracking import log_trial_result, settle_run, start_trial_run, update_parent_best
from octft.track.mlflow_store import MlflowStore


# A runner still running when its trial is interrupted gets this long to end (Ctrl-C reached it too) before it is killed.
RUNNER_STOP_S = 5.0
# Why this worker is being interrupted, when not by Ctrl-C (`stop_with_parent`).
_interruption: list[str] = []


def interrupted_by() -> str:
    return _interruption[0] if _interruption else "interrupted (Ctrl-C)"


def stop_with_parent() -> None:
    """End this worker (as Ctrl-C would: its trial FAIL with the reason, retried once, its runner killed) when the
    launch that started it ends: a worker never trains on for a launch that is gone."""

    def interrupt_main(signum, frame) -> None:
        raise KeyboardInterrupt

    def interrupt() -> None:
        _interruption.append("interrupted: the launch that started this worker ended")
        # A signal to the main thread itself: it may be blocked reading its runner's reply, which only a signal ends.
        signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR1)

    signal.signal(signal.SIGUSR1, interrupt_main)
    watch_parent(interrupt)


def run_worker(plan: LaunchPlan, worker_index: int, runner: Runner, *, echo: Callable[[str], None] = print,
               verbose: bool = False) -> int:
    """Run trials of `plan`'s study on `runner` until the budget is spent or the deadline passes; return how many.

    `worker_index` keeps this worker's sampler seed and devices apart from the launch's other workers'. The runner is
    closed when the loop ends. `echo` gets one line per trial end (`describe`); `verbose`: also a line when a trial
    starts and, when it ends, its epochs (from its trial.log, where its runner wrote them).
    """
    launch = plan.launch
    try:
        storage = open_study_storage(plan.storage_url(), heartbeat_interval=launch.heartbeat_interval,
                                     grace_period=launch.grace_period)
        study = open_worker_study(plan, storage, worker_index)
        store = MlflowStore(plan.tracking_url())
        done = 0
        size = trials_per_pass(plan)
        while launch.deadline is None or time.time() < launch.deadline:
            reap_stale_trials(study, storage, store)
            trials = next_trials(study, storage, launch.n_trials, size)
            if not trials:
                # The budget is taken: wait for the other workers' trials (any host), taking the retry of one whose
                # worker dies meanwhile; the slice may be gone before the next launch could.
                if await_running_trials(study, storage, store):
                    continue
                break
            with heartbeat(storage, [trial._trial_id for trial in trials]):
                records = [start_trial(plan, study, storage, store, trial, worker_index, runner_pid=runner.pid)
                           for trial in trials]
                if verbose:
                    for trial, record in zip(trials, records):
                        echo(f"trial {trial.number} starts on worker {worker_index} ({record.run_dir})")
                try:
                    if len(trials) == 1:
                        outcomes = [runner.run(plan, trials[0].number)]
                    else:
                        outcomes = runner.run_many(plan, [trial.number for trial in trials])
                except KeyboardInterrupt:
                    # The runner goes first: nothing of this attempt may land after Optuna has its state.
                    runner.close(timeout=RUNNER_STOP_S)
                    for trial, record in zip(trials, records):
                        again = retry(study, storage.get_trial(trial._trial_id))  # not a failure of its params
                        reason = f"{interrupted_by()}; " + ("retried once" if again else "not retried: it was a retry")
                        finish_trial(plan, study, storage, store, trial, record,
                                     TrialOutcome(status="failed", stop_reason=reason))
                    raise
                # Each trial's line as Optuna takes its state: its "best so far" counts the trials told before it.
                for trial, record, outcome in zip(trials, records, outcomes):
                    state = finish_trial(plan, study, storage, store, trial, record, outcome)
                    done += 1
                    if verbose:
                        for line in epoch_lines(Path(record.run_dir) / "trial.log"):
                            echo(f"  trial {trial.number} {line}")
                    echo(describe(trial.number, state, record.outcome, plan.spec().objective.metric, best_so_far(study)))
    finally:
        runner.close()
    return done


def start_trial(plan: LaunchPlan, study: optuna.Study, storage: RDBStorage, store: MlflowStore,
                trial: optuna.trial.Trial, worker_index: int, *, runner_pid: int | None = None) -> TrialRecord:
    """Sample the trial's params (here, where the sampler sees the whole study), make its MLflow run and write its
    record; a queued trial's record (a retry, a warm start) passes on only where it came from."""
    queued = trial_record(storage.get_trial(trial._trial_id))
    overrides = plan.trial_overrides(suggest(trial, plan.spec().space))
    run_dir = plan.trial_dir(trial.number)
    record = TrialRecord(status="running", worker=worker_index, host=socket.gethostname(), run_dir=str(run_dir),
                         overrides=overrides, replay=plan.replay_command(overrides), runner_pid=runner_pid,
                         unfreeze_epoch=_unfreeze_epoch(plan, overrides), retry_of=queued.retry_of,
                         enqueued_from=queued.enqueued_from)
    record.mlflow_run_id = start_trial_run(store, plan, trial.number, str(run_dir))
    record.save(storage, trial._trial_id)
    return record


def finish_trial(plan: LaunchPlan, study: optuna.Study, storage: RDBStorage, store: MlflowStore,
                 trial: optuna.trial.Trial, record: TrialRecord, outcome: TrialOutcome) -> TrialState:
    """Record the outcome, tell Optuna COMPLETE, PRUNED or FAIL, make the MLflow run's status match, update the
    parent run's best when this trial is it. The record is written first: Optuna refuses attrs on a finished trial."""
    if outcome.succeeded:
        state = TrialState.COMPLETE
    elif outcome.status == "pruned":
        state = TrialState.PRUNED
    else:
        state = TrialState.FAIL
        reason = outcome.stop_reason or "no reason given"
        if outcome.status != "failed":
            reason = f"trial ended without a usable outcome ({outcome.status}, best value {outcome.best_value})"
        log = plan.trial_dir(trial.number) / "trial.log"
        outcome.status, outcome.stop_reason = "failed", str(redact(reason + (f" (log {log})" if log.is_file() else "")))
    record.status, record.outcome = outcome.status, outcome
    record.save(storage, trial._trial_id)
    with warnings.catch_warnings():
        # Optuna warns that heartbeats are meant for Study.optimize; this loop beats for its trials itself.
        warnings.filterwarnings("ignore", message="Heartbeat of storage")
        study.tell(trial, outcome.best_value if state == TrialState.COMPLETE else None, state=state)
    log_trial_result(store, record, state, plan.spec().objective.metric)
    # The runner left the run open (or died): it ends now that Optuna holds the trial's state.
    settle_run(store, record.mlflow_run_id, state, outcome.stop_reason if outcome.run_status is None else None)
    if state == TrialState.COMPLETE and study.best_trial.number == trial.number:  # the parent's best changed
        update_parent_best(store, plan.parent_run_id, study, plan.spec().objective.metric)
    return state


def describe(number: int, state: TrialState, outcome: TrialOutcome, metric: str, best: tuple[int, float] | None) -> str:
    """How a trial ended, in one line, with the study's best so far (`best_so_far`):

        trial 7 COMPLETE val/balanced_accuracy=0.712 at epoch 5 (best: trial 3, 0.741)
        trial 2 PRUNED (collapse) at epoch 4 val/balanced_accuracy=0.312: collapsed: class 0 takes 97.0% of ... (best: ...)
        trial 9 FAIL: ValueError: a bad checkpoint (log runs/.../trial-9/trial.log) (best: trial 3, 0.741)

    A pruned trial's value is its best epoch's, before it was pruned.
    """
    if best is None:
        standing = "no trial complete yet"
    else:
        standing = "new best" if best[0] == number else f"best: trial {best[0]}, {best[1]:.3f}"
    value = f"{metric}={'none' if outcome.best_value is None else format(outcome.best_value, '.3f')}"
    if state == TrialState.COMPLETE:
        return f"trial {number} COMPLETE {value} at epoch {outcome.best_epoch} ({standing})"
    if state == TrialState.PRUNED:
        # The reason's first clause: the collapse pruner's detail goes on about its streak and grace epochs.
        detail = (outcome.prune_detail or "").split(";")[0].removesuffix(f" at epoch {outcome.prune_epoch}")
        return (f"trial {number} PRUNED ({outcome.prune_reason}) at epoch {outcome.prune_epoch} {value}"
                + (f": {detail}" if detail else "") + f" ({standing})")
    reason = outcome.stop_reason.splitlines()[0] if outcome.stop_reason else "no reason given"
    return f"trial {number} FAIL: {reason} ({standing})"


def best_so_far(study: optuna.Study) -> tuple[int, float] | None:
    """The study's best trial and its value now (every worker's trials), or None while none is COMPLETE."""
    try:
        best = study.best_trial
    except ValueError:  # no COMPLETE trial yet
        return None
    return best.number, float(best.value)


@contextlib.contextmanager
def heartbeat(storage: RDBStorage, trial_ids: list[int]) -> Iterator[None]:
    """Record the heartbeat of each trial of `trial_ids` every `heartbeat_interval` seconds while the block runs."""
    interval = storage.get_heartbeat_interval()
    if not interval:
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        while True:
            for trial_id in trial_ids:
                try:
                    storage.record_heartbeat(trial_id)
                except Exception as error:  # a storage hiccup; the grace period covers a few missed beats
                    print(f"heartbeat of trial id {trial_id} failed: {redact(str(error))}", file=sys.stderr, flush=True)
            if stop.wait(interval):
                return

    thread = threading.Thread(target=beat, name=f"heartbeat-{trial_ids[0]}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def trials_per_pass(plan: LaunchPlan) -> int:
    """How many trials a worker takes at once: a probe study trained in the worker's process stacks up to the
    sweep's `heads_per_pass` heads in one pass over the stored features; any other study, one trial at a time."""
    if not plan.is_probe() or plan.launch.runner != "in_process":
        return 1
    return plan.spec().resolved_heads_per_pass()


def _unfreeze_epoch(plan: LaunchPlan, overrides: list[str]) -> int:
    """From which epoch the trial's encoder trains (0 for a probe); a config that does not load fails in its runner,
    with the reason."""
    if plan.is_probe():  # no trial of it ever unfreezes: no config to load (a probe trial lasts milliseconds)
        return 0
    try:
        return plan.trial_config(overrides).train.unfreeze_epoch or 0
    except ConfigError:
        return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m octft.sweep.worker PLAN --worker-index I`: one more worker of the launch that wrote PLAN."""
    parser = argparse.ArgumentParser(prog="python -m octft.sweep.worker", description="one worker of a sweep launch")
    parser.add_argument("plan", help="the launch plan (<study dir>/plans/<hash>.json)")
    parser.add_argument("--worker-index", type=int, required=True)
    parser.add_argument("--wait-for-launch", action="store_true",
                        help="start the runner, then take no trial before the line 'go' on standard input (the launch "
                             "sends it once the data is prepared; end of input without it: exit, the launch failed)")
    parser.add_argument("--verbose", action="store_true", help="trial starts, epochs and library logs too")
    args = parser.parse_args(argv)
    with quiet_console(verbose=args.verbose):
        return _work(args)


def _work(args: argparse.Namespace) -> int:
    try:
        plan = LaunchPlan.read(args.plan)
        log_to(Path(plan.study_dir) / "launch.log")  # beside the launch's own library logs
        runner = make_runner(plan, args.worker_index)
        if args.wait_for_launch:
            stop_with_parent()
            runner.start()  # an in-process runner imports the training stack while the launch prepares the data
            if sys.stdin.readline().strip() != "go":  # the launch failed before its trials
                runner.close(timeout=0)
                return 0
        run_worker(plan, args.worker_index, runner, verbose=args.verbose)
    except OctftError as error:
        print(f"octft: error: worker {args.worker_index}: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
