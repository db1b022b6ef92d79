"""Experiments octft writes to say they hold model training (MLflow 3's `mlflow.experimentKind`), not GenAI traces."""

from __future__ import annotations

from octft.track.mlflow_store import MlflowStore, MlflowTracker

KIND = "mlflow.experimentKind"


def test_every_experiment_octft_writes_to_is_a_model_training_one(tmp_path):
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    store = MlflowStore(tracking_uri)
    older = store.client.create_experiment("made-by-an-older-octft")
    chosen = store.client.create_experiment("kind-chosen-in-the-ui", tags={KIND: "genai_development"})
    for name in ("octft", "made-by-an-older-octft", "kind-chosen-in-the-ui"):  # `octft train`'s, and a sweep's alike
        MlflowTracker(tracking_uri, name, "run").finish("FINISHED")
    assert store.client.get_experiment_by_name("octft").tags[KIND] == "custom_model_development"
    assert store.client.get_experiment(older).tags[KIND] == "custom_model_development"
    assert store.client.get_experiment(chosen).tags[KIND] == "genai_development"  # a choice is kept
