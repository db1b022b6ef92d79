"""Greedy soups at promotion (`octft promote --soup K`).

Two real tiny fine-tunes from one encoder initialisation (train.seed 0, two head learning rates), and from the first
two more trials' runs: one whose head predicts one class whatever it sees (averaging it in must lower the soup's
balanced accuracy to chance), and one tagged with another encoder identity (skipped, with the reason). The study and
its runs are laid out as a sweep's workers leave them (sqlite Optuna storage, MLflow in a sqlite store).
"""

from __future__ import annotations


import numpy as np
import optuna
import pytest
import torch
import yaml
from optuna.distributions import FloatDistribution
from sklearn.metrics import balanced_accuracy_score

from octft.cli import main
from octft.config import load_experiment, save_resolved
from octft.data.dataset import prepare_data
from octft.data.layout import CLASS_SHORT_NAMES
from octft.data.synth import synthesize
from octft.registry.inference import load_checkpoint_folder
from octft.registry.ledger import TestLedger
from octft.registry.promote import LEDGER_KEY_TAG, promote
from octft.registry.soup import average_states, soup_number
from octft.sweep.pruners import record_epoch
from octft.sweep.records import PLAN_ATTR, TRIAL_ATTR, TrialOutcome, TrialRecord, test_evaluations
from octft.sweep.spec import load_sweep
from octft.track.mlflow_store import MlflowStore, MlflowTracker
from octft.train.recipe import train
from octft.train.runtime import load_state

MODEL_NAME = "octft-soup-test"
METRIC = "val/balanced_accuracy"


def _add_trial(study, value, run_id):
    trial = study.ask({"optim.lr_head": FloatDistribution(1e-4, 1e-1, log=True)})
    record_epoch(trial, 0, value, pred_frac=[0.25] * 4, balanced_accuracy=value)
    metrics = {METRIC: value, **{f"val/f1_{name}": 0.5 for name in CLASS_SHORT_NAMES}}
    record = TrialRecord(status="completed", mlflow_run_id=run_id, outcome=TrialOutcome(
        "completed", best_value=value, best_epoch=0, epochs_run=1, best_metrics=metrics))
    trial.set_user_attr(TRIAL_ATTR, record.to_dict())
    study.tell(trial, value)
    return trial.number


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """Trials, best recorded value first: 0 the first fine-tune, 1 another encoder, 2 the one-class head, 3 the
    second fine-tune. Returns (spec path, tracking URI, {trial: run id})."""
    root = tmp_path_factory.mktemp("soup")
    synthesize(root / "data", participants=48, frames=4, height=32, width=32)
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    parent = MlflowTracker(tracking_uri, "soup-test", "study")
    parent.finish("FINISHED")
    base = [f"data.uri={root / 'data'}", f"data.cache_dir={root / 'cache'}", "model.size=vit_micro",
            "data.preprocess.frames=4", "data.preprocess.height=32", "data.preprocess.width=32", "train.epochs=3",
            "train.unfreeze_epoch=1", "runtime.kind=cpu", f"tracking.tracking_uri={tracking_uri}",
            "tracking.experiment=soup-test", f"output_dir={root / 'runs'}"]
    save_resolved(load_experiment("experiments/demo.yaml", base), root / "base.yaml")
    trained = {lr: train(load_experiment("experiments/demo.yaml", [*base, f"optim.lr_head={lr}"]),
                         run_dir=root / "runs" / f"lr-{lr}", progress=False) for lr in (3e-3, 1e-3)}
    first, second = trained[3e-3], trained[1e-3]
    store = MlflowStore(tracking_uri)
    for result in (first, second):  # as a sweep's worker leaves it: a child of the study's run
        store.set_tag(result.run_id, "mlflow.parentRunId", parent.run_id)

    def derived_run(name, change_state=None, **tag_changes):
        state = load_state(first.run_dir / "checkpoint" / "best.pt")
        if change_state:
            change_state(state["model"])
        folder = root / name / "checkpoint"
        folder.mkdir(parents=True)
        torch.save(state, folder / "best.pt")
        (folder / "config.yaml").write_bytes((first.run_dir / "checkpoint" / "config.yaml").read_bytes())
        run = MlflowTracker(tracking_uri, "soup-test", name, parent_run_id=parent.run_id)
        run.log_artifact(folder, "checkpoint")
        tags = {key: value for key, value in store.run(first.run_id).tags.items() if key.startswith("octft.")}
        run.set_tags({**tags, **tag_changes})
        run.finish("FINISHED")
        return run.run_id

    def one_class_head(model_state):
        # The head's last layer answers class 0 whatever the encoder says, strongly enough to outweigh the other
        # members in any average: a soup holding it predicts one class (balanced accuracy 0.25).
        out = [key for key in model_state if key.startswith("head.") and model_state[key].shape[0] == len(CLASS_SHORT_NAMES)]
        assert len(out) == 2, out  # the last layer's weight and bias
        for key in out:
            model_state[key].zero_()
            if model_state[key].ndim == 1:
                model_state[key][0] = 1e4

    runs = {0: first.run_id, 1: derived_run("other-encoder", **{"octft.encoder": "sha256:another"}),
            2: derived_run("one-class", one_class_head), 3: second.run_id}
    storage = f"sqlite:///{root / 'optuna.db'}"
    optuna_study = optuna.create_study(study_name="soup-test", storage=storage, direction="maximize")
    optuna_study.set_user_attr(PLAN_ATTR, {"parent_run_id": parent.run_id})
    for number, value in zip(runs, (0.9, 0.85, 0.8, 0.7)):
        _add_trial(optuna_study, value, runs[number])
    spec_path = root / "sweep.yaml"
    spec_path.write_text(yaml.safe_dump({
        "base": str(root / "base.yaml"), "study_name": "soup-test", "storage": storage,
        "mlflow": {"tracking_uri": tracking_uri, "experiment": "soup-test"},
        "space": {"optim.lr_head": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True}},
        "promote": {"model_name": MODEL_NAME, "min_class_f1": 0.05},
    }))
    return spec_path, tracking_uri, runs


def _participant_balanced_accuracy(folder) -> float:
    """The soup checkpoint's validation balanced accuracy, recomputed here: its own forward pass and scikit-learn."""
    loaded = load_checkpoint_folder(folder, source="test")
    _, val_set = prepare_data(loaded.config.data, progress=False).prepared.run_datasets(
        loaded.config.data.inner_val_fraction, loaded.config.data.split.seed)
    with torch.no_grad():
        logits = np.concatenate([loaded.model(val_set[index]["x"].unsqueeze(0)).numpy() for index in range(len(val_set))])
    participants = np.asarray(val_set.participant_ids(range(len(val_set))))
    ids = sorted(set(participants))
    mean_logits = np.stack([logits[participants == pid].mean(axis=0) for pid in ids])
    targets = np.asarray([val_set.labels[participants == pid][0] for pid in ids])
    return balanced_accuracy_score(targets, mean_logits.argmax(axis=1))


def test_the_greedy_soup_is_logged_judged_on_validation_and_tested_once(study, capsys, tmp_path):
    spec_path, tracking_uri, runs = study
    store = MlflowStore(tracking_uri)

    assert main(["promote", str(spec_path), "--soup", "3"]) == 0
    out = capsys.readouterr().out
    # Another encoder: skipped with the reason; the one-class head lowers the soup: left out, with both values.
    assert "soup: skipped trial 1 was trained with another encoder checkpoint: octft.encoder is sha256:another" in out
    assert "soup: left out trial 2: val/balanced_accuracy 0.2500 with it" in out

    (soup_run,) = store.search_runs("soup-test", {"octft.kind": "soup"})
    tags, params, metrics = soup_run.tags, store.client.get_run(soup_run.run_id).data.params, soup_run.metrics
    members = [int(member) for member in tags["octft.soup_members"].split(",")]
    assert members[0] == 0 and 2 not in members and 1 not in members
    assert params["soup.candidates"] == "0,2,3" and params["soup.members"] == tags["octft.soup_members"]
    value, best_value = metrics[METRIC], metrics["soup/best_trial_value"]
    assert f"{METRIC} {value:.4f} vs trial 0 {best_value:.4f} alone" in out and f"soup run {soup_run.run_id}" in out

    # The logged soup is a normal checkpoint folder: its weights are the members' average, and its validation value
    # is what an independent computation on the loaded folder gives.
    folder = store.download(soup_run.run_id, "checkpoint", tmp_path)
    soup_state = load_state(folder / "best.pt")["model"]
    member_states = [load_state(store.download(runs[member], "checkpoint", tmp_path / f"m{member}") / "best.pt")["model"]
                     for member in members]
    expected = average_states(member_states)
    assert all(torch.equal(soup_state[key], expected[key]) for key in expected)
    assert value == pytest.approx(_participant_balanced_accuracy(folder))
    if members == [0]:  # the second fine-tune lowered it too: the soup is the best trial's weights
        assert value == best_value

    # The registered version says which won, with both values; the winner alone was scored on the test split, once.
    version = store.client.get_model_version_by_alias(MODEL_NAME, "champion")
    won = len(members) > 1 and value > best_value
    assert version.tags["octft.soup_winner"] == ("soup" if won else "trial")
    assert version.tags["octft.soup_val_value"] == f"{value:.6g}"
    assert version.tags["octft.soup_best_trial_val_value"] == f"{best_value:.6g}"
    assert "soup of trials" in version.description and f"trial 0 {best_value:.4f} alone" in version.description
    winner_run = soup_run.run_id if won else runs[0]
    assert version.run_id == winner_run
    optuna_study = optuna.load_study(study_name="soup-test", storage=load_sweep(spec_path).storage)
    assert tags["mlflow.parentRunId"] == optuna_study.user_attrs[PLAN_ATTR]["parent_run_id"]
    evaluations = test_evaluations(optuna_study.user_attrs)
    assert [(item.trial, item.run_id) for item in evaluations] == [(soup_number(members) if won else 0, winner_run)]
    key = store.run(winner_run).tags[LEDGER_KEY_TAG]
    assert [entry.run_id for entry in TestLedger(store).entries(key)] == [winner_run]
    loser = runs[0] if won else soup_run.run_id
    assert "test/balanced_accuracy" not in store.run(loser).metrics

    # Again: the same soup run and version, nothing scored a second time.
    again = promote(load_sweep(spec_path), soup=3)
    assert again.version == str(version.version) and not again.evaluated
    assert len(store.search_runs("soup-test", {"octft.kind": "soup"})) == 1
    assert len(TestLedger(store).entries(key)) == 1


def test_a_soup_needs_k_of_two_or_more_and_no_trial(study, capsys):
    spec_path, _, _ = study
    assert main(["promote", str(spec_path), "--soup", "1"]) == 2
    assert "give K >= 2" in capsys.readouterr().err
    assert main(["promote", str(spec_path), "--soup", "3", "--trial", "0"]) == 2


def test_every_floating_tensor_is_averaged_and_counts_are_kept():
    states = [{"head.weight": torch.full((2,), value), "norm.running_mean": torch.full((2,), value),
               "norm.num_batches_tracked": torch.tensor(count), "half": torch.full((1,), value, dtype=torch.bfloat16)}
              for value, count in ((1.0, 5), (2.0, 7), (6.0, 9))]
    averaged = average_states(states)
    assert averaged["head.weight"].tolist() == averaged["norm.running_mean"].tolist() == [3.0, 3.0]
    assert averaged["norm.num_batches_tracked"].item() == 5 and averaged["half"].dtype == torch.bfloat16
    assert soup_number([3, 1]) == soup_number([1, 3]) == -10
