"""A stacked pass's MLflow writer: its runs end up as MlflowTracker would leave them, a failed write fails its run
only, and the helper never outlives the process that started it."""

from __future__ import annotations

import math
import subprocess
import sys
import time

import pandas as pd
import psutil
import pytest
from mlflow.tracking import MlflowClient

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
    writer = WriteBehind(store[0], tmp_path / "writer.log")
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
