"""A trial never outlives its launch: SIGKILL of `octft sweep launch` (not of its children) ends its runner, its
other workers and their runners; no MLflow run says FINISHED for a trial Optuna does not have COMPLETE; every attempt
cut short is FAIL with its reason and retried once with its params; a launch whose trials all fail exits non-zero."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from optuna.trial import TrialState

from octft.stores import TRACKING_ENV
from octft.sweep.records import trial_record
from octft.sweep.storage import open_existing_study, open_study_storage
from octft.sweep.study import reap_stale_trials
from octft.track.mlflow_store import MlflowStore

from .conftest import DEMO, REPO, SMALL


def sweep_file(tmp_path: Path, name: str, **fixed) -> Path:
    spec = tmp_path / f"{name}.yaml"
    spec.write_text(yaml.safe_dump({
        "base": str(DEMO), "study_name": name, "storage": f"sqlite:///{tmp_path / 'optuna.db'}",
        "mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": name},
        "n_trials": 3, "fixed": {"train.epochs": 200, "train.early_stopping_patience": None, **fixed},
        "pruner": {"collapse": {"enabled": False}, "wrapped": "none"},
        "space": {"optim.lr_head": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}},
        "sampler": {"type": "random", "seed": 0},
    }))
    return spec


def launch_command(spec: Path, release: Path, tmp_path: Path, *options: str) -> list[str]:
    return [sys.executable, "-m", "octft.cli", "sweep", "launch", str(spec), *options, f"data.uri={release}",
            f"data.cache_dir={tmp_path / 'cache'}", *SMALL, "runtime.kind=cpu", f"output_dir={tmp_path / 'runs'}"]


def environment() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for name in ("OCTFT_OPTUNA_STORAGE", TRACKING_ENV):
        env.pop(name, None)
    return env


def training(study_dir: Path, number: int) -> bool:
    log = study_dir / f"trial-{number}" / "trial.log"
    return bool(re.search(r"epoch +1 ", log.read_text() if log.is_file() else ""))


@pytest.mark.integration
def test_sigkill_of_the_launch_ends_every_runner_and_worker_and_no_trial_runs_twice(release, tmp_path):
    spec = sweep_file(tmp_path, "killed")
    launcher = subprocess.Popen(
        launch_command(spec, release, tmp_path, "--workers", "2", "--heartbeat-interval", "1", "--grace-period", "2"),
        env=environment(), start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    study_dir = tmp_path / "runs" / "sweeps" / "killed"
    try:
        deadline = time.monotonic() + 600  # a guard against a hang, not a measurement
        while not (training(study_dir, 0) and training(study_dir, 1)):
            assert launcher.poll() is None and time.monotonic() < deadline, "both workers' trials never trained"
            time.sleep(0.2)
        descendants = psutil.Process(launcher.pid).children(recursive=True)
        assert len(descendants) == 3  # worker 0's runner, worker 1 and its runner
        os.kill(launcher.pid, signal.SIGKILL)  # the launch alone, as a lost terminal or an OOM kill would
        launcher.wait()
        _, alive = psutil.wait_procs(descendants, timeout=30)
        assert not alive, [process.cmdline() for process in alive]
    finally:
        with contextlib.suppress(ProcessLookupError):  # anything of its session left behind by a failure
            os.killpg(launcher.pid, signal.SIGKILL)

    storage = open_study_storage(f"sqlite:///{tmp_path / 'optuna.db'}", heartbeat_interval=1, grace_period=2)
    study = open_existing_study("killed", f"sqlite:///{tmp_path / 'optuna.db'}")
    store = MlflowStore(f"sqlite:///{tmp_path / 'mlflow.db'}")
    time.sleep(3)  # past the grace period: worker 0's trial (the launch's own) is stale now
    reap_stale_trials(study, storage, store)
    trials = study.get_trials(deepcopy=False)
    failed = [trial for trial in trials if trial.state == TrialState.FAIL]
    waiting = [trial for trial in trials if trial.state == TrialState.WAITING]
    assert sorted(trial.number for trial in failed) == [0, 1]
    assert sorted(trial.params["optim.lr_head"] for trial in waiting) == sorted(trial.params["optim.lr_head"] for trial in failed)
    assert not any(trial.state in (TrialState.COMPLETE, TrialState.RUNNING) for trial in trials)
    reasons = {trial.number: trial_record(trial).fail_reason for trial in failed}
    assert any("the launch that started this worker ended; retried once" in reason for reason in reasons.values()), reasons
    for trial in failed:
        status = store.run(trial_record(trial).mlflow_run_id).status
        assert status == "FAILED", (trial.number, status)


@pytest.mark.integration
def test_a_launch_whose_trials_all_fail_exits_non_zero(release, tmp_path):
    # optim.lr_head=1e30 makes the loss NaN in the first epoch: every trial fails.
    spec = sweep_file(tmp_path, "all-fail", **{"train.epochs": 2, "optim.lr_encoder": 1e30, "train.unfreeze_epoch": 0})
    tree = yaml.safe_load(spec.read_text())
    tree["n_trials"], tree["space"] = 2, {"optim.lr_head": {"type": "float", "low": 1e29, "high": 1e30, "log": True}}
    spec.write_text(yaml.safe_dump(tree))
    done = subprocess.run(launch_command(spec, release, tmp_path), env=environment(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "octft: error: every trial of study all-fail failed" in done.stderr
