"""Faults after the checks passed: files that stop decoding, a diverging loss, an interrupted sweep."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from optuna.trial import TrialState

from octft.data.audit import audit_dataset
from octft.sweep.records import trial_record
from octft.sweep.storage import open_existing_study
from octft.track.mlflow_store import MlflowStore

from .conftest import DEMO, REPO, SMALL, one_error_line, run_cli


@pytest.fixture()
def val_insulin_truncated(release, tmp_path) -> tuple[Path, list[str]]:
    """A copy of the release whose val insulin volumes are cut in half: the audit (no --verify) still passes."""
    copy = tmp_path / "release"
    shutil.copytree(release, copy)
    volumes = audit_dataset(str(copy)).volumes
    victims = volumes[(volumes.split == "val") & (volumes.class_name == "insulin_dependent")].key.tolist()
    assert victims
    for key in victims:
        path = copy / key
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return copy, victims


def train_args(data: Path, tmp_path: Path, *overrides: str) -> list[str]:
    return ["train", str(DEMO), f"data.uri={data}", f"data.cache_dir={tmp_path / 'cache'}", *SMALL,
            "runtime.kind=cpu", "data.verify=false", f"output_dir={tmp_path / 'runs'}", *overrides,
            "--run-dir", str(tmp_path / "runs" / "run"), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]


def test_training_refuses_a_split_emptied_by_the_cache(val_insulin_truncated, tmp_path, capsys):
    data, victims = val_insulin_truncated
    line = one_error_line(capsys, *train_args(data, tmp_path, "train.epochs=1", "train.unfreeze_epoch=0"))
    assert "after the cache, val:" in line and "below 1: insulin_dependent" in line, line
    for key in victims:
        assert key in line, (key, line)
    assert "data.allow_failed_guards=[classes_in_val]" in line
    # The run that refused says so in MLflow rather than finishing with three-class figures.
    from mlflow.tracking import MlflowClient

    run_id = json.loads((tmp_path / "runs" / "run" / "run.json").read_text())["mlflow_run_id"]
    run = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(run_id)
    assert run.info.status == "FAILED" and "val/balanced_accuracy" not in run.data.metrics


def test_data_cache_exits_nonzero_naming_the_volumes_that_failed(val_insulin_truncated, tmp_path, capsys):
    data, victims = val_insulin_truncated
    code, lines = run_cli(capsys, "data", "cache", "--data", data, f"data.cache_dir={tmp_path / 'cache'}",
                          "data.verify=false", *SMALL, "--workers", "1")
    assert code == 1, lines
    failed = [line for line in lines if line.startswith("octft: could not cache")]
    assert len(failed) == len(victims)
    for key in victims:
        assert any(key in line for line in failed), key


def test_nan_loss_in_the_first_epoch_promises_no_checkpoint(release, tmp_path, capsys):
    line = one_error_line(capsys, *train_args(release, tmp_path, "train.epochs=2", "optim.lr_head=1e30",
                                              "optim.lr_encoder=1e30", "train.unfreeze_epoch=0"))
    assert "training loss is nan at epoch 0" in line.lower(), line
    assert "no checkpoint was written before it" in line and "last.pt" not in line


@pytest.mark.integration
def test_ctrl_c_during_a_sweep_ends_the_parent_run_killed(release, tmp_path):
    spec = tmp_path / "sweep.yaml"
    spec.write_text(yaml.safe_dump({
        "base": str(DEMO), "study_name": "ctrl-c", "storage": f"sqlite:///{tmp_path / 'optuna.db'}",
        "mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "ctrl-c"},
        # Long enough to be interrupted: a warm runner trains a tiny trial in seconds, and nothing stops it early.
        "n_trials": 2, "fixed": {"train.epochs": 200, "train.early_stopping_patience": None},
        "pruner": {"collapse": {"enabled": False}, "wrapped": "none"},
        "space": {"optim.lr_head": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}},
        "sampler": {"type": "random", "seed": 0},
    }))
    overrides = [f"data.uri={release}", f"data.cache_dir={tmp_path / 'cache'}", *SMALL, "runtime.kind=cpu",
                 f"output_dir={tmp_path / 'runs'}"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for name in ("OCTFT_OPTUNA_STORAGE", "MLFLOW_TRACKING_URI"):
        env.pop(name, None)
    # Its own session, so that SIGINT reaches the launcher and its workers as Ctrl-C in a terminal would.
    # SIGINT as a terminal delivers it: a test run started in the background (`make test &`) ignores SIGINT,
    # and its children would inherit that.
    launcher = subprocess.Popen([sys.executable, "-m", "octft.cli", "sweep", "launch", str(spec), *overrides],
                                env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        trial_log = tmp_path / "runs" / "sweeps" / "ctrl-c" / "trial-0" / "trial.log"
        deadline = time.monotonic() + 600  # a guard against a hang, not a measurement
        while not re.search(r"epoch +0 ", trial_log.read_text() if trial_log.is_file() else "") and launcher.poll() is None:
            assert time.monotonic() < deadline, "the first trial never started its first epoch"
            time.sleep(0.2)
        os.killpg(launcher.pid, signal.SIGINT)
        output, _ = launcher.communicate(timeout=300)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    assert launcher.returncode == 130, output

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("ctrl-c")
    runs = {run.data.tags.get("octft.kind", "trial"): run for run in client.search_runs([experiment.experiment_id])}
    parent = runs["study"]
    assert parent.info.status == "KILLED", parent.info.status
    assert parent.data.tags["octft.end_reason"] == "interrupted (Ctrl-C)"
    assert all(run.info.status != "RUNNING" for run in runs.values())
    # The interrupted trial failed for no fault of its params: it is queued again with them, in its place in the budget.
    study = open_existing_study("ctrl-c", f"sqlite:///{tmp_path / 'optuna.db'}")
    interrupted, retried = study.trials[0], study.trials[-1]
    assert interrupted.state == TrialState.FAIL
    assert trial_record(interrupted).fail_reason.startswith("interrupted (Ctrl-C); retried once")
    assert retried.state == TrialState.WAITING and retried.params == interrupted.params
    assert trial_record(retried).retry_of == 0

    # A relaunch reopens the parent run: the reason it ended no longer holds, so its state and tags agree again.
    store = MlflowStore(f"sqlite:///{tmp_path / 'mlflow.db'}")
    store.reopen_run(parent.info.run_id)
    store.end_run(parent.info.run_id, "FINISHED")
    status, tags = store.run(parent.info.run_id).status, store.run(parent.info.run_id).tags
    assert status == "FINISHED" and "octft.end_reason" not in tags
