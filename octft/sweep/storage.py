"""Optuna's storage: opening it (fast failure when unreachable, patience on a busy SQLite file, one host at a time
creating a new database's tables), opening a study that must exist (every read-only command), and the study lock
that keeps "count trials, then take one" atomic.

    >>> storage = open_study_storage("sqlite:///optuna.db")                           # doctest: +SKIP
    >>> study = open_existing_study("demo", "sqlite:///optuna.db")                    # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import fcntl
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import optuna
from optuna.storages import RDBStorage
from sqlalchemy import create_engine, text
from sqlalchemy.exc import ProgrammingError
from sqlalchemy.pool import NullPool

from octft import sqlite_wal
from octft.errors import MissingInputError, OctftError, UsageError
from octft.redaction import normalise_url, redact_text, redact_url
from octft.stores import (STORAGE_ENV, database_lock, dialect, missing_driver, open_failure, sqlalchemy_url,
                          sqlite_path, store_timeout_s)

DEFAULT_HEARTBEAT_S = 10
SQLITE_BUSY_TIMEOUT_S = 30


class StudyStorageError(OctftError, ValueError):
    """The Optuna storage cannot be used (unreachable, unsupported); the message names it, redacted."""


def open_study_storage(url: str, *, heartbeat_interval: int | None = DEFAULT_HEARTBEAT_S,
                       grace_period: int | None = None, create: bool = True) -> RDBStorage:
    """An RDB storage that fails fast when unreachable and waits (not crashes) on a busy SQLite file.

    With `heartbeat_interval`, a RUNNING trial with no heartbeat for `grace_period` seconds (default twice the
    interval) is stale (`octft.sweep.study.reap_stale_trials`). `create=False` (read-only commands) refuses a
    SQLite file that does not exist instead of creating it, and creates no tables.
    """
    url = normalise_url(url)  # before anything parses it: a password may hold any character
    shown = redact_url(url)
    kind = dialect(url)
    connect_args: dict[str, Any]
    if kind == "sqlite":
        path = sqlite_path(url)
        if path is None:
            raise StudyStorageError(f"Optuna storage {shown!r} is in memory: worker processes cannot share it; "
                                    "use sqlite:///optuna.db")
        if not create and not path.is_file():
            raise MissingInputError(f"Optuna storage {shown!r}: no such database file {path}; start the study with "
                                    "octft sweep launch, or pass the storage it uses with --storage")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise StudyStorageError(f"Optuna storage {shown!r}: cannot create its folder {path.parent} "
                                    f"({error.strerror or error}); pass a storage in a folder you can write") from None
        connect_args = {"timeout": SQLITE_BUSY_TIMEOUT_S}
        sqlite_wal.install()  # commits append to a log: a sweep commits every epoch
    elif kind in ("postgresql", "postgres", "mysql", "mariadb"):
        problem = missing_driver(url)
        if problem:
            raise StudyStorageError(f"Optuna storage {problem}")
        connect_args = {"connect_timeout": store_timeout_s()}
        url = sqlalchemy_url(url)
    else:
        raise StudyStorageError(f"Optuna storage {shown!r} is not supported: use sqlite:///path.db on one machine or "
                                f"postgresql://user@host/db across machines (--storage or ${STORAGE_ENV})")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            if kind == "sqlite":
                return _rdb_storage(url, connect_args, heartbeat_interval, grace_period, create)
            return _network_rdb_storage(url, shown, connect_args, heartbeat_interval, grace_period, create)
        except OctftError:
            raise
        except Exception as error:  # sqlalchemy's OperationalError and friends: unreachable, refused, bad auth
            password = urlsplit(url).password
            lines = redact_text(str(error), [password, unquote(password)] if password else []).strip().splitlines()
            line = lines[0] if lines else type(error).__name__
            happened, advice = (("did not open", "check that its folder is writable and its disk has room")
                                if kind == "sqlite" else open_failure(line))
            raise StudyStorageError(f"cannot open the Optuna storage {shown!r}: it {happened} ({line}); {advice}, or "
                                    f"pass another storage with --storage / ${STORAGE_ENV}") from None


# SQLite: errors of two processes making a new storage's tables or its schema stamp at once (every RDBStorage,
# readers included, stamps an unstamped database): the loser finds the winner's rows and opens the storage again.
# (All of a SQLite file's users are on one machine; PostgreSQL and MySQL take a lock instead.)
_SCHEMA_RACE = ("UNIQUE constraint failed", "already exists")
SCHEMA_RACE_TRIES = 5
SCHEMA_LOCK = "optuna-schema"


def _rdb_storage(url: str, connect_args: dict, heartbeat_interval: int | None, grace_period: int | None,
                 create: bool) -> RDBStorage:
    for attempt in range(SCHEMA_RACE_TRIES):
        try:
            return RDBStorage(url, engine_kwargs={"connect_args": connect_args}, heartbeat_interval=heartbeat_interval,
                              grace_period=grace_period, skip_table_creation=not create)
        except Exception as error:
            if attempt + 1 == SCHEMA_RACE_TRIES or not any(sign in str(error) for sign in _SCHEMA_RACE):
                raise
            time.sleep(0.1 * (attempt + 1))
    raise AssertionError("unreachable")


def _network_rdb_storage(url: str, shown: str, connect_args: dict, heartbeat_interval: int | None,
                         grace_period: int | None, create: bool) -> RDBStorage:
    """PostgreSQL or MySQL: a database whose tables Optuna has not finished (stamped) is opened under a database lock,
    so that hosts launching one new study at the same moment make its tables one after another, not at once
    (PostgreSQL would refuse all but one: duplicate key value ... pg_type_typname_nsp_index). A finished one opens
    without the lock: a pod's workers do not queue for it."""
    def storage() -> RDBStorage:
        return RDBStorage(url, engine_kwargs={"connect_args": connect_args}, heartbeat_interval=heartbeat_interval,
                          grace_period=grace_period, skip_table_creation=not create)

    engine = create_engine(url, poolclass=NullPool, connect_args=connect_args)
    try:
        if _stamped(engine):  # also the first connection: an unreachable server fails here, within the timeout
            return storage()
        if not create:
            raise MissingInputError(f"Optuna storage {shown!r} holds no Optuna tables: no study was launched "
                                    "there; start the study with octft sweep launch, or pass the storage it uses with "
                                    "--storage")
        with database_lock(engine, SCHEMA_LOCK):
            return storage()
    finally:
        engine.dispose()


def _stamped(engine) -> bool:
    """Whether Optuna has finished this database's tables: it stamps their version (alembic_version) last."""
    with engine.connect() as connection:
        try:
            return connection.execute(text("SELECT version_num FROM alembic_version")).first() is not None
        except ProgrammingError:  # no such table (yet)
            return False


def open_existing_study(study_name: str, url: str, *, sampler=None, pruner=None) -> optuna.Study:
    """Study `study_name` of storage `url`, which must exist; creates nothing (not even tables)."""
    storage = open_study_storage(url, heartbeat_interval=None, create=False)
    try:
        return optuna.load_study(study_name=study_name, storage=storage, sampler=sampler, pruner=pruner)
    except KeyError:
        names = optuna.get_all_study_names(storage=storage)
        raise UsageError(f"study {study_name!r} is not in the Optuna storage {redact_url(url)} (studies there: "
                         f"{names or 'none'}); run `octft sweep launch` first, or pass the storage it used with "
                         "--storage") from None


@contextlib.contextmanager
def study_lock(storage: RDBStorage, study_name: str) -> Iterator[None]:
    """Serialize "count trials, then take one" across processes and hosts.

    SQLite: an flock on a file next to the database (all SQLite users are on one machine). PostgreSQL: a session
    advisory lock; MySQL: GET_LOCK. Both are released if the holder dies.
    """
    engine = storage.engine
    if engine.dialect.name == "sqlite":
        with open(f"{Path(engine.url.database)}.octft-lock", "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
        return
    with database_lock(engine, study_name):  # PostgreSQL: an advisory lock; MySQL: GET_LOCK
        yield
