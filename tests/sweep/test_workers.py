"""Workers and their trial runners, for real: trials sharing a warm runner (its graphs, its data setup), a
worker killed mid-trial, a trial that raises, a runner that segfaults or is killed."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import psutil
import pytest
import yaml
from optuna.trial import TrialState

from octft.config import load_experiment
from octft.sweep.study import budget_used, launch, open_storage
from octft.sweep.trial import TrialOutcome
from octft.sweep.workers import describe_exit, device_env
from octft.train.recipe import AuditFailedError, DataSetups

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def subprocess_env(tmp_path_factory, monkeypatch):
    # Worker and trial processes import torch, mlflow and timm; cached bytecode saves seconds per process.
    monkeypatch.delenv("PYTHONDONTWRITEBYTECODE", raising=False)
    monkeypatch.setenv("PYTHONPYCACHEPREFIX", str(tmp_path_factory.getbasetemp() / "pycache"))
    for name in ("OCTFT_OPTUNA_STORAGE", "MLFLOW_TRACKING_URI", "PJRT_DEVICE"):
        monkeypatch.delenv(name, raising=False)


def experiment_overrides(data_dir: Path, out: Path) -> list[str]:
    return [
        f"data.uri={data_dir / 'data'}", f"data.cache_dir={data_dir / 'cache'}", "data.preprocess.frames=4",
        "data.preprocess.height=32", "data.preprocess.width=32", "runtime.kind=cpu", f"output_dir={out / 'runs'}",
    ]


# A trial that is to be killed while it runs is made long enough that no poll can miss it running (a warm
# trial of 2 epochs takes about a second on an idle machine, a few polls of the study): all its epochs run.
RUN_EVERY_EPOCH = {"train.early_stopping_patience": None}
NO_PRUNING = {"wrapped": "none", "collapse": {"enabled": False}}
LONG_EPOCHS = 1000
LONG_OR_SHORT = {"train.epochs": {"type": "categorical", "choices": [2, LONG_EPOCHS]}}


def write_spec(directory: Path, *, study_name: str, n_trials: int, space: dict, fixed: dict | None = None,
               pruner: dict | None = None) -> tuple[Path, str, str]:
    """A sweep file over `space`, its trials 2 epochs long unless `fixed` or `space` says otherwise."""
    storage, tracking_uri = f"sqlite:///{directory / 'optuna.db'}", f"sqlite:///{directory / 'mlflow.db'}"
    fixed = {"train.epochs": 2, **(fixed or {})}
    if "train.epochs" in space:
        del fixed["train.epochs"]
    spec = {
        "base": str(REPO / "experiments" / "demo.yaml"),
        "study_name": study_name,
        "storage": storage,
        "mlflow": {"tracking_uri": tracking_uri, "experiment": f"sweep-{study_name}"},
        "n_trials": n_trials,
        "fixed": fixed,
        "space": space,
        "sampler": {"type": "random", "seed": 0},
        # demo unfreezes at epoch 2 of 2: collapse never counts, trials complete
        "pruner": pruner or {"wrapped": "none"},
    }
    path = directory / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path, storage, tracking_uri


def load(storage: str, study_name: str) -> optuna.Study:
    return optuna.load_study(study_name=study_name, storage=open_storage(storage, heartbeat_interval=None))


def wait_for(condition, timeout: float, what: str, poll: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = condition()
        except KeyError:  # the study does not exist yet
            value = None
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def running_trial_attr(storage: str, study_name: str, number: int, attr: str):
    trials = load(storage, study_name).get_trials(deepcopy=False)
    if len(trials) > number and trials[number].state == TrialState.RUNNING:
        return trials[number].user_attrs.get(attr)
    return None


def run_status(tracking_uri: str, run_id: str) -> tuple[str, dict]:
    from mlflow.tracking import MlflowClient

    run = MlflowClient(tracking_uri=tracking_uri).get_run(run_id)
    return run.info.status, run.data.tags


# ---------------------------------------------------------------------------------------------------- fast


def test_each_worker_gets_its_own_devices():
    assert device_env(1, 2, {"PJRT_DEVICE": "CPU"}) == {"CPU_NUM_DEVICES": "2"}
    tpu = [device_env(index, 2, {"PJRT_DEVICE": "TPU"}) for index in range(2)]
    assert [env["TPU_VISIBLE_CHIPS"] for env in tpu] == ["0,1", "2,3"]
    assert tpu[0]["TPU_PROCESS_PORT"] != tpu[1]["TPU_PROCESS_PORT"]
    assert device_env(1, 2, {})["CUDA_VISIBLE_DEVICES"] == "2,3"
    with pytest.raises(ValueError, match="--devices-per-trial 3 on TPU"):
        device_env(0, 3, {"PJRT_DEVICE": "TPU"})


def test_a_failed_trial_is_described_by_signal_and_last_lines_without_secrets(tmp_path):
    log = tmp_path / "trial.log"
    log.write_text("".join(f"line {n}\n" for n in range(30)) + "storage postgresql://u:hunter2@db/optuna\n")
    text = describe_exit(-signal.SIGKILL, log)
    assert text.startswith("trial process killed by signal SIGKILL (the out-of-memory killer sends SIGKILL)")
    assert "line 29" in text and "line 5\n" not in text
    assert "hunter2" not in text and "postgresql://u:***@db/optuna" in text
    assert describe_exit(3, tmp_path / "missing.log") == "trial process exited with code 3"


# ---------------------------------------------------------------------------------------------------- processes


@pytest.mark.integration
def test_killed_workers_resume_and_the_dead_trial_is_retried_once(tmp_path, data_dir, subprocess_env):
    # 12 epochs each: trial 0 still trains when the poll sees it (its retry has its params, so not a long trial).
    spec, storage, tracking_uri = write_spec(
        tmp_path, study_name="killed", n_trials=2,
        space={"optim.lr_head": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}},
        fixed={"train.epochs": 12, **RUN_EVERY_EPOCH}, pruner=NO_PRUNING,
    )
    overrides = experiment_overrides(data_dir, tmp_path)
    beat = ["--heartbeat-interval", "1", "--grace-period", "3"]
    with open(tmp_path / "launcher.log", "w") as log:
        launcher = subprocess.Popen(
            [sys.executable, "-m", "octft.cli", "sweep", "launch", str(spec), *overrides, "--workers", "1", *beat],
            cwd=REPO, start_new_session=True, stdout=log, stderr=subprocess.STDOUT,
        )
    # Kill launcher, worker and trial process (one process group) once the trial trains under its MLflow run.
    dead_run = wait_for(lambda: running_trial_attr(storage, "killed", 0, "mlflow_run_id"), 240, "trial 0 to start",
                        poll=0.1)
    os.killpg(launcher.pid, signal.SIGSTOP)  # frozen at once, then killed: nothing can end the trial in between
    os.killpg(launcher.pid, signal.SIGKILL)
    launcher.wait()
    assert run_status(tracking_uri, dead_run)[0] == "RUNNING"  # nobody was left to end it
    time.sleep(4)  # past the grace period: the trial's heartbeat is stale

    result = launch(spec, overrides=overrides, heartbeat_interval=1, grace_period=3)
    assert result.reaped == [0] and result.worker_exit_codes == [0]
    trials = load(storage, "killed").trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    dead, retry, new = trials
    assert "worker running this trial died" in dead.user_attrs["fail_reason"]
    status, tags = run_status(tracking_uri, dead_run)
    assert status == "FAILED" and "worker running this trial died" in tags["octft.end_reason"]
    assert retry.system_attrs["failed_trial"] == 0 and retry.user_attrs["retry_of"] == 0
    assert retry.params == dead.params != new.params  # retried once, with the same params; nothing else repeated
    assert not retry.user_attrs.get("fail_reason")
    assert retry.user_attrs["mlflow_run_id"] not in (None, dead_run)
    for trial in (retry, new):
        status, tags = run_status(tracking_uri, trial.user_attrs["mlflow_run_id"])
        assert status == "FINISHED" and tags["optuna.trial_number"] == str(trial.number)
    assert budget_used(trials) == 2 == sum(t.state == TrialState.COMPLETE for t in trials)


@pytest.mark.integration
def test_a_crashing_trial_fails_alone_and_the_worker_goes_on(tmp_path, data_dir, subprocess_env):
    missing = tmp_path / "no-such-encoder.pt"
    spec, storage, tracking_uri = write_spec(
        tmp_path, study_name="crash", n_trials=2,
        space={"model.checkpoint": {"type": "categorical", "choices": [None, str(missing)]}, **LONG_OR_SHORT},
        fixed=RUN_EVERY_EPOCH, pruner=NO_PRUNING,
    )
    study = optuna.create_study(study_name="crash", storage=storage, direction="maximize")
    # Trial 0 raises: the checkpoint does not exist. Trial 1 is killed with SIGSEGV while it runs its long epochs.
    study.enqueue_trial({"model.checkpoint": str(missing), "train.epochs": 2})
    study.enqueue_trial({"model.checkpoint": None, "train.epochs": LONG_EPOCHS})

    outcome = {}
    launcher = threading.Thread(target=lambda: outcome.update(result=launch(
        spec, overrides=experiment_overrides(data_dir, tmp_path), heartbeat_interval=1)))
    launcher.start()
    pid = wait_for(lambda: running_trial_attr(storage, "crash", 1, "pid"), 240, "trial 1 to start", poll=0.1)
    os.kill(pid, signal.SIGSEGV)
    launcher.join(timeout=240)
    assert outcome["result"].worker_exit_codes == [0]

    raised, segfaulted = load(storage, "crash").trials
    assert (raised.state, segfaulted.state) == (TrialState.FAIL, TrialState.FAIL)
    assert str(missing) in raised.user_attrs["fail_reason"]
    assert segfaulted.user_attrs["fail_reason"].startswith("trial process killed by signal SIGSEGV")
    for trial in (raised, segfaulted):
        status, tags = run_status(tracking_uri, trial.user_attrs["mlflow_run_id"])
        assert status == "FAILED" and tags["octft.end_reason"]
    assert "SIGSEGV" in run_status(tracking_uri, segfaulted.user_attrs["mlflow_run_id"])[1]["octft.end_reason"]


# ---------------------------------------------------------------------------------------------------- warm runners

LR_HEAD = {"optim.lr_head": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}}


def test_an_outcome_crosses_the_pipe_unchanged():
    outcome = TrialOutcome(status="pruned", best_value=0.5, best_epoch=1, epochs_run=2,
                           best_metrics={"val/balanced_accuracy": 0.5}, stop_reason="pruned (collapse): ...",
                           compiles=3, compile_seconds=1.25, runner_pid=42, runner_trials=2, runner_rss_bytes=10)
    assert TrialOutcome.from_json(outcome.to_json()) == outcome
    assert not outcome.succeeded and TrialOutcome(status="early_stopped", best_value=0.4).succeeded


def test_trials_with_the_same_data_settings_share_one_audit_and_cache_check(tmp_path, data_dir):
    overrides = experiment_overrides(data_dir, tmp_path)
    setups = DataSetups()
    first = setups.get(load_experiment(REPO / "experiments" / "demo.yaml", overrides).data, progress=False)
    again = setups.get(load_experiment(REPO / "experiments" / "demo.yaml", [*overrides, "optim.lr_head=0.01"]).data,
                       progress=False)
    assert again is first  # another trial's params, the same data: nothing audited or checked again
    assert len(first.prepared.volumes) == len(first.report.volumes) > 0
    other = setups.get(load_experiment(REPO / "experiments" / "demo.yaml", [*overrides, "data.guards.min_per_class=2"]).data,
                       progress=False)
    assert other is not first  # other data settings: audited again (its cache entries are all reused)
    assert other.prepared.report.reused == len(other.prepared.volumes) and other.prepared.report.built == 0


def test_a_complete_cache_is_checked_without_starting_a_process_pool(tmp_path, data_dir, monkeypatch):
    def no_pool(*args, **kwargs):
        raise AssertionError("a process pool started to find that nothing needs building")

    import octft.data.prepare

    monkeypatch.setattr(octft.data.prepare, "ProcessPoolExecutor", no_pool)
    overrides = [*experiment_overrides(data_dir, tmp_path), "data.download.workers=2"]
    setup = DataSetups().get(load_experiment(REPO / "experiments" / "demo.yaml", overrides).data, progress=False)
    assert setup.prepared.report.reused == len(setup.prepared.volumes) > 0


@pytest.mark.integration
def test_a_launch_whose_data_is_refused_takes_no_trial_and_leaves_no_process(tmp_path, data_dir, subprocess_env):
    spec, storage, _ = write_spec(tmp_path, study_name="refused", n_trials=2, space=LR_HEAD)
    before = {child.pid for child in psutil.Process().children(recursive=True)}
    # The workers and their runners start before the audit, which refuses the data: they must all end.
    with pytest.raises(AuditFailedError, match="min_per_class|classes_in"):
        launch(spec, workers=2, overrides=[*experiment_overrides(data_dir, tmp_path), "data.guards.min_per_class=1000"])
    assert load(storage, "refused").trials == []
    assert {child.pid for child in psutil.Process().children(recursive=True)} <= before
    assert (tmp_path / "runs" / "sweeps" / "refused" / "runner-1.log").is_file()  # the runner had started


@pytest.mark.integration
def test_trials_reuse_their_runner_until_it_is_killed_then_a_new_one_takes_over(tmp_path, data_dir, subprocess_env):
    spec, storage, tracking_uri = write_spec(tmp_path, study_name="warm", n_trials=5, space={**LR_HEAD, **LONG_OR_SHORT},
                                             fixed=RUN_EVERY_EPOCH, pruner=NO_PRUNING)
    study = optuna.create_study(study_name="warm", storage=storage, direction="maximize")
    for number, lr_head in enumerate((1e-3, 2e-3, 3e-3, 4e-3, 5e-3)):  # trial 2 is killed during its long epochs
        study.enqueue_trial({"optim.lr_head": lr_head, "train.epochs": LONG_EPOCHS if number == 2 else 2})

    outcome = {}
    launcher = threading.Thread(target=lambda: outcome.update(result=launch(
        spec, overrides=experiment_overrides(data_dir, tmp_path), heartbeat_interval=1)))
    launcher.start()
    # Generous bounds: the runner's first trial pays imports, audit and cache check on a possibly busy machine.
    pid = wait_for(lambda: running_trial_attr(storage, "warm", 2, "pid"), 900, "trial 2 to start", poll=0.1)
    os.kill(pid, signal.SIGKILL)  # what the out-of-memory killer does
    launcher.join(timeout=900)
    assert outcome["result"].worker_exit_codes == [0]

    trials = load(storage, "warm").trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2 + [TrialState.FAIL] + [TrialState.COMPLETE] * 2
    before, killed, after = trials[:2], trials[2], trials[3:]
    # One runner ran every trial up to the killed one; the next trials ran on its replacement.
    assert {t.user_attrs["pid"] for t in (*before, killed)} == {pid}
    assert [t.user_attrs["runner_trials"] for t in before] == [1, 2]
    assert {t.user_attrs["pid"] for t in after} != {pid} and [t.user_attrs["runner_trials"] for t in after] == [1, 2]
    assert killed.user_attrs["fail_reason"].startswith("trial process killed by signal SIGKILL")
    status, tags = run_status(tracking_uri, killed.user_attrs["mlflow_run_id"])
    assert status == "FAILED" and "SIGKILL" in tags["octft.end_reason"]
    for trial in (*before, *after):
        assert run_status(tracking_uri, trial.user_attrs["mlflow_run_id"])[0] == "FINISHED"
        assert trial.user_attrs["epochs_run"] == 2 and trial.user_attrs["runner_rss_bytes"] > 0
        # The runner ran what the replay command runs: the trial's overrides, then the launch's.
        assert f"optim.lr_head={trial.params['optim.lr_head']!r}" in trial.user_attrs["replay"]
        assert trial.user_attrs["replay"].endswith(f"output_dir={tmp_path / 'runs'}")


@pytest.mark.integration
@pytest.mark.parametrize("devices", [1, 2])  # 2: SPMD, where a tensor a graph has read becomes {replicated}
def test_a_second_trial_on_a_warm_xla_runner_compiles_nothing(tmp_path, data_dir, subprocess_env, monkeypatch, devices):
    # The first trial builds the feature store (its epoch 0 is frozen), the second reuses it: under SPMD the
    # encoder that built it had been read by a graph and the reusing one had not, and the second trial's first
    # unfrozen step compiled again under another graph hash until every parameter was marked replicated at once.
    # The second trial also accumulates over another number of micro-batches and unfreezes at another epoch:
    # the launch fixed one micro-batch shape for the study, and the loop runs one micro-batch per graph.
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
    result = launch(spec, overrides=[*overrides, "runtime.kind=xla", "train.batch_size=4"], devices_per_trial=devices)
    assert result.worker_exit_codes == [0]

    first, second = load(storage, "compiles").trials
    assert (first.state, second.state) == (TrialState.COMPLETE, TrialState.COMPLETE)
    assert first.user_attrs["pid"] == second.user_attrs["pid"]
    # Effective batches 4 and 8: every trial cuts them into micro-batches of 4 rows in all.
    assert second.user_attrs["replay"].split().count(f"runtime.micro_batch_rows={4 // devices}") == 1
    assert first.user_attrs["xla_compiles"] > 0  # frozen and unfrozen steps, eval: counted for the trial that compiled them
    assert second.user_attrs["xla_compiles"] == 0, second.user_attrs
