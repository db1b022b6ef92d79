"""A model artifact is data to octft, and a run folder holds one run: a tampered registered model runs no code
through any octft command; a run never writes into another run's folder; a checkpoint carries its own config."""

from __future__ import annotations

import json
import subprocess
import sys
import shutil
from pathlib import Path

import pytest
import yaml

from octft.registry.model import save_pyfunc_model
from octft.track.mlflow_store import MlflowStore

from .conftest import DEMO, SMALL, one_error_line, run_cli


def train_args(release: Path, root: Path, *extra: str) -> list:
    return ["train", DEMO, f"data.uri={release}", f"data.cache_dir={root / 'cache'}", *SMALL, "runtime.kind=cpu",
            "train.epochs=2", f"output_dir={root / 'runs'}", "--tracking-uri", f"sqlite:///{root / 'mlflow.db'}", *extra]


@pytest.fixture(scope="module")
def trained(release, tmp_path_factory) -> Path:
    """One finished two-epoch run of the demo experiment (a micro ViT on 4 frames of 32 x 32): its run folder."""
    from octft.cli import main

    root = tmp_path_factory.mktemp("trained")
    assert main([str(arg) for arg in train_args(release, root, "--run-dir", root / "run")]) == 0
    return root / "run"


def predictions(capsys, model: Path | str, scans: list[Path], *extra: str) -> list[dict]:
    from octft.cli import main

    capsys.readouterr()
    assert main([str(arg) for arg in ("predict", "--model", model, *scans, "--json", *extra)]) == 0
    return json.loads(capsys.readouterr().out)["volumes"]


def test_a_tampered_model_artifact_runs_no_code_through_octft(trained, release, tmp_path, capsys):
    """The champion's model code (models-from-code: pyfunc_code.py) replaced by a file that runs a shell command:
    `octft predict` of the model folder and of its registered version reads the checkpoint as data, so the payload
    never runs. MLflow's own loader, the control, runs it."""
    scans = sorted(release.rglob("*.dcm"))[:2]
    model = save_pyfunc_model(trained / "checkpoint", tmp_path / "model")
    marker = tmp_path / "payload-ran"
    code = next(model.glob("*.py"))  # the model's code file, as MLmodel names it
    assert "pyfunc_code" in code.name and not list(model.glob("*.pkl"))
    code.write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n")
    before = predictions(capsys, trained / "checkpoint", scans)

    assert predictions(capsys, model, scans) == before
    store = MlflowStore(f"sqlite:///{tmp_path / 'registry.db'}")
    run_id = store.client.create_run(store.client.create_experiment("tampered", artifact_location=(tmp_path / "artifacts").as_uri())).info.run_id
    store.log_artifacts(run_id, model, "model")
    store.register(run_id, "model", "tampered", "champion", {})
    assert predictions(capsys, "models:/tampered@champion", scans, "--tracking-uri", store.uri) == before
    assert not marker.exists()
    # The control, in its own interpreter: MLflow's loader executes the model's code file.
    subprocess.run([sys.executable, "-c", f"import mlflow; mlflow.pyfunc.load_model({str(model)!r})"],
                   capture_output=True, timeout=300)
    assert marker.exists()


def test_a_fresh_run_never_writes_into_the_folder_of_another(trained, release, capsys):
    best = trained / "checkpoint" / "best.pt"
    written = best.stat().st_mtime_ns
    line = one_error_line(capsys, *train_args(release, trained.parent, "--run-dir", trained))
    assert f"run directory {trained} holds an earlier run (run.json)" in line and "--resume" in line, line
    assert best.stat().st_mtime_ns == written

    # Without --run-dir each fresh run gets its own folder: <output_dir>/<name>, then <name>-2.
    root = trained.parent / "named"
    for expected in ("demo", "demo-2"):
        code, _ = run_cli(capsys, *train_args(release, root))
        assert code == 0
        assert (root / "runs" / expected / "checkpoint" / "best.pt").is_file()


def test_a_checkpoint_carries_the_config_it_was_trained_with(trained, release, tmp_path, capsys):
    """The config.yaml beside best.pt rewritten (another normalisation, another input size), as a failed run into the
    folder once did: predictions still come from the config inside best.pt."""
    scans = sorted(release.rglob("*.dcm"))[:2]
    before = predictions(capsys, trained / "checkpoint", scans)
    folder = shutil.copytree(trained / "checkpoint", tmp_path / "checkpoint")
    config = yaml.safe_load((folder / "config.yaml").read_text())
    config["data"]["preprocess"].update(intensity="zscore", height=48, width=48)
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    assert predictions(capsys, folder, scans) == before
