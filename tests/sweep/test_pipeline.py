"""One trial pipeline: every trial's value is the sweep's objective at its best epoch, equal to the best of its own
epochs in MLflow and to what its replay command reaches, for probe and fine-tune trials alike (here with an objective
to minimise over a sampled loss definition, where a second copy of the pipeline had gone wrong)."""

from __future__ import annotations

import shlex

import pytest
import yaml
from optuna.trial import TrialState

from octft.cli import main
from octft.registry.model import trial_model
from octft.sweep.launch import launch
from octft.sweep.records import trial_record
from octft.track.mlflow_store import MlflowStore
from sweeps import REPO, experiment_overrides, load, write_spec

VAL_LOSS = {"metric": "val/loss", "direction": "minimize"}
LOSS_SPACE = {"loss.class_weights": {"type": "categorical", "choices": ["balanced", "none"]},
              "loss.label_smoothing": {"type": "float", "low": 0.0, "high": 0.2}}


def replay_best(record, tmp_path, number: int) -> float:
    """The best objective the trial's replay command reaches: `octft train ...` as `octft sweep show` prints it."""
    words = shlex.split(record.replay)
    assert words[:2] == ["octft", "train"]
    store = f"sqlite:///{tmp_path / f'replay-{number}.db'}"
    assert main([*words[1:], "--run-dir", str(tmp_path / f"replay-{number}"), "--tracking-uri", store]) == 0
    return min(value for _, value in MlflowStore(store).metric_history(_only_run(store), "val/loss"))


def _only_run(store: str) -> str:
    (run,) = MlflowStore(store).client.search_runs(["0", "1"])
    return run.info.run_id


def check_values(storage: str, study_name: str, tracking_uri: str, tmp_path) -> None:
    study = load(storage, study_name)
    complete = [trial for trial in study.trials if trial.state == TrialState.COMPLETE]
    assert complete, [trial_record(trial).fail_reason for trial in study.trials]
    for trial in complete:
        record = trial_record(trial)
        epochs = MlflowStore(tracking_uri).metric_history(record.mlflow_run_id, "val/loss")
        assert trial.value == pytest.approx(min(value for _, value in epochs), abs=1e-4), trial.number
        assert trial.value == record.outcome.best_metrics["val/loss"] == record.outcome.best_value
        assert replay_best(record, tmp_path, trial.number) == pytest.approx(trial.value, abs=1e-4), trial.number
        # The sampled loss definition is the one the run trained with (the replay above trains with it too).
        params = MlflowStore(tracking_uri).run(record.mlflow_run_id).params
        assert params["loss.class_weights"] == trial.params["loss.class_weights"]
        assert float(params["loss.label_smoothing"]) == trial.params["loss.label_smoothing"]


def test_a_probe_studys_values_are_its_runs_and_its_replays(data_dir, tmp_path):
    tree = yaml.safe_load((REPO / "sweeps" / "probe.yaml").read_text())
    spec, storage, tracking_uri = write_spec(
        tmp_path, study_name="probe-loss", n_trials=3, objective=VAL_LOSS, fixed=tree["fixed"],
        space={**LOSS_SPACE, "optim.lr_head": tree["space"]["optim.lr_head"], "train.epochs": {"type": "int", "low": 3, "high": 5}},
    )
    result = launch(spec, overrides=experiment_overrides(data_dir, tmp_path))
    assert result.worker_exit_codes == [0]
    check_values(storage, "probe-loss", tracking_uri, tmp_path)
    # A probe trial is a head on stored features: opened once per runner, reused by every later trial.
    built = [MlflowStore(tracking_uri).metric_history(trial_record(trial).mlflow_run_id, "features/reused")
             for trial in load(storage, "probe-loss").trials]
    assert [history[0][1] for history in built][1:] == [1.0, 1.0]


def test_a_fine_tune_studys_values_are_its_runs_and_its_replays(data_dir, tmp_path):
    spec, storage, tracking_uri = write_spec(
        tmp_path, study_name="fine-loss", n_trials=2, objective=VAL_LOSS, fixed={"train.epochs": 3},
        space={**LOSS_SPACE, "train.unfreeze_epoch": {"type": "int", "low": 0, "high": 1}},
    )
    result = launch(spec, overrides=experiment_overrides(data_dir, tmp_path), runner="in_process")
    assert result.worker_exit_codes == [0]
    check_values(storage, "fine-loss", tracking_uri, tmp_path)
    # Each complete fine-tune trial's best checkpoint is an MLflow 3 LoggedModel of its run, with its best metrics.
    store = MlflowStore(tracking_uri)
    for trial in load(storage, "fine-loss").trials:
        record = trial_record(trial)
        model = trial_model(store, record.mlflow_run_id)
        if trial.state != TrialState.COMPLETE:
            assert model is None, trial.number
            continue
        assert model is not None and model.status == "READY" and model.run_id == record.mlflow_run_id
        assert model.metrics["val/loss"] == pytest.approx(trial.value)
