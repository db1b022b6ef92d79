"""Everything octft does with MLflow, in the one module that imports it.

- `MlflowTracker`: one run held open, behind the `Tracker` seam the training loop logs through;
- `MlflowStore`: the other operations on a tracking store and its registry (ending, reopening and tagging runs
  octft does not hold open, downloads, model versions);
- `save_pyfunc` / `load_pyfunc`: MLflow Models.

Nothing here touches MLflow's fluent API (`mlflow.start_run` and its global active-run stack), so a study's
parent run and its trials' runs live in one process without stepping on each other. Every SQLite store is
opened in write-ahead-log mode (`octft.sqlite_wal`): a sweep commits every epoch.

>>> parent = MlflowTracker(experiment="octft-sweep", run_name="study-a")     # doctest: +SKIP
>>> with MlflowTracker(experiment="octft-sweep", run_name="trial-3",
...                    parent_run_id=parent.run_id) as trial:                # doctest: +SKIP
...     trial.log_params({"optim.lr_head": 3e-4})
...     trial.log_metrics({"val/loss": 0.71, "val/f1_healthy": 0.64}, step=1)
>>> MlflowStore(parent.store.uri).register(trial.run_id, "model", "octft-dm4")   # doctest: +SKIP
'1'
"""

from __future__ import annotations

import json
import logging
import posixpath
import re
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import mlflow.data
import mlflow.pyfunc
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.system_metrics.metrics.base_metrics_monitor import BaseMetricsMonitor
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
from mlflow.tracking import MlflowClient
from mlflow.types import ColSpec, Schema

from octft import sqlite_wal
from octft.errors import MissingInputError, UsageError
from octft.redaction import redact, redact_url
from octft.stores import artifact_location, resolve_tracking_uri
from octft.track import RunDataset

logger = logging.getLogger(__name__)

RunStatus = Literal["FINISHED", "FAILED", "KILLED"]
RUN_STATUSES: tuple[str, ...] = ("FINISHED", "FAILED", "KILLED")
END_REASON_TAG = "octft.end_reason"
PARENT_RUN_TAG = "mlflow.parentRunId"  # the tag the MLflow UI nests child runs by
NOTE_TAG = "mlflow.note.content"  # the run description the UI shows on the run's page

# MLflow 3's own limits (mlflow.utils.validation); a longer value is refused by the store.
MAX_PARAM_VALUE_LENGTH = 6000
MAX_TAG_VALUE_LENGTH = 8000
_MAX_PARAMS_TAGS_PER_BATCH = 100
_MAX_METRICS_PER_BATCH = 1000
TRUNCATION_MARKER = "...[truncated]"
_RUN_ID = re.compile(r"[A-Za-z0-9_\-]+")
SYSTEM_METRICS_INTERVAL_S = 10.0

PythonModel = mlflow.pyfunc.PythonModel  # the base class of a pyfunc model (octft.registry.model)


def _client(tracking_uri: str) -> MlflowClient:
    sqlite_wal.install()
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def _error_code(error: Exception) -> str | None:
    return getattr(error, "error_code", None)


def _first_line(error: Exception) -> str:
    text = str(getattr(error, "message", None) or error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _truncate(kind: str, key: str, text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    # Said out loud: a shortened param must never look like the full value.
    logger.warning("%s %r is %d characters; MLflow keeps %d, so it is truncated", kind, key, len(text), limit)
    return text[: limit - len(TRUNCATION_MARKER)] + TRUNCATION_MARKER


def _format_param(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, default=str)
    return str(value)  # None -> "None", True -> "True", 0.001 -> "0.001", Path -> its text


def _tag_values(tags: dict) -> dict[str, str]:
    return {str(key): _truncate("tag", str(key), str(redact(value, str(key))), MAX_TAG_VALUE_LENGTH)
            for key, value in tags.items()}


def _chunks(items: list, size: int) -> list[list]:
    return [items[start : start + size] for start in range(0, len(items), size)]


@dataclass(frozen=True)
class RunView:
    """What octft reads of a run: its status, experiment, params, tags and latest metrics."""

    run_id: str
    status: str
    experiment_id: str
    params: dict[str, str]
    tags: dict[str, str]
    metrics: dict[str, float]


@dataclass(frozen=True)
class ModelVersion:
    """A registered model version: its name, number, and the run artifact it was registered from."""

    name: str
    version: str
    run_id: str
    artifact_path: str


class MlflowStore:
    """One tracking store and its model registry (the same URI): the operations on runs octft does not hold open.

    Every method names the store redacted in its errors; a missing run or artifact is a `MissingInputError`.
    """

    def __init__(self, tracking_uri: str | None = None) -> None:
        self.uri = resolve_tracking_uri(tracking_uri)
        self.client = _client(self.uri)

    @property
    def shown(self) -> str:
        """The store's URI with any password hidden."""
        return redact_url(self.uri)

    def warm(self) -> None:
        """Open the store now (its connection, its migrations check): a runner does this before its first trial."""
        self.client._tracking_client.store  # noqa: B018 (the property opens the store)

    # -- runs

    def run(self, run_id: str) -> RunView:
        try:
            run = self.client.get_run(run_id)
        except MlflowException as error:
            raise MissingInputError(f"MLflow run {run_id} is not in the store {self.shown} ({_first_line(error)}); "
                                    "pass the store it was logged to") from None
        return RunView(run.info.run_id, run.info.status, run.info.experiment_id, dict(run.data.params),
                       dict(run.data.tags), dict(run.data.metrics))

    def end_run(self, run_id: str, status: RunStatus, reason: str | None = None) -> None:
        """End run `run_id` as `status` (again, if it ended otherwise); `reason` goes to tag `octft.end_reason`."""
        if reason:
            self.set_tag(run_id, END_REASON_TAG, reason)
        self.client.set_terminated(run_id, status=status)

    def reopen_run(self, run_id: str) -> None:
        self.client.update_run(run_id, status="RUNNING")

    def set_tag(self, run_id: str, key: str, value: Any) -> None:
        """Set a tag that several workers may set at once. Two first writes race in MLflow's SQL store (it looks the
        tag up, then inserts): the loser fails on the UNIQUE key while the row now exists, so it sets it again."""
        text = _tag_values({key: value})[key]
        try:
            self.client.set_tag(run_id, key, text)
        except MlflowException as error:
            if "UNIQUE constraint" not in str(error):
                raise
            self.client.set_tag(run_id, key, text)

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        stamp = int(time.time() * 1000)
        entries = [Metric(key, float(value), stamp, int(step)) for key, value in metrics.items()]
        for chunk in _chunks(entries, _MAX_METRICS_PER_BATCH):
            self.client.log_batch(run_id, metrics=chunk)

    def log_dict(self, run_id: str, obj: Any, name: str) -> None:
        self.client.log_dict(run_id, redact(json.loads(json.dumps(obj, default=str))), name)

    def log_artifacts(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file or a folder into the run as it stands (nothing reopens the run)."""
        if Path(path).is_dir():
            self.client.log_artifacts(run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(run_id, str(path), artifact_path)

    def has_artifact(self, run_id: str, artifact_path: str) -> bool:
        parent = posixpath.dirname(artifact_path.strip("/")) or None
        return any(entry.path == artifact_path.strip("/") for entry in self.client.list_artifacts(run_id, parent))

    def download(self, run_id: str, artifact_path: str, into: str | Path) -> Path:
        """Artifact `artifact_path` (a file or folder) of run `run_id`, downloaded under `into`."""
        try:
            return Path(self.client.download_artifacts(run_id, artifact_path, str(into)))
        except (MlflowException, OSError) as error:
            raise MissingInputError(f"MLflow run {run_id} has no readable artifact {artifact_path!r} in {self.shown} "
                                    f"({_first_line(error)})") from None

    def metric_history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        """(step, value) of every logged value of metric `key`, by step."""
        return sorted((metric.step, metric.value) for metric in self.client.get_metric_history(run_id, key))

    def experiment_id(self, name: str) -> str | None:
        experiment = self.client.get_experiment_by_name(name)
        return None if experiment is None else str(experiment.experiment_id)

    def child_runs(self, parent_run_id: str) -> list[RunView]:
        parent = self.run(parent_run_id)
        found = self.client.search_runs([parent.experiment_id], f"tags.{PARENT_RUN_TAG} = '{parent_run_id}'")
        return [RunView(run.info.run_id, run.info.status, run.info.experiment_id, dict(run.data.params),
                        dict(run.data.tags), dict(run.data.metrics)) for run in found]

    # -- the registry

    def model_version(self, uri: str) -> ModelVersion:
        """The version `models:/NAME@ALIAS` or `models:/NAME/VERSION` names."""
        reference = uri.removeprefix("models:/")
        try:
            if "@" in reference:
                name, alias = reference.split("@", 1)
                version = self.client.get_model_version_by_alias(name, alias)
            elif "/" in reference:
                name, number = reference.rsplit("/", 1)
                version = self.client.get_model_version(name, number)
            else:
                raise UsageError(f"{uri}: write models:/NAME@ALIAS or models:/NAME/VERSION")
        except MlflowException as error:
            raise MissingInputError(f"{uri}: not found in the MLflow registry at {self.shown} "
                                    f"({_first_line(error)})") from None
        source = str(version.source)
        prefix = f"runs:/{version.run_id}/"
        artifact_path = source[len(prefix):] if source.startswith(prefix) else source.rstrip("/").rsplit("/", 1)[-1]
        return ModelVersion(str(version.name), str(version.version), str(version.run_id), artifact_path)

    def register(self, run_id: str, artifact_path: str, name: str, alias: str | None = "champion",
                 tags: dict[str, str] | None = None) -> str:
        """Register `runs:/<run_id>/<artifact_path>` as a version of model `name` (created when absent) and return
        the version; the same run and artifact again returns its existing version. `alias` moves to it."""
        if not _RUN_ID.fullmatch(run_id):
            raise ValueError(f"run_id {run_id!r} is not an MLflow run id (letters, digits, '-', '_')")
        artifact_path = artifact_path.strip("/")
        if not self.has_artifact(run_id, artifact_path):
            raise MissingInputError(f"MLflow run {run_id} has no artifact {artifact_path!r}; log it before registering")
        self._ensure_registered_model(name)
        source = f"runs:/{run_id}/{artifact_path}"
        # MLflow may store the source as given or resolved to the run's artifact location: the same run and
        # artifact path is the same version either way.
        existing = [version for version in self.client.search_model_versions(f"run_id='{run_id}'")
                    if version.name == name and (version.source == source
                                                 or version.source.rstrip("/").endswith(f"/{artifact_path}"))]
        if existing:
            version = str(min(existing, key=lambda found: int(found.version)).version)
        else:
            version = str(self.client.create_model_version(name, source, run_id=run_id).version)
        if alias:
            self.client.set_registered_model_alias(name, alias, version)
        for key, value in _tag_values(tags or {}).items():
            self.client.set_model_version_tag(name, version, key, value)
        return version

    def _ensure_registered_model(self, name: str) -> None:
        try:
            self.client.get_registered_model(name)
            return
        except MlflowException as error:
            if _error_code(error) != "RESOURCE_DOES_NOT_EXIST":
                raise
        try:
            self.client.create_registered_model(name)
        except MlflowException as error:
            if _error_code(error) != "RESOURCE_ALREADY_EXISTS":
                raise

    def _experiment_id_or_create(self, name: str, location: str | None) -> str:
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            try:
                return self.client.create_experiment(name, artifact_location=location or artifact_location(self.uri, name))
            except MlflowException as error:
                if _error_code(error) != "RESOURCE_ALREADY_EXISTS":  # another worker created it meanwhile: use theirs
                    raise
                experiment = self.client.get_experiment_by_name(name)
        if experiment.lifecycle_stage == "deleted":
            raise UsageError(f"MLflow experiment {name!r} is deleted in {self.shown}; restore it (mlflow experiments "
                             f"restore --experiment-id {experiment.experiment_id}) or pick another name")
        return experiment.experiment_id


class MlflowTracker:
    """One MLflow run held open: a new one, a child of `parent_run_id`, or an existing one (`run_id=`).

    An existing run that has ended is reopened (a resumed `octft train`), unless `reopen=False`: then the tracker
    adds to it as it stands (status, start and end time unchanged) and `finish` does nothing. `artifact_location`
    is used only when this tracker creates the experiment. With `log_system_metrics`, the machine's CPU, memory,
    GPU and TPU use are sampled into the run until `finish`. `flush_interval_s` > 0 holds metrics and writes them
    in one batch at most that often (and at `finish`): trials whose epochs take milliseconds write once.
    As a context manager the run ends FINISHED, FAILED (on an exception) or KILLED (on Ctrl-C).
    """

    def __init__(
        self,
        tracking_uri: str | None = None,
        experiment: str = "octft",
        run_name: str | None = None,
        *,
        parent_run_id: str | None = None,
        tags: dict | None = None,
        run_id: str | None = None,
        artifact_location: str | None = None,
        reopen: bool = True,
        log_system_metrics: bool = False,
        flush_interval_s: float = 0.0,
    ) -> None:
        self.store = MlflowStore(tracking_uri)
        self.experiment = experiment
        self.end_status: str | None = None  # what `finish` ended the run as
        self._finished = False
        self._pending: list[tuple[int, dict[str, float]]] = []
        self._flush_interval_s = flush_interval_s
        self._last_flush = time.monotonic()
        run_tags = dict(tags or {})
        if parent_run_id is not None:
            self._require_run(parent_run_id, "parent_run_id", "start the parent run first")
            run_tags[PARENT_RUN_TAG] = parent_run_id
        if run_id is None:
            experiment_id = self.store._experiment_id_or_create(experiment, artifact_location)
            self.run_id: str | None = self.store.client.create_run(experiment_id, run_name=run_name,
                                                                   tags=_tag_values(run_tags)).info.run_id
        else:
            run = self._require_run(run_id, "run_id", "drop run_id= to start a new run")
            self.run_id = run.info.run_id
            if not reopen:
                self._finished = True  # logging to an ended run as it stands: its times still say how long it ran
            elif run.info.status != "RUNNING":
                if END_REASON_TAG in run.data.tags:  # the run is live again: its previous end reason no longer holds
                    self.store.client.delete_tag(run_id, END_REASON_TAG)
                self.store.reopen_run(run_id)
            if run_name and run_name != run.info.run_name:
                self.store.client.update_run(run_id, name=run_name)
            changed = {key: value for key, value in _tag_values(run_tags).items() if run.data.tags.get(key) != value}
            if changed:  # a run made by a sweep's worker has them already: no write
                self.set_tags(changed)
        self._system_metrics = start_system_metrics(self.run_id, self.store.uri) if (
            log_system_metrics and not self._finished) else None

    def __repr__(self) -> str:
        return f"MlflowTracker(run_id={self.run_id!r}, experiment={self.experiment!r}, tracking_uri={self.tracking_uri!r})"

    def __enter__(self) -> MlflowTracker:
        return self

    def __exit__(self, exc_type, exc, traceback) -> bool:
        if exc_type is None:
            self.finish("FINISHED")
        elif issubclass(exc_type, KeyboardInterrupt):
            self.finish("KILLED", "interrupted")
        else:
            self.finish("FAILED", f"{exc_type.__name__}: {exc}")
        return False

    @property
    def tracking_uri(self) -> str:
        """The store this tracker writes to, with any password hidden."""
        return self.store.shown

    # -- the Tracker seam

    def log_params(self, params: dict[str, object]) -> None:
        """Log flat dotted params; values are redacted, stringified and cut to MLflow's limit.

        The same value again is a no-op (a resumed run re-logs its config); another value is an error, since
        MLflow params never change.
        """
        if not params:
            return
        values = {str(key): _truncate("param", str(key), _format_param(redact(value, str(key))), MAX_PARAM_VALUE_LENGTH)
                  for key, value in params.items()}
        logged = self.store.client.get_run(self.run_id).data.params
        changed = [f"{key}: {logged[key]!r} -> {value!r}" for key, value in values.items()
                   if key in logged and logged[key] != value]
        if changed:
            raise ValueError(f"MLflow run {self.run_id}: params cannot change once logged ({'; '.join(changed)}); "
                             "start a new run (without run_id=) to try other values")
        new = [Param(key, value) for key, value in values.items() if key not in logged]
        for chunk in _chunks(new, _MAX_PARAMS_TAGS_PER_BATCH):
            self.store.client.log_batch(self.run_id, params=chunk)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """One value per metric at `step` (the epoch); NaN is kept as NaN."""
        for key, value in metrics.items():
            try:
                float(value)
            except (TypeError, ValueError):
                raise ValueError(f"metric {key!r} has value {value!r}, which is not a number; log floats (read "
                                 "tensors with .item() at the logging point)") from None
        self._pending.append((int(step), {str(key): float(value) for key, value in metrics.items()}))
        if time.monotonic() - self._last_flush >= self._flush_interval_s:
            self.flush()

    def flush(self) -> None:
        """Write the metrics held back, in as few batches as MLflow takes (1,000 values each)."""
        stamp = int(time.time() * 1000)
        entries = [Metric(key, value, stamp, step) for step, metrics in self._pending for key, value in metrics.items()]
        self._pending = []
        self._last_flush = time.monotonic()
        for chunk in _chunks(entries, _MAX_METRICS_PER_BATCH):
            self.store.client.log_batch(self.run_id, metrics=chunk)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Copy a file or a whole folder into the run's artifacts (under `artifact_path`)."""
        if not Path(path).exists():
            raise FileNotFoundError(f"artifact {str(path)!r} does not exist; write it before logging it")
        self.store.log_artifacts(self.run_id, path, artifact_path)

    def log_figure(self, figure: Any, name: str) -> None:
        """A matplotlib figure as `name` (`.png` added when `name` has no suffix)."""
        self.store.client.log_figure(self.run_id, figure, name if posixpath.splitext(name)[1] else f"{name}.png")

    def log_dict(self, obj: dict, name: str) -> None:
        """`obj` as json, or yaml when `name` ends in .yaml/.yml; secrets are redacted."""
        if posixpath.splitext(name)[1].lower() not in (".json", ".yaml", ".yml"):
            name += ".json"
        self.store.log_dict(self.run_id, obj, name)

    def set_tags(self, tags: dict[str, str]) -> None:
        entries = [RunTag(key, value) for key, value in _tag_values(tags).items()]
        for chunk in _chunks(entries, _MAX_PARAMS_TAGS_PER_BATCH):
            self.store.client.log_batch(self.run_id, tags=chunk)

    def log_datasets(self, datasets: Sequence[RunDataset]) -> None:
        """Each dataset (its table a pandas DataFrame) as an input of the run, shown in the UI's Dataset column, in one
        write: `digest` identifies the data, `context` says what the run did with it ("training"), `tags` go on the
        input."""
        inputs = []
        for data in datasets:
            with warnings.catch_warnings():
                # MLflow warns when it guesses a source's kind from the URI and when a schema has integer columns (a
                # hint for model inputs); neither concerns a record of what a run trained on.
                warnings.simplefilter("ignore")
                entity = mlflow.data.from_pandas(data.table, source=redact(data.source), name=data.name,
                                                 digest=data.digest)._to_mlflow_entity()
            tags = [InputTag("mlflow.data.context", data.context)]
            inputs.append(DatasetInput(entity, tags=tags + [InputTag(key, value)
                                                            for key, value in _tag_values(data.tags).items()]))
        try:
            self.store.client.log_inputs(self.run_id, datasets=inputs)
        except MlflowException as error:
            # Parallel trials log the same dataset at once; the store keeps one row per (experiment, name, digest),
            # so the loser of that race gets a unique-constraint error. The row exists now: link again.
            if "UNIQUE" not in str(error).upper() and "DUPLICATE" not in str(error).upper():
                raise
            self.store.client.log_inputs(self.run_id, datasets=inputs)

    def finish(self, status: RunStatus, reason: str | None = None) -> None:
        """End the run as FINISHED, FAILED or KILLED; `reason` goes to the tag `octft.end_reason`. Only the first
        call counts, so a loop that ended the run itself (KILLED when pruned) is not overwritten by FINISHED."""
        if status not in RUN_STATUSES:
            raise ValueError(f"run status {status!r} is not one of {', '.join(RUN_STATUSES)}")
        if self._finished:
            return
        self.flush()
        if self._system_metrics is not None:
            self._system_metrics.finish()  # flushed while the run still runs: the monitor stops at an ended run
            self._system_metrics = None
        self.store.end_run(self.run_id, status, reason)
        self._finished = True
        self.end_status = status

    def _require_run(self, run_id: str, argument: str, advice: str):
        try:
            return self.store.client.get_run(run_id)
        except MlflowException as error:
            if _error_code(error) != "RESOURCE_DOES_NOT_EXIST":
                raise
            raise UsageError(f"{argument}={run_id!r}: no such MLflow run in {self.tracking_uri}; {advice}") from None


# ---------------------------------------------------------------------------------------------------- system metrics


def start_system_metrics(run_id: str, tracking_uri: str, *, sampling_interval_s: float = SYSTEM_METRICS_INTERVAL_S):
    """Sample this machine into run `run_id` (CPU, memory, disk, network, GPU through MLflow's own monitor; each
    TPU chip's HBM use and duty cycle through `tpu-info` where it is installed); `.finish()` it before the run ends."""
    monitor = SystemMetricsMonitor(run_id, sampling_interval=sampling_interval_s, tracking_uri=tracking_uri)
    tpu = tpu_monitor()
    if tpu is not None:
        monitor.monitors.append(tpu)
    monitor.start()
    return monitor


def tpu_monitor() -> BaseMetricsMonitor | None:
    """A monitor of this host's TPU chips, or None where `tpu-info` (the `tpu` extra) is absent or sees no chip."""
    try:
        from tpu_info import device, metrics  # optional: installed on TPU VMs only
    except ImportError:
        return None
    try:
        chip_type, count = device.get_local_chips()
    except Exception as error:  # libtpu missing or no TPU driver: a machine without TPUs
        logger.debug("tpu-info sees no TPU chips: %s", error)
        return None
    if chip_type is None or not count:
        return None

    class TpuMonitor(BaseMetricsMonitor):
        def collect_metrics(self) -> None:
            for usage in metrics.get_chip_usage(chip_type):
                self._metrics[f"tpu_{usage.device_id}_memory_usage_megabytes"].append(usage.memory_usage / 1e6)
                self._metrics[f"tpu_{usage.device_id}_memory_total_megabytes"].append(usage.total_memory / 1e6)
                self._metrics[f"tpu_{usage.device_id}_duty_cycle_percentage"].append(usage.duty_cycle_pct)

        def aggregate_metrics(self) -> dict[str, float]:
            return {name: round(sum(values) / len(values), 1) for name, values in self._metrics.items() if values}

    return TpuMonitor()


# ---------------------------------------------------------------------------------------------------- models


def table_signature(inputs: Sequence[tuple[str, str]], outputs: Sequence[tuple[str, str]]) -> ModelSignature:
    """A model signature of named columns: `[("string", "path")]` in, `[("double", "prob_healthy"), ...]` out."""
    return ModelSignature(inputs=Schema([ColSpec(kind, name) for kind, name in inputs]),
                          outputs=Schema([ColSpec(kind, name) for kind, name in outputs]))


def save_pyfunc(path: str | Path, python_model: PythonModel, *, artifacts: dict[str, str], signature: ModelSignature,
                input_example: Any, pip_requirements: list[str], metadata: dict[str, Any]) -> Path:
    """Write the MLflow Model of `python_model` with `artifacts` to the new folder `path`."""
    mlflow.pyfunc.save_model(path=str(path), python_model=python_model, artifacts=artifacts, signature=signature,
                             input_example=input_example, pip_requirements=pip_requirements, metadata=metadata)
    return Path(path)


def load_pyfunc(folder: str | Path):
    """The MLflow Model in local folder `folder`, loaded as a pyfunc."""
    return mlflow.pyfunc.load_model(str(folder))
