"""Many hosts on one study: hosts that launch a new study at the same moment on an empty database all join it, a
database tracking store keeps every artifact where all hosts and a later workstation can read it (or the launch is
refused), and a store that does not open is one line saying what happened. Real PostgreSQL, MLflow and processes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import optuna
import pytest
import yaml

from octft.errors import MissingInputError, UsageError
from octft.stores import ARTIFACT_ROOT_ENV, check_shared_artifacts, database_lock, sqlalchemy_url
from octft.sweep.plan import resolve_plan
from octft.sweep.storage import StudyStorageError, open_study_storage
from octft.track.mlflow_store import MlflowStore, MlflowTracker

from sweeps import LR_HEAD, experiment_overrides, write_spec
from .conftest import REPO, one_error_line
from .test_stores_and_secrets import POSTGRES, free_port, fresh_database

HOSTS = 3
THREE_OPTIONS = ("--serve-artifacts", "s3://", "/mnt/shared/mlartifacts", ARTIFACT_ROOT_ENV)


@pytest.fixture(autouse=True)
def _no_store_environment(monkeypatch):
    for name in ("MLFLOW_TRACKING_URI", "OCTFT_OPTUNA_STORAGE", ARTIFACT_ROOT_ENV, "MLFLOW_S3_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)


def spec_on(tmp_path: Path, storage: str, tracking_uri: str) -> Path:
    spec, _, _ = write_spec(tmp_path, study_name="pod", n_trials=4, space=LR_HEAD, storage=storage)
    sweep = yaml.safe_load(spec.read_text())
    sweep["mlflow"]["tracking_uri"] = tracking_uri
    spec.write_text(yaml.safe_dump(sweep))
    return spec


# ---------------------------------------------------------------------------------------------------- hosts that start
# together


# One simulated host: imports everything, says it is ready, waits for the word, then does what `octft sweep launch`
# does before its first trial: resolve the plan (MLflow's store opened), open Optuna's storage, create or join the
# study.
HOST = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from octft.sweep.plan import resolve_plan
    from octft.sweep.storage import open_study_storage
    from octft.sweep.study import create_or_load_study

    ready, go, spec, *overrides = sys.argv[1:]
    Path(ready).touch()
    while not Path(go).exists():
        time.sleep(0.001)
    plan, _ = resolve_plan(spec, overrides=overrides)
    study, plan = create_or_load_study(plan, open_study_storage(plan.storage_url()))
    print(study.study_name, plan.parent_run_id, plan.launch.index)
""")


@pytest.mark.integration
def test_hosts_launching_one_new_study_at_the_same_moment_on_empty_databases_all_join_it(tmp_path):
    """Optuna's tables, MLflow's tables, the study and its parent run are each made once, whoever comes first."""
    with fresh_database() as storage, fresh_database() as tracking_uri:
        spec = spec_on(tmp_path, storage, tracking_uri)
        env = {**os.environ, "PYTHONPATH": str(REPO), ARTIFACT_ROOT_ENV: str(tmp_path / "shared")}
        go = tmp_path / "go"
        hosts = []
        for host in range(HOSTS):
            cwd = tmp_path / f"host-{host}"  # MLflow's default ./mlruns would land here
            cwd.mkdir()
            hosts.append(subprocess.Popen(
                [sys.executable, "-c", HOST, str(tmp_path / f"ready-{host}"), str(go), str(spec),
                 *experiment_overrides(tmp_path, tmp_path)],
                cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        deadline = time.monotonic() + 120
        while not all((tmp_path / f"ready-{host}").exists() for host in range(HOSTS)):
            assert time.monotonic() < deadline and all(host.poll() is None for host in hosts), \
                [host.communicate() for host in hosts if host.poll() is not None]
            time.sleep(0.05)
        go.touch()
        results = [host.communicate(timeout=300) for host in hosts]
        assert [host.returncode for host in hosts] == [0] * HOSTS, [err[-2000:] for _, err in results]
        joined = [out.split() for out, _ in results]
        assert {name for name, _, _ in joined} == {"pod"}
        assert len({parent for _, parent, _ in joined}) == 1  # one parent run, made by whoever created the study
        assert sorted(int(index) for _, _, index in joined) == list(range(HOSTS))  # every launch counted once
        assert optuna.get_all_study_names(open_study_storage(storage, create=False)) == ["pod"]
        location = MlflowStore(tracking_uri).experiment_artifact_location("sweep-pod")
        assert location == (tmp_path / "shared" / "sweep-pod").as_uri()
        assert not any((tmp_path / f"host-{host}" / "mlruns").exists() for host in range(HOSTS))


@pytest.mark.integration
def test_a_database_lock_waits_its_turn_and_says_so_when_it_waited_too_long():
    import sqlalchemy

    with fresh_database() as url:
        engine = sqlalchemy.create_engine(sqlalchemy_url(url), poolclass=sqlalchemy.pool.NullPool)
        try:
            with database_lock(engine, "schema"):
                started = time.monotonic()
                with pytest.raises(UsageError, match="waited 1 s for octft's lock 'schema'"):
                    with database_lock(engine, "schema", wait_s=1):
                        pass
                assert 1 <= time.monotonic() - started < 5
                with database_lock(engine, "another name", wait_s=1):  # other locks are not held up
                    pass
            with database_lock(engine, "schema", wait_s=1):  # released: free again
                pass
        finally:
            engine.dispose()


# ---------------------------------------------------------------------------------------------------- one place for
# artifacts


def test_the_artifact_rule_refuses_one_hosts_disk_under_a_database_store(tmp_path, monkeypatch):
    database = "postgresql://mlflow:s3cretpw@db.internal/mlflow"
    with pytest.raises(UsageError) as refused:
        check_shared_artifacts(database, None, "sweep-pod", exists=False)
    message = str(refused.value)
    assert all(option in message for option in THREE_OPTIONS) and "'sweep-pod'" in message, message
    assert "s3cretpw" not in message
    with pytest.raises(UsageError, match="experiment 'old' .* keeps its artifacts in file:///home/me/mlruns/3"):
        check_shared_artifacts(database, "file:///home/me/mlruns/3", "old", exists=True)
    for fine in ("s3://bucket/octft/old", "mlflow-artifacts:/3", "gs://bucket/x"):
        check_shared_artifacts(database, fine, "old", exists=True)
    for store in (f"sqlite:///{tmp_path / 'mlflow.db'}", "http://mlflow:5000"):  # one machine's, or the server's choice
        check_shared_artifacts(store, None, "sweep-pod", exists=False)
    monkeypatch.setenv(ARTIFACT_ROOT_ENV, "/mnt/shared/")  # a filesystem the user says every host mounts
    check_shared_artifacts(database, "file:///mnt/shared/old", "old", exists=True)
    check_shared_artifacts(database, "/mnt/shared/a/b", "old", exists=True)
    with pytest.raises(UsageError, match="file:///mnt/sharedness"):
        check_shared_artifacts(database, "file:///mnt/sharedness", "old", exists=True)
    monkeypatch.setenv(ARTIFACT_ROOT_ENV, "shared/mlartifacts")
    with pytest.raises(UsageError, match="relative path"):
        check_shared_artifacts(database, "file:///x", "old", exists=True)


def test_doctor_says_where_a_database_stores_new_experiments_keep_their_artifacts(tmp_path, monkeypatch):
    from octft.doctor import check_artifacts

    refused = check_artifacts("postgresql://mlflow@db.internal/mlflow")
    assert not refused.ok and all(option in refused.detail for option in THREE_OPTIONS), refused
    monkeypatch.setenv(ARTIFACT_ROOT_ENV, "s3://octft-artifacts/pods")
    fine = check_artifacts("postgresql://mlflow@db.internal/mlflow")
    assert fine.ok and "s3://octft-artifacts/pods/<experiment>" in fine.detail, fine
    assert check_artifacts(f"sqlite:///{tmp_path / 'mlflow.db'}") is None  # one machine's: nothing to say


@pytest.mark.integration
def test_a_launch_on_a_database_tracking_store_without_a_shared_artifact_location_is_refused(tmp_path, capsys,
                                                                                            monkeypatch):
    """Before anything of the study exists; with the three ways out; and an older experiment whose artifacts lie on
    one host's disk is refused by name."""
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    with fresh_database() as tracking_uri:
        spec = spec_on(tmp_path, storage, tracking_uri)
        overrides = experiment_overrides(tmp_path, tmp_path)
        line = one_error_line(capsys, "sweep", "launch", spec, *overrides)
        assert all(option in line for option in THREE_OPTIONS) and "'sweep-pod'" in line, line
        assert not (tmp_path / "optuna.db").exists()  # refused before the study was created

        monkeypatch.setenv(ARTIFACT_ROOT_ENV, str(tmp_path / "shared"))
        plan, _ = resolve_plan(spec, overrides=overrides)
        assert plan.tracking_uri == tracking_uri

        # An experiment made before, by a run that left its artifacts in a host's ./mlruns:
        MlflowTracker(tracking_uri, "sweep-old", artifact_location=(tmp_path / "host-0" / "mlruns" / "1").as_uri()
                      ).finish("FINISHED")
        sweep = yaml.safe_load(spec.read_text())
        sweep["mlflow"]["experiment"] = "sweep-old"
        spec.write_text(yaml.safe_dump(sweep))
        local = f"experiment 'sweep-old' .* keeps its artifacts in file://{tmp_path}/host-0"
        with pytest.raises(UsageError, match=local):
            resolve_plan(spec, overrides=overrides)
        monkeypatch.setenv(ARTIFACT_ROOT_ENV, str(tmp_path))  # that folder is on the shared filesystem after all
        resolve_plan(spec, overrides=overrides)


@pytest.mark.integration
def test_artifacts_go_to_an_object_store_and_another_host_reads_them(tmp_path, monkeypatch):
    """S3 through moto's server: a run logs a checkpoint from one folder, another process elsewhere downloads it."""
    pytest.importorskip("boto3")
    moto_server = pytest.importorskip("moto.server")
    import boto3

    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        s3_env = {"MLFLOW_S3_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
                  "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                  ARTIFACT_ROOT_ENV: "s3://octft-artifacts/pods"}
        for name, value in s3_env.items():
            monkeypatch.setenv(name, value)
        s3 = boto3.client("s3", endpoint_url=s3_env["MLFLOW_S3_ENDPOINT_URL"])
        s3.create_bucket(Bucket="octft-artifacts")
        checkpoint = tmp_path / "host-0" / "checkpoint" / "best.pt"
        checkpoint.parent.mkdir(parents=True)
        checkpoint.write_bytes(os.urandom(4096))
        with fresh_database() as tracking_uri:
            monkeypatch.chdir(tmp_path / "host-0")
            spec = spec_on(tmp_path, f"sqlite:///{tmp_path / 'optuna.db'}", tracking_uri)
            resolve_plan(spec, overrides=experiment_overrides(tmp_path, tmp_path))  # accepted: an object store
            with MlflowTracker(tracking_uri, "sweep-pod") as tracker:
                tracker.log_artifact(checkpoint.parent, "checkpoint")
            keys = [item["Key"] for item in s3.list_objects_v2(Bucket="octft-artifacts")["Contents"]]
            assert any(key.startswith("pods/sweep-pod/") and key.endswith("checkpoint/best.pt") for key in keys), keys
            assert not (tmp_path / "host-0" / "mlruns").exists()
            workstation = tmp_path / "workstation"
            workstation.mkdir()
            paths = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])  # boto3 wherever the test found it
            read = subprocess.run(
                [sys.executable, "-c", "import sys; from octft.track.mlflow_store import MlflowStore; "
                 "print(MlflowStore(sys.argv[1]).download(sys.argv[2], 'checkpoint/best.pt', sys.argv[3]))",
                 tracking_uri, tracker.run_id, str(workstation)],
                cwd=workstation, env={**os.environ, "PYTHONPATH": paths},
                capture_output=True, text=True, timeout=300)
            assert read.returncode == 0, read.stderr[-2000:]
            assert Path(read.stdout.strip()).read_bytes() == checkpoint.read_bytes()
    finally:
        server.stop()


# ---------------------------------------------------------------------------------------------------- a store that does
# not open


def test_a_storage_nobody_listens_at_is_one_line_saying_so(capsys):
    line = one_error_line(capsys, "sweep", "status", REPO / "sweeps" / "demo.yaml", "--storage",
                          f"postgresql://optuna:s3cretpw@127.0.0.1:{free_port()}/studies")
    assert "does not answer: nothing listens at that host and port" in line and "--storage" in line, line
    assert "s3cretpw" not in line and "Traceback" not in line


def test_a_tracking_database_nobody_listens_at_stops_the_launch_in_one_line_before_anything_starts(tmp_path, capsys):
    spec = spec_on(tmp_path, f"sqlite:///{tmp_path / 'optuna.db'}",
                   f"postgresql://mlflow:s3cretpw@127.0.0.1:{free_port()}/mlflow")
    line = one_error_line(capsys, "sweep", "launch", spec, *experiment_overrides(tmp_path, tmp_path))
    assert "the MLflow store" in line and "does not answer: nothing listens at that host and port" in line, line
    assert "s3cretpw" not in line and not (tmp_path / "optuna.db").exists()


@pytest.mark.integration
def test_a_server_that_answers_but_refuses_is_not_called_unreachable(tmp_path, capsys):
    """A database that does not exist, on a server that answers: said as such, for Optuna's storage and MLflow's."""
    missing = f"{POSTGRES}/octft_no_such_database"
    with fresh_database():  # skips where no PostgreSQL answers
        pass
    line = one_error_line(capsys, "sweep", "status", REPO / "sweeps" / "demo.yaml", "--storage", missing)
    assert "answers, but has no such database" in line and "createdb" in line, line
    assert "reachable" not in line and "does not answer" not in line
    with pytest.raises(UsageError) as refused:
        MlflowStore(missing)
    assert "answers, but has no such database" in str(refused.value) and "reachable" not in str(refused.value)
    with fresh_database() as empty:  # a database with no study in it: a reader says so, and creates nothing
        with pytest.raises(MissingInputError, match="holds no Optuna tables"):
            open_study_storage(empty, create=False)
        with pytest.raises(StudyStorageError, match="nothing listens"):
            open_study_storage(empty.replace(":5432/", f":{free_port()}/"))
        assert open_study_storage(empty) is not None  # a writer makes the tables
