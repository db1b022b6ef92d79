"""`octft predict`: a promoted model (or any checkpoint folder) on new OCT files, per volume and per participant.

A model is the champion `octft promote` registers, an MLflow `pyfunc` Model (`octft.registry.model`)
holding the folder a training run logs as its `checkpoint` artifact: `best.pt` (the best epoch's weights) beside
`config.yaml` (the resolved experiment config that built them, preprocessing included). `predict` takes a
registry URI `models:/<name>@<alias>` / `models:/<name>/<version>`, an MLflow Model folder or a bare checkpoint
folder; an MLflow Model is run through its own pyfunc, so `octft predict`, `mlflow.pyfunc.load_model` and
`mlflow models serve` give the same per-volume rows.

    >>> result = predict("models:/octft-demo@champion", ["scans/"], tracking_uri="sqlite:///mlflow.db")  # doctest: +SKIP
    >>> print(format_prediction(result))                                                              # doctest: +SKIP

Participant predictions average the logits of the participant's volumes, then apply softmax (computed from
the volumes' probabilities, which determine the logits up to a constant per volume): the same aggregation as the
validation and test figures (`octft.train.metrics.aggregate_by_participant`).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from octft.data.layout import CLASS_SHORT_NAMES
from octft.data.volume import OctReadError
from octft.errors import MissingInputError
from octft.models.checkpoint import CheckpointError
from octft.redaction import redact_url
from octft.registry.inference import (
    ERROR_COLUMN,
    PARTICIPANT_COLUMN,
    PATH_COLUMN,
    PROBABILITY_PREFIX,
    LoadedModel,
    classify_paths,
    load_checkpoint_folder,
)
from octft.registry.model import MLMODEL_FILE
from octft.stores import resolve_tracking_uri, sqlite_path
from octft.track.mlflow_store import MlflowStore, load_pyfunc
from octft.train.metrics import softmax

# Files a folder given as input contributes; a file named on the command line is read whatever its name.
OCT_SUFFIXES = (".dcm", ".dicom", ".nii", ".nii.gz", ".npy", ".npz")


@dataclass
class Prediction:
    """Per-volume and per-participant predictions; `failed` lists inputs that could not be read, with why."""

    model: str
    class_names: tuple[str, ...]
    volumes: list[dict[str, Any]] = field(default_factory=list)
    participants: list[dict[str, Any]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "classes": list(self.class_names),
            "volumes": self.volumes,
            "participants": self.participants,
            "failed": [{"file": file, "reason": reason} for file, reason in self.failed],
        }


def model_store(tracking_uri: str | None) -> MlflowStore:
    """The store to read models from; a SQLite file that does not exist is refused, not created (MLflow would create
    the database on first contact and then report the model missing: a mistyped path would hide the typo)."""
    uri = resolve_tracking_uri(tracking_uri)
    path = sqlite_path(uri)
    if path is not None and not path.is_file():
        raise MissingInputError(f"MLflow store {redact_url(uri)}: no such database file {path}; pass the --tracking-uri the sweep "
                                "logged to (e.g. sqlite:///demo/mlflow.db)")
    return MlflowStore(uri)


def resolve_model_folder(model_uri: str, *, tracking_uri: str | None = None, download_to: str | Path) -> Path:
    """The local folder of `model_uri`: itself, or downloaded from MLflow.

    The folder is an MLflow Model (what `octft promote` registers: it has an `MLmodel` file) or a run's checkpoint
    folder (best.pt beside config.yaml). `models:/<name>@<alias>` and `models:/<name>/<version>` resolve through the
    registry of `tracking_uri` (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db); `runs:/<run id>/<path>`
    works too.
    """
    if not model_uri.startswith(("models:/", "runs:/")):
        folder = Path(model_uri)
        if not folder.is_dir():
            raise CheckpointError(f"model {model_uri!r} is neither a models:/<name>@<alias> URI nor a model folder; give "
                                  "models:/<name>@champion, an MLflow Model folder, or a checkpoint folder holding "
                                  "best.pt and config.yaml")
        return folder
    store = model_store(tracking_uri)
    try:
        if model_uri.startswith("models:/"):
            version = store.model_version(model_uri)
            run_id, artifact_path = version.run_id, version.artifact_path
        else:
            run_id, _, artifact_path = model_uri[len("runs:/"):].partition("/")
        return store.download(run_id, artifact_path or "model", download_to)
    except MissingInputError as error:
        raise CheckpointError(f"model {model_uri!r} cannot be loaded: {error}; check the name and alias (`octft promote "
                              "SPEC` registers the champion) or pass --tracking-uri") from None


def load_model(model_uri: str, *, tracking_uri: str | None = None) -> LoadedModel:
    """The classifier behind a `models:/` URI, an MLflow Model folder or a checkpoint folder, on the CPU.

    An MLflow Model is loaded through its pyfunc, so this is the very object a served model runs.

    >>> loaded = load_model("models:/octft-demo@champion", tracking_uri="sqlite:///mlflow.db")  # doctest: +SKIP
    >>> loaded.config.data.preprocess.frames                                                 # doctest: +SKIP
    8
    """
    with tempfile.TemporaryDirectory(prefix="octft-model-") as download_to:
        folder = resolve_model_folder(model_uri, tracking_uri=tracking_uri, download_to=download_to)
        if (folder / MLMODEL_FILE).is_file():
            loaded = load_pyfunc(str(folder)).unwrap_python_model().loaded
            loaded.source = model_uri
            return loaded
        return load_checkpoint_folder(folder, source=model_uri)


def list_inputs(inputs: Iterable[str | Path]) -> list[Path]:
    """Files to predict: each named file, and every OCT file (by suffix) under each named folder, sorted."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.name.lower().endswith(OCT_SUFFIXES))
            if not found:
                raise OctReadError(str(path), f"no OCT files ({', '.join(OCT_SUFFIXES)}) in this folder")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise OctReadError(str(path), "no such file or folder")
    return files


def _predict_table(model_uri: str, inputs: Sequence[str | Path], *, tracking_uri: str | None,
                   batch_size: int) -> tuple[str, tuple[str, ...], pd.DataFrame]:
    """The prediction table of `inputs` from the model at `model_uri`, through the model's own pyfunc when it is an
    MLflow Model (so `octft predict` and a served champion run the same code)."""
    with tempfile.TemporaryDirectory(prefix="octft-model-") as download_to:
        folder = resolve_model_folder(model_uri, tracking_uri=tracking_uri, download_to=download_to)
        files = [str(path) for path in list_inputs(inputs)]
        if not (folder / MLMODEL_FILE).is_file():
            loaded = load_checkpoint_folder(folder, source=model_uri)
            return model_uri, loaded.class_names, classify_paths(loaded, files, batch_size=batch_size)
        pyfunc = load_pyfunc(str(folder))
    class_names = tuple(pyfunc.metadata.metadata.get("octft.classes", CLASS_SHORT_NAMES))
    return model_uri, class_names, pyfunc.predict(pd.DataFrame({PATH_COLUMN: list(files)}))


def predict(
    model: str | LoadedModel, inputs: Sequence[str | Path], *, tracking_uri: str | None = None, batch_size: int = 8
) -> Prediction:
    """Read, preprocess (with the model's own settings) and classify every input file.

    A file that cannot be read lands in `Prediction.failed` with the reason; the rest are still predicted.
    """
    if isinstance(model, LoadedModel):
        files = [str(path) for path in list_inputs(inputs)]
        source, class_names, table = model.source, model.class_names, classify_paths(model, files, batch_size=batch_size)
    else:
        source, class_names, table = _predict_table(model, inputs, tracking_uri=tracking_uri, batch_size=batch_size)
    result = Prediction(source, class_names)
    failed = table[ERROR_COLUMN].fillna("") != ""
    result.failed = list(zip(table.loc[failed, PATH_COLUMN], table.loc[failed, ERROR_COLUMN]))
    ok = table[~failed]
    probabilities = ok[[f"{PROBABILITY_PREFIX}{name}" for name in class_names]].to_numpy(dtype=np.float64)
    participants = ok[PARTICIPANT_COLUMN].tolist()
    for path, participant_id, row in zip(ok[PATH_COLUMN], participants, probabilities):
        result.volumes.append(_entry({"file": path, "participant_id": participant_id}, row, class_names))

    # softmax(mean of log-probabilities) equals softmax(mean of logits): a row's log-softmax differs from its
    # logits by one constant per row, which the mean carries to every class alike.
    log_probabilities = np.log(np.maximum(probabilities, np.finfo(np.float64).tiny))
    for participant_id in dict.fromkeys(participants):  # first appearance
        rows = [index for index, other in enumerate(participants) if other == participant_id]
        mean = softmax(log_probabilities[rows].mean(axis=0, keepdims=True))[0]
        result.participants.append(_entry({"participant_id": participant_id, "volumes": len(rows)}, mean, class_names))
    return result


def _entry(head: dict[str, Any], probabilities: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    return {
        **head,
        "predicted_class": class_names[int(np.argmax(probabilities))],
        "probabilities": {name: float(p) for name, p in zip(class_names, probabilities)},
    }


def format_prediction(result: Prediction) -> str:
    """Plain-text tables: one line per volume, then one per participant, then the files that failed."""
    names = result.class_names
    header = "  ".join(f"{name:>11}" for name in names)
    lines = [f"model: {result.model}", "", f"{'volume':<50}  {'participant':>11}  {'predicted':>11}  {header}"]
    for entry in result.volumes:
        file = entry["file"] if len(entry["file"]) <= 50 else "..." + entry["file"][-47:]
        probabilities = "  ".join(f"{entry['probabilities'][name]:>11.4f}" for name in names)
        lines.append(f"{file:<50}  {entry['participant_id']:>11}  {entry['predicted_class']:>11}  {probabilities}")
    lines += ["", f"{'participant':<50}  {'volumes':>11}  {'predicted':>11}  {header}"]
    for entry in result.participants:
        probabilities = "  ".join(f"{entry['probabilities'][name]:>11.4f}" for name in names)
        lines.append(f"{entry['participant_id']:<50}  {entry['volumes']:>11}  {entry['predicted_class']:>11}  {probabilities}")
    if result.failed:
        lines += ["", f"{len(result.failed)} file(s) could not be read:"]
        lines += [f"  {file}: {reason}" for file, reason in result.failed]
    return "\n".join(lines)
