"""Each run's data as MLflow dataset inputs: the audited volume table of each split, told apart by its digest."""

from __future__ import annotations

import json

import pandas as pd
from mlflow.tracking import MlflowClient

from octft.track.mlflow_store import MlflowTracker
from octft.train.recipe import data_inputs
from octft.data.dataset import data_manifest_hash


def _volumes(labels: dict[str, tuple[int, str]]) -> pd.DataFrame:
    """An audited volume table: one volume per participant, its class and split."""
    names = ["healthy", "prediabetes", "oral", "insulin"]
    return pd.DataFrame([
        {"key": f"{pid}/oct_l.dcm", "participant_id": pid, "label": label, "class_name": names[label], "split": split,
         "device": "spectralis", "laterality": "L", "region": "macula", "source_id": f"{pid}|1000|", "size": 1000}
        for pid, (label, split) in labels.items()
    ])


def test_a_run_shows_its_training_and_validation_volumes_as_datasets(tmp_path):
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    volumes = _volumes({"1001": (0, "train"), "1002": (1, "train"), "1003": (1, "train"), "1004": (0, "val"),
                        "1005": (3, "test")})
    with MlflowTracker(tracking_uri, "datasets", "run-a") as run:
        run.log_datasets(data_inputs(volumes, "b2://bucket/aireadi-v3"))
    inputs = MlflowClient(tracking_uri).get_run(run.run_id).inputs.dataset_inputs
    by_context = {next(tag.value for tag in entry.tags if tag.key == "mlflow.data.context"): entry for entry in inputs}
    assert sorted(by_context) == ["training", "validation"]  # the test split is not the run's to use

    training = by_context["training"]
    assert training.dataset.name == "aireadi-v3/train"
    assert training.dataset.digest == data_manifest_hash(volumes[volumes.split == "train"])
    assert json.loads(training.dataset.source) == {"uri": "b2://bucket/aireadi-v3"}
    assert json.loads(training.dataset.profile)["num_rows"] == 3
    assert "participant_id" in training.dataset.schema and "size" not in training.dataset.schema
    tags = {tag.key: tag.value for tag in training.tags}
    assert tags["octft.participants_per_class"] == "healthy=1, prediabetes=2" and tags["octft.volumes"] == "3"

    # Other data (one label changed): another digest, so the UI tells the two runs apart.
    changed = volumes.copy()
    changed.loc[changed.participant_id == "1002", ["label", "class_name"]] = (2, "oral")
    with MlflowTracker(tracking_uri, "datasets", "run-b") as other:
        other.log_datasets(data_inputs(changed, "b2://bucket/aireadi-v3"))
    other_inputs = MlflowClient(tracking_uri).get_run(other.run_id).inputs.dataset_inputs
    digests = {entry.dataset.name: entry.dataset.digest for entry in other_inputs}
    assert digests["aireadi-v3/train"] != training.dataset.digest
    assert digests["aireadi-v3/val"] == by_context["validation"].dataset.digest


def _log_after(barrier, tracking_uri, run_id):
    barrier.wait()
    tracker = MlflowTracker(tracking_uri, "datasets", run_id=run_id)
    tracker.log_datasets(data_inputs(_volumes({"1001": (0, "train"), "1002": (1, "train"), "1004": (0, "val")}), "/data/aireadi"))


def test_parallel_trials_logging_the_same_data_all_get_it(tmp_path):
    """Trials of a sweep (separate processes) log the same dataset at the same moment; the store keeps one
    row per digest, and a trial that loses that race must link to the row, not fail (seen with two
    workers on one sqlite store). The race itself is timing-dependent and rarely lost here; this checks
    that concurrent trials all get their inputs."""
    import multiprocessing

    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    trackers = [MlflowTracker(tracking_uri, "datasets", f"trial-{n}") for n in range(4)]
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(len(trackers))
    processes = [context.Process(target=_log_after, args=(barrier, tracking_uri, t.run_id)) for t in trackers]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=300)
    assert [process.exitcode for process in processes] == [0] * len(processes)
    client = MlflowClient(tracking_uri)
    for tracker in trackers:
        tracker.finish("FINISHED")
        names = sorted(entry.dataset.name for entry in client.get_run(tracker.run_id).inputs.dataset_inputs)
        assert names == ["aireadi/train", "aireadi/val"]
