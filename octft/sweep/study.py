"""A study in shared storage: open it, create or resume it, keep its trial budget exact, launch workers.

    >>> result = launch("sweeps/demo.yaml", workers=2, overrides=["data.uri=/data/aireadi"])  # doctest: +SKIP

`octft sweep launch SPEC --workers K` starts K worker processes on this machine (`octft.sweep.workers`);
each runs one trial at a time on its warm trial runner (`octft.sweep.trial`), a process that imports
torch once (while the launch opens the study and prepares the data) and keeps its compiled graphs from trial
to trial. Running the same
command on every host of a pod slice adds that host's workers to the same study, as long as all hosts
reach the same storage (PostgreSQL; sqlite only works on one machine). Launching again resumes: trials
whose worker died (no heartbeat for `grace_period` seconds) are marked FAIL, their MLflow runs FAILED,
and each is retried once. K workers together run exactly `n_trials` trials: a worker takes a trial
only while holding the study lock (`study_lock`), after counting the trials that already exist.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from octft.config import ConfigError, ExperimentConfig, load_experiment
from octft.sweep.spec import (
    OBJECTIVE_KEYS,
    STORAGE_ENV,
    SweepSpec,
    format_value,
    load_sweep,
    redact_url,
    sampler_settings,
)
from octft.redaction import normalise_url, redact_text
from octft.track import check_not_shared, resolve_tracking_uri
from octft.errors import OctftError

DEFAULT_HEARTBEAT_S = 10
SQLITE_BUSY_TIMEOUT_S = 30
CONNECT_TIMEOUT_S = 5
# Sections of a sweep file; every other key=value on the command line addresses the base experiment.
SWEEP_SECTIONS = frozenset(SweepSpec.model_fields)


class StorageError(OctftError, ValueError):
    """The Optuna storage cannot be used (unreachable, unsupported); the message names it, redacted."""


# ---------------------------------------------------------------------------------------------------- inputs


def split_overrides(overrides: Sequence[str]) -> tuple[list[str], list[str]]:
    """Command-line key=value pairs -> (sweep-file overrides, base-experiment overrides), by first key part.

    >>> split_overrides(["n_trials=2", "fixed.train.epochs=3", "data.uri=/data/aireadi"])
    (['n_trials=2', 'fixed.train.epochs=3'], ['data.uri=/data/aireadi'])
    """
    sweep, experiment = [], []
    for text in overrides:
        key = text.split("=", 1)[0].strip()
        (sweep if key.split(".", 1)[0] in SWEEP_SECTIONS else experiment).append(text)
    return sweep, experiment


def load_launch_spec(spec_path: str | Path, overrides: Sequence[str] = (), storage: str | None = None) -> tuple[SweepSpec, list[str], list[str]]:
    """The sweep spec with its overrides applied, plus (sweep overrides, experiment overrides).

    Experiment overrides must not touch a key of the search space: the trial's sampled value would be
    silently replaced.
    """
    sweep_overrides, experiment_overrides = split_overrides(overrides)
    spec = load_sweep(spec_path, sweep_overrides)
    if storage:
        spec.storage = storage  # validated on assignment: its password percent-encoded before any parsing
    keys = override_keys(experiment_overrides)
    objective = sorted(keys & set(OBJECTIVE_KEYS))
    if objective:
        raise ConfigError(
            f"{spec_path}: override {', '.join(objective)} would give trials another objective than the study's; "
            "set objective.metric=... / objective.direction=... (the sweep's objective) instead"
        )
    clash = sorted(keys & set(spec.space))
    if clash:
        raise ConfigError(
            f"{spec_path}: override {', '.join(clash)} is a key of the search space; change the space instead, "
            f"e.g. space.{clash[0]}.low=... or fixed.{clash[0]}=... with space.{clash[0]}=null"
        )
    base_config(spec, experiment_overrides)  # every override is checked before any worker starts
    return spec, sweep_overrides, experiment_overrides


def base_config(spec: SweepSpec, experiment_overrides: Sequence[str] = ()) -> ExperimentConfig:
    """The base experiment with the objective, `fixed` and the command-line overrides (no trial params)."""
    fixed = spec.objective_overrides() + [f"{key}={format_value(value)}" for key, value in spec.fixed.items()]
    return load_experiment(spec.base, fixed + list(experiment_overrides))


def study_dir(spec: SweepSpec, experiment_overrides: Sequence[str] = ()) -> Path:
    """`<output_dir of the base experiment>/sweeps/<study_name>/`, absolute."""
    return (Path(base_config(spec, experiment_overrides).output_dir) / "sweeps" / spec.study_name).resolve()


def sweep_tracking_uri(spec: SweepSpec) -> str:
    """spec.mlflow.tracking_uri, else $MLFLOW_TRACKING_URI, else ./mlflow.db; never Optuna's database."""
    uri = resolve_tracking_uri(spec.mlflow.tracking_uri)
    check_not_shared(uri, spec.storage)
    return uri


# ---------------------------------------------------------------------------------------------------- storage


def open_storage(
    url: str,
    *,
    heartbeat_interval: int | None = DEFAULT_HEARTBEAT_S,
    grace_period: int | None = None,
    create: bool = True,
) -> RDBStorage:
    """An RDB storage that fails fast when unreachable and waits (not crashes) on a busy sqlite file.

    With `heartbeat_interval`, a RUNNING trial with no heartbeat for `grace_period` seconds (default twice
    the interval) is stale: `reap_stale_trials` marks it FAIL and queues one retry. `create=False` (read-only
    commands) refuses a sqlite file that does not exist instead of creating it.
    """
    url = normalise_url(url)  # before anything parses it: a password may hold any character
    shown = redact_url(url)
    kind = url.split(":", 1)[0].split("+", 1)[0].lower()
    engine_kwargs: dict[str, Any] = {}
    if kind == "sqlite":
        path = _sqlite_path(url)
        if not create and not Path(path).is_file():
            raise StorageError(
                f"Optuna storage {shown!r}: no such database file {path}; start the study with "
                "octft sweep launch, or pass the storage it uses with --storage"
            )
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs["connect_args"] = {"timeout": SQLITE_BUSY_TIMEOUT_S}
        from octft import sqlite_wal

        sqlite_wal.install()  # commits append to a log: a sweep commits every epoch
    elif kind in ("postgresql", "postgres"):
        engine_kwargs["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT_S}
        url = _postgres_driver(url)
    elif kind in ("mysql", "mariadb"):
        engine_kwargs["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT_S}
    else:
        raise StorageError(
            f"Optuna storage {redact_url(url)!r} is not supported: use sqlite:///path.db on one machine or "
            "postgresql://user:password@host/db across machines (--storage or $" + STORAGE_ENV + ")"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        callback = RetryHeartbeatStaleTrialCallback(max_retry=1) if heartbeat_interval else None
        try:
            return RDBStorage(
                url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_interval,
                grace_period=grace_period, heartbeat_stale_trial_callback=callback,
                skip_table_creation=not create,  # read-only commands write nothing, not even an empty schema
            )
        except Exception as error:  # sqlalchemy's OperationalError and friends: unreachable, refused, bad auth
            first_line = redact_text(str(error), _passwords(url)).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise StorageError(
                f"cannot open the Optuna storage {shown!r}: {first_line}. Check that the database server "
                f"is up and reachable from this host, or pass another one with --storage / ${STORAGE_ENV}"
            ) from None


def _passwords(url: str) -> list[str]:
    """The password of `url` in the forms a driver's message may quote it (decoded and as written)."""
    from urllib.parse import unquote, urlsplit

    password = urlsplit(url).password
    return [password, unquote(password)] if password else []


def _postgres_driver(url: str) -> str:
    """`postgresql://` with the driver that is installed: SQLAlchemy 2.1 defaults to psycopg (3), octft ships psycopg2."""
    scheme, rest = url.split("://", 1)
    if "+" in scheme:
        return url
    import importlib.util

    if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2") is not None:
        return f"postgresql+psycopg2://{rest}"
    return url


def _sqlite_path(url: str) -> str:
    path = url.split("://", 1)[1].split("?", 1)[0]
    path = path.removeprefix("/")
    if path in ("", ":memory:"):
        raise StorageError(
            f"Optuna storage {url!r} is in memory: worker processes cannot share it; use sqlite:///optuna.db"
        )
    return path


@contextlib.contextmanager
def study_lock(storage: RDBStorage, study_name: str) -> Iterator[None]:
    """Serialize "count trials, then take one" across processes and hosts.

    sqlite: an flock on a file next to the database (all sqlite users are on one machine). PostgreSQL:
    a session advisory lock; MySQL: GET_LOCK. Both are released if the holder dies.
    """
    url = str(storage.engine.url)
    dialect = storage.engine.dialect.name
    if dialect == "sqlite":
        with open(f"{_sqlite_path(url)}.octft-lock", "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
        return
    from sqlalchemy import text

    key = int.from_bytes(hashlib.sha256(f"octft:{study_name}".encode()).digest()[:8], "big", signed=True)
    with storage.engine.connect() as connection:
        if dialect == "postgresql":
            connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": key})
            release = text("SELECT pg_advisory_unlock(:key)")
        else:
            connection.execute(text("SELECT GET_LOCK(:key, 600)"), {"key": str(key)})
            release = text("SELECT RELEASE_LOCK(:key)")
        try:
            yield
        finally:
            connection.execute(release, {"key": key if dialect == "postgresql" else str(key)})
            connection.commit()


# ---------------------------------------------------------------------------------------------------- budget


def retried_numbers(trials: Sequence[FrozenTrial]) -> set[int]:
    """Numbers of trials that a later trial retries (their place in the budget went to the retry)."""
    return {number for trial in trials for number in trial.system_attrs.get("retry_history", [])}


def budget_used(trials: Sequence[FrozenTrial]) -> int:
    """Trials that count against n_trials: all of them, except failed ones replaced by a retry."""
    replaced = retried_numbers(trials)
    return sum(1 for trial in trials if trial.number not in replaced)


def take_trial(study: optuna.Study, n_trials: int | None) -> optuna.trial.Trial | None:
    """The next trial for a worker, or None when the budget is spent. Hold `study_lock` while calling.

    Trials count against `n_trials` in the order they were created (a retry in place of the trial it
    replaces). A waiting trial (a retry, or one enqueued) is taken first when it falls within the budget;
    enqueued trials beyond it stay waiting, for a later launch with a larger budget. Otherwise a new trial
    is created only while fewer than `n_trials` count.
    """
    trials = study.get_trials(deepcopy=False)
    if n_trials is None:
        return study.ask()
    replaced = retried_numbers(trials)
    counted = sorted((trial for trial in trials if trial.number not in replaced), key=lambda trial: trial.number)
    if any(trial.state == TrialState.WAITING for trial in counted[:n_trials]) or len(counted) < n_trials:
        return study.ask()  # Optuna hands out the oldest waiting trial first
    return None


def next_trial(study: optuna.Study, storage: RDBStorage, n_trials: int | None) -> optuna.trial.Trial | None:
    """`take_trial` under the study lock: what a worker or the probe loop calls for its next trial."""
    with study_lock(storage, study.study_name), warnings.catch_warnings():
        # Optuna warns that heartbeats are meant for Study.optimize; our loops beat for their trials themselves.
        warnings.filterwarnings("ignore", message="Heartbeat of storage")
        return take_trial(study, n_trials)


def reap_stale_trials(study: optuna.Study, storage: RDBStorage, tracking_uri: str) -> list[int]:
    """Fail trials whose worker died (stale heartbeat), queue their retry, and end their MLflow runs FAILED.

    What `optuna.storages.fail_stale_trials` does, plus the user attr `fail_reason`, which must be written
    while the trial still runs (Optuna refuses attrs on finished trials). Returns the numbers failed now.
    """
    from octft.sweep.tracking import settle_run

    reason = "the worker running this trial died (no heartbeat within the grace period); retried once"
    callback = storage.get_heartbeat_stale_trial_callback()
    failed = []
    # Optuna's own stale-trial query: the one fail_stale_trials uses.
    for trial_id in storage._get_stale_trial_ids(storage.get_study_id_from_name(study.study_name)):
        try:
            storage.set_trial_user_attr(trial_id, "fail_reason", reason)
            if not storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker reaped it first
        trial = storage.get_trial(trial_id)
        failed.append(trial.number)
        settle_run(tracking_uri, trial.user_attrs.get("mlflow_run_id"), TrialState.FAIL, reason)
        if callback is not None:
            callback(study, trial)
    return failed


# ---------------------------------------------------------------------------------------------------- launch


def create_or_load_study(
    spec: SweepSpec, storage: RDBStorage, *, spec_path: str | Path, sweep_overrides: Sequence[str],
    experiment_overrides: Sequence[str], tracking_uri: str,
) -> tuple[optuna.Study, int]:
    """Create the study, or load it when it exists; record its settings and its MLflow parent run once.

    Returns the study and this launch's index (0 for the first launch on any host, then 1, 2, ...).
    """
    from octft.sweep.pruners import build_pruner
    from octft.sweep.spec import build_sampler
    from octft.sweep.tracking import ensure_parent_run

    with study_lock(storage, spec.study_name):
        study = optuna.create_study(
            storage=storage, study_name=spec.study_name, direction=spec.objective.direction,
            sampler=build_sampler(spec), pruner=build_pruner(spec), load_if_exists=True,
        )
        if study.direction.name.lower() != spec.objective.direction:
            raise ConfigError(
                f"study {spec.study_name!r} in {spec.storage_redacted} was created to {study.direction.name.lower()}, "
                f"but {spec_path} says {spec.objective.direction}; use another study_name"
            )
        if "spec_path" not in study.user_attrs:
            attrs = {
                "spec_path": str(Path(spec_path).resolve()),
                "base": spec.base,
                "sampler": sampler_settings(spec),
                "pruner": spec.pruner.model_dump(),
                "objective": spec.objective.model_dump(),
                "sweep_overrides": list(sweep_overrides),
                "cli_overrides": list(experiment_overrides),
            }
            for key, value in attrs.items():
                study.set_user_attr(key, value)
        elif list(study.user_attrs.get("cli_overrides", [])) != list(experiment_overrides):
            raise ConfigError(
                f"study {spec.study_name!r} was launched with overrides {study.user_attrs['cli_overrides']}, now "
                f"{list(experiment_overrides)}; its trials must share one config: launch with the same overrides "
                "or use another study_name"
            )
        if study.metric_names != [spec.objective.metric]:
            with warnings.catch_warnings():
                # Experimental in Optuna 5, and harmless: it names the objective (optuna-dashboard then shows
                # val/balanced_accuracy, not "Objective 0"), so its warning stays out of the user's way.
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                study.set_metric_names([spec.objective.metric])
        ensure_parent_run(study, spec, tracking_uri)
        # Each launch gets its own sampler seeds: the same seed again would draw the first launch's params again.
        launch_index = int(study.user_attrs.get("launches", 0))
        study.set_user_attr("launches", launch_index + 1)
    return study, launch_index


def worker_seed_offset(launch_index: int, worker_index: int) -> int:
    """Seed offset of a worker's sampler, distinct for every worker of every launch (on any host)."""
    return launch_index * 10_007 + worker_index


@dataclass
class LaunchRecord:
    """What a launch resolved once and every worker of it uses: written to the study folder as JSON.

    `spec` is the resolved sweep spec without its storage URL (it may hold a password; workers get it
    from $OCTFT_OPTUNA_STORAGE). Workers never reload the sweep file or re-apply the overrides.
    """

    spec_path: str
    spec: dict[str, Any]
    experiment_overrides: list[str]
    tracking_uri: str
    parent_run_id: str
    study_dir: str
    launch_index: int = 0  # 0 for the study's first launch on any host, then 1, 2, ...

    def sweep_spec(self, storage: str) -> SweepSpec:
        return SweepSpec.model_validate({**self.spec, "storage": storage})

    def write(self, path: Path) -> None:
        """Atomically: a worker never reads half a record."""
        partial = path.with_name(f".{path.name}.partial")
        partial.write_text(json.dumps(asdict(self), indent=2) + "\n")
        partial.replace(path)

    @classmethod
    def read(cls, path: Path) -> "LaunchRecord":
        return cls(**json.loads(path.read_text()))


@dataclass
class LaunchResult:
    study_name: str
    study_dir: Path
    parent_run_id: str
    worker_exit_codes: list[int]
    counts: dict[str, int]  # trials per state after the launch
    reaped: list[int]  # trials found dead at launch (FAIL, retried)
    enqueued: list[dict[str, Any]] = field(default_factory=list)  # warm-start parameter sets enqueued now


MICRO_BATCH_KEY = "runtime.micro_batch_rows"


def override_keys(overrides: Sequence[str]) -> set[str]:
    """The dotted keys of `key=value` overrides."""
    return {text.split("=", 1)[0].strip() for text in overrides}


def check_trial_layouts(spec: SweepSpec, base: ExperimentConfig, devices_per_trial: int) -> None:
    """Refuse at launch a space whose sampled batch layouts the trials' devices cannot hold (XLA runtimes; an
    eager runtime trains on one device), or cannot cut into micro-batches of a `runtime.micro_batch_rows` the
    user set."""
    from octft.sweep.space import check_batch_layouts
    from octft.train.devices import platform

    xla = base.runtime.kind in ("xla", "auto") and bool(platform())
    micro = None if MICRO_BATCH_KEY in spec.space else base.runtime.micro_batch_rows
    if xla or micro is not None:
        check_batch_layouts(spec.space, base.train.batch_size, base.train.accumulation_steps,
                            devices_per_trial if xla else 1, micro_batch_rows=micro)


def fixed_micro_batch(spec: SweepSpec, base: ExperimentConfig, devices_per_trial: int,
                      experiment_overrides: Sequence[str] = ()) -> list[str]:
    """The override that gives every trial of an XLA sweep one micro-batch shape (`runtime.micro_batch_rows`),
    so that trials with other accumulation counts or batch sizes compile nothing new; [] on an eager runtime,
    when the space samples one effective batch, or when the user sets the key (null included) in the base
    experiment, the sweep's `fixed` or `space`, or `experiment_overrides`."""
    from octft.sweep.space import shared_micro_batch_rows
    from octft.train.devices import platform

    if base.runtime.kind not in ("xla", "auto") or not platform():
        return []
    if (base.runtime.micro_batch_rows is not None or MICRO_BATCH_KEY in spec.space or MICRO_BATCH_KEY in spec.fixed
            or MICRO_BATCH_KEY in override_keys(experiment_overrides)):
        return []
    rows = shared_micro_batch_rows(spec.space, base.train.batch_size, base.train.accumulation_steps, devices_per_trial)
    return [] if rows is None else [f"{MICRO_BATCH_KEY}={rows}"]


def _launched_without_fixed_micro_batch(storage: RDBStorage, study_name: str) -> bool:
    """Whether an earlier launch recorded this study's overrides without `runtime.micro_batch_rows` (a study from
    before octft fixed it). False for a new study, or one made with Optuna alone (e.g. to enqueue trials)."""
    try:
        study_id = storage.get_study_id_from_name(study_name)
    except KeyError:
        return False
    recorded = storage.get_study_user_attrs(study_id).get("cli_overrides")
    return recorded is not None and MICRO_BATCH_KEY not in override_keys(recorded)


def launch(
    spec_path: str | Path,
    *,
    n_trials: int | None = None,
    workers: int = 1,
    devices_per_trial: int | None = None,
    storage: str | None = None,
    overrides: Sequence[str] = (),
    heartbeat_interval: int = DEFAULT_HEARTBEAT_S,
    grace_period: int | None = None,
    enqueue_from: str | None = None,
    enqueue_top: int = 3,
    fresh_process_per_trial: bool = False,
) -> LaunchResult:
    """Create or resume the study of `spec_path` and run `workers` worker processes until the budget is spent.

    `overrides`: key=value pairs; sweep-file keys (n_trials, fixed.*, sampler.*, ...) change the spec,
    all others the base experiment of every trial (e.g. data.uri=/data/aireadi). `enqueue_from`: an earlier
    sweep file or `models:/NAME@champion` whose params are tried first (`octft.sweep.warmstart`).
    `devices_per_trial=None`: on a TPU host its chips divided among the workers, elsewhere 1.
    `fresh_process_per_trial`: a new trial runner for every trial (slower; for debugging a runner).
    """
    if devices_per_trial is None:
        from octft.train.devices import default_devices_per_trial

        devices_per_trial = default_devices_per_trial(workers)
    if workers < 1 or devices_per_trial < 1:
        raise ConfigError(f"--workers ({workers}) and --devices-per-trial ({devices_per_trial}) must be at least 1")
    storage_url = storage or os.environ.get(STORAGE_ENV) or None
    spec, sweep_overrides, experiment_overrides = load_launch_spec(spec_path, overrides, storage_url)
    if n_trials is not None:
        spec.n_trials = n_trials
    tracking_uri = sweep_tracking_uri(spec)
    base = base_config(spec, experiment_overrides)
    check_trial_layouts(spec, base, devices_per_trial)
    layout_overrides = fixed_micro_batch(spec, base, devices_per_trial, experiment_overrides)
    if layout_overrides:
        # Beside the command-line overrides, so the study records it and every replay runs the same shapes.
        experiment_overrides = [*experiment_overrides, *layout_overrides]
        print(f"{layout_overrides[0]} for every trial: one micro-batch shape, so trials share compiled graphs", flush=True)
    deadline = time.time() + spec.timeout_s if spec.timeout_s else None
    directory = study_dir(spec, experiment_overrides)
    directory.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, **{STORAGE_ENV: spec.storage, "MLFLOW_TRACKING_URI": tracking_uri})
    from octft.sweep.probe import is_probe_study, run_probe_trials

    probe = is_probe_study(spec, base_config(spec, experiment_overrides))
    runner = None
    if not probe:
        # Worker 0 is this process. Its trial runner starts first, so that it imports torch and MLflow (most of
        # a worker's start) while this process opens the study and prepares the data.
        from octft.sweep.workers import TrialRunner, device_env

        runner = TrialRunner(dict(env, **device_env(0, devices_per_trial), PYTHONUNBUFFERED="1"),
                             directory / "runner-0.log")
        runner.start()
    rdb = open_storage(spec.storage, heartbeat_interval=heartbeat_interval, grace_period=grace_period)
    # Workers 1.. are processes, started now for the same reason; they take trials once they read the launch
    # record's path. A probe study runs its trials in this process; each further worker is one more probe process.
    processes = [
        subprocess.Popen(worker_command(index, probe=probe, devices_per_trial=devices_per_trial, study_dir=directory,
                                        n_trials=spec.n_trials, heartbeat_interval=heartbeat_interval,
                                        grace_period=grace_period, deadline=deadline,
                                        fresh_process_per_trial=fresh_process_per_trial),
                         env=env, stdin=subprocess.PIPE, text=True)
        for index in range(1, workers)
    ]
    try:
        # LP-FT: a probe sweep file in init.head_from becomes one run, chosen now and kept for the study's life.
        head_from = resolved_head_from(spec, rdb, experiment_overrides, spec_path=spec_path)
        if head_from is not None:
            # Into `fixed` when the sweep file set it there, else beside the command-line overrides; the head's
            # shape comes with it (a warm start needs the probe's head), so every trial and replay builds that head.
            prefix = "fixed." if "init.head_from" in spec.fixed else ""
            target = sweep_overrides if prefix else experiment_overrides
            target += [f"{prefix}{key}={value}" for key, value in {**head_from["head"], "init.head_from": head_from["run"]}.items()]
            spec, sweep_overrides, experiment_overrides = load_launch_spec(
                spec_path, [*sweep_overrides, *experiment_overrides], storage_url)
            if n_trials is not None:
                spec.n_trials = n_trials
        if layout_overrides and _launched_without_fixed_micro_batch(rdb, spec.study_name):
            # A study launched before octft fixed the micro-batch: its trials keep the layouts they ran with.
            experiment_overrides = [text for text in experiment_overrides if text not in layout_overrides]
            print(f"study {spec.study_name!r} was launched without {layout_overrides[0]}: its trials keep their own "
                  "micro-batch layouts", flush=True)
        study, launch_index = create_or_load_study(
            spec, rdb, spec_path=spec_path, sweep_overrides=sweep_overrides,
            experiment_overrides=experiment_overrides, tracking_uri=tracking_uri,
        )
        if head_from is not None and "head_from" not in study.user_attrs:
            study.set_user_attr("head_from", head_from)
        parent_run_id = str(study.user_attrs["mlflow_parent_run_id"])
        from octft.sweep.tracking import end_parent_run, reopen_parent_run

        reopen_parent_run(tracking_uri, parent_run_id)
        reaped = reap_stale_trials(study, rdb, tracking_uri)
        if reaped:
            print(f"trials {reaped} of study {spec.study_name!r} lost their worker: marked FAIL, retried once", flush=True)
        enqueued: list[dict[str, Any]] = []
        if enqueue_from:
            from octft.sweep.warmstart import warm_start

            with study_lock(rdb, spec.study_name):  # two hosts launching together enqueue each set once
                enqueued = warm_start(study, spec, enqueue_from, top=enqueue_top, tracking_uri=tracking_uri,
                                      parent_run_id=parent_run_id)
            print(f"warm start from {enqueue_from}: {len(enqueued)} parameter sets enqueued"
                  + "".join(f"\n  {entry['origin']}" for entry in enqueued), flush=True)

        record = LaunchRecord(
            spec_path=str(Path(spec_path).resolve()),
            # Only what the file and overrides set: defaults of another sampler type would not validate again.
            spec=spec.model_dump(mode="json", exclude_unset=True, exclude={"storage"}),
            experiment_overrides=list(experiment_overrides), tracking_uri=tracking_uri, parent_run_id=parent_run_id,
            study_dir=str(directory), launch_index=launch_index,
        )
        record_path = directory / f"launch-{launch_index}.json"
        record.write(record_path)

        if probe:
            # Heads on stored features, one CPU thread each: this process and `workers - 1` probe processes.
            for process in processes:
                with contextlib.suppress(BrokenPipeError):  # one that died already: its exit code tells
                    process.stdin.write(f"{record_path}\n")
                    process.stdin.close()
            run_probe_trials(spec, study, rdb, study_dir=directory, n_trials=spec.n_trials, tracking_uri=tracking_uri,
                             experiment_overrides=experiment_overrides, deadline=deadline)
            codes = [0, *(process.wait() for process in processes)]
            return _finish_launch(study, spec, directory, parent_run_id, codes, reaped, tracking_uri, enqueued)
        if not any(name.startswith("data.") for name in spec.space):
            # Audit and prepare the data once, here, before any trial starts: the preparation plan (files and
            # bytes to fetch, the prepared cache's size) is printed and a disk that cannot hold it is refused
            # now, and each trial runner's own data check then finds every volume prepared.
            from octft.train.recipe import prepare_data

            print(f"study {spec.study_name!r}: auditing and preparing the data once for every trial", flush=True)
            prepare_data(base_config(spec, experiment_overrides).data, progress=True)
    except BaseException:
        if runner is not None:
            runner.stop(timeout=0)  # no trial to finish: do not wait for its imports
        for process in processes:  # input ends without a record: the worker and its runner exit, no trial taken
            with contextlib.suppress(BrokenPipeError):
                process.stdin.close()
            process.wait()
        raise
    for process in processes:
        with contextlib.suppress(BrokenPipeError):  # a worker that died already: its exit code tells
            process.stdin.write(f"{record_path}\n")
            process.stdin.close()
    try:
        codes = [_run_worker_here(record, runner, spec.storage, n_trials=spec.n_trials, deadline=deadline,
                                  devices_per_trial=devices_per_trial, heartbeat_interval=heartbeat_interval,
                                  grace_period=grace_period, fresh_process_per_trial=fresh_process_per_trial),
                 *(process.wait() for process in processes)]
    except KeyboardInterrupt:
        # The workers got the same Ctrl-C (one process group); give them a moment to tell Optuna.
        codes = [process.wait(timeout=60) for process in processes]
        # Trials still RUNNING belong to another launch (another host) that keeps the parent run open.
        if not any(t.state == TrialState.RUNNING for t in study.get_trials(deepcopy=False)):
            end_parent_run(tracking_uri, parent_run_id, "KILLED", "interrupted (Ctrl-C)")
        raise

    return _finish_launch(study, spec, directory, parent_run_id, codes, reaped, tracking_uri, enqueued)


def _run_worker_here(record: LaunchRecord, runner, storage_url: str, **settings) -> int:
    """Worker 0 in the launch's process, with its already started `runner`: its exit code as a worker
    process's would be (a bug in the worker prints its traceback and gives 1; the other workers go on)."""
    from octft.sweep.workers import run_worker

    try:
        run_worker(record, worker_index=0, runner=runner, storage_url=storage_url, **settings)
    except Exception:
        traceback.print_exc()
        return 1
    return 0


def worker_command(index: int, *, probe: bool = False, devices_per_trial: int = 1, study_dir: Path, n_trials: int | None,
                   heartbeat_interval: int, grace_period: int | None, deadline: float | None,
                   fresh_process_per_trial: bool = False) -> list[str]:
    """The command of worker `index`: `python -m octft.sweep.workers ...`, or with `probe` one more probe
    process, `python -m octft.sweep.probe ...` (heads in-process: no devices, runners or runner logs). Either
    reads its launch record's path on its input."""
    if probe:
        command = [sys.executable, "-m", "octft.sweep.probe", "--worker-index", str(index)]
    else:
        command = [sys.executable, "-m", "octft.sweep.workers", "--worker-index", str(index), "--study-dir", str(study_dir),
                   "--devices-per-trial", str(devices_per_trial)]
    command += ["--heartbeat-interval", str(heartbeat_interval)]
    if grace_period is not None:
        command += ["--grace-period", str(grace_period)]
    if n_trials is not None:
        command += ["--n-trials", str(n_trials)]
    if deadline is not None:
        command += ["--deadline", repr(deadline)]
    if fresh_process_per_trial:
        command += ["--fresh-process-per-trial"]
    return command


def open_worker_study(record: LaunchRecord, worker_index: int, *, heartbeat_interval: int, grace_period: int | None,
                      storage_url: str | None = None) -> tuple[optuna.Study, RDBStorage, SweepSpec]:
    """(study, storage, spec) as worker `worker_index` of the launch `record` opens them: the storage URL
    (default $OCTFT_OPTUNA_STORAGE, which the launch gives its workers: it is not in the record), the study's
    pruner, and a sampler seeded apart from every other worker's."""
    from octft.sweep.pruners import build_pruner
    from octft.sweep.spec import build_sampler

    spec = record.sweep_spec(storage_url or os.environ[STORAGE_ENV])
    storage = open_storage(spec.storage, heartbeat_interval=heartbeat_interval, grace_period=grace_period)
    study = optuna.load_study(
        study_name=spec.study_name, storage=storage, pruner=build_pruner(spec),
        sampler=build_sampler(spec, seed_offset=worker_seed_offset(record.launch_index, worker_index)),
    )
    return study, storage, spec


def _finish_launch(study, spec, directory, parent_run_id, codes, reaped, tracking_uri, enqueued) -> LaunchResult:
    from octft.sweep.tracking import end_parent_run, update_parent_best, update_parent_note

    trials = study.get_trials(deepcopy=False)
    counts = {state.name: sum(1 for t in trials if t.state == state) for state in TrialState}
    # Runners update it as each trial starts: the last trials' results arrive here.
    update_parent_best(tracking_uri, parent_run_id, study, spec.objective.metric)
    update_parent_note(tracking_uri, study, spec)
    if not counts["RUNNING"] and not counts["WAITING"]:
        end_parent_run(tracking_uri, parent_run_id)
    return LaunchResult(spec.study_name, directory, parent_run_id, codes, counts, reaped, enqueued)


def resolved_head_from(
    spec: SweepSpec, storage: RDBStorage, experiment_overrides: Sequence[str], *, spec_path: str | Path
) -> dict | None:
    """{"from": <sweep file>, "run": "runs:/<id>"} when the trials' init.head_from names a sweep file, else None.

    Resolved once: a study that already recorded its choice keeps it (a probe study that ran on since then
    does not change the head of trials already run, or of their replay commands).
    """
    from octft.train.head_from import head_settings, is_run_uri, resolve_head_from

    value = base_config(spec, experiment_overrides).init.head_from
    if not value or is_run_uri(value):
        return None
    try:
        recorded = optuna.load_study(study_name=spec.study_name, storage=storage).user_attrs.get("head_from")
    except KeyError:  # the study does not exist yet
        recorded = None
    if recorded and recorded.get("from") == value:
        return dict(recorded)
    # Relative to where octft runs, else to the sweep file's repo root (as `base` is).
    path = value if Path(value).is_file() else str(Path(spec_path).resolve().parent.parent / value)
    run = resolve_head_from(path, storage=spec.storage)  # the probe study lives beside this one
    head = head_settings(run, sweep_tracking_uri(spec))
    print(f"init.head_from={value} -> {run} (its best trial; head {head}), fixed for this study", flush=True)
    return {"from": value, "run": run, "head": head}
