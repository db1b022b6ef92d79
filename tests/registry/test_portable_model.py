"""The champion leaves this checkout: a models-from-code LoggedModel whose requirements name only installable packages.

One real training run of the recipe on a tiny synthetic release gives the checkpoint; MLflow is a sqlite store in a
temporary folder. The champion is loaded in a second interpreter that cannot import octft (the project's editable
install is taken off its `sys.path`) and may not unpickle, so it runs only on the code the model carries. The full
check, a fresh virtual environment made from nothing but the model's requirements.txt and `mlflow models serve
--env-manager uv`, is `benchmarks/check_portable_champion.py` (minutes; run by hand).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from octft.config import load_experiment
from octft.data.layout import CLASS_SHORT_NAMES
from octft.data.synth import synthesize
from octft.registry.model import MODEL_ARTIFACT, PACKAGE_DIR, REQUIREMENTS, log_trial_model, trial_model
from octft.registry.predict import predict
from octft.track.mlflow_store import MlflowStore
from octft.train.recipe import train

MODEL_NAME = "octft-portable-test"
REPO = PACKAGE_DIR.parent


@pytest.fixture(scope="module")
def champion(tmp_path_factory):
    """A trained run's best checkpoint logged as its LoggedModel, registered as models:/octft-portable-test@champion."""
    root = tmp_path_factory.mktemp("portable")
    synthesize(root / "data", participants=48, frames=4, height=32, width=32)
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    cfg = load_experiment(REPO / "experiments" / "demo.yaml", [
        f"data.uri={root / 'data'}", f"data.cache_dir={root / 'cache'}", "model.size=vit_micro",
        "data.preprocess.frames=4", "data.preprocess.height=32", "data.preprocess.width=32", "train.epochs=2",
        "runtime.kind=cpu", f"tracking.tracking_uri={tracking_uri}", "tracking.experiment=portable-test",
        f"output_dir={root / 'runs'}", f"features.dir={root / 'features'}",
    ])
    trained = train(cfg, run_dir=root / "runs" / "trial", progress=False)
    store = MlflowStore(tracking_uri)
    model = log_trial_model(store, trained.run_id, trained.run_dir / "checkpoint", trained.best_metrics,
                            step=trained.best_epoch)
    version = store.register_logged_model(model, MODEL_NAME, "champion", {"octft.trial": "0"})
    return root, trained, tracking_uri, model, version


def _model_folder(tracking_uri: str, model_id: str) -> Path:
    """The LoggedModel's artifacts: a local folder, in a sqlite store's artifact root."""
    location = MlflowClient(tracking_uri).get_logged_model(model_id).artifact_location
    return Path(location.removeprefix("file://"))


def test_the_champion_is_a_models_from_code_logged_model_of_its_run(champion):
    _, trained, tracking_uri, model, version = champion
    client = MlflowClient(tracking_uri)
    experiment_id = client.get_run(trained.run_id).info.experiment_id
    found = client.search_logged_models([experiment_id])
    assert [(entry.model_id, entry.name, entry.source_run_id, entry.status.value) for entry in found] == [
        (model.model_id, MODEL_ARTIFACT, trained.run_id, "READY")]
    # An output of its run at the best epoch, with that epoch's metrics, linked to the values the run logged there.
    outputs = client.get_run(trained.run_id).outputs.model_outputs
    assert [(output.model_id, output.step) for output in outputs] == [(model.model_id, trained.best_epoch)]
    linked = {metric.key: (metric.value, metric.step) for metric in found[0].metrics}
    assert linked == {key: (pytest.approx(value, nan_ok=True), trained.best_epoch)
                      for key, value in trained.best_metrics.items()}
    history = client.get_metric_history(trained.run_id, "val/balanced_accuracy")
    assert len(history) == len({entry.step for entry in history}), "linking the metrics added points to the run"
    assert found[0].params == client.get_run(trained.run_id).data.params
    run_tags = client.get_run(trained.run_id).data.tags
    assert found[0].tags["octft.data_manifest_hash"] == run_tags["octft.data_manifest_hash"]

    # Logging the trial again keeps its one model; registering it again keeps its one version.
    store = MlflowStore(tracking_uri)
    assert log_trial_model(store, trained.run_id, trained.run_dir / "checkpoint", {}, step=0).model_id == model.model_id
    assert store.register_logged_model(trial_model(store, trained.run_id), MODEL_NAME, "champion") == version
    registered = client.get_model_version_by_alias(MODEL_NAME, "champion")
    assert (str(registered.version), registered.source, registered.run_id) == (
        version, f"models:/{model.model_id}", trained.run_id)
    assert json.loads(client.get_logged_model(model.model_id).tags["mlflow.modelVersions"]) == [
        {"name": MODEL_NAME, "version": version}]
    resolved = store.model_version(f"models:/{MODEL_NAME}@champion")
    assert (resolved.model_id, resolved.run_id, resolved.artifact_path) == (
        model.model_id, trained.run_id, MODEL_ARTIFACT)

    folder = _model_folder(tracking_uri, model.model_id)
    mlmodel = yaml.safe_load((folder / "MLmodel").read_text())
    pyfunc = mlmodel["flavors"]["python_function"]
    assert pyfunc["loader_module"] == "mlflow.pyfunc.loaders.code_model" and "python_model" not in pyfunc
    assert Path(pyfunc["model_code_path"]).name == "pyfunc_code.py" and (folder / "pyfunc_code.py").is_file()
    assert (folder / pyfunc["code"] / "octft" / "registry" / "inference.py").is_file()
    assert not list(folder.rglob("*.pkl")) and not list(folder.rglob("__pycache__"))
    # A uv project copied from the working directory would make `--env-manager uv` sync octft's own project.
    assert not (folder / "uv.lock").exists() and not (folder / "pyproject.toml").exists()
    assert (mlmodel["model_id"], mlmodel["run_id"]) == (model.model_id, trained.run_id)
    assert mlmodel["metadata"]["octft.run_id"] == trained.run_id


def test_its_requirements_are_installable_pins_of_what_it_was_trained_with(champion):
    _, _, tracking_uri, model, _ = champion
    lines = (_model_folder(tracking_uri, model.model_id) / "requirements.txt").read_text().split()
    pins = {canonicalize_name(Requirement(line).name): str(Requirement(line).specifier) for line in lines}
    assert "octft" not in pins and "torch-xla" not in pins and "optuna" not in pins
    for name in ("timm", "pydantic", "pyyaml", "pylibjpeg", "pylibjpeg-openjpeg", "pylibjpeg-libjpeg", "torch",
                 "torchvision", "mlflow", "pydicom", "nibabel", "numpy", "pandas"):
        assert pins[name] == f"=={importlib.metadata.version(name).split('+')[0]}", name
    assert set(pins) == {canonicalize_name(name) for name in REQUIREMENTS}


def _imported_distributions(code: str) -> tuple[set[str], set[str]]:
    """(distributions, top-level modules) a fresh interpreter has loaded after `code`, octft found on the repo."""
    probe = (f"import sys; sys.path.insert(0, {str(REPO)!r})\n{code}\n"
             "import json; print(json.dumps(sorted({name.split('.')[0] for name in sys.modules})))")
    done = subprocess.run([sys.executable, "-I", "-c", probe], capture_output=True, text=True, timeout=300, cwd="/")
    assert done.returncode == 0, done.stderr[-3000:]
    modules = set(json.loads(done.stdout.strip().splitlines()[-1]))
    owners = importlib.metadata.packages_distributions()
    return {canonicalize_name(dist) for name in modules for dist in owners.get(name, [])}, modules


def _closure(names: tuple[str, ...]) -> set[str]:
    """`names` and everything they require (without extras), as installed here."""
    seen, todo = set(), [canonicalize_name(name) for name in names]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for line in importlib.metadata.requires(name) or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(canonicalize_name(requirement.name))
    return seen


# Imported only where installed, and needed by nothing the model does: pydicom's JPEG-LS decoder (octft's dev group),
# NVIDIA's management library that MLflow's GPU monitor and torch look for, Mako's syntax highlighter (via alembic).
OPTIONAL = {"pyjpegls", "nvidia-ml-py", "pygments"}


@pytest.mark.timeout(600)
def test_the_requirements_cover_every_package_the_model_code_imports():
    imported, modules = _imported_distributions("import octft.registry.pyfunc_code")
    assert "torch_xla" not in modules and "optuna" not in modules
    uncovered = imported - _closure(REQUIREMENTS) - {"octft"} - OPTIONAL
    assert not uncovered, f"the model's code imports {sorted(uncovered)}: add them to octft.registry.model.REQUIREMENTS"


LOAD_WITHOUT_OCTFT = """
import importlib.util, json, sys
from pathlib import Path
repo = Path(sys.argv[1]).resolve()
# The project's editable install puts the checkout on sys.path: take it off, so octft can come only from the model.
sys.path = [entry for entry in sys.path if not entry or Path(entry).resolve() != repo]
assert importlib.util.find_spec("octft") is None, "octft is still importable"
import mlflow, pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[2])
table = model.predict(pd.DataFrame({"path": json.loads(sys.argv[3])}))
print(json.dumps({"octft": sys.modules["octft"].__file__, "rows": json.loads(table.to_json(orient="records"))}))
"""


@pytest.mark.timeout(600)
def test_the_champion_predicts_where_octft_is_not_installed_and_pickle_is_refused(champion, tmp_path):
    root, trained, tracking_uri, _, _ = champion
    files = sorted((root / "data" / "retinal_oct" / "structural_oct").rglob("*.dcm"))[:3]
    paths = [str(file) for file in files] + [str(tmp_path / "missing.dcm")]
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PYTHON", "MLFLOW_"))}
    env.update(MLFLOW_TRACKING_URI=tracking_uri, MLFLOW_ALLOW_PICKLE_DESERIALIZATION="false")
    done = subprocess.run([sys.executable, "-I", "-c", LOAD_WITHOUT_OCTFT, str(REPO), f"models:/{MODEL_NAME}@champion",
                           json.dumps(paths)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=540)
    assert done.returncode == 0, done.stderr[-3000:]
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert not Path(answer["octft"]).resolve().is_relative_to(REPO), answer["octft"]  # the model's own copy

    rows = answer["rows"]
    assert [row["path"] for row in rows] == paths and rows[-1]["error"] and not any(row["error"] for row in rows[:-1])
    # `octft predict` of the same registered version, which reads the checkpoint with the checkout's octft.
    expected = predict(f"models:/{MODEL_NAME}@champion", files, tracking_uri=tracking_uri).table.set_index("path")
    columns = [f"prob_{name}" for name in CLASS_SHORT_NAMES]
    for row in rows[:-1]:
        np.testing.assert_allclose([row[column] for column in columns],
                                   expected.loc[row["path"], columns].astype(float), atol=1e-6)
        assert row["predicted_class"] == expected.loc[row["path"], "predicted_class"]
