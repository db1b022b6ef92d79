"""Warm start through real sqlite studies and a real MLflow store in a temp dir."""

import json
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.distributions import FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial

from octft.config import load_experiment
from octft.sweep.records import ENQUEUED_ATTR, TRIAL_ATTR, TrialRecord, trial_record
from octft.sweep.space import suggest
from octft.sweep.spec import load_sweep
from octft.sweep.warmstart import WarmStartError, warm_start
from octft.track.mlflow_store import MlflowStore, MlflowTracker

REPO = Path(__file__).resolve().parents[2]
SPACE = {
    "optim.lr_head": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
    "train.unfreeze_epoch": {"type": "int", "low": 0, "high": 3},
}
# The provenance tags of the new study's data, encoder, classes and preprocessing (octft.train.provenance).
HERE = {"octft.data_manifest_hash": "9f1c", "octft.encoder": "scratch:seed=0", "octft.classes": "a,b,c,d",
        "octft.preprocessing": "77aa"}


def write_spec(root: Path, name: str, space: dict, direction: str = "maximize") -> Path:
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "base": str(REPO / "experiments" / "demo.yaml"), "study_name": name,
        "storage": f"sqlite:///{root / 'optuna.db'}", "mlflow": {"tracking_uri": f"sqlite:///{root / 'mlflow.db'}"},
        "objective": {"metric": "val/balanced_accuracy", "direction": direction}, "space": space,
    }))
    return path


def source_study(root: Path, values_and_params, provenance: dict | None = None) -> Path:
    """An earlier study holding COMPLETE trials with these (value, params), each with an MLflow run tagged with
    `provenance` (default: this data's), and a pruned one."""
    path = write_spec(root, "earlier", SPACE)
    study = optuna.create_study(study_name="earlier", storage=f"sqlite:///{root / 'optuna.db'}", direction="maximize")
    dists = {"optim.lr_head": FloatDistribution(1e-4, 1e-1, log=True), "train.unfreeze_epoch": IntDistribution(0, 3)}
    for number, (value, params) in enumerate(values_and_params):
        run = MlflowTracker(f"sqlite:///{root / 'mlflow.db'}", "earlier", f"trial-{number}",
                            tags=HERE if provenance is None else provenance)
        run.finish("FINISHED")
        study.add_trial(create_trial(params=params, distributions=dists, value=value,
                                     user_attrs={TRIAL_ATTR: TrialRecord(mlflow_run_id=run.run_id).to_dict()}))
    study.add_trial(create_trial(params={"optim.lr_head": 0.05, "train.unfreeze_epoch": 0}, distributions=dists,
                                 state=TrialState.PRUNED))
    return path


@pytest.fixture
def new_study(tmp_path):
    spec = load_sweep(write_spec(tmp_path, "newer", SPACE))
    study = optuna.create_study(study_name="newer", storage=spec.storage, direction="maximize")
    parent = MlflowTracker(spec.mlflow.tracking_uri, "warm", "study")
    return spec, study, MlflowStore(spec.mlflow.tracking_uri), parent.run_id


def waiting_params(study):
    # Optuna keeps an enqueued trial's params in system attr `fixed_params` until it is asked.
    return [t.system_attrs["fixed_params"] for t in study.get_trials(states=(TrialState.WAITING,))]


def test_the_best_trials_of_an_earlier_sweep_are_enqueued_best_first(tmp_path, new_study):
    spec, study, store, parent_run_id = new_study
    source = str(source_study(tmp_path, [
        (0.4, {"optim.lr_head": 1e-3, "train.unfreeze_epoch": 1}),
        (0.7, {"optim.lr_head": 2e-3, "train.unfreeze_epoch": 2}),
        (0.6, {"optim.lr_head": 3e-3, "train.unfreeze_epoch": 0}),
    ]))

    enqueued = warm_start(study, spec, source, top=2, store=store, parent_run_id=parent_run_id, provenance=HERE)

    assert waiting_params(study) == [{"optim.lr_head": 2e-3, "train.unfreeze_epoch": 2},
                                     {"optim.lr_head": 3e-3, "train.unfreeze_epoch": 0}]
    assert [e["origin"] for e in enqueued] == [f"{source} trial 1 (val/balanced_accuracy 0.7)",
                                               f"{source} trial 2 (val/balanced_accuracy 0.6)"]
    # Recorded on the study, on each trial and on the parent run.
    assert [e["origin"] for e in study.user_attrs[ENQUEUED_ATTR]] == [e["origin"] for e in enqueued]
    assert trial_record(study.get_trials()[0]).enqueued_from == enqueued[0]["origin"]
    assert json.loads(store.run(parent_run_id).tags["octft.enqueued_from"]) == [source]
    # A relaunch with the same source enqueues nothing twice.
    assert warm_start(study, spec, source, top=2, store=store, parent_run_id=parent_run_id, provenance=HERE) == []
    assert len(study.get_trials()) == 2

    # The enqueued params are what the worker's suggest() returns for the next trial.
    assert suggest(study.ask(), spec.space) == {"optim.lr_head": 2e-3, "train.unfreeze_epoch": 2}


def test_parameters_outside_the_new_space_are_refused_by_name(tmp_path, new_study):
    spec, study, store, parent_run_id = new_study
    narrow = load_sweep(write_spec(tmp_path, "narrow", {"optim.lr_head": {"type": "float", "low": 1e-4, "high": 1e-2,
                                                                          "log": True}}))
    source = str(source_study(tmp_path, [(0.7, {"optim.lr_head": 5e-2, "train.unfreeze_epoch": 2})]))
    with pytest.raises(WarmStartError) as error:
        warm_start(study, narrow, source, top=1, store=store, parent_run_id=parent_run_id, provenance=HERE)
    message = str(error.value)
    assert "train.unfreeze_epoch not in the space" in message and "optim.lr_head=0.05 outside 0.0001..0.01" in message
    assert study.get_trials() == []  # nothing enqueued


def test_a_missing_study_or_one_without_completed_trials_is_named(tmp_path, new_study):
    spec, study, store, parent_run_id = new_study
    with pytest.raises(WarmStartError, match="study 'ghost' is not in the Optuna storage"):
        warm_start(study, spec, str(write_spec(tmp_path, "ghost", SPACE)), top=3, store=store,
                   parent_run_id=parent_run_id, provenance=HERE)
    with pytest.raises(WarmStartError, match="no completed trial"):
        warm_start(study, spec, str(source_study(tmp_path, [])), top=3, store=store,
                   parent_run_id=parent_run_id, provenance=HERE)


def test_the_champions_training_params_are_enqueued(tmp_path, new_study):
    spec, study, store, parent_run_id = new_study
    cfg = load_experiment(REPO / "experiments" / "demo.yaml", ["optim.lr_head=0.0042", "train.unfreeze_epoch=2"])
    trained = MlflowTracker(store.uri, "warm", "trial-7", tags=HERE)
    trained.log_params(cfg.flat())
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "best.pt").write_bytes(b"weights")
    trained.log_artifact(tmp_path / "checkpoint", "checkpoint")
    trained.finish("FINISHED")
    store.register(trained.run_id, "checkpoint", "warm-model", alias="champion")

    enqueued = warm_start(study, spec, "models:/warm-model@champion", top=3, store=store,
                          parent_run_id=parent_run_id, provenance=HERE)

    assert waiting_params(study) == [{"optim.lr_head": 0.0042, "train.unfreeze_epoch": 2}]
    assert enqueued[0]["origin"] == f"models:/warm-model version 1 (run {trained.run_id})"
    with pytest.raises(WarmStartError, match="not found in the MLflow registry"):
        warm_start(study, spec, "models:/no-such-model@champion", top=1, store=store,
                   parent_run_id=parent_run_id, provenance=HERE)


@pytest.mark.parametrize("tags, says", [
    ({**HERE, "octft.data_manifest_hash": "0d0d"}, "octft.data_manifest_hash is 0d0d there and 9f1c here"),
    ({**HERE, "octft.encoder": "sha256:beef"}, "octft.encoder is sha256:beef there and scratch:seed=0 here"),
    ({key: value for key, value in HERE.items() if key != "octft.preprocessing"}, "records no preprocessing"),
], ids=["other data or split", "other encoder checkpoint", "no record"])
def test_a_source_trained_on_other_data_or_encoder_is_refused_naming_the_field(tmp_path, new_study, tags, says):
    spec, study, store, parent_run_id = new_study
    source = str(source_study(tmp_path, [(0.7, {"optim.lr_head": 5e-3, "train.unfreeze_epoch": 2})], provenance=tags))
    with pytest.raises(WarmStartError, match="trial 0") as error:
        warm_start(study, spec, source, top=1, store=store, parent_run_id=parent_run_id, provenance=HERE)
    assert says in str(error.value)
    assert study.get_trials() == []  # nothing enqueued
