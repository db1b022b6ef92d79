"""Probe studies in-process on stored features, replayed exactly by `octft train`; LP-FT from their best head.

Real sqlite Optuna storage, real MLflow store in a temp dir, real synthetic DICOM data (micro ViT, 4 x 32 x 32).
"""

from __future__ import annotations

from pathlib import Path

import os
import subprocess
import sys

import optuna
import pandas as pd
import psutil
import pytest
import torch
import yaml
from optuna.trial import TrialState

from octft.config import load_experiment
from octft.data.layout import CLASS_SHORT_NAMES
from octft.registry.promote import promote
from octft.sweep.records import unpromotable_reason
from octft.errors import OctftError
from octft.sweep.launch import launch
from octft.sweep.plan import LaunchPlan, best_probe_run, resolve_plan
from octft.sweep.pruners import collapsed_at_best
from octft.sweep.records import HEAD_FROM_ATTR, TRIAL_ATTR, EpochRecord, TrialOutcome, TrialRecord, trial_record
from octft.sweep.spec import load_sweep
from octft.sweep.storage import open_study_storage
from octft.sweep.study import take_trials
from octft.sweep.trial import TrialCache, run_trials
from octft.sweep.worker import start_trial
from octft.track import NullTracker
from octft.track.mlflow_store import MlflowStore
from octft.train.head_from import HeadFromError, load_head
from octft.train.recipe import head_state, train
from octft.train.runtime import load_state
from octft.train.setup import build_model

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def probe(data_dir, tmp_path_factory):
    """A 6-trial probe study launched once for the module: (spec path, storage, tracking uri, overrides, study)."""
    out = tmp_path_factory.mktemp("probe")
    storage, tracking = f"sqlite:///{out / 'optuna.db'}", f"sqlite:///{out / 'mlflow.db'}"
    tree = yaml.safe_load((REPO / "sweeps" / "probe.yaml").read_text())
    tree.update(base=str(REPO / "experiments" / "demo.yaml"), storage=storage, n_trials=6,
                mlflow={"tracking_uri": tracking, "experiment": "probe-test"})
    tree["space"]["train.epochs"] = {"type": "int", "low": 3, "high": 5}
    tree["sampler"]["n_startup_trials"] = 3
    spec_path = out / "sweeps" / "probe.yaml"
    spec_path.parent.mkdir()
    spec_path.write_text(yaml.safe_dump(tree))
    overrides = [
        f"data.uri={data_dir / 'data'}", f"data.cache_dir={data_dir / 'cache'}", "data.preprocess.frames=4",
        "data.preprocess.height=32", "data.preprocess.width=32", "runtime.kind=cpu", f"output_dir={out / 'runs'}",
        f"features.dir={out / 'features'}",
    ]
    result = launch(spec_path, storage=storage, overrides=overrides)
    study = optuna.load_study(study_name="demo-probe", storage=storage)
    return spec_path, storage, tracking, overrides, study, result, out


def test_probe_trials_run_in_process_each_with_its_own_child_run(probe):
    _, _, tracking, _, study, result, out = probe
    assert result.worker_exit_codes == [0]
    trials = study.get_trials()
    assert len(trials) == 6 and all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    assert {t.params["model.head"] for t in trials} <= {"linear", "mlp"}
    store = MlflowStore(tracking)
    for trial in trials:
        record = trial_record(trial)
        run = store.run(record.mlflow_run_id)
        assert run.tags["mlflow.parentRunId"] == result.parent_run_id and run.tags["octft.kind"] == "probe"
        assert run.status == ("FINISHED" if trial.state == TrialState.COMPLETE else "KILLED")
        history = store.metric_history(record.mlflow_run_id, "val/balanced_accuracy")
        assert [step for step, _ in history] == list(range(record.outcome.epochs_run))  # every epoch logged
        assert all(value == 0.0 for _, value in store.metric_history(record.mlflow_run_id, "train/encoder_trainable"))
        assert record.runner_pid == os.getpid()  # in the launch's own process
        # Its output in its own trial.log, as a process runner's trial writes it, not on the launch's console.
        log = (Path(record.run_dir) / "trial.log").read_text()
        assert f"trial-{trial.number}" in str(record.run_dir) and "epoch   0" in log and "encoder frozen (features)" in log
        # A head on stored features: no confusion-matrix image, whose drawing cost a fifth of a probe trial.
        assert not (Path(record.run_dir) / "best" / "confusion_matrix.png").exists()
    # The six heads trained together, stacked in one pass over the features (sweeps/probe.yaml: heads_per_pass auto),
    # each still its own trial, run and folder; the pass's output in its own log, named by each trial's log.
    assert all(store.metric_history(trial_record(t).mlflow_run_id, "perf/heads_in_pass")[0][1] == 6 for t in trials)
    assert (Path(trial_record(trials[0]).run_dir).parent / "passes" / "trials-0-5.log").is_file()
    assert "trains in one pass with trials 0, 1, 2, 3, 4, 5" in (Path(trial_record(trials[0]).run_dir) / "trial.log").read_text()
    # One store entry for the whole study, built by its first trial's runner.
    assert len([p for p in (out / "features").iterdir() if not p.name.startswith(".")]) == 1
    reused = [store.metric_history(trial_record(t).mlflow_run_id, "features/reused")[0][1] for t in trials]
    assert reused[1:] == [1.0] * 5


def test_a_probe_trial_replays_exactly_with_octft_train(probe, tmp_path):
    _, _, _, overrides, study, _, _ = probe
    best = trial_record(study.best_trial)
    cfg = load_experiment(REPO / "experiments" / "demo.yaml", best.overrides)
    replayed = train(cfg, run_dir=tmp_path / "replay", tracker=NullTracker(), progress=False)
    assert replayed.best_value == pytest.approx(study.best_value, abs=1e-9)
    assert replayed.best_epoch == best.outcome.best_epoch
    probe_head = load_state(Path(best.run_dir) / "checkpoint" / "best.pt")["model"]
    replay_head = load_state(tmp_path / "replay" / "checkpoint" / "best.pt")["model"]
    for name, value in probe_head.items():
        torch.testing.assert_close(replay_head[name], value, rtol=1e-5, atol=1e-6)


def test_head_from_loads_the_probe_head_and_refuses_a_different_head(probe):
    _, _, tracking, overrides, study, _, _ = probe
    best = trial_record(study.best_trial)
    cfg = load_experiment(REPO / "experiments" / "demo.yaml", best.overrides)
    model = build_model(cfg, len(CLASS_SHORT_NAMES))[0]
    uri = f"runs:/{best.mlflow_run_id}"
    load_head(model, head_state(uri, MlflowStore(tracking)), uri)
    saved = load_state(Path(best.run_dir) / "checkpoint" / "best.pt")["model"]
    for name, value in model.head.state_dict().items():
        assert torch.equal(value, saved[f"head.{name}"])
    other = "linear" if cfg.model.head == "mlp" else "mlp"
    wrong = build_model(load_experiment(REPO / "experiments" / "demo.yaml", [*overrides, f"model.head={other}"]), 4)[0]
    with pytest.raises(HeadFromError, match="does not fit"):
        load_head(wrong, head_state(uri, MlflowStore(tracking)), uri)


def test_lpft_launch_resolves_the_best_probe_once_and_replays_the_same_head(probe, tmp_path):
    spec_path, storage, tracking, overrides, study, _, out = probe
    tree = yaml.safe_load((REPO / "sweeps" / "demo_lpft.yaml").read_text())
    tree.update(base=str(REPO / "experiments" / "demo.yaml"), storage=storage, n_trials=1,
                mlflow={"tracking_uri": tracking, "experiment": "probe-test"}, study_name="lpft-test")
    tree["fixed"].update({"train.epochs": 2, "init.head_from": str(spec_path)})
    tree["space"]["train.unfreeze_epoch"] = {"type": "int", "low": 0, "high": 1}
    lpft = tmp_path / "sweeps" / "lpft.yaml"
    lpft.parent.mkdir()
    lpft.write_text(yaml.safe_dump(tree))
    best = trial_record(study.best_trial)
    expected = f"runs:/{best.mlflow_run_id}"

    launch(lpft, storage=storage, overrides=overrides, runner="in_process")
    lpft_study = optuna.load_study(study_name="lpft-test", storage=storage)
    recorded = lpft_study.user_attrs[HEAD_FROM_ATTR]
    assert recorded["run"] == expected and recorded["head"]["model.head"] == study.best_trial.params["model.head"]
    (trial,) = lpft_study.trials
    record = trial_record(trial)
    assert trial.state == TrialState.COMPLETE, record.fail_reason
    # In `fixed`, where the sweep file names the probe: the replay names its run, never the sweep file.
    assert f"init.head_from={expected}" in record.replay and str(spec_path) not in record.replay
    assert f"model.head={study.best_trial.params['model.head']}" in record.replay
    assert MlflowStore(tracking).run(record.mlflow_run_id).tags["octft.head_from"] == best.mlflow_run_id

    # The probe study goes on and finds another best: this study keeps the head it started with.
    probe_study = optuna.load_study(study_name="demo-probe", storage=storage)
    probe_study.add_trial(optuna.trial.create_trial(params={}, distributions={}, value=2.0, user_attrs={
        TRIAL_ATTR: TrialRecord(mlflow_run_id="0" * 32).to_dict()}))
    again, _ = resolve_plan(lpft, storage=storage, overrides=overrides)
    assert again.head_from["run"] == expected and again.spec().fixed["init.head_from"] == expected


def test_a_probe_trial_goes_through_the_same_promotion(probe):
    spec_path, storage, tracking, _, study, _, _ = probe
    spec = load_sweep(spec_path, ["promote.min_class_f1=0.0"])
    healthy = [t for t in study.get_trials() if t.state == TrialState.COMPLETE and unpromotable_reason(t, 0.0) is None]
    if not healthy:  # the same refusal as for any fine-tune trial
        with pytest.raises(OctftError, match="can be promoted"):
            promote(spec, storage=storage, tracking_uri=tracking, n_resamples=50)
        return
    chosen = max(healthy, key=lambda t: t.value)
    promotion = promote(spec, trial_number=chosen.number, storage=storage, tracking_uri=tracking, n_resamples=50)
    assert promotion.evaluated and promotion.run_id == trial_record(chosen).mlflow_run_id
    assert 0.0 <= promotion.test_metrics["test/balanced_accuracy"] <= 1.0
    assert MlflowStore(tracking).model_version(f"models:/{spec.promote.model_name}@champion").run_id == promotion.run_id


@pytest.mark.integration  # probe worker processes
def test_more_probe_processes_share_one_study_and_one_store(probe, tmp_path):
    """`--workers 2`: the launch and one more process run trials of one study, reading the one feature store;
    `python -m octft.sweep.worker PLAN --worker-index 1` is that process, given the plan's path and nothing else."""
    spec_path, _, tracking, overrides, _, _, out = probe
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    moved = [o for o in overrides if not o.startswith("output_dir=")] + [f"output_dir={tmp_path / 'runs'}"]
    result = launch(spec_path, storage=storage, overrides=[*moved, "n_trials=3"], workers=2)
    assert result.worker_exit_codes == [0, 0]
    study = optuna.load_study(study_name="demo-probe", storage=storage)
    assert len(study.trials) == 3  # the budget is the study's, not each process's
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.trials)
    assert {trial_record(t).worker for t in study.trials} <= {0, 1}

    # The second process on its own, deterministically: it takes the study's next trials up to the budget.
    entries = {p.name for p in (out / "features").iterdir() if not p.name.startswith(".")}
    plan = result.plan_path.read_text().replace('"n_trials": 3', '"n_trials": 5')
    (tmp_path / "larger.json").write_text(plan)
    env = dict(os.environ, OCTFT_OPTUNA_STORAGE=storage, PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-m", "octft.sweep.worker", str(tmp_path / "larger.json"), "--worker-index", "1"],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    study = optuna.load_study(study_name="demo-probe", storage=storage)
    added = [trial_record(t) for t in study.trials if t.number >= 3]
    assert len(added) == 2 and all(record.worker == 1 for record in added)
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.trials[3:]), [r.fail_reason for r in added]
    for record in added:
        assert MlflowStore(tracking).run(record.mlflow_run_id).tags["mlflow.parentRunId"] == result.parent_run_id
        assert record.runner_pid != os.getpid()
    # Both processes read the fixture's store: no entry was built.
    assert {p.name for p in (out / "features").iterdir() if not p.name.startswith(".")} == entries


@pytest.mark.parametrize("change, named", [
    ("other data", "data release and split (the data manifest hash)"),
    ("other encoder", "encoder checkpoint: octft.encoder is scratch:seed=0 there and scratch:seed=1 here"),
])
def test_a_head_from_other_data_or_another_encoder_is_refused(probe, tmp_path, capsys, change, named):
    """LP-FT checks what produced the head (data manifest, split, encoder, class order, preprocessing) before it
    trains: a head trained on another split may have seen this run's validation or test participants."""
    from octft.cli import main
    from octft.data.synth import synthesize

    _, _, tracking, overrides, study, _, _ = probe
    trained = next(trial for trial in study.trials if trial_record(trial).overrides)  # not a test's hand-made trial
    head = f"runs:/{trial_record(trained).mlflow_run_id}"
    args = [*trial_record(trained).overrides, f"init.head_from={head}", "train.epochs=2",
            "train.unfreeze_epoch=1", f"output_dir={tmp_path}"]
    if change == "other data":
        synthesize(tmp_path / "other", participants=48, seed=1, frames=4, height=32, width=32)
        args += [f"data.uri={tmp_path / 'other'}", f"data.cache_dir={tmp_path / 'cache'}"]
    else:
        args += ["train.seed=1"]  # a from-scratch encoder is named by its seed, a checkpoint by its content hash
    capsys.readouterr()
    assert main(["train", str(REPO / "experiments" / "demo.yaml"), *args, "--tracking-uri", tracking]) == 2
    error = capsys.readouterr().err
    assert f"init.head_from='{head}' was trained with another {named}" in error, error
    assert not (tmp_path / "demo" / "checkpoint" / "best.pt").exists()


def test_a_collapsed_probe_trial_never_gives_its_head(probe, tmp_path):
    """The probe study's best value belongs to a trial that collapsed at its best epoch: LP-FT takes the best
    healthy trial instead."""
    spec_path, storage, _, _, _, _, _ = probe
    copy = tmp_path / "optuna.db"
    optuna.copy_study(from_study_name="demo-probe", from_storage=storage, to_storage=f"sqlite:///{copy}")
    study = optuna.load_study(study_name="demo-probe", storage=f"sqlite:///{copy}")
    probe_spec = load_sweep(spec_path)
    healthy = max((t for t in study.trials if t.state == TrialState.COMPLETE and collapsed_at_best(t, probe_spec) is None),
                  key=lambda t: t.value)
    collapsed = TrialOutcome(status="completed", best_value=2.0, best_epoch=0)
    study.add_trial(optuna.trial.create_trial(params={}, distributions={}, value=2.0, intermediate_values={0: 2.0},
                                              user_attrs={
        TRIAL_ATTR: TrialRecord(status="completed", mlflow_run_id="0" * 32, outcome=collapsed).to_dict(),
        EpochRecord.attr(0): {"pred_frac": [0.97, 0.01, 0.01, 0.01], "balanced_accuracy": 0.26}}))
    assert study.best_trial.value == 2.0
    assert best_probe_run(str(spec_path), f"sqlite:///{copy}") == f"runs:/{trial_record(healthy).mlflow_run_id}"


def test_probe_heads_are_picked_on_an_inner_split_of_the_training_participants(probe, data_dir):
    """Validation used once: a probe trial validates on held-out training participants (every class), never on the
    validation split, which the LP-FT study's selection then reads alone."""
    _, _, tracking, _, study, _, _ = probe
    from octft.data.audit import audit_dataset

    volumes = audit_dataset(str(data_dir / "data")).volumes
    train = set(volumes[volumes.split == "train"].participant_id.astype(str))
    trial = next(trial for trial in study.trials if trial_record(trial).overrides and trial.state == TrialState.COMPLETE)
    record = trial_record(trial)
    validated = pd.read_csv(Path(record.run_dir) / "best" / "val_predictions.csv", dtype={"participant_id": str})
    assert set(validated.participant_id) <= train and validated.true_class.nunique() == len(CLASS_SHORT_NAMES)
    tags = MlflowStore(tracking).run(record.mlflow_run_id).tags
    assert tags["octft.validation"].startswith("inner split of train: 0.2 of each class, seed 0")
    assert tags["octft.validation"].endswith("the val split was not read")


def test_a_warm_start_from_a_study_on_other_data_is_refused_and_on_the_same_data_enqueued(probe, tmp_path):
    """A warm start's sets must come from runs on this study's data, split, encoder and preprocessing: the launch
    checks the source trials' provenance tags against what its own trials will record."""
    from octft.data.synth import synthesize
    from octft.sweep.warmstart import WarmStartError

    spec_path, storage, _, overrides, study, _, _ = probe
    # The source: the fixture's study as launched (other tests add hand-made trials to it).
    source_storage = f"sqlite:///{tmp_path / 'source.db'}"
    source = optuna.create_study(study_name="demo-probe", storage=source_storage, direction="maximize")
    source.add_trials([trial for trial in study.get_trials() if trial_record(trial).overrides])
    tree = yaml.safe_load(spec_path.read_text())
    source_path = tmp_path / "source.yaml"
    source_path.write_text(yaml.safe_dump({**tree, "storage": source_storage}))
    tree.update(study_name="demo-probe-warm", n_trials=1)
    warm_path = tmp_path / "warm.yaml"
    warm_path.write_text(yaml.safe_dump(tree))
    tree.update(study_name="demo-probe-warm-other")
    other_path = tmp_path / "warm-other.yaml"
    other_path.write_text(yaml.safe_dump(tree))
    synthesize(tmp_path / "other", participants=48, seed=1, frames=4, height=32, width=32)
    other = [*overrides, f"data.uri={tmp_path / 'other'}", f"data.cache_dir={tmp_path / 'cache'}",
             f"output_dir={tmp_path / 'runs'}"]
    with pytest.raises(WarmStartError, match="octft.data_manifest_hash is [0-9a-f]+ there and [0-9a-f]+ here"):
        launch(other_path, storage=storage, overrides=other, enqueue_from=str(source_path), enqueue_top=1)

    same = [*overrides, f"output_dir={tmp_path / 'runs'}"]
    result = launch(warm_path, storage=storage, overrides=same, enqueue_from=str(source_path), enqueue_top=1)
    assert [entry["params"] for entry in result.enqueued] == [source.best_trial.params]


def test_a_pass_whose_writer_died_fails_its_trials_and_the_next_pass_gets_a_new_writer(probe, tmp_path):
    spec_path, _, _, overrides, *_ = probe
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    moved = [*overrides, f"output_dir={tmp_path / 'runs'}", f"features.dir={tmp_path / 'features'}",
             f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", "n_trials=1"]
    result = launch(spec_path, storage=storage, overrides=moved)
    plan = LaunchPlan.read(result.plan_path)
    rdb = open_study_storage(plan.storage_url(), heartbeat_interval=None)
    study = optuna.load_study(study_name="demo-probe", storage=rdb)
    trials = take_trials(study, None, 2)  # two more trials, started as a worker starts them
    for trial in trials:
        start_trial(plan, study, rdb, MlflowStore(plan.tracking_url()), trial, 0)
    cache = TrialCache()
    dead = psutil.Process(cache.writer(plan).pid)
    dead.kill()
    dead.wait(timeout=10)

    outcomes = run_trials(plan, [trial.number for trial in trials], cache)
    assert [outcome.status for outcome in outcomes] == ["failed", "failed"]
    assert all(f"writer (pid {dead.pid}) ended" in outcome.stop_reason for outcome in outcomes)
    assert cache.writer(plan).pid != dead.pid  # the next pass writes again
    cache.close()
