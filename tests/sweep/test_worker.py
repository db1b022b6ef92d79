"""The one worker loop, in this process: what it records, tells Optuna and settles in MLflow for every way a trial
can end, how a dead worker's trial is failed and retried, and a Ctrl-C. Runners here are scripted (the worker's side
of the pipeline is under test) or in-process (real training); process runners are `test_runners.py`'s."""

from __future__ import annotations

import time

import pytest
from optuna.trial import TrialState

from octft.sweep.plan import resolve_plan
from octft.sweep.records import TrialOutcome, trial_record
from octft.sweep.storage import open_study_storage
from octft.sweep.study import create_or_load_study
from octft.sweep.warmstart import WarmStart, enqueue
from octft.sweep.worker import run_worker, start_trial
from octft.track.mlflow_store import MlflowStore
from sweeps import LR_HEAD, load, records, run_status, write_spec

SPACE = {**LR_HEAD, "train.unfreeze_epoch": {"type": "int", "low": 0, "high": 1}}


class ScriptedRunner:
    """A runner whose outcomes the test writes (`script(number)`): nothing trains, nothing ends a run."""

    def __init__(self, script):
        self.script = script
        self.ran: list[int] = []
        self.closed = False
        self.pid = 4242

    def start(self):
        pass

    def run(self, plan, number):
        self.ran.append(number)
        return self.script(number)

    def close(self, timeout=60):
        self.closed = True


def launched(tmp_path, *, n_trials, space=SPACE, **settings):
    """A study launched as `octft sweep launch` would (plan resolved and written, study and parent run made), with no
    trial run yet: (plan, storage, tracking uri)."""
    spec, storage, tracking_uri = write_spec(tmp_path, study_name="worker", n_trials=n_trials, space=space)
    plan, _ = resolve_plan(spec, overrides=[f"output_dir={tmp_path / 'runs'}"], **settings)
    _, plan = create_or_load_study(plan, open_study_storage(plan.storage_url()))
    plan.write()
    return plan, storage, tracking_uri


def test_every_way_a_trial_ends_becomes_its_record_its_state_and_its_runs_status(tmp_path):
    outcomes = {
        0: TrialOutcome(status="completed", best_value=0.75, best_epoch=1, epochs_run=2,
                        best_metrics={"val/balanced_accuracy": 0.75}),
        1: TrialOutcome(status="pruned", best_value=0.3, best_epoch=0, epochs_run=2, prune_reason="collapse",
                        prune_epoch=1, prune_detail="collapsed: class 0 takes 97% of predictions",
                        stop_reason="pruned (collapse): collapsed"),
        2: TrialOutcome(status="failed", stop_reason="ValueError: a bad checkpoint"),
        3: TrialOutcome(status="early_stopped", best_value=None),  # the objective never became a number
    }
    plan, storage, tracking_uri = launched(tmp_path, n_trials=4)
    runner = ScriptedRunner(outcomes.get)
    echoed = []
    assert run_worker(plan, 0, runner, echo=echoed.append) == 4
    assert runner.ran == [0, 1, 2, 3] and runner.closed

    study = load(storage, "worker")
    assert [trial.state for trial in study.trials] == [TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL,
                                                       TrialState.FAIL]
    assert study.trials[0].value == 0.75
    completed, pruned, failed, unusable = records(storage, "worker")
    assert [record.status for record in (completed, pruned, failed, unusable)] == ["completed", "pruned", "failed",
                                                                                   "failed"]
    for trial, record in zip(study.trials, (completed, pruned, failed, unusable)):
        # What ran is what `octft sweep show` prints: the trial's params as overrides of the base.
        assert record.overrides == plan.trial_overrides(trial.params) and record.replay == plan.replay_command(record.overrides)
        assert record.run_dir == str(plan.trial_dir(trial.number)) and (record.worker, record.runner_pid) == (0, 4242)
        assert record.unfreeze_epoch == trial.params["train.unfreeze_epoch"]
        status, tags = run_status(tracking_uri, record.mlflow_run_id)
        # The runner ended no run: the worker settled each to match Optuna.
        assert status == {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}[trial.state.name], trial.number
        assert tags["optuna.trial_number"] == str(trial.number) and tags["mlflow.parentRunId"] == plan.parent_run_id
    assert pruned.outcome.prune_reason == "collapse" and "collapse" in run_status(tracking_uri, pruned.mlflow_run_id)[1]["octft.end_reason"]
    assert failed.fail_reason == "ValueError: a bad checkpoint"
    assert "without a usable outcome" in unusable.fail_reason
    assert MlflowStore(tracking_uri).metric_history(plan.parent_run_id, "best/val/balanced_accuracy")[-1] == (1, 0.75)
    # One line per trial end (no start lines without verbose), each with the study's best so far.
    assert echoed == [
        "trial 0 COMPLETE val/balanced_accuracy=0.750 at epoch 1 (new best)",
        "trial 1 PRUNED (collapse) at epoch 1 val/balanced_accuracy=0.300: collapsed: class 0 takes 97% of "
        "predictions (best: trial 0, 0.750)",
        "trial 2 FAIL: ValueError: a bad checkpoint (best: trial 0, 0.750)",
        "trial 3 FAIL: trial ended without a usable outcome (early_stopped, best value None) (best: trial 0, 0.750)",
    ]


def test_a_dead_workers_trial_fails_and_its_one_retry_starts_clean(tmp_path):
    plan, storage, tracking_uri = launched(tmp_path, n_trials=2, heartbeat_interval=1, grace_period=1)
    # A worker takes trial 0, beats once and dies: its run stays RUNNING, its record says it runs.
    rdb = open_study_storage(plan.storage_url(), heartbeat_interval=1, grace_period=1)
    study = load(storage, "worker")
    trial = study.ask()
    dead = start_trial(plan, study, rdb, MlflowStore(plan.tracking_url()), trial, 5)
    rdb.record_heartbeat(trial._trial_id)
    time.sleep(2.5)  # past the grace period

    runner = ScriptedRunner(lambda number: TrialOutcome(status="completed", best_value=0.5 + number / 10, best_epoch=1,
                                                         epochs_run=2))
    assert run_worker(plan, 0, runner) == 2
    study = load(storage, "worker")
    assert [trial.state for trial in study.trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    first, retry, new = study.trials
    first_record, retry_record, _ = records(storage, "worker")
    assert "worker running this trial died" in first_record.fail_reason and first_record.worker == 5
    status, tags = run_status(tracking_uri, dead.mlflow_run_id)
    assert status == "FAILED" and "worker running this trial died" in tags["octft.end_reason"]
    # The retry: the same params, its own run and record, linked to the attempt it replaces and to nothing else of it.
    assert retry.params == first.params != new.params and runner.ran == [1, 2]
    assert retry_record.retry_of == 0 and retry_record.worker == 0 and retry_record.fail_reason is None
    assert retry_record.mlflow_run_id not in (None, dead.mlflow_run_id)
    assert retry.system_attrs["failed_trial"] == 0  # Optuna's own link, for its tools
    assert not [key for key in retry.user_attrs if key.startswith("octft.epoch.")]


def test_ctrl_c_fails_the_running_trial_with_its_reason_ends_its_run_and_retries_it(tmp_path):
    plan, storage, tracking_uri = launched(tmp_path, n_trials=3)

    def interrupted(number):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_worker(plan, 0, ScriptedRunner(interrupted))
    trial, retried = load(storage, "worker").trials
    record, retry_record = records(storage, "worker")
    assert trial.state == TrialState.FAIL and record.fail_reason == "interrupted (Ctrl-C); retried once"
    assert run_status(tracking_uri, record.mlflow_run_id)[0] == "FAILED"
    # Interrupted is no fault of its params: they are queued again, in its place in the budget.
    assert retried.state == TrialState.WAITING and retried.params == trial.params and retry_record.retry_of == 0

    # A retry interrupted in its turn is not queued a third time, and says so.
    with pytest.raises(KeyboardInterrupt):
        run_worker(plan, 0, ScriptedRunner(interrupted))
    assert records(storage, "worker")[1].fail_reason == "interrupted (Ctrl-C); not retried: it was a retry"


def test_a_queued_trial_keeps_where_it_came_from(tmp_path):
    plan, storage, _ = launched(tmp_path, n_trials=2)
    study = load(storage, "worker")
    enqueue(study, [WarmStart("models:/octft version 3 (run abc)", {"optim.lr_head": 0.002, "train.unfreeze_epoch": 1}, {})],
            "models:/octft@champion")
    run_worker(plan, 0, ScriptedRunner(lambda number: TrialOutcome(status="completed", best_value=0.5, best_epoch=0,
                                                                    epochs_run=2)))
    first, second = records(storage, "worker")
    assert first.enqueued_from == "models:/octft version 3 (run abc)" and "optim.lr_head=0.002" in first.overrides
    assert second.enqueued_from is None
    assert trial_record(load(storage, "worker").trials[0]).status == "completed"
