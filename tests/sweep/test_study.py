"""Studies in real storages (SQLite files, PostgreSQL): created or resumed once per launch, the budget exact across
processes, refusals that keep a study's trials comparable, and the commands that read a study."""

from __future__ import annotations

import contextlib
import os
import shlex
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from octft.cli import main as octft_main
from octft.config import load_experiment
from octft.errors import UsageError
from octft.sweep.launch import launch
from octft.sweep.records import PLAN_ATTR, trial_record
from octft.sweep.storage import StudyStorageError, open_study_storage, study_lock
from octft.sweep.study import take_trial, take_trials
from octft.track.mlflow_store import MlflowStore, MlflowTracker
from sweeps import REPO, experiment_overrides, load, records, run_status, write_spec

POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"
SPACE = {"optim.lr_head": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
         "train.unfreeze_epoch": {"type": "int", "low": 0, "high": 1}}  # below the 2 epochs
# Strict: one collapsed epoch from the unfreeze epoch on prunes.
STRICT = {"collapse": {"patience": 1, "grace_epochs": 0}, "wrapped": "none"}


# ---------------------------------------------------------------------------------------------------- the budget


def test_budget_counts_a_retried_trial_once():
    study = optuna.create_study(direction="maximize")
    distribution = {"x": optuna.distributions.FloatDistribution(0, 1)}
    study.add_trial(optuna.create_trial(state=TrialState.FAIL, params={"x": 0.5}, distributions=distribution))
    study.add_trial(optuna.create_trial(state=TrialState.WAITING, params={"x": 0.5}, distributions=distribution,
                                        system_attrs={"failed_trial": 0, "retry_history": [0]}))
    study.add_trial(optuna.create_trial(state=TrialState.FAIL, params={"x": 0.7}, distributions=distribution))
    retry = take_trial(study, n_trials=2)  # the waiting retry is taken although 2 trials exist: trial 0 is replaced
    assert retry.number == 1
    study.tell(retry, 0.3)
    assert take_trial(study, n_trials=2) is None
    assert take_trial(study, n_trials=3).number == 3


def test_enqueued_trials_beyond_the_budget_wait_for_a_larger_one():
    study = optuna.create_study(direction="maximize")
    for x in (0.1, 0.2, 0.3):
        study.enqueue_trial({"x": x})
    taken = []
    while (trial := take_trial(study, n_trials=2)) is not None:
        taken.append(trial.suggest_float("x", 0, 1))
        study.tell(trial, 0.5)
    assert taken == [0.1, 0.2]  # the third enqueued set is over the budget of 2
    assert [trial.state for trial in study.trials] == [TrialState.COMPLETE] * 2 + [TrialState.WAITING]
    assert take_trial(study, n_trials=3).suggest_float("x", 0, 1) == 0.3  # a later launch with a larger budget


@pytest.mark.parametrize("size", [1, 2, 5])
def test_a_pass_takes_at_once_what_one_at_a_time_would_take(size):
    def study_with_retry_and_queue() -> optuna.Study:
        study = optuna.create_study(direction="maximize")
        distribution = {"x": optuna.distributions.FloatDistribution(0, 1)}
        study.add_trial(optuna.create_trial(state=TrialState.FAIL, params={"x": 0.5}, distributions=distribution))
        study.add_trial(optuna.create_trial(state=TrialState.WAITING, params={"x": 0.5}, distributions=distribution,
                                            system_attrs={"failed_trial": 0, "retry_history": [0]}))
        for x in (0.1, 0.2, 0.3, 0.4):
            study.enqueue_trial({"x": x})
        return study

    for n_trials in (2, 4, 7, 9):
        alone, together = study_with_retry_and_queue(), study_with_retry_and_queue()
        one_by_one = []
        while len(one_by_one) < size and (trial := take_trial(alone, n_trials)) is not None:
            one_by_one.append(trial.number)
        assert [trial.number for trial in take_trials(together, n_trials, size)] == one_by_one
        assert [t.state for t in alone.trials] == [t.state for t in together.trials]


RACE_SCRIPT = """
import sys, optuna
from octft.sweep.storage import open_study_storage, study_lock
from octft.sweep.study import take_trial
url, name, n_trials = sys.argv[1], sys.argv[2], int(sys.argv[3])
storage = open_study_storage(url, heartbeat_interval=None)
study = optuna.load_study(study_name=name, storage=storage)
while True:
    with study_lock(storage, name):
        trial = take_trial(study, n_trials)
    if trial is None:
        break
    study.tell(trial, float(trial.number))
"""


def run_race(url: str, name: str, tmp_path: Path, processes: int = 4, n_trials: int = 12) -> None:
    optuna.create_study(study_name=name, storage=open_study_storage(url, heartbeat_interval=None), direction="maximize")
    script = tmp_path / "race.py"
    script.write_text(RACE_SCRIPT)
    workers = [subprocess.Popen([sys.executable, str(script), url, name, str(n_trials)], cwd=REPO)
               for _ in range(processes)]
    assert [worker.wait(timeout=180) for worker in workers] == [0] * processes
    trials = optuna.load_study(study_name=name, storage=open_study_storage(url, heartbeat_interval=None)).get_trials()
    assert len(trials) == n_trials and all(trial.state == TrialState.COMPLETE for trial in trials)


@pytest.mark.integration
def test_workers_racing_for_trials_take_exactly_n_trials_sqlite(tmp_path):
    run_race(f"sqlite:///{tmp_path / 'race.db'}", "race", tmp_path)


def test_study_lock_is_exclusive_across_processes(tmp_path):
    url = f"sqlite:///{tmp_path / 'lock.db'}"
    storage = open_study_storage(url, heartbeat_interval=None)
    code = (f"from octft.sweep.storage import open_study_storage, study_lock\n"
            f"with study_lock(open_study_storage({url!r}, heartbeat_interval=None), 's'): print('got it')")
    with study_lock(storage, "s"):
        other = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
        with pytest.raises(subprocess.TimeoutExpired):
            other.wait(timeout=5)  # blocked while we hold the lock
    assert other.communicate(timeout=60)[0].strip() == "got it"


# ---------------------------------------------------------------------------------------------------- the stores


def test_an_unreachable_storage_is_a_quick_clear_error_without_the_password(tmp_path):
    spec, _, _ = write_spec(tmp_path, study_name="s", n_trials=1, space=SPACE)
    started = time.perf_counter()
    with pytest.raises(StudyStorageError) as error:
        launch(spec, storage="postgresql://optuna:s3cret@127.0.0.1:1/x")
    assert time.perf_counter() - started < 15
    message = str(error.value)
    assert "postgresql://optuna:***@127.0.0.1:1/x" in message and "s3cret" not in message and "--storage" in message


def test_mlflow_may_not_share_the_optuna_database(tmp_path):
    spec, _, _ = write_spec(tmp_path, study_name="s", n_trials=1, space=SPACE, storage=f"sqlite:///{tmp_path / 'mlflow.db'}")
    with pytest.raises(ValueError, match="are the same database"):
        launch(spec)


def journal_mode(path: Path) -> str:
    with contextlib.closing(sqlite3.connect(path)) as connection:
        return connection.execute("PRAGMA journal_mode").fetchone()[0]


def test_sqlite_stores_opened_by_octft_commit_to_a_write_ahead_log(tmp_path):
    """Every later SQLite connection of the process, Optuna's and MLflow's, in WAL mode with synchronous=NORMAL;
    the mode stays with the file, so other processes (the MLflow UI, a plain Optuna script) read it as usual."""
    storage = open_study_storage(f"sqlite:///{tmp_path / 'optuna.db'}", heartbeat_interval=None)
    optuna.create_study(storage=storage, study_name="s").optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    with storage.engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
    with MlflowTracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "e", "r") as tracker:
        tracker.log_metrics({"m": 1.0}, step=0)
    assert journal_mode(tmp_path / "optuna.db") == journal_mode(tmp_path / "mlflow.db") == "wal"
    assert len(optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'optuna.db'}").trials) == 2


# ---------------------------------------------------------------------------------------------------- a study


@pytest.fixture(scope="module")
def study(data_dir, tmp_path_factory):
    """Three trials in this process: one enqueued to collapse (pruned), one enqueued to complete, one sampled."""
    out = tmp_path_factory.mktemp("study")
    spec, storage, tracking_uri = write_spec(out, study_name="three", n_trials=3, space=SPACE, pruner=STRICT)
    created = optuna.create_study(study_name="three", storage=storage, direction="maximize")
    # Measured on this data (seed 0, eager CPU): at epoch 1, the first with a trainable encoder, lr_head 1e-2
    # predicts one class (pruned), lr_head 1e-3 reaches balanced accuracy 0.375, spread over two classes (completes).
    created.enqueue_trial({"optim.lr_head": 0.01, "train.unfreeze_epoch": 1})
    created.enqueue_trial({"optim.lr_head": 0.001, "train.unfreeze_epoch": 1})
    overrides = experiment_overrides(data_dir, out)
    result = launch(spec, overrides=overrides, runner="in_process")
    assert result.worker_exit_codes == [0]
    return {"out": out, "spec": spec, "storage": storage, "tracking_uri": tracking_uri, "result": result,
            "overrides": overrides}


def test_a_study_runs_exactly_n_trials_each_with_its_run_and_record(study):
    trials = load(study["storage"], "three").trials
    assert [trial.state for trial in trials][:2] == [TrialState.PRUNED, TrialState.COMPLETE]
    parent = study["result"].parent_run_id
    children = MlflowStore(study["tracking_uri"]).child_runs(parent)
    assert {run.run_id for run in children} == {record.mlflow_run_id for record in records(study["storage"], "three")}
    for trial, record in zip(trials, records(study["storage"], "three")):
        status, tags = run_status(study["tracking_uri"], record.mlflow_run_id)
        assert status == {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}[trial.state.name]
        assert Path(record.run_dir).name == f"trial-{trial.number}" and Path(record.run_dir).is_absolute()
        if trial.state == TrialState.COMPLETE:
            assert trial.value == record.outcome.best_metrics["val/balanced_accuracy"]
            assert (Path(record.run_dir) / "checkpoint" / "best.pt").is_file()
    pruned = records(study["storage"], "three")[0].outcome
    assert pruned.prune_reason == "collapse" and pruned.prune_epoch == 1  # never judged while frozen
    assert "unfreeze epoch 1" in pruned.prune_detail and pruned.epochs_run == 2
    assert trials[0].user_attrs["octft.epoch.1"]["pred_frac"]  # the pruner's evidence
    assert study["result"].study_dir == (study["out"] / "runs" / "sweeps" / "three").resolve()
    plan_record = load(study["storage"], "three").user_attrs[PLAN_ATTR]
    assert plan_record["experiment_overrides"] == study["overrides"] and plan_record["sampler"]["type"] == "random"
    best = MlflowStore(study["tracking_uri"]).metric_history(parent, "best/val/balanced_accuracy")
    assert best[-1][1] == load(study["storage"], "three").best_value


def test_show_prints_the_replay_that_rebuilds_the_trials_config(study, capsys):
    for number in (1, 2):
        assert octft_main(["sweep", "show", str(study["spec"]), "--storage", study["storage"], "--trial", str(number)]) == 0
        words = shlex.split(capsys.readouterr().out.strip())
        assert words[:2] == ["octft", "train"]
        replayed = load_experiment(words[2], words[3:]).model_dump(mode="json")
        record = records(study["storage"], "three")[number]
        ran = yaml.safe_load((Path(record.run_dir) / "config.yaml").read_text())
        replayed.pop("tracking"), ran.pop("tracking")  # the sweep names the MLflow experiment and run
        assert replayed == ran
    assert octft_main(["sweep", "show", str(study["spec"]), "--storage", study["storage"], "--trial", "7"]) == 2
    assert "has no trial 7" in capsys.readouterr().err


def test_status_lists_every_trial_and_the_best(study, capsys):
    assert octft_main(["sweep", "status", str(study["spec"]), "--storage", study["storage"]]) == 0
    text = capsys.readouterr().out
    found = load(study["storage"], "three")
    lines = text.splitlines()
    assert lines[0].split()[:2] == ["trial", "state"]
    assert lines[1].split()[:2] == ["0", "PRUNED"] and "collapse" in lines[1]
    assert lines[2].split()[:3] == ["1", "COMPLETE", f"{found.trials[1].value:.4f}"]
    assert f"best: trial {found.best_trial.number}" in text


def test_stop_rules_replays_the_study_and_its_own_rules_spend_what_the_study_spent(study, capsys):
    assert octft_main(["sweep", "stop-rules", str(study["spec"]), "--storage", study["storage"]]) == 0
    text = capsys.readouterr().out
    spent = sum(record.outcome.epochs_run for record in records(study["storage"], "three"))
    pruned = sum(trial.state == TrialState.PRUNED for trial in load(study["storage"], "three").trials)
    rows = {line[:22].strip(): line[22:].split() for line in text.splitlines()[3:] if line[:1] in "go"}
    assert text.startswith(f"study three: 3 finished trials replayed in trial order ({pruned} pruned by the study); no "
                           f"pruning spends {spent} epochs or more")
    assert rows["grace 0, patience 1"][0] == "*100%"  # the study's own rules (collapse grace 0, patience 1; no wrapped)
    assert rows["off"][0] == ">=100%"  # the pruned trials would run past the epoch they were pruned at: unknown
    assert f"the study pruned {pruned} trial(s)" in text


def test_launching_a_finished_study_again_runs_nothing_and_other_overrides_are_refused(study):
    before = [(t.number, t.state, t.datetime_complete) for t in load(study["storage"], "three").trials]
    result = launch(study["spec"], overrides=study["overrides"], runner="in_process")
    assert result.worker_exit_codes == [0]
    assert [(t.number, t.state, t.datetime_complete) for t in load(study["storage"], "three").trials] == before
    with pytest.raises(UsageError, match=r"launched with overrides .* now .*must share one config"):
        launch(study["spec"], overrides=[*study["overrides"], "optim.weight_decay=0.1"], runner="in_process")


def test_a_study_launched_by_an_earlier_octft_is_refused_with_what_to_do(tmp_path):
    spec, storage, _ = write_spec(tmp_path, study_name="old", n_trials=1, space=SPACE)
    old = optuna.create_study(study_name="old", storage=storage, direction="maximize")
    for key, value in {"spec_path": str(spec), "cli_overrides": [], "mlflow_parent_run_id": "abc"}.items():
        old.set_user_attr(key, value)
    with pytest.raises(UsageError, match="launched by an earlier octft.*another study_name.*delete-study"):
        launch(spec, runner="in_process")
    assert octft_main(["sweep", "launch", str(spec)]) == 2  # one line, no traceback


# ---------------------------------------------------------------------------------------------------- PostgreSQL


@pytest.fixture
def postgres_study():
    try:
        storage = open_study_storage(POSTGRES_URL, heartbeat_interval=None)
    except StudyStorageError as error:
        if os.environ.get("OCTFT_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"OCTFT_REQUIRE_POSTGRES=1 but no PostgreSQL answers at {POSTGRES_URL}: {error}")
        pytest.skip(f"no PostgreSQL at {POSTGRES_URL} (trust auth, database test); set OCTFT_REQUIRE_POSTGRES=1 to fail")
    name = f"octft-test-{uuid.uuid4().hex[:8]}"
    yield name
    with contextlib.suppress(KeyError):
        optuna.delete_study(study_name=name, storage=storage)


@pytest.mark.integration
def test_workers_racing_for_trials_take_exactly_n_trials_postgres(tmp_path, postgres_study):
    run_race(POSTGRES_URL, postgres_study, tmp_path)


def test_a_record_reads_back_from_postgres(tmp_path, data_dir, postgres_study):
    """One in-process trial on PostgreSQL: its record and epoch records are plain JSON in any SQL storage."""
    spec, _, tracking_uri = write_spec(tmp_path, study_name=postgres_study, n_trials=1, storage=POSTGRES_URL,
                                       space={"optim.lr_head": SPACE["optim.lr_head"]})
    assert launch(spec, overrides=experiment_overrides(data_dir, tmp_path), runner="in_process").worker_exit_codes == [0]
    (trial,) = load(POSTGRES_URL, postgres_study).trials
    record = trial_record(trial)
    assert trial.state == TrialState.COMPLETE and record.outcome.epochs_run == 2
    assert run_status(tracking_uri, record.mlflow_run_id)[0] == "FINISHED"


def test_processes_opening_a_new_storage_at_once_all_open_it(tmp_path):
    """Every opener of an unstamped database (readers too) stamps its schema: four processes opening one new SQLite
    storage at the same moment race for it, and the losers open it again instead of failing."""
    script = ("import sys, time; from octft.sweep.storage import open_study_storage\n"
              "time.sleep(max(0.0, float(sys.argv[2]) - time.time()))\n"
              "open_study_storage(sys.argv[1], heartbeat_interval=None)\n")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    for attempt in range(3):
        url, start = f"sqlite:///{tmp_path / f'race-{attempt}.db'}", time.time() + 3.0
        openers = [subprocess.Popen([sys.executable, "-c", script, url, str(start)], env=env, stderr=subprocess.PIPE,
                                    text=True) for _ in range(4)]
        for opener in openers:
            _, err = opener.communicate(timeout=120)
            assert opener.returncode == 0, err[-2000:]
        assert optuna.get_all_study_names(url) == []
