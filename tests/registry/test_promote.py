"""Promotion: the best healthy trial, tested once on the test split, registered once as the champion.

The study is built here the way a sweep's workers leave one (sqlite Optuna storage, trials told through ask/tell
with their records, MLflow runs in a sqlite store); the checkpoint comes from one real training run of the recipe on
a tiny synthetic release.
"""

from __future__ import annotations

import json

import numpy as np
import optuna
import pytest
import yaml
from optuna.distributions import FloatDistribution, IntDistribution
from optuna.trial import TrialState
from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

from octft.cli import main
from octft.config import load_experiment, save_resolved
from octft.data.layout import CLASS_SHORT_NAMES
from octft.data.synth import synthesize
from octft.registry.promote import caveats, participant_test_scores, promote, select_trial
from octft.sweep.records import unpromotable_reason
from octft.report.study import render_report
from octft.sweep.pruners import record_epoch
from octft.sweep.records import PLAN_ATTR, TRIAL_ATTR, TrialOutcome, TrialRecord, test_evaluations
from octft.sweep.spec import load_sweep
from octft.track.mlflow_store import MlflowStore, MlflowTracker
from octft.train.recipe import train
from octft.train.metrics import softmax

DISTRIBUTIONS = {"optim.lr_head": FloatDistribution(1e-4, 1e-1, log=True), "train.unfreeze_epoch": IntDistribution(0, 2)}
MODEL_NAME = "octft-promote-test"


def _best_metrics(f1: list[float], balanced_accuracy: float) -> dict[str, float]:
    metrics = {"val/balanced_accuracy": balanced_accuracy, "val/auc_macro": 0.7}
    for name, value in zip(CLASS_SHORT_NAMES, f1):
        metrics[f"val/f1_{name}"] = value
        metrics[f"val/pred_frac_{name}"] = 0.25
    return metrics


def _add_trial(study, state, value, *, f1=(0.6, 0.5, 0.5, 0.6), run_id=None, run_dir=None, **outcome):
    trial = study.ask(DISTRIBUTIONS)
    for epoch, epoch_value in enumerate([value * 0.8, value]):
        record_epoch(trial, epoch, epoch_value, pred_frac=[0.25] * 4, balanced_accuracy=epoch_value)
    status = {TrialState.COMPLETE: "completed", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed"}[state]
    record = TrialRecord(status=status, mlflow_run_id=run_id, run_dir=str(run_dir) if run_dir else None, outcome=TrialOutcome(
        status, best_value=value, best_epoch=1, epochs_run=2, best_metrics=_best_metrics(list(f1), value), **outcome))
    trial.set_user_attr(TRIAL_ATTR, record.to_dict())
    if state == TrialState.COMPLETE:
        study.tell(trial, value)
    else:
        study.tell(trial, state=state)
    return trial.number


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A study of five trials around one real training run; returns (spec path, trained run, data report)."""
    root = tmp_path_factory.mktemp("promote")
    data = synthesize(root / "data", participants=48, frames=4, height=32, width=32)
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    cfg = load_experiment("experiments/demo.yaml", [
        f"data.uri={root / 'data'}", f"data.cache_dir={root / 'cache'}", "model.size=vit_micro",
        "data.preprocess.frames=4", "data.preprocess.height=32", "data.preprocess.width=32", "train.epochs=2",
        "runtime.kind=cpu", f"tracking.tracking_uri={tracking_uri}", "tracking.experiment=promote-test",
        f"output_dir={root / 'runs'}",
    ])
    save_resolved(cfg, root / "base.yaml")
    trained = train(cfg, run_dir=root / "runs" / "trial-1", progress=False)

    parent = MlflowTracker(tracking_uri, "promote-test", "study")
    parent.finish("FINISHED")

    def copy_of_the_trained_run(name):
        copy = MlflowTracker(tracking_uri, "promote-test", name, parent_run_id=parent.run_id)
        copy.log_artifact(trained.run_dir / "checkpoint", "checkpoint")
        copy.set_tags({key: value for key, value in MlflowStore(tracking_uri).run(trained.run_id).tags.items()
                       if key.startswith("octft.")})
        copy.finish("FINISHED")
        return copy.run_id

    # Runs holding the same checkpoint: the collapsed trial that scores higher on validation, and a third
    # healthy trial with a run of its own (a second test evaluation).
    collapsed_run, third_run = copy_of_the_trained_run("trial-0"), copy_of_the_trained_run("trial-2")

    storage = f"sqlite:///{root / 'optuna.db'}"
    study = optuna.create_study(study_name="promote-test", storage=storage, direction="maximize")
    study.set_user_attr(PLAN_ATTR, {"parent_run_id": parent.run_id})
    _add_trial(study, TrialState.COMPLETE, 0.9, f1=(0.9, 0.0, 0.8, 0.9), run_id=collapsed_run, run_dir=trained.run_dir)
    _add_trial(study, TrialState.COMPLETE, 0.6, run_id=trained.run_id, run_dir=trained.run_dir)
    _add_trial(study, TrialState.COMPLETE, 0.5, run_id=third_run, run_dir=trained.run_dir)
    _add_trial(study, TrialState.PRUNED, 0.3, prune_reason="collapse", prune_epoch=1,
               prune_detail="collapsed: class 3 takes 97.0% of predictions")
    _add_trial(study, TrialState.FAIL, 0.0, stop_reason="TrainingError: training loss is nan at epoch 1")

    spec_path = root / "sweep.yaml"
    spec_path.write_text(yaml.safe_dump({
        "base": str(root / "base.yaml"), "study_name": "promote-test", "storage": storage,
        "mlflow": {"tracking_uri": tracking_uri, "experiment": "promote-test"},
        "space": {"optim.lr_head": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
                  "train.unfreeze_epoch": {"type": "int", "low": 0, "high": 1}},
        "promote": {"model_name": MODEL_NAME, "min_class_f1": 0.05},
    }))
    return spec_path, trained, data, tracking_uri


def test_the_best_trial_that_did_not_collapse_is_promoted_once(sweep, capsys):
    spec_path, trained, data, tracking_uri = sweep
    client = MlflowStore(tracking_uri).client
    trained_run = client.get_run(trained.run_id).info

    assert main(["promote", str(spec_path)]) == 0
    out = capsys.readouterr().out
    # Trial 0 scores higher but its prediabetes F1 is 0: skipped, with the reason said.
    assert "skipped trial 0 collapsed" in out and "prediabetes 0.000" in out
    assert f"trial 1 (MLflow run {trained.run_id}) -> models:/{MODEL_NAME}@champion (version 1)" in out

    champion = client.get_model_version_by_alias(MODEL_NAME, "champion")
    assert str(champion.version) == "1" and champion.run_id == trained.run_id
    assert champion.source.startswith("models:/m-")  # the trial's MLflow 3 LoggedModel
    tags = champion.tags
    run_tags = client.get_run(trained.run_id).data.tags
    assert tags["octft.study"] == "promote-test" and tags["octft.trial"] == "1"
    assert tags["octft.data_manifest_hash"] == run_tags["octft.data_manifest_hash"] != "unknown"
    assert tags["octft.git_commit"] == run_tags["octft.git_commit"]
    study = optuna.load_study(study_name="promote-test", storage=load_sweep(spec_path).storage)
    assert json.loads(tags["octft.params"]) == study.trials[1].params

    # Test scores: on the study, on the trial's run and on the parent run; each interval holds its point.
    (evaluation,) = test_evaluations(study.user_attrs)
    metrics = evaluation.scores
    test_participants = sum(data.split_class_counts["test"].values())
    assert metrics["test/participants"] == test_participants
    for name in ("balanced_accuracy", "macro_f1", *(f"f1_{c}" for c in CLASS_SHORT_NAMES)):
        assert metrics[f"test/{name}_ci_low"] <= metrics[f"test/{name}"] <= metrics[f"test/{name}_ci_high"]
    run = client.get_run(trained.run_id)
    assert run.data.metrics["test/balanced_accuracy"] == pytest.approx(metrics["test/balanced_accuracy"])
    # Logging to the finished run left it as training did: status, start and end time (its UI duration).
    assert (run.info.status, run.info.start_time, run.info.end_time) == (
        "FINISHED", trained_run.start_time, trained_run.end_time)
    assert tags["octft.test_reuse"] == "false"
    assert [entry["trial"] for entry in json.loads(tags["octft.test_evaluations"])] == [1]
    assert "test split scored for 1 trial(s) of this study: 1" in out
    parent = client.get_run(study.user_attrs[PLAN_ATTR]["parent_run_id"])
    assert parent.data.metrics["test/balanced_accuracy_ci_high"] == pytest.approx(metrics["test/balanced_accuracy_ci_high"])
    assert parent.data.tags["octft.champion_trial"] == "1"
    assert [entry["trial"] for entry in json.loads(parent.data.tags["octft.test_evaluations"])] == [1]

    # Again: nothing new, and the test split is not evaluated a second time.
    again = promote(load_sweep(spec_path))
    assert (again.trial_number, again.version, again.evaluated) == (1, "1", False)
    assert again.test_metrics == pytest.approx(metrics, nan_ok=True)
    assert len(client.search_model_versions(f"name='{MODEL_NAME}'")) == 1
    history = client.get_metric_history(trained.run_id, "test/balanced_accuracy")
    assert len(history) == 1
    assert client.get_run(trained.run_id).info.end_time == trained_run.end_time


def test_scoring_a_second_trial_on_test_needs_allow_test_reuse_and_is_tagged(sweep, capsys, tmp_path):
    spec_path, trained, _, tracking_uri = sweep
    client = MlflowStore(tracking_uri).client
    if not client.search_model_versions(f"name='{MODEL_NAME}'"):
        assert main(["promote", str(spec_path)]) == 0  # trial 1 scored first (when run alone)
    capsys.readouterr()
    study = optuna.load_study(study_name="promote-test", storage=load_sweep(spec_path).storage)
    third_run = study.trials[2].user_attrs[TRIAL_ATTR]["mlflow_run_id"]
    third_before = client.get_run(third_run).info

    assert main(["promote", str(spec_path), "--trial", "2"]) == 2
    err = capsys.readouterr().err
    assert f"already scored for study 'promote-test' trial 1 (run {trained.run_id}) on " in err, err
    assert "--allow-test-reuse" in err and "octft.test_reuse=true" in err
    assert "test/balanced_accuracy" not in client.get_run(third_run).data.metrics  # refused before scoring

    assert main(["promote", str(spec_path), "--trial", "2", "--allow-test-reuse"]) == 0
    assert "test split scored for 2 trial(s) of this study: 1, 2 (octft.test_reuse=true)" in capsys.readouterr().out
    version = client.get_model_version_by_alias(MODEL_NAME, "champion")
    assert (version.run_id, version.tags["octft.test_reuse"]) == (third_run, "true")
    assert [entry["trial"] for entry in json.loads(version.tags["octft.test_evaluations"])] == [1, 2]
    third = client.get_run(third_run).info
    assert (third.status, third.start_time, third.end_time) == ("FINISHED", third_before.start_time, third_before.end_time)
    parent = client.get_run(study.user_attrs[PLAN_ATTR]["parent_run_id"])
    assert parent.data.tags["octft.test_evaluated_trials"] == "2"
    evaluations = test_evaluations(
        optuna.load_study(study_name="promote-test", storage=load_sweep(spec_path).storage).user_attrs)
    assert [(evaluation.trial, evaluation.run_id) for evaluation in evaluations] == [(1, trained.run_id), (2, third_run)]

    # Trial 1 again: its recorded scores, no new evaluation, and the version says the test split was reused.
    assert main(["promote", str(spec_path), "--trial", "1"]) == 0
    assert "recorded earlier; not evaluated again" in capsys.readouterr().out
    assert len(client.get_metric_history(trained.run_id, "test/balanced_accuracy")) == 1

    # The report and the parent run's description say how often the test split was used.
    page = render_report(load_sweep(spec_path), out=tmp_path / "report.html").read_text()
    assert "<b>Test split:</b> scored for 2 trial(s) (1, 2)." in page and "octft.test_reuse=true" in page
    note = client.get_run(study.user_attrs[PLAN_ATTR]["parent_run_id"]).data.tags["mlflow.note.content"]
    assert "**Champion:** trial 1, `models:/octft-promote-test@champion`" in note
    assert "test split scored for 2 trial(s): [1, 2]" in note and "**Report:** artifact `report.html`" in note


@pytest.mark.parametrize(
    "trial_number, reason",
    [(0, "trial 0 collapsed at its best epoch 1: validation F1 of prediabetes 0.000 is not above promote.min_class_f1=0.05"),
     (3, "trial 3 was pruned (collapse at epoch 1: collapsed: class 3 takes 97.0% of predictions)"),
     (4, "trial 4 failed (TrainingError: training loss is nan at epoch 1)"),
     (9, "has no trial 9")],
)
def test_a_trial_asked_for_that_cannot_be_promoted_is_refused_with_the_reason(sweep, capsys, trial_number, reason):
    spec_path, _, _, tracking_uri = sweep
    versions_before = MlflowStore(tracking_uri).client.search_model_versions(f"name='{MODEL_NAME}'")
    assert main(["promote", str(spec_path), "--trial", str(trial_number)]) == 2
    assert reason in capsys.readouterr().err
    assert MlflowStore(tracking_uri).client.search_model_versions(f"name='{MODEL_NAME}'") == versions_before


def test_a_study_with_no_promotable_trial_says_why_for_each(tmp_path):
    study = optuna.create_study(study_name="none", storage=f"sqlite:///{tmp_path / 'o.db'}", direction="maximize")
    _add_trial(study, TrialState.COMPLETE, 0.8, f1=(0.0, 0.9, 0.9, 0.9), run_id="abc", run_dir=tmp_path)
    _add_trial(study, TrialState.COMPLETE, 0.7)  # healthy, but without a run: no checkpoint to promote
    with pytest.raises(ValueError) as error:
        select_trial(study, 0.05)
    message = str(error.value)
    assert "no trial of study 'none' can be promoted (2 complete)" in message
    assert "trial 0 collapsed" in message and "healthy 0.000" in message
    assert "trial 1 recorded no MLflow run" in message


def test_collapse_is_judged_on_every_class_against_min_class_f1(tmp_path):
    study = optuna.create_study(direction="maximize")
    number = _add_trial(study, TrialState.COMPLETE, 0.7, f1=(0.3, 0.1, 0.3, 0.3), run_id="abc", run_dir=tmp_path)
    trial = study.trials[number]
    assert unpromotable_reason(trial, 0.05) is None
    assert "prediabetes 0.100 is not above promote.min_class_f1=0.1" in unpromotable_reason(trial, 0.1)


def test_test_scores_equal_scikit_learn_and_sit_inside_their_intervals():
    rng = np.random.default_rng(3)
    targets = np.repeat(np.arange(4), 10)
    logits = rng.normal(size=(40, 4)) + 1.5 * np.eye(4)[targets]
    scores = participant_test_scores(targets, logits, n_resamples=200, seed=1)
    predictions = logits.argmax(axis=1)
    assert scores["test/balanced_accuracy"] == pytest.approx(balanced_accuracy_score(targets, predictions))
    assert scores["test/f1_insulin"] == pytest.approx(f1_score(targets, predictions, labels=[3], average="macro"))
    assert scores["test/auc_macro"] == pytest.approx(roc_auc_score(targets, softmax(logits), multi_class="ovr"))
    for name in ("balanced_accuracy", "auc_macro", "macro_f1", "f1_healthy"):
        low, point, high = (scores[f"test/{name}{suffix}"] for suffix in ("_ci_low", "", "_ci_high"))
        assert low <= point <= high and low < high  # 40 noisy participants: a real interval, not a point


def test_a_perfect_classifier_gets_every_f1_interval_at_one_whatever_a_resample_draws():
    targets = np.repeat(np.arange(4), [8, 6, 4, 2])  # 20 test participants, the rarest class held by 2
    scores = participant_test_scores(targets, 5.0 * np.eye(4)[targets], n_resamples=500, seed=0)
    for name in ("balanced_accuracy", "macro_f1", *(f"f1_{c}" for c in CLASS_SHORT_NAMES)):
        assert (scores[f"test/{name}_ci_low"], scores[f"test/{name}"], scores[f"test/{name}_ci_high"]) == (1.0, 1.0, 1.0), name
    assert scores["test/auc_macro_ci_low"] == 1.0
    # Stratified: every resample holds every class, so every interval rests on all 500 resamples.
    assert not [key for key in scores if key.endswith("_resamples") and key != "test/bootstrap_resamples"]
    assert scores["test/bootstrap_resamples"] == 500


def test_one_test_ledger_for_every_study_of_a_data_release(sweep, tmp_path, capsys):
    """Two studies with other names, experiments and registered models on the same data: the second one's promotion
    is refused, naming the first's evaluation; with --allow-test-reuse it goes through, and exactly one version
    carries octft.test_reuse=true, listing the earlier evaluation in its description."""
    _, trained, _, source_uri = sweep
    tracking_uri, storage = f"sqlite:///{tmp_path / 'mlflow.db'}", f"sqlite:///{tmp_path / 'optuna.db'}"
    specs, runs = {}, {}
    for name in ("first", "second"):
        run = MlflowTracker(tracking_uri, f"exp-{name}", "trial-0")
        run.log_artifact(trained.run_dir / "checkpoint", "checkpoint")
        run.set_tags({key: value for key, value in MlflowStore(source_uri).run(trained.run_id).tags.items()
                      if key.startswith("octft.") and key != "octft.test_split_id"})
        run.finish("FINISHED")
        study = optuna.create_study(study_name=name, storage=storage, direction="maximize")
        _add_trial(study, TrialState.COMPLETE, 0.6, run_id=run.run_id, run_dir=trained.run_dir)
        specs[name] = tmp_path / f"{name}.yaml"
        specs[name].write_text(yaml.safe_dump({
            "base": str(sweep[0].parent / "base.yaml"), "study_name": name, "storage": storage,
            "mlflow": {"tracking_uri": tracking_uri, "experiment": f"exp-{name}"},
            "space": {"optim.lr_head": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True}},
            "promote": {"model_name": f"model-{name}", "min_class_f1": 0.05}}))
        runs[name] = run.run_id
    first_run = runs["first"]

    assert main(["promote", str(specs["first"])]) == 0
    capsys.readouterr()
    assert main(["promote", str(specs["second"])]) == 2
    error = capsys.readouterr().err
    assert f"was already scored for study 'first' trial 0 (run {first_run}) on " in error, error
    assert main(["promote", str(specs["second"]), "--allow-test-reuse"]) == 0
    assert "the test ledger holds other scorings of this test split: study 'first' trial 0" in capsys.readouterr().out

    client = MlflowStore(tracking_uri).client
    versions = [client.get_model_version(f"model-{name}", "1") for name in ("first", "second")]
    assert [version.tags["octft.test_reuse"] for version in versions] == ["false", "true"]
    assert f"study 'first' trial 0 (run {first_run})" in versions[1].description


def test_a_champion_that_never_beat_its_frozen_head_or_was_validated_in_bf16_says_so():
    study = optuna.create_study(direction="maximize")
    number = _add_trial(study, TrialState.COMPLETE, 0.6, run_id="0" * 32)
    trial = study.trials[number]
    record = TrialRecord.from_dict(trial.user_attrs[TRIAL_ATTR])
    assert caveats(trial, {"octft.precision": "fp32"}) == []  # best epoch 1, encoder trained from epoch 0
    record.unfreeze_epoch = 3
    late = optuna.trial.create_trial(params=trial.params, distributions=trial.distributions, value=0.6,
                                     user_attrs={TRIAL_ATTR: record.to_dict()})
    notes = caveats(late, {"octft.precision": "bf16", "octft.runtime": "xla"})
    assert "the encoder's fine-tune did not improve on the frozen head" in notes[0]
    assert "best epoch 1 came before its encoder unfroze at epoch 3" in notes[0]
    assert notes[1].startswith("validation ran in bf16 (xla), the test in float32 on the CPU")
