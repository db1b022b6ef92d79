"""A trained classifier on new volumes: loading a checkpoint folder, and classifying files the way training saw them.

A checkpoint folder is what a run logs as its `checkpoint` artifact: `best.pt` (the best epoch's weights) beside
`config.yaml` (the resolved config that built them), so its preprocessing (frame picking, resize, intensity) comes
with it. The champion's MLflow Model (`octft.registry.model`), `octft predict` and promotion's test scores all run
these functions.

    >>> loaded = load_checkpoint_folder(Path("runs/demo/checkpoint"), source="runs/demo")    # doctest: +SKIP
    >>> classify_paths(loaded, ["scan.dcm"])[["predicted_class", "error"]]                # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from octft.config import ExperimentConfig, load_experiment
from octft.data.ids import canonical_participant_id
from octft.data.layout import CLASS_SHORT_NAMES
from octft.data.preprocess import Preprocessing, preprocess
from octft.data.readers import read_volume
from octft.data.volume import OctReadError
from octft.errors import OctftError
from octft.models.checkpoint import CheckpointError
from octft.train.metrics import softmax
from octft.train.runtime import load_state
from octft.train.setup import build_model

CHECKPOINT_FILE = "best.pt"
CONFIG_FILE = "config.yaml"
# The prediction table's columns: one row per input path.
PATH_COLUMN = "path"
PARTICIPANT_COLUMN = "participant_id"
PREDICTED_COLUMN = "predicted_class"
ERROR_COLUMN = "error"
PROBABILITY_PREFIX = "prob_"


def output_columns(class_names: Sequence[str] = CLASS_SHORT_NAMES) -> list[str]:
    """The columns of a prediction table, in order."""
    return [PATH_COLUMN, PARTICIPANT_COLUMN, *(f"{PROBABILITY_PREFIX}{name}" for name in class_names),
            PREDICTED_COLUMN, ERROR_COLUMN]


@dataclass
class LoadedModel:
    """A classifier in eval mode on the CPU, the config that built it, and where it came from."""

    model: torch.nn.Module
    config: ExperimentConfig
    source: str
    class_names: tuple[str, ...] = CLASS_SHORT_NAMES


def load_checkpoint_folder(folder: Path, *, source: str) -> LoadedModel:
    """The classifier of a checkpoint folder (best.pt + config.yaml), with its weights, in eval mode on the CPU."""
    missing = [name for name in (CHECKPOINT_FILE, CONFIG_FILE) if not (folder / name).is_file()]
    if missing:
        raise CheckpointError(
            f"model {source!r} ({folder}) lacks {', '.join(missing)}; a model folder is an MLflow Model "
            "(octft promote) or a run's checkpoint/ folder: best.pt beside the config.yaml it was trained with"
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
            f"{source}: {CHECKPOINT_FILE} does not fit the model of its config.yaml ({first_line})"
        ) from None
    model.eval()
    return LoadedModel(model, config, source)


def classify_paths(loaded: LoadedModel, paths: Sequence[str], *, batch_size: int = 8) -> pd.DataFrame:
    """One row per path, in order: path, participant_id, prob_<class>..., predicted_class, error.

    This is what the champion's pyfunc returns. A file that cannot be read or preprocessed gets its reason
    in `error` (probabilities NaN, no class) instead of failing the others.
    """
    spec = Preprocessing(**loaded.config.data.preprocess.model_dump())
    names = loaded.class_names
    rows: list[dict[str, Any]] = []
    clips, read = [], []
    for path in paths:
        row: dict[str, Any] = {PATH_COLUMN: path, PARTICIPANT_COLUMN: "", PREDICTED_COLUMN: "", ERROR_COLUMN: ""}
        row.update({f"{PROBABILITY_PREFIX}{name}": math.nan for name in names})
        rows.append(row)
        try:
            volume = read_volume(path)
            clip = preprocess(volume.array, spec)
        except OctReadError as error:
            row[ERROR_COLUMN] = error.reason
            continue
        except (OctftError, OSError) as error:
            row[ERROR_COLUMN] = f"cannot read the volume: {error}"
            continue
        except ValueError as error:  # preprocess refuses NaN, empty or non-3-D arrays
            row[ERROR_COLUMN] = f"cannot preprocess the volume: {error}"
            continue
        row[PARTICIPANT_COLUMN] = participant_of(Path(path), volume.meta)
        clips.append(clip)
        read.append(row)
    logits = predict_logits(loaded.model, clips.__getitem__, len(clips), batch_size=batch_size)
    for row, probabilities in zip(read, softmax(logits)):
        row.update({f"{PROBABILITY_PREFIX}{name}": float(p) for name, p in zip(names, probabilities)})
        row[PREDICTED_COLUMN] = names[int(np.argmax(probabilities))]
    return pd.DataFrame(rows, columns=output_columns(names))


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
            # As it comes (float32 clips, or a pack's uint8 / float16 rows): the model converts it.
            x = torch.from_numpy(batch).unsqueeze(1)  # (B, 1, T, H, W)
            rows.append(model(x).float().numpy())
    if not rows:
        return np.zeros((0, len(CLASS_SHORT_NAMES)))
    return np.concatenate(rows).astype(np.float64)


def participant_of(path: Path, meta: dict[str, Any]) -> str:
    """The file's participant: its metadata's participant_id, else its folder's name, else the file itself."""
    return (
        canonical_participant_id(meta.get("participant_id"))
        or canonical_participant_id(path.parent.name)
        or str(path)
    )
