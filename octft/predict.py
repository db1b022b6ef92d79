"""`octft predict`: a promoted model (or any checkpoint folder) on new OCT files, per volume and per participant.

A model is the folder a training run logs as its `checkpoint` artifact: `best.pt` (the best epoch's weights)
beside `config.yaml` (the resolved experiment config that built them). `load_model` takes that folder, or a
registry URI `models:/<name>@<alias>` / `models:/<name>/<version>` that MLflow resolves to it.

    >>> result = predict("models:/octft-demo@champion", ["scans/"], tracking_uri="sqlite:///mlflow.db")  # doctest: +SKIP
    >>> print(format_prediction(result))                                                              # doctest: +SKIP

Participant predictions average the logits of the participant's volumes, then apply softmax: the same
aggregation as the validation and test figures (`octft.train.metrics.aggregate_by_participant`).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from octft.config import ExperimentConfig, load_experiment
from octft.data.ids import canonical_participant_id
from octft.data.layout import CLASS_SHORT_NAMES
from octft.data.volume import OctReadError
from octft.models.checkpoint import CheckpointError

CHECKPOINT_FILE = "best.pt"
CONFIG_FILE = "config.yaml"
# Files a folder given as input contributes; a file named on the command line is read whatever its name.
OCT_SUFFIXES = (".dcm", ".dicom", ".nii", ".nii.gz", ".npy", ".npz")


@dataclass
class LoadedModel:
    """A classifier in eval mode on the CPU, the config that built it, and where it came from."""

    model: torch.nn.Module
    config: ExperimentConfig
    source: str
    class_names: tuple[str, ...] = CLASS_SHORT_NAMES


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


def resolve_checkpoint_folder(model_uri: str, *, tracking_uri: str | None = None, download_to: str | Path) -> Path:
    """The local folder holding `best.pt` and `config.yaml`: `model_uri` itself, or downloaded from MLflow.

    `models:/...` URIs resolve through the model registry of `tracking_uri` (default: $MLFLOW_TRACKING_URI,
    else sqlite:///mlflow.db); `runs:/<run_id>/checkpoint` works too.
    """
    if not model_uri.startswith(("models:/", "runs:/")):
        folder = Path(model_uri)
        if not folder.is_dir():
            raise CheckpointError(
                f"model {model_uri!r} is neither a models:/<name>@<alias> URI nor a checkpoint folder; give "
                "models:/<name>@champion or a folder holding best.pt and config.yaml"
            )
        return folder

    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from octft.track.mlflow_tracker import redact, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    # An explicit client for both the runs and the registry: mlflow's module-level helpers resolve models:/
    # through process-wide settings, which a library call must neither depend on nor change.
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        if model_uri.startswith("models:/"):
            reference = model_uri[len("models:/"):].strip("/")
            if "@" in reference:
                name, alias = reference.split("@", 1)
                version = client.get_model_version_by_alias(name, alias)
            else:
                name, _, number = reference.partition("/")
                version = client.get_model_version(name, number)
            run_id, source = version.run_id, version.source
            artifact_path = source.split(f"runs:/{run_id}/", 1)[1] if source.startswith("runs:/") else "checkpoint"
        else:
            run_id, _, artifact_path = model_uri[len("runs:/"):].partition("/")
        local = client.download_artifacts(run_id, artifact_path or "checkpoint", str(download_to))
    except MlflowException as error:
        raise CheckpointError(
            f"model {model_uri!r} cannot be loaded from the MLflow store {redact(uri)}: {error.message}; check the "
            "name and alias (`octft promote SPEC` registers the champion) or pass --tracking-uri"
        ) from None
    return Path(local)


def load_model(model_uri: str, *, tracking_uri: str | None = None) -> LoadedModel:
    """The classifier of a checkpoint folder or a `models:/` URI, with its weights, in eval mode on the CPU.

    >>> loaded = load_model("models:/octft-demo@champion", tracking_uri="sqlite:///mlflow.db")  # doctest: +SKIP
    >>> loaded.config.data.preprocess.frames                                                 # doctest: +SKIP
    8
    """
    from octft.train.recipe import build_model
    from octft.train.runtime import load_state

    with tempfile.TemporaryDirectory(prefix="octft-model-") as download_to:
        folder = resolve_checkpoint_folder(model_uri, tracking_uri=tracking_uri, download_to=download_to)
        missing = [name for name in (CHECKPOINT_FILE, CONFIG_FILE) if not (folder / name).is_file()]
        if missing:
            raise CheckpointError(
                f"model {model_uri!r} ({folder}) lacks {', '.join(missing)}; a model folder is a run's "
                "checkpoint/ folder: best.pt beside the config.yaml it was trained with"
            )
        config = load_experiment(folder / CONFIG_FILE)
        state = load_state(folder / CHECKPOINT_FILE, required=("model",))
    # The fine-tuned weights replace every encoder weight: do not read the pretraining checkpoint again.
    config.model.checkpoint = None
    model, _ = build_model(config, len(CLASS_SHORT_NAMES))
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, TypeError) as error:  # keys or shapes of another model
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(
            f"{model_uri}: {CHECKPOINT_FILE} does not fit the model of its config.yaml ({first_line})"
        ) from None
    model.eval()
    return LoadedModel(model, config, model_uri)


def predict_logits(
    model: torch.nn.Module, clip: Callable[[int], np.ndarray], count: int, *, batch_size: int = 8
) -> np.ndarray:
    """Logits (count, C) float64 of clips `clip(0)`, ..., `clip(count - 1)`, each (frames, height, width).

    Clips are fetched one batch at a time, so a large test split never sits in memory at once.
    """
    rows = []
    model.eval()
    with torch.inference_mode():
        for start in range(0, count, batch_size):
            batch = np.stack([clip(index) for index in range(start, min(start + batch_size, count))])
            x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).unsqueeze(1)  # (B, 1, T, H, W)
            rows.append(model(x).float().numpy())
    if not rows:
        return np.zeros((0, len(CLASS_SHORT_NAMES)))
    return np.concatenate(rows).astype(np.float64)


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


def participant_of(path: Path, meta: dict[str, Any]) -> str:
    """The file's participant: its metadata's participant_id, else its folder's name, else the file itself."""
    return (
        canonical_participant_id(meta.get("participant_id"))
        or canonical_participant_id(path.parent.name)
        or str(path)
    )


def predict(
    model: str | LoadedModel, inputs: Sequence[str | Path], *, tracking_uri: str | None = None, batch_size: int = 8
) -> Prediction:
    """Read, preprocess (with the model's own settings) and classify every input file.

    A file that cannot be read lands in `Prediction.failed` with the reason; the rest are still predicted.
    """
    from octft.data.preprocess import Preprocessing, preprocess
    from octft.data.readers import read_volume
    from octft.train.metrics import softmax

    loaded = model if isinstance(model, LoadedModel) else load_model(model, tracking_uri=tracking_uri)
    spec = Preprocessing(**loaded.config.data.preprocess.model_dump())
    files = list_inputs(inputs)
    clips, participants, read = [], [], []
    result = Prediction(loaded.source, loaded.class_names)
    for path in files:
        try:
            volume = read_volume(path)
            clip = preprocess(volume.array, spec)
        except OctReadError as error:
            result.failed.append((str(path), error.reason))
            continue
        except ValueError as error:  # preprocess refuses NaN, empty or non-3-D arrays
            result.failed.append((str(path), f"cannot preprocess the volume: {error}"))
            continue
        clips.append(clip)
        participants.append(participant_of(path, volume.meta))
        read.append(path)

    logits = predict_logits(loaded.model, clips.__getitem__, len(clips), batch_size=batch_size)
    for path, participant_id, row in zip(read, participants, softmax(logits)):
        result.volumes.append(_entry({"file": str(path), "participant_id": participant_id}, row, loaded.class_names))

    order = list(dict.fromkeys(participants))  # first appearance
    for participant_id in order:
        rows = [index for index, other in enumerate(participants) if other == participant_id]
        probabilities = softmax(logits[rows].mean(axis=0, keepdims=True))[0]
        result.participants.append(
            _entry({"participant_id": participant_id, "volumes": len(rows)}, probabilities, loaded.class_names)
        )
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
