"""`octft predict`: a promoted model (or any checkpoint folder) on new OCT files, per volume and per participant.

A model is the champion `octft promote` registers, an MLflow `pyfunc` Model (`octft.registry.model`)
holding the folder a training run logs as its `checkpoint` artifact: `best.pt` (the best epoch's weights and the
resolved experiment config that built them, preprocessing included). `predict` takes a registry URI
`models:/<name>@<alias>` / `models:/<name>/<version>`, an MLflow Model folder or a bare checkpoint folder. It
reads the checkpoint as data and runs octft's own code on it (`classify_paths`, the code the Model's pyfunc runs),
so `octft predict`, `mlflow.pyfunc.load_model` and `mlflow models serve` give the same per-volume rows, in the same
columns (`output_columns`), while no pickle or code inside a model artifact is ever loaded by octft.

As training did, `predict` leaves out volumes outside the model's training selection (`data.selection`: regions,
devices, lateralities, known from the path and the file's tags): their rows say why instead of a class, and
`summary` counts them by reason; `all_volumes=True` (`--all-volumes`) classifies every volume.

    >>> result = predict("models:/octft-demo@champion", ["scans/"], tracking_uri="sqlite:///mlflow.db")  # doctest: +SKIP
    >>> print(format_prediction(result))                                                              # doctest: +SKIP
    >>> write_prediction_csv(result, "predictions.csv")                                               # doctest: +SKIP

Participant predictions average the logits of the participant's volumes, then apply softmax (computed from
the volumes' probabilities, which determine the logits up to a constant per volume): the same aggregation as the
validation and test figures (`octft.train.metrics.aggregate_by_participant`).
"""

from __future__ import annotations

import tempfile
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from octft.data.volume import OctReadError
from octft.errors import MissingInputError, UsageError
from octft.io import DiskFullError, atomic_file, file_kind
from octft.models.checkpoint import CheckpointError
from octft.registry.inference import (
    ERROR_COLUMN,
    OUTSIDE_SELECTION,
    PARTICIPANT_COLUMN,
    PATH_COLUMN,
    PREDICTED_COLUMN,
    PROBABILITY_PREFIX,
    LoadedModel,
    classify_paths,
    empty_row,
    load_checkpoint_folder,
    prediction_table,
)
from octft.registry.model import CHECKPOINT_KEY, MLMODEL_FILE
from octft.track.mlflow_store import MlflowStore
from octft.train.metrics import softmax

# Files a folder given as input contributes; a file named on the command line is read whatever its name.
OCT_SUFFIXES = (".dcm", ".dicom", ".nii", ".nii.gz", ".npy", ".npz")


@dataclass
class Prediction:
    """The prediction table (`octft.registry.inference.output_columns`: the pyfunc's and the server's columns, one
    row per input file, classified, failed or outside the training selection) and its per-participant means."""

    model: str
    class_names: tuple[str, ...]
    table: pd.DataFrame
    participants: list[dict[str, Any]] = field(default_factory=list)
    selection: dict[str, Any] | None = None  # the training selection applied; None with --all-volumes

    @property
    def skipped(self) -> Counter[str]:
        """Volumes outside the model's training selection, by reason (`region 'optic_disc' not in ['macula']`)."""
        errors = self.table[ERROR_COLUMN]
        return Counter(error[len(OUTSIDE_SELECTION):] for error in errors if error.startswith(OUTSIDE_SELECTION))

    @property
    def failed(self) -> list[tuple[str, str]]:
        """(path, reason) of every file that could not be read or classified."""
        return [(path, error) for path, error in zip(self.table[PATH_COLUMN], self.table[ERROR_COLUMN])
                if error and not error.startswith(OUTSIDE_SELECTION)]

    def classified(self) -> pd.DataFrame:
        return self.table[self.table[ERROR_COLUMN] == ""]

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "classes": list(self.class_names),
            "selection": self.selection,
            "volumes": self.table.to_dict(orient="records"),
            "participants": self.participants,
            "skipped": dict(self.skipped),
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
    model: str | LoadedModel, inputs: Sequence[str | Path], *, tracking_uri: str | None = None, batch_size: int = 8,
    all_volumes: bool = False, progress: bool = False,
) -> Prediction:
    """Read, preprocess (with the model's own settings) and classify every input file.

    A file that cannot be read gets its reason in its row's `error`; so does a volume outside the model's training
    selection (`data.selection`: regions, devices, lateralities), which is not classified unless `all_volumes`.
    `progress` shows a bar on stderr.
    """
    if not isinstance(model, LoadedModel):
        model = load_model(model, tracking_uri=tracking_uri)
    files, refused = list_inputs(inputs)
    names = model.class_names
    table = classify_paths(model, [str(path) for path in files], batch_size=batch_size, select=not all_volumes,
                           progress=progress)
    if refused:
        rows = [empty_row(names, **{PATH_COLUMN: path, ERROR_COLUMN: reason}) for path, reason in refused]
        table = pd.concat([table, prediction_table(rows, names)], ignore_index=True)
    selection = None if all_volumes else model.config.data.selection.model_dump(exclude={"per_participant"})
    result = Prediction(model.source, names, table, selection=selection)

    ok = result.classified()
    probabilities = ok[[f"{PROBABILITY_PREFIX}{name}" for name in names]].to_numpy(dtype=np.float64)
    participants = ok[PARTICIPANT_COLUMN].tolist()
    # softmax(mean of log-probabilities) equals softmax(mean of logits): a row's log-softmax differs from its
    # logits by one constant per row, which the mean carries to every class alike.
    log_probabilities = np.log(np.maximum(probabilities, np.finfo(np.float64).tiny))
    for participant_id in dict.fromkeys(participants):  # first appearance
        rows = [index for index, other in enumerate(participants) if other == participant_id]
        mean = softmax(log_probabilities[rows].mean(axis=0, keepdims=True))[0]
        result.participants.append({
            PARTICIPANT_COLUMN: participant_id, "volumes": len(rows),
            **{f"{PROBABILITY_PREFIX}{name}": float(p) for name, p in zip(names, mean)},
            PREDICTED_COLUMN: names[int(np.argmax(mean))],
        })
    return result


def write_prediction_csv(result: Prediction, path: str | Path) -> Path:
    """Write the prediction table (the pyfunc's columns) to the CSV file `path`, whole or not at all."""
    path = Path(path)
    try:
        with atomic_file(path) as temp:
            result.table.to_csv(temp, index=False)
    except DiskFullError:
        raise
    except OSError as error:
        raise UsageError(f"--out {path}: cannot write it ({error.strerror or error}); give a writable path") from None
    return path


def format_prediction(result: Prediction, *, volumes: bool = True) -> str:
    """Plain text: the prediction table (without `id`, which only a REST client sets) unless not `volumes`, one
    line per participant, then what was skipped and what failed."""
    names = result.class_names
    probability_columns = [f"{PROBABILITY_PREFIX}{name}" for name in names]
    header = "  ".join(f"{column:>14}" for column in probability_columns)

    def probabilities(row: dict[str, Any]) -> str:
        return "  ".join(" " * 14 if row[column] is None else f"{row[column]:>14.4f}" for column in probability_columns)

    lines = [f"model: {result.model}"]
    if volumes:
        lines += ["", f"{PATH_COLUMN:<50}  {PARTICIPANT_COLUMN:>14}  {header}  {PREDICTED_COLUMN:>15}  {ERROR_COLUMN}"]
        for row in result.table.to_dict(orient="records"):
            path = row[PATH_COLUMN] if len(row[PATH_COLUMN]) <= 50 else "..." + row[PATH_COLUMN][-47:]
            lines.append(f"{path:<50}  {row[PARTICIPANT_COLUMN]:>14}  {probabilities(row)}  "
                         f"{row[PREDICTED_COLUMN]:>15}  {row[ERROR_COLUMN]}".rstrip())
    lines += ["", f"{PARTICIPANT_COLUMN:<50}  {'volumes':>14}  {header}  {PREDICTED_COLUMN:>15}"]
    for entry in result.participants:
        lines.append(f"{entry[PARTICIPANT_COLUMN]:<50}  {entry['volumes']:>14}  {probabilities(entry)}  "
                     f"{entry[PREDICTED_COLUMN]:>15}")
    lines += ["", summary(result)]
    if result.failed:
        lines += [f"{len(result.failed)} file(s) could not be read:"]
        lines += [f"  {file}: {reason}" for file, reason in result.failed]
    return "\n".join(lines)


def summary(result: Prediction) -> str:
    """One line (more when volumes were skipped): how many volumes were classified, skipped and failed."""
    skipped = result.skipped
    line = (f"{len(result.classified())} classified, {sum(skipped.values())} outside the training selection, "
            f"{len(result.failed)} failed, of {len(result.table)} files")
    if not skipped:
        return line
    rules = ", ".join(f"{key}={value}" for key, value in (result.selection or {}).items() if value is not None)
    reasons = [f"  {count} skipped: {reason}" for reason, count in skipped.most_common()]
    return "\n".join([line + f" (training selection: {rules}; --all-volumes classifies every volume)", *reasons])
