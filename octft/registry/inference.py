"""A trained classifier on new volumes: loading a checkpoint folder, and classifying volumes the way training saw them.

A checkpoint folder is what a run logs as its `checkpoint` artifact: `best.pt` (the best epoch's weights) beside
`config.yaml` (the resolved config that built them), so its preprocessing (frame picking, resize, intensity) and its
data selection come with it. The champion's MLflow Model (`octft.registry.model`), `octft predict` and promotion's
test scores all run these functions.

    >>> loaded = load_checkpoint_folder(Path("runs/demo/checkpoint"), source="runs/demo")    # doctest: +SKIP
    >>> serve_frame(loaded, pd.DataFrame({"volume": [base64_of_a_dicom], "id": ["eye-1"]}))  # doctest: +SKIP
    >>> classify_paths(loaded, ["scan.dcm"])[["predicted_class", "error"]]                # doctest: +SKIP

One table out, whoever asks (`output_columns`): one row per input volume, in order,

    id, path, participant_id, prob_<class> for each class, predicted_class, error

`error` is empty when the volume was classified, else why not; a row never fails the batch. `id` echoes the
client's `id` (null when none was sent), `path` the path given ("" for a volume sent as bytes). The probabilities
are null, not NaN, in a row that was not classified: the columns hold Python floats and None (object dtype), so
the JSON MLflow's scoring server writes (`DataFrame.to_dict` then `json.dump`) is strict JSON.

The served model's input (`serve_frame`) is a table with, per row, a `path` or a `volume`: the file's bytes in
base64 (a DICOM, NIfTI, .nii.gz or NumPy file, recognised by its content, at most `MAX_VOLUME_BYTES`), and an
optional `id`. A volume outside the model's training selection (`data.selection`: regions, devices, lateralities)
is not classified: its `error` starts with `OUTSIDE_SELECTION` and says which fact differs. The facts come from
the path first, as training read them (a device folder such as `topcon_maestro2/`, file-name tokens such as
`_macula_` and `_l_`), then from the file's own tags (DICOM Manufacturer and model, ImageLaterality, Anatomic
Region); a fact neither says is not held against the volume (a NumPy file says nothing).

Two callers, two answers for a path that cannot be used. `octft predict` (`classify_paths`) runs on the user's
own machine with the user's own paths: its `error` says precisely why (file not found, a FIFO, not DICOM ...).
The served model answers clients it does not know, so a reason must not tell them which files exist on the server:

- with `$OCTFT_PREDICT_ROOT` set, it reads only regular files inside that folder: a relative path is taken under
  it, and a path leading out of it (absolute, `..`, or a link, all resolved first) is never opened. Every path it
  cannot open (missing, unreadable, outside the root, not a regular file) gets the one answer `UNREADABLE_PATH`;
  a file inside the root that opens keeps its precise reason (the root is what it serves).
- without it (a model loaded in one's own session), paths are read as given, and every failure of a path,
  decoding and selection included, gets the one answer `UNREADABLE_PATH`: `octft predict` or the root gives the
  reasons. A server should always set `$OCTFT_PREDICT_ROOT`.
- a row with neither (a null, NaN or empty value) gets `NO_PATH`, never the path "None" or "nan".

Bytes sent as a `volume` are the client's own, so their errors are always precise. A volume that reads but holds
no image (constant, or B-scans under `MIN_SIDE` pixels a side) gets its reason in `error`, not a confident class.
"""

from __future__ import annotations

import binascii
import json
import math
import os
import re
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from octft.config import SCRATCH, ExperimentConfig, SelectionConfig, load_experiment_dict
from octft.data.ids import canonical_participant_id
from octft.data.layout import CLASS_SHORT_NAMES, DEVICES
from octft.data.locator import name_tokens, normalise_laterality, normalise_region
from octft.data.preprocess import Preprocessing, preprocess
from octft.data.readers import read_volume
from octft.data.volume import OctReadError, Volume
from octft.errors import OctftError
from octft.models.checkpoint import CheckpointError
from octft.train.metrics import softmax
from octft.train.runtime import load_state
from octft.train.setup import build_model

CHECKPOINT_FILE = "best.pt"
CONFIG_FILE = "config.yaml"
# The input table's columns: a `path` or a `volume` (base64 of the file's bytes) per row, and an optional `id`.
ID_COLUMN = "id"
PATH_COLUMN = "path"
VOLUME_COLUMN = "volume"
INPUT_COLUMNS = (PATH_COLUMN, VOLUME_COLUMN, ID_COLUMN)
# The prediction table's columns (see `output_columns`).
PARTICIPANT_COLUMN = "participant_id"
PREDICTED_COLUMN = "predicted_class"
ERROR_COLUMN = "error"
PROBABILITY_PREFIX = "prob_"
# The folder a served model may read volumes from (see the module's docstring).
PREDICT_ROOT_ENV = "OCTFT_PREDICT_ROOT"
UNREADABLE_PATH = f"cannot read this path: missing, unreadable, not a regular file, or outside ${PREDICT_ROOT_ENV}"
NO_PATH = f"no {PATH_COLUMN} or {VOLUME_COLUMN} given"
# How an `error` of a volume left out by the training selection starts (callers count these apart from failures).
OUTSIDE_SELECTION = "outside the model's training selection: "
# The largest file a client may send as a `volume`: twice the largest AI-READI volume (~130 MB, a Triton cube).
# A larger volume is no longer a request body (the server holds it several times over: JSON, text, bytes, array);
# the readers' own bound (MAX_DECLARED_BYTES, 1 GiB of pixels) is for files read where they lie.
MAX_VOLUME_BYTES = 256 << 20
# The smallest B-scan side worth classifying: the smallest clip side a config allows (data.preprocess.height and
# width >= 8). A smaller image, even 1 x 1 pixel, would be stretched into a clip and classified with confidence.
MIN_SIDE = 8


def output_columns(class_names: Sequence[str] = CLASS_SHORT_NAMES) -> list[str]:
    """The columns of a prediction table, in order: the same for `octft predict`, the pyfunc and the server."""
    return [ID_COLUMN, PATH_COLUMN, PARTICIPANT_COLUMN, *(f"{PROBABILITY_PREFIX}{name}" for name in class_names),
            PREDICTED_COLUMN, ERROR_COLUMN]


def empty_row(class_names: Sequence[str] = CLASS_SHORT_NAMES, **values: Any) -> dict[str, Any]:
    """A row of the prediction table with nothing classified yet (probabilities None), updated with `values`."""
    row: dict[str, Any] = {ID_COLUMN: None, PATH_COLUMN: "", PARTICIPANT_COLUMN: "", PREDICTED_COLUMN: "",
                           ERROR_COLUMN: ""}
    row.update({f"{PROBABILITY_PREFIX}{name}": None for name in class_names})
    row.update(values)
    return row


def prediction_table(rows: Sequence[dict[str, Any]], class_names: Sequence[str] = CLASS_SHORT_NAMES) -> pd.DataFrame:
    """Rows as the prediction table: object columns, so a missing probability stays None (JSON null), never NaN."""
    return pd.DataFrame(list(rows), columns=output_columns(class_names), dtype=object)


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
    config.model.checkpoint = SCRATCH
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


# --- what a volume is, against what the model was trained on ----------------------------------------------------


@dataclass(frozen=True)
class VolumeFacts:
    """What is known of a volume for the training selection; None where nothing says."""

    device: str | None = None  # a layout device name (`topcon_maestro2`), or the file's own words for another
    region: str | None = None  # `macula`, `optic_disc`, ...
    laterality: str | None = None  # `L` or `R`

    def filled_from(self, other: VolumeFacts) -> VolumeFacts:
        """These facts, with `other`'s where these say nothing."""
        return VolumeFacts(self.device or other.device, self.region or other.region,
                           self.laterality or other.laterality)


def facts_of_path(path: str | Path) -> VolumeFacts:
    """The facts a path gives, read as training's locator reads a release: a device folder anywhere on the path,
    and laterality and region tokens of the file name (`1001_maestro2_macula_oct_l_<uid>.dcm`)."""
    path = Path(path)
    device = next((part for part in reversed(path.parent.parts) if part in DEVICES), None)
    _, laterality, region = name_tokens(path.name)
    return VolumeFacts(device, region, laterality)


def facts_of_meta(meta: dict[str, Any]) -> VolumeFacts:
    """The facts a file's own tags give (`Volume.meta`): its device as a layout name where the manufacturer's and
    model's words hold every word of one (`Topcon` `Maestro2` -> `topcon_maestro2`), region and laterality."""
    words = (meta.get("device") or "").strip()
    tokens = set(re.split(r"[^a-z0-9]+", words.lower()))
    device = next((name for name in DEVICES if set(name.split("_")) <= tokens), words or None)
    return VolumeFacts(device, normalise_region(meta.get("region")), normalise_laterality(meta.get("laterality")))


def outside_selection(facts: VolumeFacts, selection: SelectionConfig) -> str | None:
    """Why a volume of `facts` lies outside `selection` (an `error`, starting with `OUTSIDE_SELECTION`), or None."""
    for name, value, allowed in (("region", facts.region, selection.regions),
                                 ("device", facts.device, selection.devices),
                                 ("laterality", facts.laterality, selection.lateralities)):
        if allowed is not None and value is not None and value not in allowed:
            return f"{OUTSIDE_SELECTION}{name} {value!r} not in {list(allowed)}"
    return None


# --- classifying --------------------------------------------------------------------------------------------------


@dataclass
class _Input:
    """One row to answer: its output row, how to read its volume (None: the row already has its error), the
    facts its path gives, and the path its participant falls back on."""

    row: dict[str, Any]
    read: Callable[[], Volume] | None
    facts: VolumeFacts = VolumeFacts()
    name: str | None = None


def _classify(loaded: LoadedModel, inputs: Sequence[_Input], *, select: bool, batch_size: int,
              progress: bool) -> None:
    """Fill each input's row: read, check, preprocess, then classify `batch_size` clips at a time (so thousands of
    volumes never sit in memory at once), with a progress bar on stderr when `progress`."""
    spec = Preprocessing(**loaded.config.data.preprocess.model_dump())
    selection = loaded.config.data.selection if select else None
    pending: list[tuple[dict[str, Any], np.ndarray]] = []
    for item in tqdm(inputs, desc="predict", unit="vol", disable=not progress):
        row = item.row
        if item.read is None:
            continue
        # The path alone may rule a volume out, before a byte of it is read.
        if selection and (problem := outside_selection(item.facts, selection)):
            row[ERROR_COLUMN] = problem
            continue
        try:
            volume = item.read()
            facts = item.facts.filled_from(facts_of_meta(volume.meta))
            problem = (selection and outside_selection(facts, selection)) or degenerate(volume.array)
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
        row[PARTICIPANT_COLUMN] = _participant(volume.meta, item.name)
        pending.append((row, clip))
        if len(pending) == batch_size:
            _score(loaded, pending)
    _score(loaded, pending)


def _score(loaded: LoadedModel, pending: list[tuple[dict[str, Any], np.ndarray]]) -> None:
    """Classify the pending clips into their rows, and empty the list."""
    if not pending:
        return
    logits = predict_logits(loaded.model, lambda index: pending[index][1], len(pending), batch_size=len(pending))
    for (row, _), probabilities in zip(pending, softmax(logits)):
        row.update({f"{PROBABILITY_PREFIX}{name}": float(p) for name, p in zip(loaded.class_names, probabilities)})
        row[PREDICTED_COLUMN] = loaded.class_names[int(np.argmax(probabilities))]
    pending.clear()


def classify_paths(loaded: LoadedModel, paths: Sequence[str], *, batch_size: int = 8, select: bool = True,
                   progress: bool = False) -> pd.DataFrame:
    """The prediction table (`output_columns`) of files on this machine, one row per path, in order.

    A file that cannot be read or preprocessed gets its precise reason in `error`; with `select` (the default), a
    volume outside the model's training selection is not classified either (its `error` says why). `progress`
    shows a bar on stderr.
    """
    inputs = [_Input(empty_row(loaded.class_names, **{PATH_COLUMN: path}), lambda path=path: read_volume(path),
                     facts_of_path(path), path) for path in map(str, paths)]
    _classify(loaded, inputs, select=select, batch_size=batch_size, progress=progress)
    return prediction_table([item.row for item in inputs], loaded.class_names)


def serve_frame(loaded: LoadedModel, frame: pd.DataFrame, *, batch_size: int = 8,
                max_volume_bytes: int = MAX_VOLUME_BYTES) -> pd.DataFrame:
    """The served model's answer (`output_columns`, one row per input row) to a client's table of `path` or
    `volume` (base64 of a DICOM, NIfTI or NumPy file) per row, with an optional `id` echoed back.

    Paths are confined to `$OCTFT_PREDICT_ROOT` (see the module's docstring); a volume over `max_volume_bytes`,
    bad base64 or a row with both or neither gets its reason in `error`, never a failed batch.

    >>> text = base64.b64encode(Path("1001_oct_l.dcm").read_bytes()).decode()              # doctest: +SKIP
    >>> serve_frame(loaded, pd.DataFrame({"id": ["a"], "volume": [text]}))                 # doctest: +SKIP
    """
    if PATH_COLUMN not in frame.columns and VOLUME_COLUMN not in frame.columns:
        raise ValueError(
            f"the input has columns {list(frame.columns)}; give a column {PATH_COLUMN!r} (a file where the model runs) "
            f"or {VOLUME_COLUMN!r} (base64 of a DICOM or NIfTI file) per row, and optionally {ID_COLUMN!r}, e.g. "
            '{"dataframe_records": [{"id": "eye-1", "volume": "<base64>"}]}'
        )
    root = os.environ.get(PREDICT_ROOT_ENV) or None
    column = {name: frame[name].tolist() if name in frame.columns else [None] * len(frame) for name in INPUT_COLUMNS}
    inputs, path_rows = [], []
    for index, (path_value, volume_value, id_value) in enumerate(zip(*column.values())):
        row = empty_row(loaded.class_names, **{ID_COLUMN: _json_scalar(id_value)})
        path, volume = _given_path(path_value), _given_volume(volume_value)
        if path is not None and volume is not None:
            row[PATH_COLUMN] = path
            row[ERROR_COLUMN] = f"give a {PATH_COLUMN} or a {VOLUME_COLUMN}, not both"
            inputs.append(_Input(row, None))
        elif volume is not None:
            inputs.append(_volume_input(row, volume, f"row {index}", max_volume_bytes))
        elif path is not None:
            row[PATH_COLUMN] = path  # as the client gave it, never the path it resolved to
            inputs.append(_path_input(row, path, root))
            path_rows.append(row)
        else:
            row[ERROR_COLUMN] = NO_PATH
            inputs.append(_Input(row, None))
    _classify(loaded, inputs, select=True, batch_size=batch_size, progress=False)
    if root is None:  # no folder is served: no reason may tell a client what lies where
        for row in path_rows:
            row[ERROR_COLUMN] = row[ERROR_COLUMN] and UNREADABLE_PATH
    return prediction_table([item.row for item in inputs], loaded.class_names)


def _path_input(row: dict[str, Any], text: str, root: str | None) -> _Input:
    path = _confined(text, root)
    if path is None or not _is_regular_file(path):
        row[ERROR_COLUMN] = UNREADABLE_PATH
        return _Input(row, None)
    # The participant falls back on the client's path, never on the server's resolved one.
    return _Input(row, lambda: read_volume(path, name=text), facts_of_path(path), text)


def _volume_input(row: dict[str, Any], value: Any, label: str, max_bytes: int) -> _Input:
    """A row whose volume is base64 text: decoded when its turn comes (one volume's bytes in memory at a time)."""
    if not isinstance(value, str):
        row[ERROR_COLUMN] = f"{VOLUME_COLUMN} must be base64 text of the file's bytes, not {type(value).__name__}"
        return _Input(row, None)
    # Base64 holds 3 bytes in 4 characters; MIME line breaks (one per 76 characters) are allowed on top.
    limit = math.ceil(max_bytes / 3) * 4 * 77 // 76 + 2
    if len(value) > limit:
        row[ERROR_COLUMN] = (f"{VOLUME_COLUMN} holds {len(value)} characters of base64, more than {limit} (a file "
                             f"of {max_bytes} bytes): send a smaller volume, or its path on the server")
        return _Input(row, None)

    def read() -> Volume:
        try:
            data = binascii.a2b_base64("".join(value.split()), strict_mode=True)
        except (binascii.Error, ValueError) as error:
            raise OctReadError(label, f"{VOLUME_COLUMN} is not base64 ({error}); send the file's bytes, "
                                      "base64-encoded") from None
        if len(data) > max_bytes:
            raise OctReadError(label, f"{VOLUME_COLUMN} decodes to {len(data)} bytes, more than {max_bytes}")
        return read_volume(data, name=label)

    return _Input(row, read)


def degenerate(array: np.ndarray) -> str | None:
    """Why the volume `array` (frames, height, width) holds no image to classify, or None when it holds one."""
    height, width = array.shape[1:]
    if height < MIN_SIDE or width < MIN_SIDE:
        return f"too small to classify: B-scans of {height} x {width} pixels (at least {MIN_SIDE} x {MIN_SIDE})"
    low, high = array.min(), array.max()
    if low == high:
        return f"a constant volume (every pixel is {low.item():g}): no image to classify"
    return None


def _missing(value: Any) -> bool:
    """A null cell: None, NaN or pandas' NA (pandas turns a JSON null into any of them)."""
    return value is None or (pd.api.types.is_scalar(value) and bool(pd.isna(value)))


def _json_scalar(value: Any) -> Any:
    """A client's `id` as JSON can hold it: None for a null or NaN cell, a numpy scalar as its Python value."""
    if _missing(value):
        return None
    return value.item() if isinstance(value, np.generic) else value


def _given_volume(value: Any) -> Any:
    """A client's volume cell; None for a null, NaN or blank value (a blank is no volume, as a blank path is none)."""
    return None if _missing(value) or (isinstance(value, str) and not value.strip()) else value


def _given_path(value: Any) -> str | None:
    """A client's path as text; None for a null, NaN or empty value."""
    if _missing(value):
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
    return _participant(meta, str(path))


def _participant(meta: dict[str, Any], name: str | None) -> str:
    """The volume's participant: its metadata's, else (for a file) its folder's name, else the file itself; "" for
    bytes that name none."""
    if (participant_id := canonical_participant_id(meta.get("participant_id"))) is not None:
        return participant_id
    if name is None:
        return ""
    return canonical_participant_id(Path(name).parent.name) or name
