"""MlflowTracker against a real MLflow sqlite store in a temp dir, read back through MlflowClient."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from octft.redaction import redact
from octft.stores import check_not_shared, resolve_tracking_uri
from octft.track import NullTracker, Tracker
from octft.track.mlflow_store import END_REASON_TAG, MAX_PARAM_VALUE_LENGTH, TRUNCATION_MARKER, MlflowStore, MlflowTracker

SECRET = "Zq8sEcReT-v4lue"


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict:
    """One sqlite store per module: MLflow's migrations take seconds per new database."""
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    artifacts = (root / "artifacts").as_uri()
    # Creates the experiment (and its artifact root under tmp); later trackers find it by name.
    MlflowTracker(uri, experiment="octft-test", run_name="setup", artifact_location=artifacts).finish("FINISHED")
    return {"uri": uri, "client": MlflowClient(tracking_uri=uri, registry_uri=uri), "root": root}


def make_tracker(store: dict, run_name: str, **kwargs) -> MlflowTracker:
    return MlflowTracker(store["uri"], experiment="octft-test", run_name=run_name, **kwargs)


def read_artifact(store: dict, run_id: str, artifact_path: str, tmp_path: Path) -> Path:
    from mlflow.artifacts import download_artifacts

    return Path(download_artifacts(run_id=run_id, artifact_path=artifact_path, dst_path=str(tmp_path), tracking_uri=store["uri"]))


def test_params_round_trip_and_relogging(store):
    tracker = make_tracker(store, "params")
    params = {
        "optim.lr_head": 3e-4,
        "train.epochs": 4,
        "model.pretrained": True,
        "data.cache_dir": None,
        "data.devices": ["topcon_maestro2", "zeiss_cirrus"],
        "model.checkpoint_key": "target_encoder",
        "data.root": Path("/data/aireadi"),
    }
    tracker.log_params(params)
    tracker.log_params(params)  # a resumed run re-logs its config: same values are fine

    logged = store["client"].get_run(tracker.run_id).data.params
    assert logged == {
        "optim.lr_head": "0.0003",
        "train.epochs": "4",
        "model.pretrained": "True",
        "data.cache_dir": "None",
        "data.devices": '["topcon_maestro2", "zeiss_cirrus"]',
        "model.checkpoint_key": "target_encoder",
        "data.root": "/data/aireadi",
    }
    with pytest.raises(ValueError, match=r"optim\.lr_head.*'0\.0003' -> '0\.001'.*new run"):
        tracker.log_params({"optim.lr_head": 1e-3})
    assert store["client"].get_run(tracker.run_id).data.params["optim.lr_head"] == "0.0003"


def test_long_param_is_truncated_with_marker(store):
    tracker = make_tracker(store, "long-param")
    at_limit = "a" * MAX_PARAM_VALUE_LENGTH  # MLflow must accept exactly its limit, unchanged
    too_long = "b" * (MAX_PARAM_VALUE_LENGTH + 500)
    tracker.log_params({"sweep.at_limit": at_limit, "sweep.too_long": too_long})

    logged = store["client"].get_run(tracker.run_id).data.params
    assert logged["sweep.at_limit"] == at_limit
    assert len(logged["sweep.too_long"]) == MAX_PARAM_VALUE_LENGTH
    assert logged["sweep.too_long"].endswith(TRUNCATION_MARKER)
    assert logged["sweep.too_long"].startswith("b" * 100)


def test_metric_history_per_step_with_nan(store):
    tracker = make_tracker(store, "metrics")
    for epoch, (loss, f1) in enumerate([(1.2, 0.25), (float("nan"), 0.5), (0.6, 0.75)]):
        tracker.log_metrics({"train/loss": loss, "val/f1_healthy": f1}, step=epoch)

    client = store["client"]
    f1_history = sorted(client.get_metric_history(tracker.run_id, "val/f1_healthy"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in f1_history] == [(0, 0.25), (1, 0.5), (2, 0.75)]
    loss_history = sorted(client.get_metric_history(tracker.run_id, "train/loss"), key=lambda m: m.step)
    assert [m.step for m in loss_history] == [0, 1, 2]
    assert loss_history[0].value == 1.2 and math.isnan(loss_history[1].value) and loss_history[2].value == 0.6

    with pytest.raises(ValueError, match="'val/auc'.*not a number"):
        tracker.log_metrics({"val/auc": "high"}, step=3)


def test_artifacts_figure_and_dict_round_trip(store, tmp_path):
    from matplotlib.figure import Figure

    tracker = make_tracker(store, "artifacts")
    report = tmp_path / "report.txt"
    report.write_text("confusion matrix\n")
    predictions = tmp_path / "predictions"
    predictions.mkdir()
    (predictions / "val.csv").write_text("participant_id,label\n1001,0\n")
    figure = Figure()
    figure.add_subplot().plot([0, 1, 2], [0.3, 0.5, 0.6])

    tracker.log_artifact(report)
    tracker.log_artifact(predictions, "predictions")
    tracker.log_figure(figure, "figures/val_curve")
    tracker.log_dict({"optim": {"lr_head": 0.001}, "data": {"root": Path("/data")}}, "config")
    tracker.log_dict({"classes": ["healthy", "insulin"]}, "classes.yaml")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        tracker.log_artifact(tmp_path / "missing.pt")

    downloads = tmp_path / "downloads"
    assert read_artifact(store, tracker.run_id, "report.txt", downloads).read_text() == "confusion matrix\n"
    assert (read_artifact(store, tracker.run_id, "predictions", downloads) / "val.csv").read_text().startswith("participant_id")
    png = read_artifact(store, tracker.run_id, "figures/val_curve.png", downloads).read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    config = json.loads(read_artifact(store, tracker.run_id, "config.json", downloads).read_text())
    assert config == {"optim": {"lr_head": 0.001}, "data": {"root": "/data"}}
    classes = yaml.safe_load(read_artifact(store, tracker.run_id, "classes.yaml", downloads).read_text())
    assert classes == {"classes": ["healthy", "insulin"]}


def test_child_run_nests_under_parent_without_interfering(store):
    import mlflow

    parent = make_tracker(store, "study", tags={"octft.study": "lr-sweep"})
    child = make_tracker(store, "trial-0", parent_run_id=parent.run_id)
    child.log_metrics({"val/loss": 0.5}, step=0)
    child.finish("FINISHED")

    client = store["client"]
    child_run = client.get_run(child.run_id)
    assert child_run.data.tags["mlflow.parentRunId"] == parent.run_id
    assert child_run.info.run_name == "trial-0"
    parent_run = client.get_run(parent.run_id)
    assert parent_run.info.status == "RUNNING"  # the child's end is its own
    assert "mlflow.parentRunId" not in parent_run.data.tags
    assert parent_run.data.tags["octft.study"] == "lr-sweep"
    assert parent_run.data.metrics == {}
    assert mlflow.active_run() is None  # no fluent global run was started

    with pytest.raises(ValueError, match="parent_run_id='0123abcd'.*no such MLflow run"):
        make_tracker(store, "orphan", parent_run_id="0123abcd")


@pytest.mark.parametrize("status", ["FINISHED", "FAILED", "KILLED"])
def test_finish_sets_status_and_reason_once(store, status):
    tracker = make_tracker(store, f"end-{status}")
    tracker.finish(status, reason=f"ended {status.lower()} at epoch 2")
    tracker.finish("FINISHED", reason="second call")  # ignored: the first end stands

    run = store["client"].get_run(tracker.run_id)
    assert run.info.status == status
    assert run.data.tags[END_REASON_TAG] == f"ended {status.lower()} at epoch 2"
    assert run.info.end_time is not None


def test_finish_rejects_unknown_status(store):
    tracker = make_tracker(store, "bad-status")
    with pytest.raises(ValueError, match="'DONE'.*FINISHED, FAILED, KILLED"):
        tracker.finish("DONE")  # type: ignore[arg-type]
    assert store["client"].get_run(tracker.run_id).info.status == "RUNNING"


def test_context_manager_ends_failed_on_error_and_finished_otherwise(store):
    with pytest.raises(RuntimeError):
        with make_tracker(store, "crashes") as crashing:
            raise RuntimeError("loss diverged")
    with make_tracker(store, "succeeds") as succeeding:
        succeeding.log_metrics({"val/loss": 0.4}, step=0)

    client = store["client"]
    crashed = client.get_run(crashing.run_id)
    assert crashed.info.status == "FAILED"
    assert crashed.data.tags[END_REASON_TAG] == "RuntimeError: loss diverged"
    assert client.get_run(succeeding.run_id).info.status == "FINISHED"


def test_resume_continues_the_same_run(store):
    first = make_tracker(store, "resumable")
    first.log_params({"optim.lr_head": 1e-3})
    first.log_metrics({"val/loss": 0.9}, step=0)
    first.finish("KILLED", reason="preempted")

    resumed = MlflowTracker(store["uri"], experiment="octft-test", run_id=first.run_id, tags={"octft.resumed": "1"})
    assert resumed.run_id == first.run_id
    client = store["client"]
    running = client.get_run(first.run_id)
    assert running.info.status == "RUNNING"
    assert END_REASON_TAG not in running.data.tags  # the old reason no longer describes the run
    assert running.data.tags["octft.resumed"] == "1"

    resumed.log_params({"optim.lr_head": 1e-3})
    resumed.log_metrics({"val/loss": 0.7}, step=1)
    resumed.finish("FINISHED")

    history = sorted(client.get_metric_history(first.run_id, "val/loss"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in history] == [(0, 0.9), (1, 0.7)]
    assert client.get_run(first.run_id).info.status == "FINISHED"
    assert len(client.search_runs([running.info.experiment_id], "attributes.run_name = 'resumable'")) == 1

    with pytest.raises(ValueError, match="run_id='ffff0000'.*drop run_id"):
        MlflowTracker(store["uri"], run_id="ffff0000")


def test_redact_hides_secret_keys_and_url_passwords():
    assert redact(SECRET, key="storage.b2_application_key") == "***"
    assert redact(SECRET, key="B2_APPLICATION_KEY_ID") == "***"
    assert redact(SECRET, key="mlflow.tracking_password") == "***"
    assert redact(SECRET, key="hf.Access_Token") == "***"
    assert redact(SECRET, key="aws_secret") == "***"
    assert redact("target_encoder", key="model.checkpoint_key") == "target_encoder"
    assert redact(0.001, key="optim.lr_head") == 0.001
    assert redact("postgresql://optuna:pw@db:5432/studies") == "postgresql://optuna:***@db:5432/studies"
    with_driver = "postgresql+psycopg2://user:p%40ss@db/x?sslmode=require"
    assert redact(with_driver) == "postgresql+psycopg2://user:***@db/x?sslmode=require"
    assert redact("postgresql://db.internal/studies") == "postgresql://db.internal/studies"
    in_text = "failed to reach mysql://root:hunter2@10.0.0.5/runs: timeout"
    assert redact(in_text) == "failed to reach mysql://root:***@10.0.0.5/runs: timeout"
    nested = {"b2": {"key_id": "0012ab", "bucket": "aireadi"}, "urls": ["https://u:pw@h/x", "plain"], "seed": 7}
    assert redact(nested) == {"b2": {"key_id": "***", "bucket": "aireadi"}, "urls": ["https://u:***@h/x", "plain"], "seed": 7}


def test_secrets_never_reach_the_store(store, tmp_path):
    tracker = make_tracker(store, "secrets", tags={"b2.api_token": SECRET})
    tracker.log_params(
        {
            "storage.b2_application_key": SECRET,
            "sweep.storage": f"postgresql://optuna:{SECRET}@db:5432/studies",
            "sweep.urls": [f"https://reader:{SECRET}@mirror/aireadi"],
            "optim.lr_head": 0.001,
        }
    )
    tracker.set_tags({"octft.db_password": SECRET, "octft.host": "tpu-v5e-8"})
    tracker.log_dict({"storage": {"uri": "b2://bucket", "application_key": SECRET}}, "config.yaml")
    tracker.finish("FAILED", reason=f"could not connect to postgresql://optuna:{SECRET}@db/studies")

    run = store["client"].get_run(tracker.run_id)
    stored = json.dumps({"params": run.data.params, "tags": run.data.tags})
    assert SECRET not in stored
    assert run.data.params["storage.b2_application_key"] == "***"
    assert run.data.params["sweep.storage"] == "postgresql://optuna:***@db:5432/studies"
    assert run.data.params["optim.lr_head"] == "0.001"
    assert run.data.tags["octft.host"] == "tpu-v5e-8"
    config_text = read_artifact(store, tracker.run_id, "config.yaml", tmp_path).read_text()
    assert SECRET not in config_text
    assert yaml.safe_load(config_text)["storage"] == {"uri": "b2://bucket", "application_key": "***"}
    assert SECRET not in repr(tracker)


def test_check_not_shared_refuses_one_database_for_both(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    absolute = f"sqlite:///{tmp_path / 'sweep.db'}"
    with pytest.raises(ValueError, match="same database.*alembic_version"):
        check_not_shared("sqlite:///sweep.db", absolute)
    with pytest.raises(ValueError, match="same database"):
        check_not_shared("sqlite:///./sweep.db", "sqlite:///sweep.db?timeout=30")
    with pytest.raises(ValueError, match="same database") as refused:
        check_not_shared(f"postgresql://mlflow:{SECRET}@db:5432/octft", f"postgresql+psycopg2://optuna:{SECRET}@DB:5432/octft")
    assert SECRET not in str(refused.value)

    check_not_shared("sqlite:///mlflow.db", "sqlite:///optuna.db")
    check_not_shared("sqlite:///mlflow.db", None)
    check_not_shared("sqlite:///mlflow.db", "sqlite://")  # in-memory: private to its connection
    check_not_shared("sqlite:///mlflow.db", str(tmp_path / "mlflow.db"))  # a journal file, not SQL
    check_not_shared("postgresql://db/mlflow", "postgresql://db/optuna")


def test_resolve_tracking_uri_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri() == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////srv/env.db")
    assert resolve_tracking_uri() == "sqlite:////srv/env.db"
    assert resolve_tracking_uri("sqlite:////srv/explicit.db") == "sqlite:////srv/explicit.db"


def test_register_model_once_per_run_and_alias_resolves(store, tmp_path, monkeypatch):
    from mlflow.artifacts import download_artifacts

    checkpoint = tmp_path / "best.pt"
    checkpoint.write_bytes(b"weights-of-trial-1")
    trial = make_tracker(store, "trial-best")
    trial.log_artifact(checkpoint, "checkpoint")
    trial.finish("FINISHED")

    registry = MlflowStore(store["uri"])
    first = registry.register(trial.run_id, "checkpoint", "octft-dm4", alias="champion", tags={"val.f1": "0.71"})
    again = registry.register(trial.run_id, "checkpoint", "octft-dm4", alias="champion")
    assert first == again == "1"

    client = store["client"]
    assert len(client.search_model_versions("name='octft-dm4'")) == 1
    champion = client.get_model_version_by_alias("octft-dm4", "champion")
    assert str(champion.version) == first
    assert champion.tags == {"val.f1": "0.71"}
    # MLflow resolves models:/ URIs through the process-wide registry URI, which the env names.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store["uri"])
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", store["uri"])
    downloaded = download_artifacts("models:/octft-dm4@champion", dst_path=str(tmp_path / "champion"))
    assert (Path(downloaded) / "best.pt").read_bytes() == b"weights-of-trial-1"

    # A better trial later: a new version, and the alias moves to it.
    checkpoint.write_bytes(b"weights-of-trial-2")
    better = make_tracker(store, "trial-better")
    better.log_artifact(checkpoint, "checkpoint")
    assert registry.register(better.run_id, "checkpoint", "octft-dm4") == "2"
    assert str(client.get_model_version_by_alias("octft-dm4", "champion").version) == "2"

    with pytest.raises(FileNotFoundError, match="no artifact 'weights'.*log it before registering"):
        registry.register(trial.run_id, "weights", "octft-dm4")


def test_both_trackers_fit_the_seam(store):
    assert isinstance(NullTracker(), Tracker)
    assert NullTracker().run_id is None
    assert isinstance(make_tracker(store, "seam"), Tracker)


def test_importing_the_seam_does_not_import_mlflow():
    code = "import sys, octft.track; print('mlflow' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_artifacts_of_a_new_experiment_live_beside_the_sqlite_store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MLflow's own default would be ./mlruns here
    uri = f"sqlite:///{tmp_path / 'stores' / 'mlflow.db'}"
    (tmp_path / "stores").mkdir()
    tracker = MlflowTracker(uri, experiment="beside-the-db", run_name="r")
    note = tmp_path / "note.txt"
    note.write_text("hello")
    tracker.log_artifact(note)
    tracker.finish("FINISHED")
    assert list((tmp_path / "stores" / "mlartifacts" / "beside-the-db").rglob("note.txt"))
    assert not (tmp_path / "mlruns").exists()
