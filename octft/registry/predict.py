"""`octft predict`: a promoted model (or any checkpoint folder) on new OCT files, per volume and per participant.

A model is the champion `octft promote` registers, an MLflow `pyfunc` Model (`octft.registry.model`)
holding the folder a training run logs as its `checkpoint` artifact: `best.pt` (the best epoch's weights and the
resolved experiment config that built them, preprocessing included). `predict` takes a registry URI
`models:/<name>@<alias>` / `models:/<name>/<version>`, an MLflow Model folder or a bare checkpoint folder. It
reads the checkpoint as data and runs octft's own code on it (`classify_paths`, the code the Model's pyfunc runs),
so `octft predict`, `mlflow.pyfunc.load_model` and `mlflow models serve` give the same per-volume rows while no
pickle or code inside a model artifact is ever loaded by octft.

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

from octft.data.volume import OctReadError
from octft.errors import MissingInputError
from octft.io import file_kind
from octft.models.checkpoint import CheckpointError
from octft.registry.inference import (
    ERROR_COLUMN,
    PARTICIPANT_COLUMN,
    PATH_COLUMN,
    PROBABILITY_PREFIX,
    LoadedModel,
    classify_paths,
    load_checkpoint_folder,
)
from octft.registry.model import CHECKPOINT_KEY, MLMODEL_FILE
from octft.track.mlflow_store import MlflowStore
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
    return MlflowStore(tracking_uri, must_exist=True)


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


def checkpoint_folder(folder: Path) -> Path:
    """The checkpoint folder of a model folder: an MLflow Model's `checkpoint` artifact, or `folder` itself.

    octft reads a model's weights and config as data (`torch.load(weights_only=True)`, JSON): it never unpickles the
    Model's `python_model.pkl` or runs code a model artifact holds, so a tampered registered model cannot run code
    through `octft predict` or `octft promote`.
    """
    if not (folder / MLMODEL_FILE).is_file():
        return folder
    inside = folder / "artifacts" / CHECKPOINT_KEY
    if not inside.is_dir() or inside.is_symlink():
        raise CheckpointError(f"MLflow Model {folder} holds no artifacts/{CHECKPOINT_KEY}/ folder: it was not "
                              "registered by `octft promote`; promote the trial again")
    return inside


def load_model(model_uri: str, *, tracking_uri: str | None = None) -> LoadedModel:
    """The classifier behind a `models:/` URI, an MLflow Model folder or a checkpoint folder, on the CPU: the
    checkpoint a served model loads, read without running any of the model's code (`checkpoint_folder`).

    >>> loaded = load_model("models:/octft-demo@champion", tracking_uri="sqlite:///mlflow.db")  # doctest: +SKIP
    >>> loaded.config.data.preprocess.frames                                                 # doctest: +SKIP
    8
    """
    with tempfile.TemporaryDirectory(prefix="octft-model-") as download_to:
        folder = resolve_model_folder(model_uri, tracking_uri=tracking_uri, download_to=download_to)
        return load_checkpoint_folder(checkpoint_folder(folder), source=model_uri)


def list_inputs(inputs: Iterable[str | Path]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Files to predict: each named file, and every OCT file (by suffix) under each named folder, sorted; and the
    entries of those folders that are not regular files (FIFOs, devices, broken links), each with what it is, so
    that nothing found is skipped without a word."""
    files: list[Path] = []
    refused: list[tuple[str, str]] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.name.lower().endswith(OCT_SUFFIXES) and not p.is_dir())
            if not found:
                raise OctReadError(str(path), f"no OCT files ({', '.join(OCT_SUFFIXES)}) in this folder")
            for entry in found:
                if entry.is_file():
                    files.append(entry)
                else:
                    refused.append((str(entry), _not_a_file(entry)))
        elif path.is_file():
            files.append(path)
        else:
            raise OctReadError(str(path), _not_a_file(path))
    return files, refused


def _not_a_file(path: Path) -> str:
    try:
        return f"is {file_kind(path.stat().st_mode)}, not a regular file"
    except FileNotFoundError:
        return "a broken link" if path.is_symlink() else "no such file or folder"
    except OSError as error:
        return f"cannot be read ({error.strerror})"


def predict(
    model: str | LoadedModel, inputs: Sequence[str | Path], *, tracking_uri: str | None = None, batch_size: int = 8
) -> Prediction:
    """Read, preprocess (with the model's own settings) and classify every input file.

    A file that cannot be read lands in `Prediction.failed` with the reason; the rest are still predicted.
    """
    if not isinstance(model, LoadedModel):
        model = load_model(model, tracking_uri=tracking_uri)
    files, refused = list_inputs(inputs)
    class_names, table = model.class_names, classify_paths(model, [str(path) for path in files], batch_size=batch_size)
    result = Prediction(model.source, class_names)
    failed = table[ERROR_COLUMN].fillna("") != ""
    result.failed = [*refused, *zip(table.loc[failed, PATH_COLUMN], table.loc[failed, ERROR_COLUMN])]
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
