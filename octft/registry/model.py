"""The champion as an MLflow Model: a `pyfunc` that reads OCT files, preprocesses them as training did, classifies.

A promoted checkpoint folder (`best.pt`, which holds the config that built it, beside a readable `config.yaml`)
travels inside the model as its one artifact, so the model carries its preprocessing (frame picking, resize,
intensity: the config's `data.preprocess`) and everything else it was trained with. Its input is a table with a
column `path` (a DICOM, NIfTI or NumPy file readable where the model runs: under `$OCTFT_PREDICT_ROOT` when that
is set); its output has one row per input row:

    path, participant_id, prob_<class> for each class, predicted_class, error

`error` is empty when the volume was read; its probabilities are NaN otherwise, so one unusable volume never fails
the batch. A path the model cannot open gets one answer whatever the cause (`octft.registry.inference.serve_paths`),
so a client learns nothing of the server's files; a constant or tiny volume is flagged, not classified.

    >>> import mlflow, pandas as pd                                                     # doctest: +SKIP
    >>> model = mlflow.pyfunc.load_model("models:/octft-demo@champion")                   # doctest: +SKIP
    >>> model.predict(pd.DataFrame({"path": ["scan.dcm"]}))[["predicted_class", "error"]]  # doctest: +SKIP
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from octft.data.layout import CLASS_SHORT_NAMES
from octft.registry.inference import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    ERROR_COLUMN,
    PARTICIPANT_COLUMN,
    PATH_COLUMN,
    PREDICTED_COLUMN,
    PROBABILITY_PREFIX,
    load_checkpoint_folder,
    serve_paths,
)
from octft.track.mlflow_store import PythonModel, save_pyfunc, table_signature

MODEL_ARTIFACT = "model"  # where the MLflow Model sits in the trial run's artifacts
CHECKPOINT_KEY = "checkpoint"  # the model's artifact: the run's checkpoint folder
MLMODEL_FILE = "MLmodel"  # marks an MLflow Model folder


class OctVolumeClassifier(PythonModel):
    """The pyfunc wrapper: loads the checkpoint folder on the CPU once, then classifies tables of paths."""

    def load_context(self, context) -> None:
        self.loaded = load_checkpoint_folder(Path(context.artifacts[CHECKPOINT_KEY]), source="mlflow pyfunc")

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if PATH_COLUMN not in frame.columns:
            raise ValueError(
                f"the input has columns {list(frame.columns)}; give a column {PATH_COLUMN!r} of DICOM / NIfTI / "
                "NumPy file paths, e.g. {\"dataframe_records\": [{\"path\": \"/data/scan.dcm\"}]}"
            )
        # Paths from a client: confined to $OCTFT_PREDICT_ROOT, one answer for any it cannot use (octft.registry.inference).
        return serve_paths(self.loaded, frame[PATH_COLUMN].tolist())


def model_signature(class_names: Sequence[str] = CLASS_SHORT_NAMES):
    return table_signature(
        [("string", PATH_COLUMN)],
        [("string", PATH_COLUMN), ("string", PARTICIPANT_COLUMN),
         *(("double", f"{PROBABILITY_PREFIX}{name}") for name in class_names),
         ("string", PREDICTED_COLUMN), ("string", ERROR_COLUMN)],
    )


def _requirements() -> list[str]:
    # Written for the record: the model's code is octft's own, so it loads where octft is installed
    # (`--env-manager local`); octft is not on PyPI, so MLflow cannot rebuild its environment from these.
    found = []
    for name in ("mlflow", "torch", "numpy", "pandas", "pydicom", "nibabel", "octft"):
        try:
            found.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def save_pyfunc_model(checkpoint_dir: str | Path, path: str | Path, *, metadata: dict[str, Any] | None = None,
                      class_names: Sequence[str] = CLASS_SHORT_NAMES) -> Path:
    """Write the MLflow Model of `checkpoint_dir` (best.pt + config.yaml) to the new folder `path`.

    The input example names a file that exists nowhere: it shows the request's shape, and a model served
    elsewhere answers it with one row whose `error` says the path cannot be read.
    """
    checkpoint_dir = Path(checkpoint_dir)
    missing = [name for name in (CHECKPOINT_FILE, CONFIG_FILE) if not (checkpoint_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(f"checkpoint folder {checkpoint_dir} lacks {', '.join(missing)}; cannot build its model")
    return save_pyfunc(path, OctVolumeClassifier(), artifacts={CHECKPOINT_KEY: str(checkpoint_dir)},
                       signature=model_signature(class_names),
                       input_example=pd.DataFrame({PATH_COLUMN: ["/data/1001/1001_oct_l.dcm"]}),
                       pip_requirements=_requirements(), metadata={"octft.classes": list(class_names), **(metadata or {})})
