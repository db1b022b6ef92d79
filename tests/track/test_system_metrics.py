"""System metrics: MLflow's sampler logs the machine into a run while it runs; TPU metrics only where tpu-info is."""

from __future__ import annotations

import importlib.util
import time

from mlflow.tracking import MlflowClient

from octft.track.mlflow_store import MlflowTracker
from octft.track.mlflow_store import start_system_metrics, tpu_monitor


def test_a_run_logs_cpu_and_memory_until_it_finishes(tmp_path):
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = MlflowTracker(tracking_uri, "system", "trial-0")
    monitor = start_system_metrics(run.run_id, tracking_uri, sampling_interval_s=0.2)
    client = MlflowClient(tracking_uri)
    deadline = time.monotonic() + 120  # a bound for a busy machine, not a speed check
    while "system/cpu_utilization_percentage" not in client.get_run(run.run_id).data.metrics:
        assert time.monotonic() < deadline, "no system metric reached the run"
        time.sleep(0.2)
    monitor.finish()
    run.finish("FINISHED")
    metrics = client.get_run(run.run_id).data.metrics
    assert 0 <= metrics["system/cpu_utilization_percentage"] <= 100 * 64
    assert metrics["system/system_memory_usage_megabytes"] > 0
    assert not [name for name in metrics if name.startswith("system/tpu_")]  # no TPU here


def test_the_tracker_starts_and_stops_the_sampler_with_the_run(tmp_path):
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with MlflowTracker(tracking_uri, "system", "trial-1", log_system_metrics=True) as run:
        assert run._system_metrics is not None and run._system_metrics._process.is_alive()
        thread = run._system_metrics._process
    assert not thread.is_alive() and run._system_metrics is None
    assert MlflowClient(tracking_uri).get_run(run.run_id).info.status == "FINISHED"


def test_without_tpu_info_the_tpu_part_is_skipped_cleanly():
    if importlib.util.find_spec("tpu_info") is None:
        assert tpu_monitor() is None
    else:  # installed (the tpu extra) on a machine without TPU chips: still nothing to monitor
        assert tpu_monitor() is None or hasattr(tpu_monitor(), "collect_metrics")
