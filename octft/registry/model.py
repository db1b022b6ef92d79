"""The champion as an MLflow Model: a `pyfunc` that reads OCT files, preprocesses them as training did, classifies.

Every complete trial's best checkpoint becomes one (`log_trial_model`): an MLflow 3 LoggedModel named `model`, an
output of the trial's run, with the best epoch's metrics; `octft promote` registers the chosen trial's. It is portable,
so it loads and serves where octft is not installed: its code is the file `pyfunc_code.py` with the octft package
beside it (models from code: nothing is pickled, `MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false` holds), and its
requirements.txt names what that code imports (`REQUIREMENTS`) at the versions it was trained with, all on PyPI, so
`mlflow models serve --env-manager uv`, or any fresh virtual environment, rebuilds its environment from the file.

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
import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from octft.data.layout import CLASS_SHORT_NAMES
from octft.errors import MissingInputError, UsageError
from octft.registry.inference import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    INPUT_COLUMNS,
    PATH_COLUMN,
    PROBABILITY_PREFIX,
    load_checkpoint_folder,
    output_columns,
    serve_frame,
)
from octft.track.mlflow_store import LoggedModelView, MlflowStore, PythonModel, save_pyfunc, table_signature
from octft.train.provenance import PROVENANCE_TAGS

MODEL_ARTIFACT = "model"  # the name of a trial's LoggedModel: `runs:/<run id>/model` finds it
CHECKPOINT_KEY = "checkpoint"  # the model's artifact: the run's checkpoint folder
MLMODEL_FILE = "MLmodel"  # marks an MLflow Model folder
PYFUNC_CODE = Path(__file__).with_name("pyfunc_code.py")  # the Model's python_model (models from code)
PACKAGE_DIR = Path(__file__).resolve().parents[1]  # the octft package: the Model's code_paths
# What the model's code imports, directly or through the modules it imports, by their PyPI names. Not torch_xla or
# optuna: inference runs on the CPU, and octft imports torch_xla only in its XLA runtime, when asked for one.
# tests/registry/test_portable_model.py checks the list against what `pyfunc_code` loads in a fresh interpreter.
REQUIREMENTS = ("mlflow", "torch", "torchvision", "timm", "numpy", "pandas", "pydantic", "pyyaml", "pydicom",
                "pylibjpeg", "pylibjpeg-openjpeg", "pylibjpeg-libjpeg", "nibabel", "b2sdk", "tqdm", "psutil")
# The trial run's tags its model carries (and its MLmodel's metadata): what produced the weights, and which trial.
MODEL_TAGS = (*PROVENANCE_TAGS, "octft.git_commit", "octft.kind", "optuna.study", "optuna.trial_number")


class OctVolumeClassifier(PythonModel):
    """The pyfunc wrapper: loads the checkpoint folder on the CPU once, then classifies tables of paths."""

    def load_context(self, context) -> None:
        self.loaded = load_checkpoint_folder(Path(context.artifacts[CHECKPOINT_KEY]), source="mlflow pyfunc")

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        # A path (confined to $OCTFT_PREDICT_ROOT) or base64 bytes per row; one answer per row (octft.registry.inference).
        return serve_frame(self.loaded, frame)


def model_signature(class_names: Sequence[str] = CLASS_SHORT_NAMES):
    signature = table_signature([("string", name) for name in INPUT_COLUMNS],
                                [("double" if name.startswith(PROBABILITY_PREFIX) else "string", name)
                                 for name in output_columns(class_names)])
    # Every input column is optional (a row gives a path or a volume, and maybe an id): the JSON form says so.
    form = signature.to_dict()
    form["inputs"] = json.dumps([{**column, "required": False} for column in json.loads(form["inputs"])])
    return type(signature).from_dict(form)


def model_requirements() -> list[str]:
    """The Model's requirements.txt: `REQUIREMENTS` at the versions installed here, the ones it was trained with.

    A local version label is dropped: `torch 2.9.0+cpu` (the PyTorch index's CPU build) is PyPI's `torch==2.9.0`, which
    on Linux x86-64 is the CUDA build (with some GB of NVIDIA wheels) and computes the same on a CPU.
    """
    pins = []
    for name in REQUIREMENTS:
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            raise UsageError(f"{name} is not installed in this environment, and the champion's code imports it: "
                             "install octft's locked environment (make install) before logging a model") from None
        pins.append(f"{name}=={version.split('+')[0]}")
    return pins


def save_pyfunc_model(checkpoint_dir: str | Path, path: str | Path, *, metadata: dict[str, Any] | None = None,
                      class_names: Sequence[str] = CLASS_SHORT_NAMES,
                      logged_model: LoggedModelView | None = None) -> Path:
    """Write the MLflow Model of `checkpoint_dir` (best.pt + config.yaml) to the new folder `path` (the folder of
    `logged_model`, when given: see `log_trial_model`).

    The input example names a file that exists nowhere: it shows the request's shape, and a model served
    elsewhere answers it with one row whose `error` says the path cannot be read.
    """
    checkpoint_dir = Path(checkpoint_dir)
    missing = [name for name in (CHECKPOINT_FILE, CONFIG_FILE) if not (checkpoint_dir / name).is_file()]
    if missing:
        raise MissingInputError(f"checkpoint folder {checkpoint_dir} lacks {', '.join(missing)}; cannot build its "
                                "model")
    return save_pyfunc(path, PYFUNC_CODE, code_paths=[PACKAGE_DIR], artifacts={CHECKPOINT_KEY: str(checkpoint_dir)},
                       signature=model_signature(class_names),
                       input_example=pd.DataFrame({PATH_COLUMN: ["/data/1001/1001_oct_l.dcm"]}),
                       pip_requirements=model_requirements(),
                       metadata={"octft.classes": list(class_names), **(metadata or {})}, logged_model=logged_model)


def trial_model(store: MlflowStore, run_id: str) -> LoggedModelView | None:
    """The READY LoggedModel of trial run `run_id` (`log_trial_model`), or None when it has none."""
    found = store.logged_models(run_id, MODEL_ARTIFACT)
    return found[0] if found else None


def log_trial_model(store: MlflowStore, run_id: str, checkpoint_dir: str | Path, metrics: dict[str, float], *,
                    step: int) -> LoggedModelView:
    """The best checkpoint of trial run `run_id` as an MLflow 3 LoggedModel named `model`: the run's output at `step`
    (its best epoch), with `metrics` (that epoch's, linked to the values the run logged there), the run's params and
    its provenance tags. A run that has one keeps it (returned); one whose writing fails is left FAILED.

    It costs one more copy of the checkpoint folder in the artifact store (about 350 MB for a ViT-B, well under 1 MB
    for the demo's micro encoder), beside octft's code (under 1 MB) and the model's small files.

    >>> model = log_trial_model(store, run_id, "runs/demo/trial-3/checkpoint", {"val/balanced_accuracy": 0.71},
    ...                         step=5)                                                      # doctest: +SKIP
    >>> model.uri                                                                           # doctest: +SKIP
    'models:/m-0123456789abcdef0123456789abcdef'
    """
    existing = trial_model(store, run_id)
    if existing is not None:
        return existing
    tags = {key: value for key, value in store.run(run_id).tags.items() if key in MODEL_TAGS}
    model = store.create_logged_model(run_id, MODEL_ARTIFACT, tags=tags)
    try:
        with tempfile.TemporaryDirectory(prefix="octft-model-") as scratch:
            folder = save_pyfunc_model(checkpoint_dir, Path(scratch) / MODEL_ARTIFACT, logged_model=model,
                                       metadata={"octft.run_id": run_id, **tags})
            return store.finish_logged_model(model, folder, metrics=metrics, step=step)
    except BaseException:
        store.fail_logged_model(model)
        raise
