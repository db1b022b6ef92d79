"""A stacked pass's writer: its runs end up as MlflowTracker would leave them, its trials' epochs as Trial.report
would, a failed write fails its trial only, and the helper never outlives the process that started it."""

from __future__ import annotations

import math
import subprocess
import sys
import time

import optuna
import pandas as pd
from optuna.pruners import MedianPruner, SuccessiveHalvingPruner
import psutil
import pytest
from mlflow.tracking import MlflowClient

from octft.data.layout import CLASS_SHORT_NAMES
from octft.sweep.pruners import CollapsePruner, PassReads
from octft.sweep.storage import open_study_storage
from octft.sweep.trial import OptunaReporter, PassReporter
from octft.sweep.write_behind import DeferredTracker, WriteBehind
from octft.track.mlflow_store import END_REASON_TAG
from octft.train.recipe import data_inputs


@pytest.fixture
def store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("write-behind")
    return uri, client, experiment


@pytest.fixture
def writer(store, tmp_path):
    writer = WriteBehind(store[0], f"sqlite:///{tmp_path / 'optuna.db'}", tmp_path / "writer.log")
    yield writer
    writer.close()


def _volumes() -> pd.DataFrame:
    return pd.DataFrame([
        {"key": f"{pid}/oct.dcm", "participant_id": pid, "label": label, "class_name": name, "split": split,
         "device": "spectralis", "laterality": "L", "region": "macula", "source_id": f"{pid}|1000|", "size": 1000}
        for pid, label, name, split in [("1001", 0, "healthy", "train"), ("1002", 1, "prediabetes", "train"),
                                        ("1003", 0, "healthy", "val")]])


def test_a_runs_writes_land_in_order_as_the_tracker_would_write_them(store, writer, tmp_path):
    uri, client, experiment = store
    run_id = client.create_run(experiment).info.run_id
    tracker = DeferredTracker(writer, run_id)
    tracker.log_params({"optim.lr_head": 1e-3, "model.head": "mlp"})
    tracker.set_tags({"octft.status": "running"})
    tracker.log_datasets(data_inputs(_volumes(), "/data/aireadi"))
    for epoch in range(3):
        tracker.log_metrics({"val/balanced_accuracy": 0.25 * epoch, "train/loss": math.nan}, step=epoch)
    (tmp_path / "config.yaml").write_text("name: head\n")
    tracker.log_artifact(tmp_path / "config.yaml")
    tracker.set_tags({"octft.status": "pruned"})  # a later write of the same tag wins, as it would in MLflow
    tracker.finish("KILLED", "pruned (collapse)")
    assert tracker.end_status == "KILLED"

    assert writer.drain() == {}
    run = client.get_run(run_id)
    assert run.data.params == {"optim.lr_head": "0.001", "model.head": "mlp"}
    assert run.data.tags["octft.status"] == "pruned"
    assert run.data.tags[END_REASON_TAG] == "pruned (collapse)"
    assert run.info.status == "RUNNING"  # its worker ends it, once Optuna holds the trial's state
    history = client.get_metric_history(run_id, "val/balanced_accuracy")
    assert [(m.step, m.value) for m in history] == [(0, 0.0), (1, 0.25), (2, 0.5)]
    assert math.isnan(client.get_metric_history(run_id, "train/loss")[0].value)
    assert [entry.dataset.name for entry in run.inputs.dataset_inputs] == ["aireadi/train", "aireadi/val"]
    assert [artifact.path for artifact in client.list_artifacts(run_id)] == ["config.yaml"]


def test_a_drain_writes_the_metrics_of_a_run_that_has_not_finished(store, writer):
    uri, client, experiment = store
    run_id = client.create_run(experiment).info.run_id
    DeferredTracker(writer, run_id).log_metrics({"val/loss": 1.5}, step=0)
    assert writer.drain() == {}
    assert client.get_run(run_id).data.metrics == {"val/loss": 1.5}


def test_a_trials_epochs_land_as_trial_report_makes_them(store, writer, tmp_path):
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'optuna.db'}", study_name="pass")
    trial = study.ask()
    for epoch, value in enumerate([0.25, 0.5]):
        writer.write_trial("run-a", trial._trial_id, "set_trial_user_attr", f"epoch_{epoch}", {"balanced_accuracy": value})
        writer.write_trial("run-a", trial._trial_id, "set_trial_intermediate_value", epoch, value)
    with pytest.raises(ValueError, match="'set_trial_state_values' is not one of the trial writes"):
        writer.write_trial("run-a", trial._trial_id, "set_trial_state_values", 1)
    assert writer.drain() == {}
    frozen = study.trials[0]
    assert frozen.intermediate_values == {0: 0.25, 1: 0.5}
    assert frozen.user_attrs == {"epoch_0": {"balanced_accuracy": 0.25}, "epoch_1": {"balanced_accuracy": 0.5}}

    study.tell(trial, 0.5)  # Optuna refuses writes to a finished trial: the trial's error, named once
    writer.write_trial("run-a", trial._trial_id, "set_trial_intermediate_value", 2, 0.75)
    assert list(writer.drain()) == ["run-a"]


def test_a_failed_write_fails_its_run_alone(store, writer):
    uri, client, experiment = store
    bad, good = (client.create_run(experiment).info.run_id for _ in range(2))
    DeferredTracker(writer, bad).log_params({"optim.lr_head": 1e-3})
    DeferredTracker(writer, bad).log_params({"optim.lr_head": 1e-2})  # MLflow params never change
    DeferredTracker(writer, bad).log_metrics({"val/loss": 1.0}, step=0)  # after its failure: not written
    DeferredTracker(writer, good).log_metrics({"val/loss": 2.0}, step=0)
    DeferredTracker(writer, "no-such-run").set_tags({"a": "b"})

    errors = writer.drain()
    assert sorted(errors) == sorted([bad, "no-such-run"])
    assert errors[bad].startswith("MLflow log_params: ValueError:") and "params cannot change" in errors[bad]
    assert "no such MLflow run" in errors["no-such-run"]
    assert client.get_run(bad).data.metrics == {}
    assert client.get_run(good).data.metrics == {"val/loss": 2.0}
    assert writer.drain() == {}  # each error is told once


def test_what_can_be_checked_here_fails_where_it_is_logged(writer, tmp_path):
    tracker = DeferredTracker(writer, "any")
    with pytest.raises(ValueError, match="'val/loss' has value 'high'"):
        tracker.log_metrics({"val/loss": "high"}, step=0)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tracker.log_artifact(tmp_path / "missing.csv")
    with pytest.raises(ValueError, match="run status 'DONE'"):
        tracker.finish("DONE")


def test_a_dead_writer_is_named_when_drained(writer):
    psutil.Process(writer.pid).kill()
    psutil.Process(writer.pid).wait(timeout=10)
    with pytest.raises(RuntimeError, match=f"MLflow writer \\(pid {writer.pid}\\) ended"):
        writer.drain()


def test_the_writer_ends_when_the_process_that_started_it_is_killed(store):
    starter = subprocess.Popen(
        [sys.executable, "-c", "import os, sys, time\n"
         "from octft.sweep.write_behind import WriteBehind\n"
         f"writer = WriteBehind({store[0]!r})\n"
         "print(writer.pid, flush=True)\n"
         "time.sleep(60)\n"], stdout=subprocess.PIPE, text=True)
    helper = psutil.Process(int(starter.stdout.readline()))
    starter.kill()
    starter.wait()
    deadline = time.monotonic() + 20  # it polls its parent twice a second; its imports may still be running
    while helper.is_running() and helper.status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not helper.is_running() or helper.status() == psutil.STATUS_ZOMBIE


@pytest.mark.parametrize("wrapped", ["median", "successive_halving"])
def test_a_pass_reporter_decides_as_a_live_trials_reporter_and_writes_the_same_epochs(store, writer, tmp_path, wrapped):
    uri, client, experiment = store
    pruner = CollapsePruner(wrapped=MedianPruner(n_startup_trials=1) if wrapped == "median" else
                            SuccessiveHalvingPruner(min_resource=1, reduction_factor=2), grace_epochs=1, patience=2)
    storage = open_study_storage(f"sqlite:///{tmp_path / 'optuna.db'}", heartbeat_interval=None)
    study = optuna.create_study(storage=storage, study_name="pass", direction="maximize", pruner=pruner)
    for value in (0.5, 0.6, 0.7):
        done = study.ask()
        for epoch in range(4):
            done.report(value, epoch)
        study.tell(done, value)
    live, head = study.ask(), study.ask()
    live_reporter = OptunaReporter(live, pruner, metric="val/balanced_accuracy")
    tracker = DeferredTracker(writer, client.create_run(experiment).info.run_id)
    pass_reporter = PassReporter(storage.get_trial(head._trial_id), storage, pruner, metric="val/balanced_accuracy",
                                 tracker=tracker, reads=PassReads(study), writer=writer)
    # Healthy and above the others at first, then stuck on one class: collapse or the wrapped pruner stops both.
    shares = [[0.25] * 4, [0.25] * 4, [1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]
    for epoch, (value, frac) in enumerate(zip([0.8, 0.4, 0.25, 0.25], shares)):
        metrics = {"val/balanced_accuracy": value, **{f"val/pred_frac_{n}": f for n, f in zip(CLASS_SHORT_NAMES, frac)}}
        verdicts = live_reporter.report(epoch, value, metrics), pass_reporter.report(epoch, value, metrics)
        assert verdicts[0] == verdicts[1]
        if verdicts[0]:
            break
    assert verdicts[0] is not None and pass_reporter.pruned == live_reporter.pruned
    assert writer.drain() == {}
    stored = {trial.number: trial for trial in study.get_trials(deepcopy=False)}
    assert stored[head.number].intermediate_values == stored[live.number].intermediate_values
    assert stored[head.number].user_attrs == stored[live.number].user_attrs
    assert client.get_run(tracker.run_id).data.tags["octft.prune_reason"] == pass_reporter.pruned["prune_reason"]
