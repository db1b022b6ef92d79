"""On XLA:CPU SPMD (2 devices), `octft train` with the feature store equals `octft train` without it.

Each run is its own process (SPMD is a once-per-process switch); they are compared through what they
leave behind: `last.pt` and the MLflow store.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from octft.data.synth import synthesize
from octft.train.runtime import load_state

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


def test_store_on_xla_spmd_gives_the_same_run(tmp_path):
    synthesize(tmp_path / "data", participants=32, seed=0, frames=4, height=32, width=32)
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = dict(os.environ, PJRT_DEVICE="CPU", CPU_NUM_DEVICES="2", PYTHONPATH=str(REPO), MLFLOW_TRACKING_URI=tracking)
    runs = {}
    for store in ("false", "true"):
        name = f"store-{store}"
        done = subprocess.run(
            [sys.executable, "-m", "octft.cli", "train", str(REPO / "experiments" / "demo.yaml"),
             f"data.uri={tmp_path / 'data'}", f"data.cache_dir={tmp_path / 'cache'}", "data.preprocess.frames=4",
             "data.preprocess.height=32", "data.preprocess.width=32", "runtime.kind=xla", "train.epochs=3",
             "train.unfreeze_epoch=2", f"features.enabled={store}", f"features.dir={tmp_path / 'features'}",
             f"output_dir={tmp_path / 'runs'}", f"tracking.run_name={name}"],
            env=env, cwd=tmp_path, capture_output=True, text=True,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        runs[store] = tmp_path / "runs" / name
    client = MlflowClient(tracking)
    history = {}
    for store, run_dir in runs.items():
        run_id = json.loads((run_dir / "run.json").read_text())["mlflow_run_id"]
        history[store] = {key: [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]
                          for key in ("val/loss", "train/loss", "train/on_features", "val/balanced_accuracy")}
        if store == "true":
            assert client.get_run(run_id).data.metrics["features/built"] == 1.0
    assert history["true"]["train/on_features"] == [1.0, 1.0, 0.0]
    for key in ("val/loss", "train/loss", "val/balanced_accuracy"):
        assert history["true"][key] == pytest.approx(history["false"][key], rel=1e-4, abs=1e-5), key
    with_store, without = (load_state(runs[s] / "last.pt")["model"] for s in ("true", "false"))
    for name, value in without.items():
        torch.testing.assert_close(with_store[name], value, rtol=1e-4, atol=1e-5)
