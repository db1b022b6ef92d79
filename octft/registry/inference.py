"""A trained classifier on new volumes: loading a checkpoint folder, and classifying files the way training saw them.

A checkpoint folder is what a run logs as its `checkpoint` artifact: `best.pt` (the best epoch's weights) beside
`config.yaml` (the resolved config that built them), so its preprocessing (frame picking, resize, intensity) comes
with it. The champion's MLflow Model (`octft.registry.model`), `octft predict` and promotion's test scores all run
these functions.

    >>> loaded = load_checkpoint_folder(Path("runs/demo/checkpoint"), source="runs/demo")    # doctest: +SKIP
    >>> classify_paths(loaded, ["scan.dcm"])[["predicted_class", "error"]]                # doctest: +SKIP

Two callers, two answers for a path that cannot be used. `octft predict` (`classify_paths`) runs on the user's
own machine with the user's own paths: its `error` says precisely why (file not found, a FIFO, not DICOM ...).
The served model (`serve_paths`, the pyfunc behind `mlflow models serve`) answers clients it does not know, so a
reason must not tell them which files exist on the server:

- with `$OCTFT_PREDICT_ROOT` set, it reads only regular files inside that folder: a relative path is taken under
  it, and a path leading out of it (absolute, `..`, or a link, all resolved first) is never opened. Every path it
  cannot open (missing, unreadable, outside the root, not a regular file) gets the one answer `UNREADABLE_PATH`;
  a file inside the root that opens but does not decode keeps its precise reason (the root is what it serves).
- without it (a model loaded in one's own session), paths are read as given, and every failure, decoding
  included, gets the one answer `UNREADABLE_PATH`: `octft predict` or the root gives the reasons. A server
  should always set `$OCTFT_PREDICT_ROOT`.
- a null, NaN or empty path is a row with the error `NO_PATH`, never the path "None" or "nan".

A volume that reads but holds no image (constant, or B-scans under `MIN_SIDE` pixels a side) gets its reason in
`error` and NaN probabilities, like an unreadable file, instead of a confident class.
"""

from __future__ import annotations

import json
import math
import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from octft.config import ExperimentConfig, load_experiment_dict
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
# The folder a served model may read volumes from (see the module's docstring).
PREDICT_ROOT_ENV = "OCTFT_PREDICT_ROOT"
UNREADABLE_PATH = f"cannot read this path: missing, unreadable, not a regular file, or outside ${PREDICT_ROOT_ENV}"
NO_PATH = "no path given"
# The smallest B-scan side worth classifying: the smallest clip side a config allows (data.preprocess.height and
# width >= 8). A smaller image, even 1 x 1 pixel, would be stretched into a clip and classified with confidence.
MIN_SIDE = 8


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
    """The classifier of a checkpoint folder's best.pt, rebuilt from the config inside it (never from a file beside
    it, which a later run in the same folder could have rewritten), with its weights, in eval mode on the CPU."""
    if not (folder / CHECKPOINT_FILE).is_file():
        raise CheckpointError(
            f"model {source!r} ({folder}) lacks {CHECKPOINT_FILE}; a model folder is an MLflow Model (octft promote) "
            "or a run's checkpoint/ folder"
        )
    state = load_state(folder / CHECKPOINT_FILE, required=("model",))
    if not state.get("config"):
        raise CheckpointError(f"{folder / CHECKPOINT_FILE} carries no config (written by an earlier octft, or not by "
                              "octft train); train the model again with this octft")
    try:
        tree = json.loads(state["config"])
    except (TypeError, ValueError):
        raise CheckpointError(f"{folder / CHECKPOINT_FILE}: its config entry is not JSON; train the model again") from None
    config = load_experiment_dict(tree, source=f"{folder / CHECKPOINT_FILE} (its config)")
    # The fine-tuned weights replace every encoder weight: do not read the pretraining checkpoint again.
    config.model.checkpoint = None
    model, _ = build_model(config, len(CLASS_SHORT_NAMES))
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, TypeError) as error:  # keys or shapes of another model
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(
            f"{source}: {CHECKPOINT_FILE} does not fit the model of its own config ({first_line})"
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
            problem = degenerate(volume.array)
            if problem is not None:
                row[ERROR_COLUMN] = problem
                continue
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


def degenerate(array: np.ndarray) -> str | None:
    """Why the volume `array` (frames, height, width) holds no image to classify, or None when it holds one."""
    height, width = array.shape[1:]
    if height < MIN_SIDE or width < MIN_SIDE:
        return f"too small to classify: B-scans of {height} x {width} pixels (at least {MIN_SIDE} x {MIN_SIDE})"
    low, high = array.min(), array.max()
    if low == high:
        return f"a constant volume (every pixel is {low.item():g}): no image to classify"
    return None


def serve_paths(loaded: LoadedModel, values: Sequence[Any], *, batch_size: int = 8) -> pd.DataFrame:
    """What the served model answers for the `path` column a client sent: `classify_paths`, with the paths
    confined to `$OCTFT_PREDICT_ROOT` and one answer for every path it cannot use (see the module's docstring)."""
    root = os.environ.get(PREDICT_ROOT_ENV) or None
    given = [_given_path(value) for value in values]
    openable = {index: path for index, text in enumerate(given)
                if text is not None and (path := _confined(text, root)) is not None and _is_regular_file(path)}
    table = classify_paths(loaded, list(openable.values()), batch_size=batch_size)
    answered = dict(zip(openable, table.to_dict("records")))
    rows = []
    for index, text in enumerate(given):
        row = answered.get(index) or {column: "" for column in output_columns(loaded.class_names)}
        row[PATH_COLUMN] = text or ""  # as the client gave it, never the path it resolved to
        if text is None:
            row[ERROR_COLUMN] = NO_PATH
        elif index not in answered or (root is None and row[ERROR_COLUMN]):
            row[ERROR_COLUMN] = UNREADABLE_PATH
        if row[ERROR_COLUMN]:
            row.update({f"{PROBABILITY_PREFIX}{name}": math.nan for name in loaded.class_names})
            row[PARTICIPANT_COLUMN] = row[PREDICTED_COLUMN] = ""
        rows.append(row)
    return pd.DataFrame(rows, columns=output_columns(loaded.class_names))


def _given_path(value: Any) -> str | None:
    """A client's path as text; None for a null, NaN or empty value (pandas turns a JSON null into None or NaN)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value)
    return text if text.strip() else None


def _confined(text: str, root: str | None) -> str | None:
    """The path to open for `text`: itself without a root; else resolved under the root, None when it leads out."""
    if root is None:
        return text
    try:
        real_root = Path(os.path.realpath(root))
        resolved = Path(os.path.realpath(real_root / text))  # an absolute `text` replaces the root: checked below
    except (OSError, ValueError):  # a NUL byte, a link loop
        return None
    return str(resolved) if resolved.is_relative_to(real_root) else None


def _is_regular_file(path: str) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


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
