"""Everything octft does with MLflow, in the one module that imports it.

- `MlflowTracker`: one run held open, behind the `Tracker` seam the training loop logs through;
- `MlflowStore`: the other operations on a tracking store and its registry (ending, reopening and tagging runs
  octft does not hold open, downloads, model versions);
- `save_pyfunc` / `load_pyfunc`: MLflow Models (models from code); `MlflowStore` logs them as MLflow 3 LoggedModels.

Nothing here touches MLflow's fluent API (`mlflow.start_run` and its global active-run stack), so a study's
parent run and its trials' runs live in one process without stepping on each other. Every SQLite store is
opened in write-ahead-log mode (`octft.sqlite_wal`): a sweep commits every epoch.

Opening a store (`MlflowStore`) checks it first, so that a wrong store is one line, not MLflow's retries and
tracebacks: a server or database gets $OCTFT_STORE_TIMEOUT_S seconds to answer (`octft.stores.store_timeout_s`);
a server's password goes to MLflow through its own variables (`MLFLOW_TRACKING_USERNAME`/`_PASSWORD`), so no URL
MLflow holds, prints or records has one; a SQL URL gets the driver that is installed; a new SQLite store is made
whole in a temporary file and linked into place, so a full disk never leaves a half-migrated one behind.

>>> parent = MlflowTracker(experiment="octft-sweep", run_name="study-a")     # doctest: +SKIP
>>> with MlflowTracker(experiment="octft-sweep", run_name="trial-3",
...                    parent_run_id=parent.run_id) as trial:                # doctest: +SKIP
...     trial.log_params({"optim.lr_head": 3e-4})
...     trial.log_metrics({"val/loss": 0.71, "val/f1_healthy": 0.64}, step=1)
>>> MlflowStore(parent.store.uri).register(trial.run_id, "model", "octft-dm4")   # doctest: +SKIP
'1'
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import posixpath
import re
import sqlite3
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import mlflow.data
import mlflow.models
import mlflow.pyfunc
import mlflow.tracking._tracking_service.utils as mlflow_tracking_state
from mlflow.entities import DatasetInput, InputTag, LoggedModelOutput, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.store.db.utils import _all_tables_exist, _get_latest_schema_revision, _initialize_tables
from mlflow.system_metrics.metrics.base_metrics_monitor import BaseMetricsMonitor
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
from mlflow.tracking import MlflowClient
from mlflow.types import ColSpec, Schema
from mlflow.utils.credentials import get_default_host_creds
from mlflow.utils.rest_utils import http_request
from sqlalchemy import create_engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import NullPool

from octft import sqlite_wal
from octft.errors import MissingInputError, UsageError
from octft.io import DiskFullError, atomic_file
from octft.redaction import redact, redact_text, redact_url
from octft.stores import (TIMEOUT_ENV, TRACKING_ENV, artifact_location, database_lock, dialect, http_credentials,
                          missing_driver, open_failure, resolve_tracking_uri, sqlalchemy_url, sqlite_path,
                          store_timeout_s)
from octft.track import RunDataset

logger = logging.getLogger(__name__)

RunStatus = Literal["FINISHED", "FAILED", "KILLED"]
RUN_STATUSES: tuple[str, ...] = ("FINISHED", "FAILED", "KILLED")
END_REASON_TAG = "octft.end_reason"
PARENT_RUN_TAG = "mlflow.parentRunId"  # the tag the MLflow UI nests child runs by
NOTE_TAG = "mlflow.note.content"  # the run description the UI shows on the run's page
# The experiment's kind, model training: a UI that reads it opens runs, not traces. (MLflow 3.17's own UI follows its
# GenAI / Model training switch instead, which the addresses `octft ui` prints set.)
EXPERIMENT_KIND_TAGS = {"mlflow.experimentKind": "custom_model_development"}

# MLflow 3's own limits (mlflow.utils.validation); a longer value is refused by the store.
MAX_PARAM_VALUE_LENGTH = 6000
MAX_TAG_VALUE_LENGTH = 8000
_MAX_PARAMS_TAGS_PER_BATCH = 100
_MAX_METRICS_PER_BATCH = 1000
TRUNCATION_MARKER = "...[truncated]"
_RUN_ID = re.compile(r"[A-Za-z0-9_\-]+")
SYSTEM_METRICS_INTERVAL_S = 10.0

PythonModel = mlflow.pyfunc.PythonModel  # the base class of a pyfunc model (octft.registry.model)
set_model = mlflow.models.set_model  # what a models-from-code file calls with its model (octft.registry.pyfunc_code)
LOGGED_MODEL_VERSIONS_TAG = "mlflow.modelVersions"  # on a LoggedModel: its registered versions, as the UI reads them


_NETWORK_SQL = ("postgresql", "postgres", "mysql", "mariadb", "mssql")
_STORE_HINT = f"or pass another store with --tracking-uri / ${TRACKING_ENV}"
_checked: set[str] = set()  # network stores that answered this process: each is checked once


def _client(mlflow_uri: str, shown: str) -> MlflowClient:
    """A client of the store at `mlflow_uri` (from `_mlflow_uri`), opened now (MLflow opens the store at once):
    a store MLflow cannot open is one line naming `shown`."""
    sqlite_wal.install()
    # MLflow prints "View run ... at: <tracking URI>" when a run ends: octft's console says what it ran itself.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    try:
        return MlflowClient(tracking_uri=mlflow_uri, registry_uri=mlflow_uri)
    except (MlflowException, SQLAlchemyError, ImportError, OSError, ValueError) as error:  # a broken schema, a driver
        line = redact_text(_first_line(error))
        if "already exists" in line and dialect(mlflow_uri) == "sqlite":
            raise UsageError(f"the MLflow store {shown} was left half-created ({line}): its creation stopped part-way, "
                             "e.g. on a full disk, before octft made new stores whole; move it away and run again") from None
        raise UsageError(f"cannot open the MLflow store {shown}: {line}; {_STORE_HINT}") from None


def _mlflow_uri(uri: str, shown: str, *, make_tables: bool = True) -> str:
    """What MLflow is given for the store `uri`, checked: see the module docstring. `make_tables=False` (a check that
    changes nothing) leaves a new database's tables to the first store that opens it."""
    kind = dialect(uri)
    if kind in ("http", "https"):
        bare, user, password = http_credentials(uri)
        if password is not None:  # set in this process only (and the processes it starts, which need them too)
            os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = user or "", password
        if bare not in _checked:
            _check_server(bare, shown)
            _checked.add(bare)
        return bare
    if kind == "sqlite":
        path = sqlite_path(uri)
        if path is not None and not path.exists():
            _create_sqlite_store(path, shown)
        return uri
    if kind in _NETWORK_SQL:
        problem = missing_driver(uri)
        if problem:
            raise UsageError(f"the MLflow store {problem}")
        url = sqlalchemy_url(uri)
        if kind != "mssql" and "connect_timeout=" not in url:  # every connection MLflow's pool makes later, too
            url += f"{'&' if '?' in url else '?'}connect_timeout={store_timeout_s()}"
        if url not in _checked:
            _check_database(url, shown, make_tables=make_tables)
            if make_tables:
                _checked.add(url)
        return url
    return uri


def check_store(tracking_uri: str) -> str:
    """How the MLflow store `tracking_uri` answers, for `octft doctor`: the checks `MlflowStore` makes (the server or
    database answers in time, with the driver that is installed), creating and changing nothing; a SQLite store's
    schema read, not migrated. Raises `UsageError` saying why octft could not open it."""
    uri = resolve_tracking_uri(tracking_uri)
    shown = redact_url(uri)
    path = sqlite_path(uri)
    if path is None:
        _mlflow_uri(uri, shown, make_tables=False)
        return "answers"
    if not path.exists():
        return "does not exist yet, will be created"
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=store_timeout_s()) as connection:
            tables = {name for (name,) in connection.execute("select name from sqlite_master where type='table'")}
            versions = connection.execute("select version_num from alembic_version").fetchall() if (
                "alembic_version" in tables) else []
    except sqlite3.Error as error:
        raise UsageError(f"the MLflow store {shown} cannot be read ({error}); {_STORE_HINT}") from None
    head = _get_latest_schema_revision()
    revision = versions[0][0] if versions else None
    if revision is None or any(name.startswith("_alembic_tmp_") for name in tables):
        raise UsageError(f"the MLflow store {shown} was left half-created ({len(tables)} tables, schema {revision}): its "
                         "creation stopped part-way, e.g. on a full disk; move it away and run again")
    if revision != head:
        raise UsageError(f"the MLflow store {shown} has schema {revision}, this MLflow needs {head}: if an older MLflow "
                         f"made it, back it up and run mlflow db upgrade {shown}; if its creation stopped part-way "
                         "(a full disk), move it away")
    return f"answers ({len(tables)} tables, schema {revision})"


def _check_server(url: str, shown: str) -> None:
    """One request, no retries, $OCTFT_STORE_TIMEOUT_S to answer: MLflow's own client would retry a server that
    is not there for minutes (MLFLOW_HTTP_REQUEST_MAX_RETRIES, _BACKOFF_FACTOR), which is right for a server
    that answered once and restarts, not for a wrong URL. Refused credentials are one line too."""
    timeout = store_timeout_s()
    try:
        response = http_request(get_default_host_creds(url), "/api/2.0/mlflow/experiments/search", "GET",
                                max_retries=0, backoff_factor=0, timeout=timeout, raise_on_status=False,
                                params={"max_results": 1})
    except MlflowException as error:
        text = str(error.message).lower()
        reason = ("it refuses connections" if "refused" in text else f"no answer within {timeout} s"
                  if "timed out" in text or "timeout" in text else redact_text(_first_line(error)))
        raise UsageError(f"the MLflow tracking server {shown} does not answer ({reason}); start it or check the URL, "
                         f"{_STORE_HINT} (${TIMEOUT_ENV} sets how long it may take, now {timeout} s)") from None
    if response.status_code in (401, 403):
        raise UsageError(f"the MLflow tracking server {shown} refuses these credentials (HTTP {response.status_code}); "
                         "put the right user and password in the URL, or in $MLFLOW_TRACKING_USERNAME and "
                         "$MLFLOW_TRACKING_PASSWORD")
    if response.status_code != 200:
        raise UsageError(f"{shown} answers HTTP {response.status_code} to MLflow's experiment search: not an MLflow "
                         f"tracking server (or another path); check the URL, {_STORE_HINT}")


def _check_database(url: str, shown: str, *, make_tables: bool) -> None:
    """One connection with the timeout in `url` (MLflow retries a database that refuses for minutes); with
    `make_tables`, a new database's tables made under a database lock: hosts opening it at the same moment would each
    make them, and all but one fail (duplicate key value ... pg_type_typname_nsp_index)."""
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect():
            pass
        if not make_tables:
            return
        with database_lock(engine, "mlflow-schema"):
            if not _all_tables_exist(engine):
                _initialize_tables(engine)  # MLflow's own: its tables, then every migration to the head revision
    except UsageError:
        raise
    except Exception as error:  # sqlalchemy's OperationalError and friends: refused, timed out, bad auth, no database
        line = redact_text(_first_line(error))
        happened, advice = open_failure(line)
        raise UsageError(f"the MLflow store {shown} {happened} ({line}); {advice}, {_STORE_HINT}") from None
    finally:
        engine.dispose()


def _create_sqlite_store(path: Path, shown: str) -> None:
    """Create MLflow's tables and run its migrations in a temporary file beside `path`, then link it into place:
    a full disk or a kill part-way leaves no store at `path` (MLflow would find a half-migrated one there and fail
    on it for good). A store another process made meanwhile is kept (`atomic_file(keep_existing=True)`)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"MLflow store {shown}: cannot create its folder {path.parent} ({error.strerror or error}); "
                         f"pass a tracking URI in a folder you can write, {_STORE_HINT}") from None
    try:
        with atomic_file(path, keep_existing=True) as temp:
            engine = create_engine(f"sqlite:///{temp}", poolclass=NullPool)
            try:
                _initialize_tables(engine)  # MLflow's own: its tables, then every migration to the head revision
                with engine.connect() as connection:  # out of WAL mode: the whole store is in the file linked
                    connection.exec_driver_sql("PRAGMA journal_mode=DELETE")
            finally:
                engine.dispose()
                for suffix in ("-wal", "-shm", "-journal"):  # what a failed write leaves beside the temporary
                    Path(f"{temp}{suffix}").unlink(missing_ok=True)
    except DiskFullError:
        raise
    except Exception as error:  # sqlite3's "unable to open database file", "disk I/O error", ...
        raise UsageError(f"cannot create the MLflow store {shown} in {path.parent}: {redact_text(_first_line(error))}; "
                         f"check that the folder is writable and its disk has room, {_STORE_HINT}") from None


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

    @classmethod
    def of(cls, run) -> "RunView":
        """The view of an MLflow `Run`."""
        return cls(run.info.run_id, run.info.status, run.info.experiment_id, dict(run.data.params),
                   dict(run.data.tags), dict(run.data.metrics))


@dataclass(frozen=True)
class ModelVersion:
    """A registered model version: its name, number, and the run artifact it was registered from. A version of an
    MLflow 3 LoggedModel names that model (`model_id`) and, as `artifact_path`, the model's name: MLflow resolves
    `runs:/<run_id>/<name>` to the run's LoggedModel of that name, so a download by run and path finds it."""

    name: str
    version: str
    run_id: str
    artifact_path: str
    model_id: str | None = None


@dataclass(frozen=True)
class LoggedModelView:
    """What octft reads of an MLflow 3 LoggedModel: its id, name, the run that made it, its status and metrics."""

    model_id: str
    name: str
    run_id: str | None
    experiment_id: str
    artifact_location: str
    status: str
    metrics: dict[str, float]
    tags: dict[str, str]

    @classmethod
    def of(cls, model) -> "LoggedModelView":
        """The view of an MLflow `LoggedModel` (a metric logged at several steps: its value at the last one)."""
        ordered = sorted(model.metrics or [], key=lambda metric: (metric.step, metric.timestamp))
        metrics = {metric.key: metric.value for metric in ordered}
        status = getattr(model.status, "value", model.status)
        return cls(model.model_id, model.name, model.source_run_id, str(model.experiment_id), model.artifact_location,
                   str(status), metrics, dict(model.tags or {}))

    @property
    def uri(self) -> str:
        return f"models:/{self.model_id}"


class MlflowStore:
    """One tracking store and its model registry (the same URI): the operations on runs octft does not hold open.

    Every method names the store redacted in its errors; a missing run or artifact is a `MissingInputError`.
    `must_exist=True` (commands that only read) refuses a SQLite store that does not exist instead of creating it:
    a mistyped path would otherwise open a new, empty store and report every run missing.
    """

    def __init__(self, tracking_uri: str | None = None, *, must_exist: bool = False) -> None:
        self.uri = resolve_tracking_uri(tracking_uri)
        path = sqlite_path(self.uri)
        if must_exist and path is not None and not path.is_file():
            raise MissingInputError(f"MLflow store {self.shown}: no such database file {path}; pass the --tracking-uri "
                                    "the sweep logged to (e.g. sqlite:///demo/mlflow.db)")
        self.mlflow_uri = _mlflow_uri(self.uri, self.shown)  # what MLflow itself is given: never a password in a URL
        self.client = _client(self.mlflow_uri, self.shown)
        self._experiment_ids: dict[str, str] = {}  # looked up (or made) once per store: a sweep makes a run a trial

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
        return RunView.of(run)

    def end_run(self, run_id: str, status: RunStatus, reason: str | None = None) -> None:
        """End run `run_id` as `status` (again, if it ended otherwise); `reason` goes to tag `octft.end_reason`."""
        if reason:
            self.set_tag(run_id, END_REASON_TAG, reason)
        self.client.set_terminated(run_id, status=status)

    def reopen_run(self, run_id: str) -> None:
        """Mark an ended run RUNNING again; the reason it ended no longer holds, so its tag goes."""
        if END_REASON_TAG in self.run(run_id).tags:
            self.client.delete_tag(run_id, END_REASON_TAG)
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
        try:
            if Path(path).is_dir():
                self.client.log_artifacts(run_id, str(path), artifact_path)
            else:
                self.client.log_artifact(run_id, str(path), artifact_path)
        except MlflowException as error:
            if _error_code(error) != "RESOURCE_DOES_NOT_EXIST":
                raise
            raise MissingInputError(f"MLflow run {run_id} is not in the store {self.shown} ({_first_line(error)}); "
                                    "pass the store it was logged to") from None

    def has_artifact(self, run_id: str, artifact_path: str) -> bool:
        parent = posixpath.dirname(artifact_path.strip("/")) or None
        return any(entry.path == artifact_path.strip("/") for entry in self.client.list_artifacts(run_id, parent))

    def download(self, run_id: str, artifact_path: str, into: str | Path) -> Path:
        """Artifact `artifact_path` (a file or folder) of run `run_id`, downloaded under `into`; `<name>/...` of the
        run's LoggedModel `<name>` too, where the run has no such artifact (MLflow 3 reads `runs:/` URIs so)."""
        try:
            # MLflow looks that LoggedModel's artifacts up in the process's registry, not this client's: this store.
            with _process_tracking_uri(self.mlflow_uri):
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

    def experiment_artifact_location(self, name: str) -> str | None:
        """Where experiment `name` keeps its runs' artifacts (fixed when it was created); None when it does not exist."""
        experiment = self.client.get_experiment_by_name(name)
        return None if experiment is None else str(experiment.artifact_location)

    def child_runs(self, parent_run_id: str) -> list[RunView]:
        parent = self.run(parent_run_id)
        found = self.client.search_runs([parent.experiment_id], f"tags.{PARENT_RUN_TAG} = '{parent_run_id}'")
        return [RunView.of(run) for run in found]

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
        model_id = _logged_model_id(source)
        if model_id is not None:  # a LoggedModel's version: its run and its name find it (see ModelVersion)
            return ModelVersion(str(version.name), str(version.version), str(version.run_id),
                                self.logged_model(model_id).name, model_id)
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

    def start_run(self, experiment: str, run_name: str, tags: dict[str, Any]) -> str:
        """A new RUNNING run of `experiment` (made when absent) with `tags` (`PARENT_RUN_TAG` nests it); its id."""
        if experiment not in self._experiment_ids:
            self._experiment_ids[experiment] = self._experiment_id_or_create(experiment, None)
        return self.client.create_run(self._experiment_ids[experiment], run_name=run_name,
                                      tags=_tag_values(tags)).info.run_id

    def record_run(self, experiment: str, run_name: str, tags: dict[str, Any]) -> str:
        """A finished run of `experiment` (made when absent) holding only `tags`: an entry of a ledger."""
        run_id = self.start_run(experiment, run_name, tags)
        self.client.set_terminated(run_id, status="FINISHED")
        return run_id

    def search_runs(self, experiment: str, tags: dict[str, str]) -> list[RunView]:
        """The runs of `experiment` (by name) whose tags hold `tags`, oldest first; none when it does not exist."""
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            return []
        query = " and ".join(f"tags.`{key}` = '{value}'" for key, value in tags.items())
        runs = self.client.search_runs([found.experiment_id], filter_string=query, order_by=["attributes.start_time ASC"],
                                       max_results=10_000)
        return [RunView.of(run) for run in runs]

    def describe_version(self, name: str, version: str, description: str) -> None:
        self.client.update_model_version(name, version, description=description)

    # -- LoggedModels (MLflow 3): a model of its own, with its artifacts, metrics and status, linked to its run

    def create_logged_model(self, run_id: str, name: str, *, tags: dict[str, str] | None = None) -> LoggedModelView:
        """A new LoggedModel of run `run_id` in the run's experiment, PENDING until `finish_logged_model`; it takes the
        run's params (as `mlflow.pyfunc.log_model` does), so models compare by hyperparameters in the UI."""
        run = self.run(run_id)
        model = self.client.create_logged_model(run.experiment_id, name, source_run_id=run_id, params=run.params,
                                                tags=_tag_values(tags or {}))
        return LoggedModelView.of(model)

    def finish_logged_model(self, model: LoggedModelView, folder: str | Path, *, metrics: dict[str, float],
                            step: int) -> LoggedModelView:
        """Upload the MLflow Model `folder` as `model`'s artifacts, record it as an output of its run at `step`, give it
        `metrics` (`log_model_metrics`) and mark it READY."""
        self.client.log_model_artifacts(model.model_id, str(folder))
        self.client.log_outputs(model.run_id, [LoggedModelOutput(model.model_id, int(step))])
        self.log_model_metrics(model.run_id, model.model_id, metrics, step)
        self.client.finalize_logged_model(model.model_id, "READY")
        return self.logged_model(model.model_id)

    def fail_logged_model(self, model: LoggedModelView) -> None:
        """Mark `model` FAILED: its artifacts were not all written, so nothing may load or register it."""
        self.client.finalize_logged_model(model.model_id, "FAILED")

    def logged_model(self, model_id: str) -> LoggedModelView:
        try:
            return LoggedModelView.of(self.client.get_logged_model(model_id))
        except MlflowException as error:
            raise MissingInputError(f"MLflow LoggedModel {model_id} is not in the store {self.shown} "
                                    f"({_first_line(error)})") from None

    def logged_models(self, run_id: str, name: str | None = None, *,
                      status: str | None = "READY") -> list[LoggedModelView]:
        """The LoggedModels run `run_id` made (named `name`; in `status`, None: any), oldest first."""
        query = f"source_run_id = '{run_id}'" + (f" AND name = '{name}'" if name else "")
        found = self.client.search_logged_models([self.run(run_id).experiment_id], filter_string=query,
                                                 order_by=[{"field_name": "creation_time", "ascending": True}])
        models = [LoggedModelView.of(model) for model in found]
        return [model for model in models if status is None or model.status == status]

    def log_model_metrics(self, run_id: str, model_id: str, metrics: dict[str, float], step: int) -> None:
        """`metrics` at `step` as metrics of LoggedModel `model_id`, logged to its run `run_id`. A value the run
        already logged at that step keeps its timestamp, so the run's history gains no second point: it is linked."""
        def same(value: float) -> float | str:
            return "nan" if math.isnan(value) else value

        logged = {(entry.key, same(entry.value)): entry.timestamp for key in metrics
                  for entry in self.client.get_metric_history(run_id, key) if entry.step == step}
        stamp = int(time.time() * 1000)
        entries = [Metric(key, float(value), logged.get((key, same(float(value))), stamp), int(step), model_id=model_id)
                   for key, value in metrics.items()]
        for chunk in _chunks(entries, _MAX_METRICS_PER_BATCH):
            self.client.log_batch(run_id, metrics=chunk)

    def register_logged_model(self, model: LoggedModelView, name: str, alias: str | None = "champion",
                              tags: dict[str, str] | None = None) -> str:
        """Register LoggedModel `model` (`models:/<model_id>`) as a version of model `name` (created when absent) and
        return the version; the same LoggedModel again returns its existing version. `alias` moves to it. The
        LoggedModel lists its versions (tag `mlflow.modelVersions`), as `mlflow.register_model` leaves it."""
        if model.status != "READY":
            raise UsageError(f"LoggedModel {model.model_id} of run {model.run_id} is {model.status}, not READY: its "
                             "artifacts were not all written; log it again")
        self._ensure_registered_model(name)
        existing = [version for version in self.client.search_model_versions(f"run_id='{model.run_id}'")
                    if version.name == name and version.source == model.uri]
        if existing:
            version = str(min(existing, key=lambda found: int(found.version)).version)
        else:
            # MLflow's SQL registry looks `models:/<model_id>` up through the process's tracking URI, not this client's
            # (its own TODO in SqlAlchemyStore.create_model_version): point that at this store for the one call.
            with _process_tracking_uri(self.mlflow_uri):
                version = str(self.client.create_model_version(name, model.uri, run_id=model.run_id,
                                                               model_id=model.model_id).version)
            listed = json.loads(self.logged_model(model.model_id).tags.get(LOGGED_MODEL_VERSIONS_TAG) or "[]")
            self.client.set_logged_model_tags(model.model_id, {LOGGED_MODEL_VERSIONS_TAG: json.dumps(
                [*listed, {"name": name, "version": version}])})
        if alias:
            self.client.set_registered_model_alias(name, alias, version)
        for key, value in _tag_values(tags or {}).items():
            self.client.set_model_version_tag(name, version, key, value)
        return version

    def set_experiment_tag(self, experiment_id: str, key: str, value: Any) -> None:
        self.client.set_experiment_tag(experiment_id, key, _tag_values({key: value})[key])

    def _experiment_id_or_create(self, name: str, location: str | None) -> str:
        """The experiment `name`, created when absent; either way it opens in MLflow's model-training layout."""
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            try:
                return self.client.create_experiment(name, artifact_location=location or artifact_location(self.uri, name),
                                                     tags=EXPERIMENT_KIND_TAGS)
            except MlflowException as error:
                if _error_code(error) != "RESOURCE_ALREADY_EXISTS":  # another worker created it meanwhile: use theirs
                    raise
                experiment = self.client.get_experiment_by_name(name)
        if experiment.lifecycle_stage == "deleted":
            raise UsageError(f"MLflow experiment {name!r} is deleted in {self.shown}; restore it (mlflow experiments "
                             f"restore --experiment-id {experiment.experiment_id}) or pick another name")
        for key, value in EXPERIMENT_KIND_TAGS.items():
            if key not in experiment.tags:  # made by an older octft: a kind the user chose in the UI is kept
                self.client.set_experiment_tag(experiment.experiment_id, key, value)
        return experiment.experiment_id


# Dataset entities made in this process, by (name, digest, source): the trials of a sweep record the same tables, and
# making an entity (its schema and profile from the table) cost about 45 ms a run.
_DATASET_ENTITIES: dict[tuple[str, str, str], Any] = {}


def _dataset_entity(data: RunDataset):
    key = (data.name, data.digest, redact(data.source))
    if key not in _DATASET_ENTITIES:
        with warnings.catch_warnings():
            # MLflow warns when it guesses a source's kind from the URI and when a schema has integer columns (a
            # hint for model inputs); neither concerns a record of what a run trained on.
            warnings.simplefilter("ignore")
            _DATASET_ENTITIES[key] = mlflow.data.from_pandas(data.table, source=key[2], name=data.name,
                                                             digest=data.digest)._to_mlflow_entity()
    return _DATASET_ENTITIES[key]


class MlflowTracker:
    """One MLflow run held open: a new one, a child of `parent_run_id`, or an existing one (`run_id=`).

    An existing run that has ended is reopened (a resumed `octft train`), unless `reopen=False`: then the tracker
    adds to it as it stands (status, start and end time unchanged) and `finish` does nothing. `artifact_location`
    is used only when this tracker creates the experiment. With `log_system_metrics`, the machine's CPU, memory,
    GPU and TPU use are sampled into the run until `finish`. `flush_interval_s` > 0 holds metrics and writes them
    in one batch at most that often (and at `finish`): trials whose epochs take milliseconds write once.
    `ends_run=False`: `finish` records how the run ended (`end_status`, the reason tag) but leaves it RUNNING for
    its owner to end (a sweep's worker, once Optuna holds the trial's state). As a context manager the run ends FINISHED, FAILED (on an exception) or KILLED (on Ctrl-C).
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
        ends_run: bool = True,
    ) -> None:
        self.store = MlflowStore(tracking_uri)
        self.experiment = experiment
        self.ends_run = ends_run
        self.end_status: str | None = None  # what `finish` ended the run as (or, with ends_run=False, would have)
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
        self._system_metrics = start_system_metrics(self.run_id, self.store.mlflow_uri) if (
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
        try:  # the store skips a value it holds already and refuses a changed one: the run is read only then
            for chunk in _chunks([Param(key, value) for key, value in values.items()], _MAX_PARAMS_TAGS_PER_BATCH):
                self.store.client.log_batch(self.run_id, params=chunk)
        except MlflowException:
            logged = self.store.client.get_run(self.run_id).data.params
            changed = [f"{key}: {logged[key]!r} -> {value!r}" for key, value in values.items()
                       if key in logged and logged[key] != value]
            if not changed:
                raise
            raise ValueError(f"MLflow run {self.run_id}: params cannot change once logged ({'; '.join(changed)}); "
                             "start a new run (without run_id=) to try other values") from None

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
            entity = _dataset_entity(data)
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
        if self.ends_run:
            self.store.end_run(self.run_id, status, reason)
        elif reason:
            self.store.set_tag(self.run_id, END_REASON_TAG, reason)
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


def save_pyfunc(path: str | Path, python_model: str | Path, *, code_paths: Sequence[str | Path],
                artifacts: dict[str, str], signature: ModelSignature, input_example: Any, pip_requirements: list[str],
                metadata: dict[str, Any], logged_model: LoggedModelView | None = None) -> Path:
    """Write to the new folder `path` the MLflow Model whose code is the file `python_model` (models from code: the file
    calls `set_model`; MLflow runs it at load, with `code_paths` first on `sys.path`, and unpickles nothing), holding
    `artifacts`; `logged_model`: the LoggedModel it is written for, which its MLmodel file then names."""
    identity = None if logged_model is None else Model(
        artifact_path=logged_model.artifact_location, model_uuid=logged_model.model_id, run_id=logged_model.run_id,
        model_id=logged_model.model_id)
    # MLflow copies the uv.lock and pyproject.toml of the working directory into a model (MLFLOW_UV_AUTO_DETECT), and
    # `--env-manager uv` then syncs that project instead of installing requirements.txt: octft's own project, which
    # no registry has. Its detection looks in `uv_project_path` only: the new model folder, which holds neither.
    mlflow.pyfunc.save_model(path=str(path), python_model=str(python_model),
                             code_paths=[str(item) for item in code_paths], artifacts=artifacts, signature=signature,
                             input_example=input_example, pip_requirements=pip_requirements, metadata=metadata,
                             mlflow_model=identity, uv_project_path=str(path))
    return Path(path)


def _logged_model_id(source: str) -> str | None:
    """The LoggedModel id of a model version's source `models:/<model_id>`; None for any other source."""
    reference = source.removeprefix("models:/") if source.startswith("models:/") else ""
    return reference if reference and not any(mark in reference for mark in "/@") else None


@contextlib.contextmanager
def _process_tracking_uri(uri: str) -> Iterator[None]:
    """The process's MLflow tracking URI set to `uri` for a block, then put back as it was. Set in MLflow's module
    state alone: `mlflow.set_tracking_uri` also writes $MLFLOW_TRACKING_URI, and MLflow's own `_use_tracking_uri`
    unsets that variable on its way out when no URI had been set, under a demo or a test that set it."""
    saved = mlflow_tracking_state._tracking_uri
    mlflow_tracking_state._tracking_uri = uri
    try:
        yield
    finally:
        mlflow_tracking_state._tracking_uri = saved


def load_pyfunc(folder: str | Path):
    """The MLflow Model in local folder `folder`, loaded as a pyfunc."""
    return mlflow.pyfunc.load_model(str(folder))
