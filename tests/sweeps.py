"""Sweep files, stores and polls the sweep tests share: tiny trials of the demo experiment (a micro ViT on 4 frames of
32 x 32 px) on a synthetic release the tests make, in real SQLite stores in the test's folder."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import optuna
import yaml
from optuna.trial import TrialState

from octft.sweep.launch import LaunchResult, launch
from octft.sweep.records import TrialRecord, trial_record
from octft.sweep.storage import open_existing_study
from octft.track.mlflow_store import MlflowStore

REPO = Path(__file__).resolve().parents[1]
LR_HEAD = {"optim.lr_head": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}}
NO_PRUNING = {"wrapped": "none", "collapse": {"enabled": False}}


def experiment_overrides(data_dir: Path, out: Path, kind: str = "cpu") -> list[str]:
    """Base-experiment overrides: the release under `data_dir`, small clips, trial folders under `out`."""
    return [
        f"data.uri={data_dir / 'data'}", f"data.cache_dir={data_dir / 'cache'}", "data.preprocess.frames=4",
        "data.preprocess.height=32", "data.preprocess.width=32", f"runtime.kind={kind}", f"output_dir={out / 'runs'}",
        f"features.dir={data_dir / 'features'}",
    ]


def write_spec(directory: Path, *, study_name: str, n_trials: int, space: dict, fixed: dict | None = None,
               pruner: dict | None = None, storage: str | None = None, objective: dict | None = None,
               sampler: dict | None = None) -> tuple[Path, str, str]:
    """A sweep file over `space` (2 epochs a trial unless `fixed` or `space` say otherwise); (path, storage, MLflow)."""
    storage = storage or f"sqlite:///{directory / 'optuna.db'}"
    tracking_uri = f"sqlite:///{directory / 'mlflow.db'}"
    fixed = {"train.epochs": 2, **(fixed or {})}
    if "train.epochs" in space:
        del fixed["train.epochs"]
    spec = {
        "base": str(REPO / "experiments" / "demo.yaml"), "study_name": study_name, "storage": storage,
        "mlflow": {"tracking_uri": tracking_uri, "experiment": f"sweep-{study_name}"}, "n_trials": n_trials,
        "fixed": fixed, "space": space, "sampler": sampler or {"type": "random", "seed": 0},
        # The demo unfreezes at epoch 1: collapse counts from its grace on only.
        "pruner": pruner or {"wrapped": "none"},
    }
    if objective:
        spec["objective"] = objective
    path = directory / f"{study_name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path, storage, tracking_uri


def load(storage: str, study_name: str) -> optuna.Study:
    return open_existing_study(study_name, storage)


def records(storage: str, study_name: str) -> list[TrialRecord]:
    return [trial_record(trial) for trial in load(storage, study_name).trials]


def run_status(tracking_uri: str, run_id: str) -> tuple[str, dict]:
    run = MlflowStore(tracking_uri).run(run_id)
    return run.status, run.tags


def wait_for(condition, timeout: float, what: str, poll: float = 0.1):
    """`condition()`'s first truthy value within `timeout` seconds (a study not made yet counts as not yet)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = condition()
        except Exception:  # the storage or the study does not exist yet
            value = None
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def running_record(storage: str, study_name: str, number: int) -> TrialRecord | None:
    """Trial `number`'s record while it runs (its worker has written it), else None."""
    trials = load(storage, study_name).get_trials(deepcopy=False)
    if len(trials) > number and trials[number].state == TrialState.RUNNING:
        record = trial_record(trials[number])
        return record if record.status == "running" else None
    return None


class Launching:
    """`launch(*args, **kwargs)` in a thread, so that a test can act on the trials while they run."""

    def __init__(self, *args, **kwargs) -> None:
        self._outcome: dict = {}
        self._thread = threading.Thread(target=self._run, args=args, kwargs=kwargs)
        self._thread.start()

    def _run(self, *args, **kwargs) -> None:
        try:
            self._outcome["result"] = launch(*args, **kwargs)
        except BaseException as error:  # raised again by `result`, in the test's thread
            self._outcome["error"] = error

    def result(self, timeout: float) -> LaunchResult:
        """The launch's result once it ends (its error, raised here); fails the test after `timeout` seconds."""
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"the launch did not end within {timeout} s"
        if "error" in self._outcome:
            raise self._outcome["error"]
        return self._outcome["result"]
