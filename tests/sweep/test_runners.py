"""Runner processes and worker processes, for real: warm runners that keep their graphs from trial to trial, a runner
that raises, segfaults or is killed, workers killed mid-trial, a launch refused before its first trial, workers on
PostgreSQL with XLA:CPU trials."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import optuna
import psutil
import pytest
from optuna.trial import TrialState

from octft.sweep.launch import launch
from octft.sweep.records import TrialOutcome
from octft.sweep.runners import describe_exit, runner_environment
from octft.sweep.plan import LaunchPlan, LaunchSettings
from octft.data.dataset import AuditFailedError
from sweeps import LR_HEAD, NO_PRUNING, REPO, Launching, experiment_overrides, load, records, run_status, \
    running_record, wait_for, write_spec

# A trial that is to be killed while it runs is made long enough that no poll can miss it running (a warm trial of 2
# epochs takes about a second): all its epochs run.
RUN_EVERY_EPOCH = {"train.early_stopping_patience": None}
LONG_EPOCHS = 1000
LONG_OR_SHORT = {"train.epochs": {"type": "categorical", "choices": [2, LONG_EPOCHS]}}


@pytest.fixture
def subprocess_env(tmp_path_factory, monkeypatch):
    # Worker and runner processes import torch, MLflow and timm; cached bytecode saves seconds per process.
    monkeypatch.delenv("PYTHONDONTWRITEBYTECODE", raising=False)
    monkeypatch.setenv("PYTHONPYCACHEPREFIX", str(tmp_path_factory.getbasetemp() / "pycache"))
    for name in ("OCTFT_OPTUNA_STORAGE", "MLFLOW_TRACKING_URI", "PJRT_DEVICE"):
        monkeypatch.delenv(name, raising=False)


# ---------------------------------------------------------------------------------------------------- fast


def test_each_worker_gets_its_own_devices(monkeypatch):
    plan = LaunchPlan(study_name="s", study_dir="/tmp/s", sweep={}, base="b.yaml", experiment_overrides=[],
                      storage="sqlite:///o.db", tracking_uri="sqlite:///m.db", launch=LaunchSettings(devices_per_trial=2))
    monkeypatch.setenv("PJRT_DEVICE", "CPU")
    assert runner_environment(plan, 1)["CPU_NUM_DEVICES"] == "2"
    monkeypatch.setenv("PJRT_DEVICE", "TPU")
    chips = [runner_environment(plan, index)["TPU_VISIBLE_CHIPS"] for index in range(2)]
    assert chips == ["0,1", "2,3"]


def test_a_dead_runner_is_described_by_signal_and_last_lines_without_secrets(tmp_path):
    log = tmp_path / "trial.log"
    log.write_text("".join(f"line {n}\n" for n in range(30)) + "storage postgresql://u:hunter2@db/optuna\n")
    text = describe_exit(-signal.SIGKILL, log)
    assert text.startswith("trial process killed by signal SIGKILL (the out-of-memory killer sends SIGKILL)")
    assert "line 29" in text and "line 5\n" not in text
    assert "hunter2" not in text and "postgresql://u:***@db/optuna" in text
    assert describe_exit(3, tmp_path / "missing.log") == "trial process exited with code 3"


def test_an_outcome_crosses_the_pipe_unchanged():
    outcome = TrialOutcome(status="pruned", best_value=0.5, best_epoch=1, epochs_run=2,
                           best_metrics={"val/balanced_accuracy": 0.5}, stop_reason="pruned (collapse): ...",
                           prune_reason="collapse", prune_epoch=1, compiles=3, compile_seconds=1.25, runner_pid=42,
                           runner_trials=2, runner_rss_bytes=10)
    assert TrialOutcome.from_json(outcome.to_json()) == outcome
    assert not outcome.succeeded and TrialOutcome(status="early_stopped", best_value=0.4).succeeded


# ---------------------------------------------------------------------------------------------------- processes


@pytest.mark.integration
def test_two_worker_processes_with_warm_runners_run_exactly_n_trials(tmp_path, data_dir, subprocess_env):
    spec, storage, tracking_uri = write_spec(tmp_path, study_name="two", n_trials=3, space=LR_HEAD)
    result = launch(spec, workers=2, overrides=experiment_overrides(data_dir, tmp_path))
    assert result.worker_exit_codes == [0, 0]
    trials = load(storage, "two").trials
    assert len(trials) == 3 and {trial.state for trial in trials} == {TrialState.COMPLETE}
    assert len({trial.params["optim.lr_head"] for trial in trials}) == 3  # no trial ran twice
    for trial, record in zip(trials, records(storage, "two")):
        assert run_status(tracking_uri, record.mlflow_run_id)[0] == "FINISHED"
        assert record.worker in (0, 1) and record.outcome.runner_pid == record.runner_pid != os.getpid()
    assert result.plan_path.parent == result.study_dir / "plans"
    assert {record.worker for record in records(storage, "two")} == {0, 1}
    assert (result.study_dir / "runner-1.log").is_file()


@pytest.mark.integration
def test_killed_workers_resume_and_the_dead_trial_is_retried_once(tmp_path, data_dir, subprocess_env):
    # 12 epochs each: trial 0 still trains when the poll sees it (its retry has its params, so not a long trial).
    spec, storage, tracking_uri = write_spec(tmp_path, study_name="killed", n_trials=2, space=LR_HEAD,
                                             fixed={"train.epochs": 12, **RUN_EVERY_EPOCH}, pruner=NO_PRUNING)
    overrides = experiment_overrides(data_dir, tmp_path)
    beat = ["--heartbeat-interval", "1", "--grace-period", "3"]
    with open(tmp_path / "launcher.log", "w") as log:
        launcher = subprocess.Popen(
            [sys.executable, "-m", "octft.cli", "sweep", "launch", str(spec), *overrides, "--workers", "1", *beat],
            cwd=REPO, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
    # Kill launcher, worker and runner (one process group) once the trial trains under its MLflow run.
    dead = wait_for(lambda: running_record(storage, "killed", 0), 240, "trial 0 to start")
    wait_for(lambda: load(storage, "killed").trials[0].intermediate_values, 240, "trial 0's first epoch")
    os.killpg(launcher.pid, signal.SIGSTOP)  # frozen at once, then killed: nothing can end the trial in between
    os.killpg(launcher.pid, signal.SIGKILL)
    launcher.wait()
    assert run_status(tracking_uri, dead.mlflow_run_id)[0] == "RUNNING"  # nobody was left to end it
    time.sleep(4)  # past the grace period: the trial's heartbeat is stale

    result = launch(spec, overrides=overrides, heartbeat_interval=1, grace_period=3)
    assert result.reaped == [0] and result.worker_exit_codes == [0]
    trials = load(storage, "killed").trials
    assert [trial.state for trial in trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    dead_record, retry, new = records(storage, "killed")
    assert "worker running this trial died" in dead_record.fail_reason
    status, tags = run_status(tracking_uri, dead.mlflow_run_id)
    assert status == "FAILED" and "worker running this trial died" in tags["octft.end_reason"]
    assert retry.retry_of == 0 and trials[1].params == trials[0].params != trials[2].params
    assert retry.mlflow_run_id not in (None, dead.mlflow_run_id) and retry.fail_reason is None
    for record in (retry, new):
        assert run_status(tracking_uri, record.mlflow_run_id)[0] == "FINISHED"


@pytest.mark.integration
def test_a_trial_that_raises_or_segfaults_fails_alone_and_the_worker_goes_on(tmp_path, data_dir, subprocess_env):
    missing = tmp_path / "no-such-encoder.pt"
    spec, storage, tracking_uri = write_spec(
        tmp_path, study_name="crash", n_trials=2, fixed=RUN_EVERY_EPOCH, pruner=NO_PRUNING,
        space={"model.checkpoint": {"type": "categorical", "choices": ["scratch", str(missing)]}, **LONG_OR_SHORT})
    study = optuna.create_study(study_name="crash", storage=storage, direction="maximize")
    # Trial 0 raises: the checkpoint does not exist. Trial 1 is killed with SIGSEGV while it runs its long epochs.
    study.enqueue_trial({"model.checkpoint": str(missing), "train.epochs": 2})
    study.enqueue_trial({"model.checkpoint": "scratch", "train.epochs": LONG_EPOCHS})
    launching = Launching(spec, overrides=experiment_overrides(data_dir, tmp_path), heartbeat_interval=1)
    record = wait_for(lambda: running_record(storage, "crash", 1), 240, "trial 1 to start")
    wait_for(lambda: load(storage, "crash").trials[1].intermediate_values, 240, "trial 1's first epoch")
    os.kill(record.runner_pid, signal.SIGSEGV)
    assert launching.result(timeout=240).worker_exit_codes == [0]
    raised, segfaulted = records(storage, "crash")
    assert [trial.state for trial in load(storage, "crash").trials] == [TrialState.FAIL, TrialState.FAIL]
    assert str(missing) in raised.fail_reason and "trial.log" in raised.fail_reason
    assert segfaulted.fail_reason.startswith("trial process killed by signal SIGSEGV")
    for failed in (raised, segfaulted):
        status, tags = run_status(tracking_uri, failed.mlflow_run_id)
        assert status == "FAILED" and tags["octft.end_reason"]
    assert "SIGSEGV" in run_status(tracking_uri, segfaulted.mlflow_run_id)[1]["octft.end_reason"]


@pytest.mark.integration
def test_a_launch_whose_data_is_refused_takes_no_trial_and_leaves_no_process(tmp_path, data_dir, subprocess_env):
    spec, storage, _ = write_spec(tmp_path, study_name="refused", n_trials=2, space=LR_HEAD)
    before = {child.pid for child in psutil.Process().children(recursive=True)}
    # Worker 0's runner and worker 1 (with its runner) start before the audit, which refuses the data: worker 1 is
    # told not to go, and every one of them must end.
    with pytest.raises(AuditFailedError, match="min_per_class|classes_in"):
        launch(spec, workers=2, overrides=[*experiment_overrides(data_dir, tmp_path), "data.guards.min_per_class=1000"])
    assert load(storage, "refused").trials == []
    assert {child.pid for child in psutil.Process().children(recursive=True)} <= before


@pytest.mark.integration
def test_trials_reuse_their_runner_until_it_is_killed_then_a_new_one_takes_over(tmp_path, data_dir, subprocess_env):
    spec, storage, tracking_uri = write_spec(tmp_path, study_name="warm", n_trials=5, space={**LR_HEAD, **LONG_OR_SHORT},
                                             fixed=RUN_EVERY_EPOCH, pruner=NO_PRUNING)
    study = optuna.create_study(study_name="warm", storage=storage, direction="maximize")
    for number, lr_head in enumerate((1e-3, 2e-3, 3e-3, 4e-3, 5e-3)):  # trial 2 is killed during its long epochs
        study.enqueue_trial({"optim.lr_head": lr_head, "train.epochs": LONG_EPOCHS if number == 2 else 2})
    launching = Launching(spec, overrides=experiment_overrides(data_dir, tmp_path), heartbeat_interval=1)
    # Generous bounds: the runner's first trial pays imports, audit and cache check on a possibly busy machine.
    killed = wait_for(lambda: running_record(storage, "warm", 2), 900, "trial 2 to start")
    wait_for(lambda: load(storage, "warm").trials[2].intermediate_values, 900, "trial 2's first epoch")
    os.kill(killed.runner_pid, signal.SIGKILL)  # what the out-of-memory killer does
    assert launching.result(timeout=900).worker_exit_codes == [0]
    trials = load(storage, "warm").trials
    assert [trial.state for trial in trials] == [TrialState.COMPLETE] * 2 + [TrialState.FAIL] + [TrialState.COMPLETE] * 2
    before, (dead,), after = records(storage, "warm")[:2], records(storage, "warm")[2:3], records(storage, "warm")[3:]
    # One runner ran every trial up to the killed one; the next trials ran on its replacement.
    assert {record.outcome.runner_pid for record in before} == {killed.runner_pid}
    assert [record.outcome.runner_trials for record in before] == [1, 2]
    assert {record.runner_pid for record in after} != {killed.runner_pid}
    assert [record.outcome.runner_trials for record in after] == [1, 2]
    assert dead.fail_reason.startswith("trial process killed by signal SIGKILL")
    status, tags = run_status(tracking_uri, dead.mlflow_run_id)
    assert status == "FAILED" and "SIGKILL" in tags["octft.end_reason"]
    for record, trial in zip((*before, *after), (*trials[:2], *trials[3:])):
        assert run_status(tracking_uri, record.mlflow_run_id)[0] == "FINISHED"
        assert record.outcome.epochs_run == 2 and record.outcome.runner_rss_bytes > 0
        assert f"optim.lr_head={trial.params['optim.lr_head']!r}" in record.replay


@pytest.mark.integration
@pytest.mark.parametrize("devices", [1, 2])  # 2: SPMD, where a tensor a graph has read becomes {replicated}
def test_a_second_trial_on_a_warm_xla_runner_compiles_nothing(tmp_path, data_dir, subprocess_env, monkeypatch, devices):
    # The first trial builds the feature store (its epoch 0 is frozen), the second reuses it: under SPMD the encoder
    # that built it had been read by a graph and the reusing one had not, and the second trial's first unfrozen step
    # compiled again under another graph hash until every parameter was marked replicated at once. The second trial
    # also accumulates over another number of micro-batches and unfreezes at another epoch: the launch fixed one
    # micro-batch shape for the study, and the loop runs one micro-batch per graph.
    monkeypatch.setenv("PJRT_DEVICE", "CPU")
    space = {"optim.lr_head": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
             "optim.lr_encoder": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
             "loss.label_smoothing": {"type": "float", "low": 0.0, "high": 0.2},
             "loss.class_weights": {"type": "categorical", "choices": ["balanced", "none"]},
             "train.accumulation_steps": {"type": "categorical", "choices": [1, 2]},
             "train.unfreeze_epoch": {"type": "categorical", "choices": [0, 1]}}
    spec, storage, _ = write_spec(tmp_path, study_name="compiles", n_trials=2, space=space)
    study = optuna.create_study(study_name="compiles", storage=storage, direction="maximize")
    # Every per-trial value differs, and the second trial's two learning rates happen to be equal.
    study.enqueue_trial({"optim.lr_head": 1e-3, "optim.lr_encoder": 3e-4, "loss.label_smoothing": 0.0,
                         "loss.class_weights": "balanced", "train.accumulation_steps": 2, "train.unfreeze_epoch": 1})
    study.enqueue_trial({"optim.lr_head": 5e-3, "optim.lr_encoder": 5e-3, "loss.label_smoothing": 0.15,
                         "loss.class_weights": "none", "train.accumulation_steps": 1, "train.unfreeze_epoch": 0})
    overrides = [text for text in experiment_overrides(data_dir, tmp_path) if text != "runtime.kind=cpu"]
    result = launch(spec, overrides=[*overrides, "runtime.kind=xla", "train.batch_size=4",
                                     f"features.dir={tmp_path / 'features'}"], devices_per_trial=devices)
    assert result.worker_exit_codes == [0]
    first, second = records(storage, "compiles")
    assert [trial.state for trial in load(storage, "compiles").trials] == [TrialState.COMPLETE] * 2
    assert first.outcome.runner_pid == second.outcome.runner_pid
    # Effective batches 4 and 8: every trial cuts them into micro-batches of 4 rows in all.
    assert second.replay.split().count(f"runtime.micro_batch_rows={4 // devices}") == 1
    assert first.outcome.compiles > 0  # frozen and unfrozen steps, eval: counted for the trial that compiled them
    assert second.outcome.compiles == 0, second.outcome


@pytest.mark.integration
def test_two_workers_on_postgres_with_xla_cpu_trials(tmp_path, data_dir, subprocess_env, monkeypatch):
    """The multi-host set-up on one host: PostgreSQL storage, and trials data parallel over 2 XLA:CPU devices."""
    import uuid

    from octft.sweep.storage import StudyStorageError, open_study_storage

    url = "postgresql://postgres@127.0.0.1:5432/test"
    try:
        open_study_storage(url, heartbeat_interval=None)
    except StudyStorageError as error:
        if os.environ.get("OCTFT_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"OCTFT_REQUIRE_POSTGRES=1 but no PostgreSQL answers at {url}: {error}")
        pytest.skip(f"no PostgreSQL at {url}")
    name = f"octft-test-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("PJRT_DEVICE", "CPU")
    spec, _, tracking_uri = write_spec(tmp_path, study_name=name, n_trials=2, storage=url, space=LR_HEAD)
    result = launch(spec, workers=2, devices_per_trial=2, overrides=experiment_overrides(data_dir, tmp_path, "xla"))
    assert result.worker_exit_codes == [0, 0]
    trials = load(url, name).trials
    assert [trial.state for trial in trials] == [TrialState.COMPLETE] * 2
    for record in records(url, name):
        tags = run_status(tracking_uri, record.mlflow_run_id)[1]
        assert (tags["octft.runtime"], tags["octft.device_count"]) == ("xla", "2")
    optuna.delete_study(study_name=name, storage=open_study_storage(url, heartbeat_interval=None))
