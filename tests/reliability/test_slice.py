"""A slice that comes and goes: two simulated TPU hosts (each its own working folder, so its own output, cache and
feature folders) launch one study at the same moment against PostgreSQL, as `gcloud ... ssh --worker=all` starts
them; one is killed mid-trial (SIGKILL of its worker and its runner), and the other fails that trial with the reason
and runs its retry; nothing runs twice. Then both hosts' folders are deleted, as a released slice's are, and a third
folder promotes the champion, writes the report and predicts, with nothing written back into a host's path. Once
with an MLflow server proxying artifacts (`mlflow server --serve-artifacts`), once with artifacts in an S3 bucket
(moto's server). Real PostgreSQL, MLflow, moto and processes throughout."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import shlex
import shutil
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from octft.config import load_experiment
from octft.registry.promote import here
from octft.stores import ARTIFACT_ROOT_ENV, sqlalchemy_url
from octft.sweep.records import PLAN_ATTR, TRIAL_ATTR, TrialRecord, output_folder, trial_record
from octft.sweep.storage import open_existing_study, open_study_storage
from octft.sweep.status import replay_here
from octft.sweep.study import DEAD_WORKER, await_running_trials
from octft.track.mlflow_store import MlflowStore

from sweeps import wait_for, write_spec
from .conftest import REPO, SMALL
from .test_stores_and_secrets import fresh_database, free_port, wait_for_mlflow_server

STUDY = "slice"
N_TRIALS = 3
HOSTS = 2
# A heartbeat a second, dead after 2 s without: the surviving host reaps the killed host's trial after its own next
# trial (each takes longer than that), while it still has trials to run.
LAUNCH_OPTIONS = ("--heartbeat-interval", "1", "--grace-period", "2")
# The demo's micro encoder, trained from its first epoch at these rates on 96 participants (6 per class in val), learns
# every class in 5 epochs (validation F1 above the promote guard's 0.05), so the study has a champion. An epoch takes
# 0.1-0.3 s on an idle core; a trial's time is mostly its process's and MLflow's.
SPACE = {"optim.lr_head": {"type": "float", "low": 3e-3, "high": 1e-2, "log": True}}
FIXED = {"train.epochs": 5, "train.unfreeze_epoch": 0}
STORE_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "OCTFT_OPTUNA_STORAGE",
             ARTIFACT_ROOT_ENV, "MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    """The shared data (a bucket, a mount in a pod): 96 participants, 4 B-scans of 32 x 32."""
    from octft.data.synth import synthesize

    root = tmp_path_factory.mktemp("slice") / "data"
    synthesize(root, participants=96, seed=0, frames=4, height=32, width=32)
    return root


def process_env(**stores: str) -> dict[str, str]:
    """This environment without any store setting of the user's, with `stores`'s."""
    env = {name: value for name, value in os.environ.items() if name not in STORE_ENV}
    return {**env, "PYTHONPATH": str(REPO), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **stores}


@contextlib.contextmanager
def artifact_server(root: Path, backend_store: str) -> Iterator[str]:
    """`mlflow server --serve-artifacts` on a PostgreSQL backend store, its artifacts under `root`: its URL."""
    port = free_port()
    log = root / "server.log"
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         # The installed driver named (psycopg2): SQLAlchemy would pick psycopg 3, which the lock does not install.
         "--backend-store-uri", sqlalchemy_url(backend_store),
         "--serve-artifacts", "--artifacts-destination", str(root / "artifacts")],
        cwd=root, env=process_env(), stdout=subprocess.DEVNULL, stderr=log.open("w"), start_new_session=True)
    try:
        wait_for_mlflow_server(server, port, log)
        yield f"http://127.0.0.1:{port}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)  # the server and its workers: the session made for it
        server.wait(timeout=60)


@contextlib.contextmanager
def s3_bucket() -> Iterator[dict[str, str]]:
    """An S3-compatible store (moto's server) with a bucket `octft-artifacts`: the environment that points at it."""
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        env = {"MLFLOW_S3_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
               "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
               ARTIFACT_ROOT_ENV: "s3://octft-artifacts/pods"}
        boto3.client("s3", endpoint_url=env["MLFLOW_S3_ENDPOINT_URL"], aws_access_key_id="testing",
                     aws_secret_access_key="testing", region_name="us-east-1").create_bucket(Bucket="octft-artifacts")
        yield env
    finally:
        server.stop()


def running_on(storage: str, host: Path):
    """A trial that `host`'s worker is running (its run folder under `host`), with its runner's pid; else None."""
    for trial in open_existing_study(STUDY, storage).get_trials(deepcopy=False):
        record = trial_record(trial)
        if (trial.state == TrialState.RUNNING and record.status == "running" and record.runner_pid
                and record.run_dir and Path(record.run_dir).is_relative_to(host)):
            return trial.number, record.runner_pid
    return None


def run_slice(tmp_path: Path, release: Path, storage: str, tracking_uri: str, stores: dict[str, str]) -> None:
    checkout = tmp_path / "checkout"  # what every machine has: the sweep file (its base is this repo's)
    checkout.mkdir()
    spec, _, _ = write_spec(checkout, study_name=STUDY, n_trials=N_TRIALS, space=SPACE, fixed=FIXED, storage=storage)
    sweep = yaml.safe_load(spec.read_text())
    sweep["mlflow"]["tracking_uri"] = tracking_uri
    spec.write_text(yaml.safe_dump(sweep))
    env = process_env(**stores)
    # The data is shared (a bucket, a mount); output, cache and features go to each host's working folder.
    overrides = [f"data.uri={release}", *SMALL, "runtime.kind=cpu"]
    hosts = [tmp_path / f"host-{index}" for index in range(HOSTS)]
    logs = [tmp_path / f"host-{index}.log" for index in range(HOSTS)]
    for host in hosts:
        host.mkdir()
    launches = [subprocess.Popen([sys.executable, "-m", "octft.cli", "sweep", "launch", str(spec), *overrides,
                                  *LAUNCH_OPTIONS], cwd=host, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                                 start_new_session=True)
                for host, log in zip(hosts, logs)]
    try:
        number, runner_pid = wait_for(lambda: running_on(storage, hosts[1]), timeout=300,
                                      what=f"a trial on host-1 ({logs[1]})", poll=0.2)
        time.sleep(1)  # mid-trial: its runner is training it
        os.kill(launches[1].pid, signal.SIGKILL)  # the launch is that host's worker 0
        os.kill(runner_pid, signal.SIGKILL)
        assert launches[1].wait(timeout=60) == -signal.SIGKILL
        assert launches[0].wait(timeout=600) == 0, logs[0].read_text()[-4000:]
    finally:
        for launch in launches:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(launch.pid, signal.SIGKILL)  # whatever of a host is left: a released slice's processes
            launch.wait(timeout=60)
    survivor = logs[0].read_text()

    # The killed host's trial: FAIL with the reason, its MLflow run FAILED, retried once by the surviving host.
    trials = {trial.number: trial for trial in open_existing_study(STUDY, storage).get_trials(deepcopy=False)}
    records = {number: trial_record(trial) for number, trial in trials.items()}
    assert trials[number].state == TrialState.FAIL, (trials[number].state, survivor[-3000:])
    assert DEAD_WORKER in records[number].fail_reason, records[number].fail_reason
    retries = [other for other, record in records.items() if record.retry_of == number]
    assert len(retries) == 1, records
    retry = trials[retries[0]]
    assert retry.state == TrialState.COMPLETE and retry.params == trials[number].params
    assert Path(records[retry.number].run_dir).is_relative_to(hosts[0])
    # Nothing ran twice, nothing is left running: the budget in COMPLETE trials, plus the one killed attempt.
    states = sorted(trial.state.name for trial in trials.values())
    assert states == ["COMPLETE"] * N_TRIALS + ["FAIL"], (states, survivor[-3000:])
    store = MlflowStore(tracking_uri)
    runs = store.search_runs(f"sweep-{STUDY}", {"octft.kind": "trial"})
    assert sorted(run.run_id for run in runs) == sorted(record.mlflow_run_id for record in records.values())
    status = {run.tags["optuna.trial_number"]: run.status for run in runs}
    assert status == {str(other): "FAILED" if other == number else "FINISHED" for other in trials}, status

    # The slice is released: both hosts' folders go. A third folder reads the study through the two stores only.
    for host in hosts:
        shutil.rmtree(host)
    workstation = tmp_path / "workstation"
    workstation.mkdir()

    def octft(*args: str | Path) -> str:
        done = subprocess.run([sys.executable, "-m", "octft.cli", *map(str, args)], cwd=workstation, env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, (args, done.stdout[-2000:], done.stderr[-3000:])
        assert "Traceback" not in done.stderr, done.stderr[-3000:]
        return done.stdout + done.stderr

    status_table = octft("sweep", "status", spec)
    assert f"(retry of {number})" in status_table and "failed: the worker running this trial died" in status_table
    shown = subprocess.run([sys.executable, "-m", "octft.cli", "sweep", "show", str(spec), "--trial", str(retry.number)],
                           cwd=workstation, env=env, capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0, shown.stderr[-3000:]
    words = shlex.split(shown.stdout.strip())
    # Its base is the checkout's, its data shared, its output folder relative: every path of it is here, no note.
    assert words[:2] == ["octft", "train"] and Path(words[2]).is_file() and shown.stderr == "", shown

    promoted = octft("promote", spec)
    assert f"-> models:/{STUDY}@champion (version 1)" in promoted, promoted
    assert "wrote" in octft("report", spec)
    report = workstation / STUDY / "report.html"
    assert report.is_file()
    scans = sorted(str(path) for path in release.rglob("*.dcm"))[:3]
    predicted = json.loads(subprocess.run(
        [sys.executable, "-m", "octft.cli", "predict", "--model", f"models:/{STUDY}@champion", *scans, "--json",
         "--tracking-uri", tracking_uri], cwd=workstation, env=env, capture_output=True, text=True, timeout=600,
        check=True).stdout)
    assert len(predicted["volumes"]) == 3 and all(row["predicted_class"] for row in predicted["volumes"]), predicted
    pages = ui_pages(workstation, spec, env)
    assert pages[0].startswith(f"runs of study {STUDY}, best first:") and "compare its" in pages[1], pages
    if tracking_uri.startswith("http"):
        assert f"{tracking_uri}/#/experiments/" in pages[0], pages  # the server's own UI: nothing started
    assert not any(host.exists() for host in hosts)  # nothing went back into a released host's folders


def ui_pages(workstation: Path, spec: Path, env: dict[str, str]) -> list[str]:
    """`octft ui SPEC`'s two pages; a UI it serves itself (a database store) is stopped once it says so."""
    ui = subprocess.Popen([sys.executable, "-m", "octft.cli", "ui", str(spec), "--port", str(free_port())],
                          cwd=workstation, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        lines = []
        for line in ui.stdout:
            lines.append(line.strip())
            if "serving MLflow's UI" in line:
                ui.send_signal(signal.SIGTERM)  # as a user's Ctrl-C: the server goes down with it
        assert ui.wait(timeout=120) == 0, lines
        return [line for line in lines if line.startswith(("runs of study", "compare its"))]  # not MLflow's own
    finally:
        if ui.poll() is None:
            ui.kill()
            ui.wait()


@pytest.mark.integration
def test_a_slice_with_an_mlflow_server_proxying_artifacts(release, tmp_path):
    with fresh_database() as storage, fresh_database() as backend_store:
        server_root = tmp_path / "mlflow-server"
        server_root.mkdir()
        with artifact_server(server_root, backend_store) as url:
            run_slice(tmp_path, release, storage, url, {})
        assert any((server_root / "artifacts").rglob("best.pt"))  # the checkpoints went through the server


@pytest.mark.integration
def test_a_slice_with_artifacts_in_an_s3_bucket(release, tmp_path):
    with fresh_database() as storage, fresh_database() as tracking_uri, s3_bucket() as stores:
        run_slice(tmp_path, release, storage, tracking_uri, stores)


# ---------------------------------------------------------------------------------------------------- studies that move


def test_a_commands_outputs_go_to_the_study_folder_only_on_the_host_that_made_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "runs" / "sweeps" / "pod"
    here = {PLAN_ATTR: {"study_dir": str(folder), "host": socket.gethostname()}}
    assert output_folder("pod", here) == tmp_path / "pod"  # recorded here, but gone: the caller's folder
    folder.mkdir(parents=True)
    assert output_folder("pod", here) == folder
    elsewhere = {PLAN_ATTR: {"study_dir": str(folder), "host": "tpu-worker-3"}}  # the same path here is not that one
    assert output_folder("pod", elsewhere) == tmp_path / "pod"
    assert output_folder("pod", elsewhere, tmp_path / "out") == tmp_path / "out"


def test_a_replay_names_what_of_it_is_not_on_this_machine(tmp_path, monkeypatch):
    """The base experiment the trial's host had is replaced by this checkout's; other paths are named, not changed."""
    monkeypatch.chdir(REPO)
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'optuna.db'}", study_name="pod")
    ran = ["octft", "train", "/gone/host-0/octft/experiments/demo.yaml", "optim.lr_head=0.001",
           f"data.uri={tmp_path}", "output_dir=/gone/host-0/runs"]
    record = TrialRecord(status="completed", host="tpu-worker-0", replay=shlex.join(ran))
    study.add_trial(optuna.trial.create_trial(state=TrialState.COMPLETE, value=0.5,
                                              user_attrs={TRIAL_ATTR: record.to_dict()}))
    command, notes = replay_here(study, 0, REPO / "experiments" / "demo.yaml")
    assert shlex.split(command) == ["octft", "train", "experiments/demo.yaml", *ran[3:]]
    assert len(notes) == 2 and all(note.startswith("trial 0 ran on host tpu-worker-0") for note in notes), notes
    assert "/gone/host-0/octft/experiments/demo.yaml is not on this machine" in notes[0]
    assert "output_dir=/gone/host-0/runs" in notes[1] and "data.uri" not in notes[1]


def test_a_worker_whose_budget_is_spent_waits_for_a_dying_trial_and_gets_its_retry(tmp_path):
    """The last trial of a host that dies while the others are on their last trials is not left RUNNING for a next
    launch: a worker with nothing left to take waits, fails it when its heartbeat is stale, and gets its retry."""
    storage = open_study_storage(f"sqlite:///{tmp_path / 'optuna.db'}", heartbeat_interval=1, grace_period=2)
    study = optuna.create_study(storage=storage, study_name="pod")
    store = None  # the lost trial made no MLflow run (as a trial asked for here): nothing of MLflow's to settle
    assert await_running_trials(study, storage, store) == []  # nothing runs: at once
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Heartbeat of storage")  # the worker beats for its trials itself
        lost = study.ask({"optim.lr_head": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)})
        never_started = study.ask({"optim.lr_head": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)})
    # A trial taken by a worker that died before its first beat has no heartbeat to go stale: not waited for.
    assert await_running_trials(study, storage, store) == []
    storage.record_heartbeat(lost._trial_id)  # its worker's last beat, then the host is gone
    TrialRecord(status="running", worker=1, host="w1").save(storage, lost._trial_id)
    started = time.monotonic()
    assert await_running_trials(study, storage, store) == [lost.number]
    assert 2 <= time.monotonic() - started < 10
    trials = study.get_trials(deepcopy=False)
    assert [trial.state for trial in trials] == [TrialState.FAIL, TrialState.RUNNING, TrialState.WAITING]
    assert DEAD_WORKER in trial_record(trials[0]).fail_reason and trial_record(trials[2]).retry_of == lost.number
    assert trials[2].params == trials[0].params
    assert never_started.number == trials[1].number


def test_promote_prepares_a_released_hosts_cache_under_the_callers_folder(tmp_path):
    data = load_experiment(REPO / "experiments" / "demo.yaml").data
    gone = data.model_copy(update={"cache_dir": "/nonexistent-host-w1/octft-cache"})
    assert here(gone).cache_dir == ".octft-cache" and here(gone).uri == gone.uri  # nothing else of it changes
    assert here(data) is data  # relative: already under the caller's folder
    kept = data.model_copy(update={"cache_dir": str(tmp_path)})
    assert here(kept) is kept  # a shared path that is here
