"""`octft doctor`: facts about this machine and checks of the stores, reading only, creating nothing."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from octft.doctor import check_data, check_database, check_tracking

REPO = Path(__file__).resolve().parents[1]


def test_a_missing_sqlite_store_will_be_created_and_is_not(tmp_path):
    check = check_database("optuna", f"sqlite:///{tmp_path / 'sub' / 'optuna.db'}", env_hint="")
    assert check.ok and "will be created" in check.detail
    assert list(tmp_path.iterdir()) == []


def test_an_existing_sqlite_store_answers_read_only(tmp_path):
    path = tmp_path / "optuna.db"
    with sqlite3.connect(path) as connection:
        connection.execute("create table studies (id integer)")
    before = path.read_bytes()
    check = check_database("optuna", f"sqlite:///{path}", env_hint="")
    assert check.ok and "answers (1 tables)" in check.detail
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["optuna.db"]
    path.write_bytes(b"not a database, just bytes that fill a page" * 200)
    broken = check_database("optuna", f"sqlite:///{path}", env_hint="or pass another with --storage")
    assert not broken.ok and "cannot be read" in broken.detail and "--storage" in broken.detail


def test_an_unreachable_database_fails_naming_it_without_its_password():
    check = check_database("optuna", "postgresql://octft:s3cret@127.0.0.1:1/optuna", env_hint="or pass --storage")
    assert not check.ok
    assert "postgresql://octft:***@127.0.0.1:1/optuna: does not answer" in check.detail
    assert "s3cret" not in check.detail and "--storage" in check.detail


def test_tracking_store_checks(tmp_path):
    assert check_tracking(f"sqlite:///{tmp_path / 'mlflow.db'}").detail.endswith("will be created")
    assert check_tracking(str(tmp_path)).ok
    refused = check_tracking("http://127.0.0.1:1")
    assert not refused.ok and "does not answer" in refused.detail and "--tracking-uri" in refused.detail


def test_a_store_answers_only_when_octft_can_open_it(tmp_path):
    """With the driver the sweep's processes will use, MLflow's store as `MlflowStore` opens it; reading only."""
    for check in (check_tracking("mysql://mlflow:s3cretpw@127.0.0.1/octft"),
                  check_database("optuna", "mysql://optuna:s3cretpw@127.0.0.1/studies", env_hint="")):
        assert not check.ok and "pip install mysqlclient" in check.detail and "s3cretpw" not in check.detail
    half = tmp_path / "mlflow.db"  # what a full disk left while MLflow migrated a new store in place
    with sqlite3.connect(half) as connection:
        connection.execute("create table experiments (experiment_id integer)")
        connection.execute("create table _alembic_tmp_params (key text)")
        connection.execute("create table alembic_version (version_num text)")
    before = half.read_bytes()
    check = check_tracking(f"sqlite:///{half}")
    assert not check.ok and "half-created" in check.detail and "move it away" in check.detail, check
    assert half.read_bytes() == before  # read, not migrated


def test_a_postgresql_mlflow_store_answers_with_the_installed_driver():
    url = "postgresql://postgres@127.0.0.1:5432/test"  # MLflow's own default driver (psycopg 3) is not installed
    if not check_database("optuna", url, env_hint="").ok:
        if os.environ.get("OCTFT_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"OCTFT_REQUIRE_POSTGRES=1 but no PostgreSQL answers at {url}")
        pytest.skip(f"no PostgreSQL at {url}")
    check = check_tracking(url)
    assert check.ok and check.detail.endswith("answers"), check


def test_data_checks_list_and_keep_b2_keys_secret(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "participants.tsv").write_text("participant_id\n1001\n")
    assert check_data(str(tmp_path / "data")).ok
    missing = check_data(str(tmp_path / "nowhere"))
    assert not missing.ok and "nowhere" in missing.detail
    monkeypatch.delenv("B2_APPLICATION_KEY", raising=False)
    monkeypatch.setenv("B2_APPLICATION_KEY_ID", "key-id-value-123")
    absent = check_data("b2://bucket/aireadi")
    assert not absent.ok and "B2_APPLICATION_KEY not set" in absent.detail
    assert "key-id-value-123" not in absent.detail


@pytest.mark.integration
def test_doctor_command_reports_the_runtime_and_fails_on_an_unreachable_store(tmp_path):
    env = dict(os.environ, PJRT_DEVICE="CPU", CPU_NUM_DEVICES="4", MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path}/ml.db")
    command = [sys.executable, "-m", "octft.cli", "doctor", "--json", str(tmp_path / "out" / "doctor.json"),
               "--storage", "postgresql://octft:s3cret@127.0.0.1:1/optuna", "--data", str(REPO / "experiments")]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert completed.returncode == 1, completed.stderr[-3000:]
    assert "FAIL  optuna" in completed.stdout and "s3cret" not in completed.stdout + completed.stderr
    report = json.loads((tmp_path / "out" / "doctor.json").read_text())
    runtime = report["runtime"]
    assert (runtime["platform"], runtime["devices"], runtime["hosts"], runtime["process_index"]) == ("CPU", 4, 1, 0)
    assert runtime["libtpu"] is None and runtime["precision"] == "fp32" and runtime["compile_cache_dir"] is None
    checks = {check["name"]: check for check in report["checks"]}
    assert not report["ok"] and not checks["optuna"]["ok"]
    assert checks["mlflow"]["ok"] and checks["mlflow"]["detail"].endswith("will be created")
    assert checks["data"]["ok"] and checks["devices"]["ok"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # doctor created no store
