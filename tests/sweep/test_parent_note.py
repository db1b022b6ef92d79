"""What a study tells MLflow's and Optuna's own tools: the parent run's description and the objective's name."""

from __future__ import annotations

import warnings

import optuna
import yaml
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from octft.sweep.plan import resolve_plan
from octft.sweep.records import PLAN_ATTR, TRIAL_ATTR, TrialOutcome, TrialRecord
from octft.sweep.spec import load_sweep
from octft.sweep.storage import open_study_storage
from octft.sweep.study import create_or_load_study
from octft.sweep.tracking import update_parent_note
from octft.track.mlflow_store import NOTE_TAG, MlflowStore, MlflowTracker


def _spec(root):
    path = root / "sweep.yaml"
    path.write_text(yaml.safe_dump({
        "base": "experiments/demo.yaml", "study_name": "note-test", "storage": f"sqlite:///{root / 'optuna.db'}",
        "mlflow": {"tracking_uri": f"sqlite:///{root / 'mlflow.db'}", "experiment": "note-test"},
        "space": {"optim.lr_head": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True}},
    }))
    return path, load_sweep(path)


def test_the_study_names_its_objective_for_optuna_dashboard_without_a_warning(tmp_path):
    spec_path, spec = _spec(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", optuna.exceptions.ExperimentalWarning)
        plan, _ = resolve_plan(spec_path)
        study, _ = create_or_load_study(plan, open_study_storage(spec.storage, heartbeat_interval=None))
    assert study.metric_names == ["val/balanced_accuracy"]
    # What optuna-dashboard reads: the name stored with the study, seen by a fresh load.
    assert optuna.load_study(study_name="note-test", storage=spec.storage).metric_names == ["val/balanced_accuracy"]


def test_the_parent_run_describes_the_study_in_markdown(tmp_path):
    spec_path, spec = _spec(tmp_path)
    tracking_uri = spec.mlflow.tracking_uri
    parent = MlflowTracker(tracking_uri, "note-test", "study-note-test")
    study = optuna.create_study(study_name="note-test", storage=spec.storage, direction="maximize")
    study.set_user_attr(PLAN_ATTR, {"parent_run_id": parent.run_id})
    replay = "octft train experiments/demo.yaml optim.lr_head=0.003"
    for value, state, record in [
        (0.61, TrialState.COMPLETE, TrialRecord(replay=replay, outcome=TrialOutcome("completed", 0.61, best_epoch=3))),
        (0.4, TrialState.COMPLETE, TrialRecord()),
        (None, TrialState.PRUNED, TrialRecord(outcome=TrialOutcome("pruned", prune_reason="collapse"))),
        (None, TrialState.PRUNED, TrialRecord(outcome=TrialOutcome("pruned", prune_reason="median"))),
        (None, TrialState.FAIL, TrialRecord()),
    ]:
        trial = study.ask({"optim.lr_head": FloatDistribution(1e-4, 1e-1, log=True)})
        trial.set_user_attr(TRIAL_ATTR, record.to_dict())
        study.tell(trial, value, state=state) if value is None else study.tell(trial, value)

    store = MlflowStore(tracking_uri)
    update_parent_note(store, study, spec)
    note = store.run(parent.run_id).tags[NOTE_TAG]
    assert "### Optuna study `note-test`" in note
    assert "**Trials:** 5: 2 complete, 1 fail, 1 pruned (collapse), 1 pruned (median)" in note
    assert "**Best trial:** 0, val/balanced_accuracy = 0.6100 at epoch 3; replay it with" in note
    assert "    octft train experiments/demo.yaml optim.lr_head=0.003" in note
    assert "not rendered yet" in note

    report = tmp_path / "report.html"
    report.write_text("<html></html>")
    parent.log_artifact(report)
    update_parent_note(store, study, spec)
    assert "**Report:** artifact `report.html` of this run." in store.run(parent.run_id).tags[NOTE_TAG]
