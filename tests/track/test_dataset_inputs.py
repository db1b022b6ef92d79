"""Each run's data as MLflow dataset inputs: the audited volume table of each split, told apart by its digest."""

from __future__ import annotations

import json

import pandas as pd
from mlflow.tracking import MlflowClient

from octft.track.mlflow_tracker import MlflowTracker
from octft.train.recipe import data_manifest_hash, log_data_inputs


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
        log_data_inputs(run, volumes, "b2://bucket/aireadi-v3")
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
        log_data_inputs(other, changed, "b2://bucket/aireadi-v3")
    other_inputs = MlflowClient(tracking_uri).get_run(other.run_id).inputs.dataset_inputs
    digests = {entry.dataset.name: entry.dataset.digest for entry in other_inputs}
    assert digests["aireadi-v3/train"] != training.dataset.digest
    assert digests["aireadi-v3/val"] == by_context["validation"].dataset.digest
