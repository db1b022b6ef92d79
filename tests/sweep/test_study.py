"""Studies in real storages (sqlite files, PostgreSQL), real worker and trial processes, real MLflow stores.

Trials fine-tune the demo experiment shrunk to a micro ViT on 4 frames of 32x32 px for 2 epochs on CPU.
"""

import contextlib
import math
import os
import shlex
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
from octft.config import ConfigError, load_experiment
from octft.sweep.study import (
    StorageError,
    budget_used,
    launch,
    load_launch_spec,
    open_storage,
    split_overrides,
    study_lock,
    take_trial,
)

REPO = Path(__file__).resolve().parents[2]
POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"
RUN_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}


@pytest.fixture(scope="module")
def subprocess_env(tmp_path_factory):
    # Worker and trial processes import torch, mlflow and timm; cached bytecode saves seconds per process.
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("PYTHONDONTWRITEBYTECODE", raising=False)
        patch.setenv("PYTHONPYCACHEPREFIX", str(tmp_path_factory.getbasetemp() / "pycache"))
        for name in ("OCTFT_OPTUNA_STORAGE", "MLFLOW_TRACKING_URI"):
            patch.delenv(name, raising=False)
        yield


def experiment_overrides(data_dir: Path, out: Path, kind: str = "cpu") -> list[str]:
    return [
        f"data.uri={data_dir / 'data'}", f"data.cache_dir={data_dir / 'cache'}", "data.preprocess.frames=4",
        "data.preprocess.height=32", "data.preprocess.width=32", f"runtime.kind={kind}", f"output_dir={out / 'runs'}",
    ]


def write_spec(directory: Path, *, study_name: str, storage: str, n_trials: int, space: dict | None = None) -> Path:
    # lr_head reaches 0.1, where the head collapses onto one class within the first epochs.
    spec = {
        "base": str(REPO / "experiments" / "demo.yaml"),
        "study_name": study_name,
        "storage": storage,
        "mlflow": {"tracking_uri": f"sqlite:///{directory / 'mlflow.db'}", "experiment": f"sweep-{study_name}"},
        "n_trials": n_trials,
        "fixed": {"train.epochs": 2},
        "space": space or {
            "optim.lr_head": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
            "train.unfreeze_epoch": {"type": "int", "low": 0, "high": 1},  # below the 2 epochs
        },
        "sampler": {"type": "random", "seed": 0},
        # Strict: one collapsed epoch from the unfreeze epoch on prunes.
        "pruner": {"collapse": {"patience": 1, "grace_epochs": 0}, "wrapped": "none"},
    }
    path = directory / f"{study_name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def load(storage: str, study_name: str) -> optuna.Study:
    return optuna.load_study(study_name=study_name, storage=open_storage(storage, heartbeat_interval=None))


def check_trials_and_runs(study: optuna.Study, tracking_uri: str, n_trials: int) -> None:
    """The contract between a study, its trials and their MLflow runs, checked both ways."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    trials = study.get_trials()
    assert len(trials) == n_trials
    assert sorted(t.number for t in trials) == list(range(n_trials))
    assert len({tuple(sorted(t.params.items())) for t in trials}) == n_trials  # no trial ran twice
    parent_id = study.user_attrs["mlflow_parent_run_id"]
    parent = client.get_run(parent_id)
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    assert {run.info.run_id for run in children} == {t.user_attrs["mlflow_run_id"] for t in trials}
    for trial in trials:
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        assert run.info.status == RUN_STATUS[trial.state.name], trial.number
        assert run.data.tags["optuna.study"] == study.study_name
        assert run.data.tags["optuna.trial_number"] == str(trial.number)
        assert run.data.params["optim.lr_head"] == str(trial.params["optim.lr_head"])
        run_dir = Path(trial.user_attrs["run_dir"])
        assert run_dir.is_absolute() and run_dir.name == f"trial-{trial.number}"
        assert trial.user_attrs["replay"].startswith("octft train ")
        assert "train.epochs=2" in trial.user_attrs["overrides"]
        if trial.state == TrialState.COMPLETE:
            metrics = trial.user_attrs["best_metrics"]
            assert trial.value == metrics["val/balanced_accuracy"]
            assert {"val/f1_healthy", "val/pred_frac_insulin"} <= set(metrics)
            assert (run_dir / "checkpoint" / "best.pt").is_file() and (run_dir / "checkpoint" / "config.yaml").is_file()
            assert "checkpoint/best.pt" in {a.path for a in client.list_artifacts(run.info.run_id, "checkpoint")}
            assert trial.user_attrs["epochs_run"] == 2
        if trial.state == TrialState.PRUNED:
            assert trial.user_attrs["prune_reason"] == "collapse"
            assert run.data.tags["octft.prune_reason"] == "collapse"
            assert "collapse" in run.data.tags["octft.end_reason"]
            assert trial.user_attrs["prune_epoch"] == trial.last_step
    if any(t.state == TrialState.COMPLETE for t in trials):
        best = client.get_metric_history(parent_id, "best/val_balanced_accuracy")
        assert best and best[-1].value == study.best_value
        assert parent.data.tags["best_trial"] == str(study.best_trial.number)


# ---------------------------------------------------------------------------------------------------- fast


def test_command_line_overrides_split_into_sweep_and_experiment_keys():
    sweep, experiment = split_overrides(["n_trials=2", "fixed.train.epochs=3", "sampler.seed=1", "data.uri=/x", "output_dir=o"])
    assert sweep == ["n_trials=2", "fixed.train.epochs=3", "sampler.seed=1"]
    assert experiment == ["data.uri=/x", "output_dir=o"]


def test_an_override_of_a_searched_key_is_refused(tmp_path):
    spec = write_spec(tmp_path, study_name="s", storage=f"sqlite:///{tmp_path / 'o.db'}", n_trials=1)
    with pytest.raises(ConfigError, match=r"optim\.lr_head is a key of the search space"):
        load_launch_spec(spec, ["optim.lr_head=0.1"])
    with pytest.raises(ConfigError, match="unknown key 'optim.lr_hed'"):
        load_launch_spec(spec, ["optim.lr_hed=0.1"])


def test_unreachable_storage_is_a_quick_clear_error_without_the_password(tmp_path):
    spec = write_spec(tmp_path, study_name="s", storage="sqlite:///unused.db", n_trials=1)
    started = time.perf_counter()
    with pytest.raises(StorageError) as error:
        launch(spec, storage="postgresql://optuna:s3cret@127.0.0.1:1/x")
    assert time.perf_counter() - started < 15
    message = str(error.value)
    assert "postgresql://optuna:***@127.0.0.1:1/x" in message and "s3cret" not in message
    assert "--storage" in message


def test_mlflow_may_not_share_the_optuna_database(tmp_path):
    spec = write_spec(tmp_path, study_name="s", storage=f"sqlite:///{tmp_path / 'mlflow.db'}", n_trials=1)
    with pytest.raises(ValueError, match="are the same database"):
        launch(spec)


def test_budget_counts_a_retried_trial_once():
    study = optuna.create_study(direction="maximize")
    distribution = {"x": optuna.distributions.FloatDistribution(0, 1)}
    study.add_trial(optuna.create_trial(state=TrialState.FAIL, params={"x": 0.5}, distributions=distribution))
    study.add_trial(optuna.create_trial(state=TrialState.WAITING, params={"x": 0.5}, distributions=distribution,
                                        system_attrs={"failed_trial": 0, "retry_history": [0]}))
    study.add_trial(optuna.create_trial(state=TrialState.FAIL, params={"x": 0.7}, distributions=distribution))
    assert budget_used(study.trials) == 2  # the dead trial's place went to its retry; a plain failure counts
    retry = take_trial(study, n_trials=2)  # the waiting retry is taken even though the budget is spent
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
    trial = take_trial(study, n_trials=3)  # a later launch with a larger budget runs it
    assert trial.suggest_float("x", 0, 1) == 0.3


def test_a_space_with_batches_the_trial_devices_cannot_split_is_refused_at_launch(tmp_path, monkeypatch):
    from octft.train.devices import BatchLayoutError

    monkeypatch.setenv("PJRT_DEVICE", "CPU")
    space = {"train.accumulation_steps": {"type": "categorical", "choices": [1, 2, 3]}}  # demo batch 8: 8, 16, 24
    spec = write_spec(tmp_path, study_name="layouts", storage=f"sqlite:///{tmp_path / 'optuna.db'}", n_trials=1,
                      space=space)
    with pytest.raises(BatchLayoutError) as error:
        launch(spec, devices_per_trial=16)
    assert "2 of the space's effective batches" in str(error.value) and "8 x 1 = 8, 8 x 3 = 24" in str(error.value)
    assert not (tmp_path / "optuna.db").exists()  # refused before the study was created
    # On 8 devices every sampled batch splits evenly; an eager runtime trains on one device and is never refused.
    from octft.sweep.space import check_batch_layouts, parse_space

    check_batch_layouts(parse_space(space), 8, 1, 8)
    monkeypatch.delenv("PJRT_DEVICE")
    from octft.sweep.study import base_config, check_trial_layouts

    loaded = load_launch_spec(spec, [], None)[0]
    check_trial_layouts(loaded, base_config(loaded), 16)


def test_launch_fixes_one_micro_batch_shape_for_every_trial_on_xla(tmp_path, monkeypatch):
    from octft.sweep.study import base_config, fixed_micro_batch

    monkeypatch.setenv("PJRT_DEVICE", "CPU")
    space = {"train.accumulation_steps": {"type": "categorical", "choices": [1, 2, 4]}}  # demo batch 8: 8, 16, 32
    spec = write_spec(tmp_path, study_name="micro", storage=f"sqlite:///{tmp_path / 'optuna.db'}", n_trials=1,
                      space=space)
    loaded = load_launch_spec(spec, [], None)[0]
    # Rows per device 4, 8, 16 on 2 devices: micro-batches of 4 fit all; on 1 device at most train.batch_size.
    assert fixed_micro_batch(loaded, base_config(loaded), 2) == ["runtime.micro_batch_rows=4"]
    assert fixed_micro_batch(loaded, base_config(loaded), 1) == ["runtime.micro_batch_rows=8"]
    assert fixed_micro_batch(loaded, base_config(loaded, ["runtime.micro_batch_rows=2"]), 2) == []  # the user's
    assert fixed_micro_batch(loaded, base_config(loaded), 2, ["runtime.micro_batch_rows=null"]) == []  # null too
    one_batch = load_launch_spec(spec, ["space.train.accumulation_steps=null"], None)[0]
    assert fixed_micro_batch(one_batch, base_config(one_batch), 2) == []  # one effective batch: nothing to share
    monkeypatch.delenv("PJRT_DEVICE")
    assert fixed_micro_batch(loaded, base_config(loaded), 2) == []  # eager: no graphs


RACE_SCRIPT = """
import sys, optuna
from octft.sweep.study import open_storage, study_lock, take_trial
url, name, n_trials = sys.argv[1], sys.argv[2], int(sys.argv[3])
storage = open_storage(url, heartbeat_interval=None)
study = optuna.load_study(study_name=name, storage=storage)
while True:
    with study_lock(storage, name):
        trial = take_trial(study, n_trials)
    if trial is None:
        break
    study.tell(trial, float(trial.number))
"""


def run_race(url: str, name: str, tmp_path: Path, processes: int = 4, n_trials: int = 12) -> None:
    optuna.create_study(study_name=name, storage=open_storage(url, heartbeat_interval=None), direction="maximize")
    script = tmp_path / "race.py"
    script.write_text(RACE_SCRIPT)
    workers = [subprocess.Popen([sys.executable, str(script), url, name, str(n_trials)], cwd=REPO)
               for _ in range(processes)]
    assert [worker.wait(timeout=180) for worker in workers] == [0] * processes
    trials = load(url, name).get_trials()
    assert len(trials) == n_trials and all(t.state == TrialState.COMPLETE for t in trials)


def test_workers_racing_for_trials_take_exactly_n_trials_sqlite(tmp_path, subprocess_env):
    run_race(f"sqlite:///{tmp_path / 'race.db'}", "race", tmp_path)


def test_study_lock_is_exclusive_across_processes(tmp_path):
    url = f"sqlite:///{tmp_path / 'lock.db'}"
    storage = open_storage(url, heartbeat_interval=None)
    code = (f"import sys; from octft.sweep.study import open_storage, study_lock\n"
            f"with study_lock(open_storage({url!r}, heartbeat_interval=None), 's'): print('got it')")
    with study_lock(storage, "s"):
        other = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
        with pytest.raises(subprocess.TimeoutExpired):
            other.wait(timeout=8)  # blocked while we hold the lock
    assert other.communicate(timeout=60)[0].strip() == "got it"


# ---------------------------------------------------------------------------------------------------- sqlite sweep


@pytest.fixture(scope="module")
def sqlite_sweep(tmp_path_factory, data_dir, subprocess_env):
    """Two workers, three trials: one enqueued to collapse (pruned), one enqueued to complete, one sampled."""
    out = tmp_path_factory.mktemp("sqlite-sweep")
    storage = f"sqlite:///{out / 'optuna.db'}"
    spec = write_spec(out, study_name="two-workers", storage=storage, n_trials=3)
    study = optuna.create_study(study_name="two-workers", storage=storage, direction="maximize")
    # Measured on this data (seed 0, eager CPU): at epoch 1, the first with a trainable encoder, lr_head 1e-3
    # still predicts one class (pruned), lr_head 3e-2 reaches balanced accuracy 0.5 (completes).
    study.enqueue_trial({"optim.lr_head": 0.001, "train.unfreeze_epoch": 1})
    study.enqueue_trial({"optim.lr_head": 0.03, "train.unfreeze_epoch": 1})
    started = time.perf_counter()
    result = launch(spec, workers=2, overrides=experiment_overrides(data_dir, out))
    print(f"sqlite sweep, 2 workers, 3 trials: {time.perf_counter() - started:.0f} s")
    assert result.worker_exit_codes == [0, 0]
    return {"out": out, "spec": spec, "storage": storage, "result": result, "data_dir": data_dir}


@pytest.mark.integration
def test_two_workers_on_sqlite_run_exactly_n_trials_each_with_its_mlflow_run(sqlite_sweep):
    out, storage = sqlite_sweep["out"], sqlite_sweep["storage"]
    study = load(storage, "two-workers")
    check_trials_and_runs(study, f"sqlite:///{out / 'mlflow.db'}", 3)
    states = {t.number: t.state for t in study.trials}
    assert states[0] == TrialState.PRUNED and states[1] == TrialState.COMPLETE
    assert sqlite_sweep["result"].study_dir == (out / "runs" / "sweeps" / "two-workers").resolve()
    assert study.user_attrs["cli_overrides"] == experiment_overrides(sqlite_sweep["data_dir"], out)
    assert study.user_attrs["sampler"] == {"type": "random", "seed": 0}
    assert study.user_attrs["pruner"]["collapse"]["patience"] == 1
    # Both stores commit to a write-ahead log (octft.sqlite_wal): a sweep commits every epoch.
    for database in (out / "mlflow.db", Path(storage.removeprefix("sqlite:///"))):
        assert journal_mode(database) == "wal", database


def journal_mode(path: Path) -> str:
    import sqlite3

    with contextlib.closing(sqlite3.connect(path)) as connection:
        return connection.execute("PRAGMA journal_mode").fetchone()[0]


def test_sqlite_stores_opened_by_octft_commit_to_a_write_ahead_log(tmp_path):
    """Every later SQLite connection of the process, Optuna's and MLflow's, in WAL mode with synchronous=NORMAL;
    the mode stays with the file, so other processes (the MLflow UI, a plain Optuna script) read it as usual."""
    from octft.track.mlflow_store import MlflowTracker

    storage = open_storage(f"sqlite:///{tmp_path / 'optuna.db'}", heartbeat_interval=None)
    optuna.create_study(storage=storage, study_name="s").optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    with storage.engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
    with MlflowTracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "e", "r") as tracker:
        tracker.log_metrics({"m": 1.0}, step=0)
    assert journal_mode(tmp_path / "optuna.db") == journal_mode(tmp_path / "mlflow.db") == "wal"
    assert len(optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'optuna.db'}").trials) == 2


@pytest.mark.integration
def test_a_collapsed_trial_is_pruned_with_its_reason(sqlite_sweep):
    pruned = load(sqlite_sweep["storage"], "two-workers").trials[0]
    assert pruned.state == TrialState.PRUNED
    epoch = pruned.user_attrs["prune_epoch"]
    assert pruned.user_attrs["prune_reason"] == "collapse" and epoch == pruned.last_step
    assert "unfreeze epoch 1" in pruned.user_attrs["prune_detail"] and epoch == 1  # never judged while frozen
    assert pruned.user_attrs["unfreeze_epoch"] == 1
    assert set(pruned.user_attrs[f"epoch_{epoch}"]) == {"pred_frac", "balanced_accuracy"}
    assert pruned.user_attrs["epochs_run"] == epoch + 1


@pytest.mark.integration
def test_show_prints_a_replay_that_rebuilds_the_trial_config(sqlite_sweep, capsys):
    spec, storage = sqlite_sweep["spec"], sqlite_sweep["storage"]
    for number in (1, 2):
        assert octft_main(["sweep", "show", str(spec), "--storage", storage, "--trial", str(number)]) == 0
        words = shlex.split(capsys.readouterr().out.strip())
        assert words[:2] == ["octft", "train"]
        replayed = load_experiment(words[2], words[3:]).model_dump(mode="json")
        trial = load(storage, "two-workers").trials[number]
        ran = yaml.safe_load((Path(trial.user_attrs["run_dir"]) / "config.yaml").read_text())
        # The sweep names the MLflow experiment and run; everything else is the same config.
        replayed.pop("tracking"), ran.pop("tracking")
        assert replayed == ran
        assert ran["optim"]["lr_head"] == trial.params["optim.lr_head"]
    assert octft_main(["sweep", "show", str(spec), "--storage", storage, "--trial", "7"]) == 2
    assert "has no trial 7" in capsys.readouterr().err


@pytest.mark.integration
def test_status_lists_every_trial_and_the_best(sqlite_sweep, capsys):
    assert octft_main(["sweep", "status", str(sqlite_sweep["spec"]), "--storage", sqlite_sweep["storage"]]) == 0
    text = capsys.readouterr().out
    study = load(sqlite_sweep["storage"], "two-workers")
    lines = text.splitlines()
    assert lines[0].split()[:2] == ["trial", "state"]
    assert lines[1].split()[:2] == ["0", "PRUNED"] and "collapse" in lines[1]
    assert lines[2].split()[:3] == ["1", "COMPLETE", f"{study.trials[1].value:.4f}"]
    assert f"best: trial {study.best_trial.number}" in text


@pytest.mark.integration
def test_launching_a_finished_study_again_runs_nothing(sqlite_sweep):
    before = [(t.number, t.state, t.datetime_complete) for t in load(sqlite_sweep["storage"], "two-workers").trials]
    result = launch(sqlite_sweep["spec"], workers=1, overrides=experiment_overrides(sqlite_sweep["data_dir"], sqlite_sweep["out"]))
    assert result.worker_exit_codes == [0]
    assert [(t.number, t.state, t.datetime_complete) for t in load(sqlite_sweep["storage"], "two-workers").trials] == before


def test_a_micro_batch_the_space_cannot_use_is_refused_at_launch_naming_the_batches(tmp_path, monkeypatch):
    from octft.train.devices import BatchLayoutError

    space = {"train.accumulation_steps": {"type": "categorical", "choices": [1, 3]}}  # demo batch 8: 8, 24
    spec = write_spec(tmp_path, study_name="bad-micro", storage=f"sqlite:///{tmp_path / 'optuna.db'}", n_trials=1,
                      space=space)
    for pjrt, devices, shown in ((None, 2, "8 x 1 = 8 (8 rows per device)"), ("CPU", 2, "8 x 1 = 8 (4 rows per device)")):
        if pjrt:
            monkeypatch.setenv("PJRT_DEVICE", pjrt)
        else:
            monkeypatch.delenv("PJRT_DEVICE", raising=False)
        with pytest.raises(BatchLayoutError) as error:
            launch(spec, overrides=["runtime.micro_batch_rows=3"], devices_per_trial=devices)
        assert str(error.value).startswith("runtime.micro_batch_rows=3 does not divide") and shown in str(error.value)
        assert "8 x 3" not in str(error.value)  # 24 rows (12 per device) divide by 3
    assert not (tmp_path / "optuna.db").exists()  # refused before the study was created


@pytest.mark.integration
def test_a_study_launched_without_a_fixed_micro_batch_is_relaunched_as_it_was(tmp_path, data_dir, subprocess_env,
                                                                               monkeypatch):
    # Launched where no XLA device was (as every study before octft fixed the micro-batch): its record holds no
    # runtime.micro_batch_rows. Relaunched on XLA, the launch keeps the study's overrides instead of refusing them.
    monkeypatch.delenv("PJRT_DEVICE", raising=False)
    space = {"optim.lr_head": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True},
             "train.accumulation_steps": {"type": "categorical", "choices": [1, 2]}}
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    spec = write_spec(tmp_path, study_name="before", storage=storage, n_trials=1, space=space)
    overrides = experiment_overrides(data_dir, tmp_path, "auto")
    assert launch(spec, overrides=overrides).worker_exit_codes == [0]
    monkeypatch.setenv("PJRT_DEVICE", "CPU")
    result = launch(spec, overrides=overrides, devices_per_trial=2)
    assert result.worker_exit_codes == [0]
    study = load(storage, "before")
    assert study.user_attrs["cli_overrides"] == overrides and len(study.trials) == 1  # nothing to run: budget spent


# ---------------------------------------------------------------------------------------------------- PostgreSQL


@pytest.fixture
def postgres_study():
    try:
        storage = open_storage(POSTGRES_URL, heartbeat_interval=None)
    except StorageError as error:
        if os.environ.get("OCTFT_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"OCTFT_REQUIRE_POSTGRES=1 but no PostgreSQL answers at {POSTGRES_URL}: {error}")
        pytest.skip(f"no PostgreSQL at {POSTGRES_URL} (trust auth, database test); set OCTFT_REQUIRE_POSTGRES=1 to fail")
    name = f"octft-test-{uuid.uuid4().hex[:8]}"
    yield name
    try:
        optuna.delete_study(study_name=name, storage=storage)
    except KeyError:
        pass


@pytest.mark.integration
def test_workers_racing_for_trials_take_exactly_n_trials_postgres(tmp_path, postgres_study, subprocess_env):
    run_race(POSTGRES_URL, postgres_study, tmp_path)


@pytest.mark.integration
def test_two_workers_on_postgres_with_xla_cpu_trials(tmp_path, data_dir, postgres_study, subprocess_env, monkeypatch):
    """The multi-host set-up on one host: PostgreSQL storage, and trials data parallel over 2 XLA:CPU devices."""
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("PJRT_DEVICE", "CPU")
    spec = write_spec(tmp_path, study_name=postgres_study, storage=POSTGRES_URL, n_trials=2,
                      space={"optim.lr_head": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}})
    started = time.perf_counter()
    result = launch(spec, workers=2, devices_per_trial=2, overrides=experiment_overrides(data_dir, tmp_path, "xla"))
    print(f"postgres sweep, 2 workers, 2 XLA:CPU trials: {time.perf_counter() - started:.0f} s")
    assert result.worker_exit_codes == [0, 0]
    study = load(POSTGRES_URL, postgres_study)
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    check_trials_and_runs(study, tracking_uri, 2)
    for trial in study.trials:
        tags = MlflowClient(tracking_uri).get_run(trial.user_attrs["mlflow_run_id"]).data.tags
        assert (tags["octft.runtime"].startswith("xla"), tags["octft.device_count"]) == (True, "2")
        assert not math.isnan(trial.value)
