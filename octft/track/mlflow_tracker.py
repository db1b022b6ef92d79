"""MLflow behind the `Tracker` seam: one run per tracker, through an explicit `MlflowClient`.

Nothing here touches MLflow's fluent API (``mlflow.start_run`` and its global active-run stack),
so a study's parent run and its trials' child runs can live in one process without stepping on
each other. mlflow itself is imported only when a tracker is built: the helpers below
(`redact`, `resolve_tracking_uri`, `check_not_shared`) are cheap to import.

>>> parent = MlflowTracker(experiment="octft-sweep", run_name="study-a")     # doctest: +SKIP
>>> with MlflowTracker(experiment="octft-sweep", run_name="trial-3",
...                    parent_run_id=parent.run_id) as trial:                # doctest: +SKIP
...     trial.log_params({"optim.lr_head": 3e-4})
...     trial.log_metrics({"val/loss": 0.71, "val/f1_healthy": 0.64}, step=1)
...     artifact_path = trial.log_model_checkpoint("runs/trial-3/best.pt")
>>> parent.register_model(trial.run_id, artifact_path, "octft-dm4")          # doctest: +SKIP
'1'
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import re
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlparse

from octft.errors import UsageError
from octft.redaction import normalise_url, redact_text, redact_url

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

logger = logging.getLogger(__name__)

RunStatus = Literal["FINISHED", "FAILED", "KILLED"]
RUN_STATUSES: tuple[str, ...] = ("FINISHED", "FAILED", "KILLED")

END_REASON_TAG = "octft.end_reason"
PARENT_RUN_TAG = "mlflow.parentRunId"  # the tag the MLflow UI nests child runs by
DEFAULT_DB_NAME = "mlflow.db"

# MLflow 3's own limits (mlflow.utils.validation); a longer value is refused by the store.
MAX_PARAM_VALUE_LENGTH = 6000
MAX_TAG_VALUE_LENGTH = 8000
_MAX_PARAMS_TAGS_PER_BATCH = 100
_MAX_METRICS_PER_BATCH = 1000
TRUNCATION_MARKER = "...[truncated]"

REDACTED = "***"
_SECRET_WORDS = ("key", "secret", "password", "passwd", "token")
# Config keys that contain a secret word but name something public (a key *inside* a checkpoint).
_PUBLIC_KEY_NAMES = frozenset({"checkpoint_key"})
_RUN_ID = re.compile(r"[A-Za-z0-9_\-]+")


# ---------------------------------------------------------------------------------------------
# Secrets and URIs


def _is_secret_key(key: str) -> bool:
    return any(
        word in part and part not in _PUBLIC_KEY_NAMES
        for part in key.lower().split(".")
        for word in _SECRET_WORDS
    )


def redact(value: Any, key: str = "") -> Any:
    """`value` with secrets hidden: anything under a secret-looking key, and passwords in URLs.

    A key is secret when one of its dotted parts contains "key", "secret", "password" or
    "token". Dicts and lists are redacted recursively (a dict's keys decide for their values).

    >>> redact("s3cr3t", key="storage.b2_application_key")
    '***'
    >>> redact("postgresql://optuna:pw@db:5432/studies")
    'postgresql://optuna:***@db:5432/studies'
    >>> redact({"optim": {"lr_head": 0.001}, "b2": {"key_id": "0012ab"}})
    {'optim': {'lr_head': 0.001}, 'b2': {'key_id': '***'}}
    """
    if key and _is_secret_key(key):
        return REDACTED
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {name: redact(item, str(name)) for name, item in value.items()}
    if isinstance(value, (list, tuple)):
        items = [redact(item) for item in value]
        return items if isinstance(value, list) else tuple(items)
    return value


def resolve_tracking_uri(uri: str | None = None) -> str:
    """The tracking URI to use: `uri`, else ``$MLFLOW_TRACKING_URI``, else ./mlflow.db (sqlite).

    The default is MLflow 3's own (it no longer accepts the old ./mlruns file store), made
    absolute so that a worker started from another directory logs to the same file.

    >>> resolve_tracking_uri("sqlite:////tmp/runs.db")
    'sqlite:////tmp/runs.db'
    """
    from octft import sqlite_wal

    sqlite_wal.install()  # every process that logs to MLflow resolves its URI first
    if uri:
        return normalise_url(uri)
    from_env = os.environ.get("MLFLOW_TRACKING_URI")
    if from_env:
        return normalise_url(from_env)
    return f"sqlite:///{Path.cwd() / DEFAULT_DB_NAME}"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///...` URI; None for other stores and in-memory sqlite.

    >>> sqlite_path("sqlite:////tmp/runs.db"), sqlite_path("postgresql://db/x")
    (PosixPath('/tmp/runs.db'), None)
    """
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):].split("?", 1)[0]
    return None if path in ("", ":memory:") else Path(path).expanduser()


def _database_identity(url: str) -> tuple | None:
    """What names a database behind a SQLAlchemy URL; None for non-SQL stores and in-memory sqlite."""
    if "://" not in url:
        return None  # a plain path: MLflow file store or an Optuna journal file, not a SQL database
    scheme, rest = url.split("://", 1)
    dialect = scheme.split("+", 1)[0].lower()
    if dialect == "sqlite":
        # sqlite:///relative.db, sqlite:////abs.db; sqlite:// and :memory: are private per connection.
        path = rest.split("?", 1)[0]
        path = path[1:] if path.startswith("/") else path
        if path in ("", ":memory:"):
            return None
        return ("sqlite", str(Path(path).expanduser().resolve()))
    if dialect in ("postgresql", "postgres", "mysql", "mariadb", "mssql"):
        parsed = urlparse(normalise_url(url))
        try:
            port = parsed.port
        except ValueError:  # the message would quote the netloc; name the URL redacted instead
            raise UsageError(f"{redact_url(url)}: the port is not a number; check the URL") from None
        return (dialect, (parsed.hostname or "localhost").lower(), port, parsed.path.strip("/"))
    return None


def check_not_shared(tracking_uri: str, optuna_storage_url: str | None) -> None:
    """Refuse an MLflow store and an Optuna storage in the same SQL database.

    Both keep their schema version in an ``alembic_version`` table, so each one's migrations
    break the other.

    >>> check_not_shared("sqlite:///mlflow.db", "sqlite:///optuna.db")
    >>> check_not_shared("sqlite:///runs.db", "sqlite:///./runs.db")
    Traceback (most recent call last):
    ...
    octft.errors.UsageError: MLflow tracking URI 'sqlite:///runs.db' and Optuna storage 'sqlite:///./runs.db' ...
    """
    if not optuna_storage_url:
        return
    tracking_db = _database_identity(tracking_uri)
    if tracking_db is not None and tracking_db == _database_identity(optuna_storage_url):
        raise UsageError(
            f"MLflow tracking URI {redact(tracking_uri)!r} and Optuna storage "
            f"{redact(optuna_storage_url)!r} are the same database; MLflow and Optuna both keep "
            "migration tables (alembic_version) there and would break each other. Give each its "
            "own file or database, e.g. sqlite:///mlflow.db and sqlite:///optuna.db."
        )


# ---------------------------------------------------------------------------------------------
# Values


def default_artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """Artifacts beside a sqlite store (`<db folder>/mlartifacts/<experiment>`), not in `./mlruns` of
    whatever directory a worker happened to start in. Other stores keep MLflow's default."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    path = tracking_uri[len("sqlite:///"):].split("?", 1)[0]
    if not path or path == ":memory:":
        return None
    return (Path(path).resolve().parent / "mlartifacts" / experiment).as_uri()


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


def _chunks(items: list, size: int) -> list[list]:
    return [items[start : start + size] for start in range(0, len(items), size)]


def _now_ms() -> int:
    return int(time.time() * 1000)


def _error_code(exc: Exception) -> str | None:
    return getattr(exc, "error_code", None)


# ---------------------------------------------------------------------------------------------
# The tracker


class MlflowTracker:
    """One MLflow run: a new one, a child of `parent_run_id`, or a resumed one (`run_id=`).

    `artifact_location` is used only when this tracker creates the experiment (where artifacts
    go; MLflow picks a default otherwise). With `run_id=` and `reopen=False` the tracker adds to a run
    without reopening it: its status and times are left alone and `finish` does nothing. With
    `log_system_metrics`, the machine's CPU, memory, GPU and TPU use are sampled into the run until `finish`. Use it as a context manager to end the run FINISHED,
    FAILED (on an exception) or KILLED (on Ctrl-C); `finish` does the same by hand.
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
    ) -> None:
        from mlflow.tracking import MlflowClient

        self._tracking_uri = resolve_tracking_uri(tracking_uri)
        # The registry lives with the runs unless the environment names another one for an implicit store.
        registry_uri = self._tracking_uri if tracking_uri else (os.environ.get("MLFLOW_REGISTRY_URI") or self._tracking_uri)
        self._client: MlflowClient = MlflowClient(tracking_uri=self._tracking_uri, registry_uri=registry_uri)
        self.experiment = experiment
        self._finished = False
        self.end_status: str | None = None  # what `finish` ended the run as

        run_tags = dict(tags or {})
        if parent_run_id is not None:
            self._require_run(parent_run_id, "parent_run_id", "start the parent run first")
            run_tags[PARENT_RUN_TAG] = parent_run_id

        if run_id is not None:
            run = self._require_run(run_id, "run_id", "drop run_id= to start a new run")
            self.run_id: str | None = run.info.run_id
            if not reopen:
                # Logging to an ended run as it stands: its status, start and end time stay as they were, so
                # the UI's duration still says how long it trained. `finish` is then a no-op.
                self._finished = True
            else:
                # The run is live again: a reason left by its previous end no longer holds.
                if END_REASON_TAG in run.data.tags:
                    self._client.delete_tag(run_id, END_REASON_TAG)
                self._client.update_run(run_id, status="RUNNING")
            if run_name:
                self._client.update_run(run_id, name=run_name)
            if run_tags:
                self.set_tags(run_tags)
        else:
            experiment_id = self._experiment_id(experiment, artifact_location)
            run = self._client.create_run(experiment_id, run_name=run_name, tags=self._tag_values(run_tags))
            self.run_id = run.info.run_id
        self._system_metrics = None
        if log_system_metrics and not self._finished:
            from octft.track.system_metrics import start_system_metrics

            self._system_metrics = start_system_metrics(self.run_id, self._tracking_uri)

    def __repr__(self) -> str:
        return (
            f"MlflowTracker(run_id={self.run_id!r}, experiment={self.experiment!r}, "
            f"tracking_uri={redact(self._tracking_uri)!r})"
        )

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
        return redact(self._tracking_uri)

    # -- the Tracker seam ---------------------------------------------------------------------

    def log_params(self, params: dict[str, object]) -> None:
        """Log flat dotted params; values are redacted, stringified and cut to MLflow's limit.

        Logging a param again with the same value is a no-op (a resumed run re-logs its
        config); a different value is an error, since MLflow params never change.
        """
        from mlflow.entities import Param

        if not params:
            return
        values = {
            str(key): _truncate("param", str(key), _format_param(redact(value, str(key))), MAX_PARAM_VALUE_LENGTH)
            for key, value in params.items()
        }
        logged = self._client.get_run(self.run_id).data.params
        changed = [
            f"{key}: {logged[key]!r} -> {value!r}" for key, value in values.items() if key in logged and logged[key] != value
        ]
        if changed:
            raise ValueError(
                f"MLflow run {self.run_id}: params cannot change once logged ({'; '.join(changed)}); "
                "start a new run (without run_id=) to try other values"
            )
        new = [Param(key, value) for key, value in values.items() if key not in logged]
        for chunk in _chunks(new, _MAX_PARAMS_TAGS_PER_BATCH):
            self._client.log_batch(self.run_id, params=chunk)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Log one value per metric at `step` (the epoch); NaN is kept as NaN."""
        self.log_metrics_by_step([(step, metrics)])

    def log_metrics_by_step(self, rows: list[tuple[int, dict[str, float]]]) -> None:
        """Many steps' metrics in as few writes as MLflow takes (1,000 values each): one per run, typically."""
        from mlflow.entities import Metric

        timestamp = _now_ms()
        entries = []
        for step, metrics in rows:
            for key, value in metrics.items():
                try:
                    number = float(value)
                except (TypeError, ValueError):
                    raise ValueError(
                        f"metric {key!r} has value {value!r}, which is not a number; "
                        "log floats (read tensors with .item() at the logging point)"
                    ) from None
                entries.append(Metric(str(key), number, timestamp, int(step)))
        for chunk in _chunks(entries, _MAX_METRICS_PER_BATCH):
            self._client.log_batch(self.run_id, metrics=chunk)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Copy a file or a whole directory into the run's artifacts (under `artifact_path`)."""
        local = Path(path)
        if not local.exists():
            raise FileNotFoundError(f"artifact {str(local)!r} does not exist; write it before logging it")
        if local.is_dir():
            self._client.log_artifacts(self.run_id, str(local), artifact_path)
        else:
            self._client.log_artifact(self.run_id, str(local), artifact_path)

    def log_figure(self, figure: Any, name: str) -> None:
        """Store a matplotlib figure as ``name`` (``.png`` is added when `name` has no suffix)."""
        if not posixpath.splitext(name)[1]:
            name += ".png"
        self._client.log_figure(self.run_id, figure, name)

    def log_dict(self, obj: dict, name: str) -> None:
        """Store `obj` as json, or yaml when `name` ends in .yaml/.yml; secrets are redacted."""
        if posixpath.splitext(name)[1].lower() not in (".json", ".yaml", ".yml"):
            name += ".json"
        # Plain JSON types first (Path, tuples...), so both writers accept it.
        plain = json.loads(json.dumps(obj, default=str))
        self._client.log_dict(self.run_id, redact(plain), name)

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        entries = [RunTag(key, value) for key, value in self._tag_values(tags).items()]
        for chunk in _chunks(entries, _MAX_PARAMS_TAGS_PER_BATCH):
            self._client.log_batch(self.run_id, tags=chunk)

    def log_dataset(self, table: Any, *, name: str, source: str, digest: str, context: str,
                    tags: dict[str, str] | None = None) -> None:
        """Record `table` (a pandas DataFrame) as a dataset input of the run, shown in the UI's Dataset column.

        `digest` identifies the data (runs on other data show another one), `context` says what the run did
        with it ("training", "validation"); `tags` go on the input (e.g. counts per class).
        """
        import mlflow.data
        from mlflow.entities import DatasetInput, InputTag
        from mlflow.exceptions import MlflowException

        with warnings.catch_warnings():
            # MLflow warns when it guesses a source's kind from the URI and when a schema has integer columns
            # (a hint for model inputs); neither concerns a record of what a run trained on.
            warnings.simplefilter("ignore")
            dataset = mlflow.data.from_pandas(table, source=redact(source), name=name, digest=digest)._to_mlflow_entity()
        input_tags = [InputTag("mlflow.data.context", context)]
        input_tags += [InputTag(key, value) for key, value in self._tag_values(tags or {}).items()]
        inputs = [DatasetInput(dataset, tags=input_tags)]
        try:
            self._client.log_inputs(self.run_id, datasets=inputs)
        except MlflowException as error:
            # Parallel trials log the same dataset at once; the store keeps one row per (experiment, name,
            # digest), so the loser of that race gets a unique-constraint error. The row exists now: link again.
            if "UNIQUE" not in str(error).upper() and "DUPLICATE" not in str(error).upper():
                raise
            self._client.log_inputs(self.run_id, datasets=inputs)

    def finish(self, status: RunStatus, reason: str | None = None) -> None:
        """End the run as FINISHED, FAILED or KILLED; `reason` goes to the tag ``octft.end_reason``.

        Only the first call counts, so a loop that ended the run itself (e.g. KILLED when pruned)
        is not overwritten by the context manager's FINISHED.
        """
        if status not in RUN_STATUSES:
            raise ValueError(f"run status {status!r} is not one of {', '.join(RUN_STATUSES)}")
        if self._finished:
            return
        if self._system_metrics is not None:
            # Flushed while the run is still RUNNING: the monitor stops at a run that has ended.
            self._system_metrics.finish()
            self._system_metrics = None
        if reason:
            self.set_tags({END_REASON_TAG: reason})
        self._client.set_terminated(self.run_id, status=status)
        self._finished = True
        self.end_status = status

    # -- checkpoints and the model registry ---------------------------------------------------

    def log_model_checkpoint(self, path: str | Path, artifact_path: str = "checkpoint") -> str:
        """Log the best checkpoint (a file or a directory) under `artifact_path` and return it.

        Keep the file name fixed (e.g. ``best.pt``): a later best replaces the earlier one,
        and the directory is what `register_model` registers.
        """
        self.log_artifact(path, artifact_path)
        return artifact_path

    def register_model(
        self,
        run_id: str,
        artifact_path: str,
        name: str,
        alias: str | None = "champion",
        tags: dict[str, str] | None = None,
    ) -> str:
        """Register ``runs:/<run_id>/<artifact_path>`` as a version of model `name`; return the version.

        The registered model is created when absent; registering the same run and artifact
        again returns the existing version. `alias` (e.g. "champion") is moved to this
        version, so ``models:/<name>@champion`` resolves to it.
        """
        if not _RUN_ID.fullmatch(run_id):
            raise ValueError(f"run_id {run_id!r} is not an MLflow run id (letters, digits, '-', '_')")
        artifact_path = artifact_path.strip("/")
        self._require_artifact(run_id, artifact_path)
        self._ensure_registered_model(name)
        source = f"runs:/{run_id}/{artifact_path}"
        # MLflow may store the source as given (runs:/...) or resolved to the run's artifact location,
        # depending on process-wide settings: the same run and artifact path is the same version either way.
        existing = [
            version
            for version in self._client.search_model_versions(f"run_id='{run_id}'")
            if version.name == name
            and (version.source == source or version.source.rstrip("/").endswith(f"/{artifact_path}"))
        ]
        if existing:
            model_version = min(existing, key=lambda version: int(version.version))
        else:
            model_version = self._client.create_model_version(name, source, run_id=run_id)
        version = str(model_version.version)
        if alias:
            self._client.set_registered_model_alias(name, alias, version)
        for key, value in self._tag_values(tags or {}).items():
            self._client.set_model_version_tag(name, version, key, value)
        return version

    # -- helpers ------------------------------------------------------------------------------

    def _tag_values(self, tags: dict) -> dict[str, str]:
        return {
            str(key): _truncate("tag", str(key), str(redact(value, str(key))), MAX_TAG_VALUE_LENGTH)
            for key, value in tags.items()
        }

    def _require_run(self, run_id: str, argument: str, advice: str):
        from mlflow.exceptions import MlflowException

        try:
            return self._client.get_run(run_id)
        except MlflowException as exc:
            if _error_code(exc) != "RESOURCE_DOES_NOT_EXIST":
                raise
            raise UsageError(f"{argument}={run_id!r}: no such MLflow run in {self.tracking_uri}; {advice}") from None

    def _experiment_id(self, name: str, artifact_location: str | None) -> str:
        from mlflow.exceptions import MlflowException

        experiment = self._client.get_experiment_by_name(name)
        if experiment is None:
            if artifact_location is None:
                artifact_location = default_artifact_location(self._tracking_uri, name)
            try:
                return self._client.create_experiment(name, artifact_location=artifact_location)
            except MlflowException as exc:
                # Another worker created it between our look-up and create: use theirs.
                if _error_code(exc) != "RESOURCE_ALREADY_EXISTS":
                    raise
                experiment = self._client.get_experiment_by_name(name)
        if experiment.lifecycle_stage == "deleted":
            raise UsageError(
                f"MLflow experiment {name!r} is deleted in {self.tracking_uri}; restore it "
                f"(mlflow experiments restore --experiment-id {experiment.experiment_id}) or pick another name"
            )
        return experiment.experiment_id

    def _require_artifact(self, run_id: str, artifact_path: str) -> None:
        parent = posixpath.dirname(artifact_path) or None
        present = [entry.path for entry in self._client.list_artifacts(run_id, parent)]
        if artifact_path not in present:
            raise FileNotFoundError(
                f"MLflow run {run_id} has no artifact {artifact_path!r} (found: {present or 'nothing'}); "
                "log it first with tracker.log_model_checkpoint(path)"
            )

    def _ensure_registered_model(self, name: str) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self._client.get_registered_model(name)
            return
        except MlflowException as exc:
            if _error_code(exc) != "RESOURCE_DOES_NOT_EXIST":
                raise
        try:
            self._client.create_registered_model(name)
        except MlflowException as exc:
            if _error_code(exc) != "RESOURCE_ALREADY_EXISTS":
                raise
