"""Optuna's storage: opening it (fast failure when unreachable, patience on a busy SQLite file), opening a study that
must exist (every read-only command), and the study lock that keeps "count trials, then take one" atomic.

    >>> storage = open_study_storage("sqlite:///optuna.db")                           # doctest: +SKIP
    >>> study = open_existing_study("demo", "sqlite:///optuna.db")                    # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import optuna
from optuna.storages import RDBStorage
from sqlalchemy import text

from octft import sqlite_wal
from octft.errors import MissingInputError, OctftError, UsageError
from octft.redaction import normalise_url, redact_text, redact_url
from octft.stores import TIMEOUT_ENV, STORAGE_ENV, dialect, missing_driver, sqlalchemy_url, sqlite_path, store_timeout_s

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
            return _rdb_storage(url, connect_args, heartbeat_interval, grace_period, create)
        except Exception as error:  # sqlalchemy's OperationalError and friends: unreachable, refused, bad auth
            password = urlsplit(url).password
            lines = redact_text(str(error), [password, unquote(password)] if password else []).strip().splitlines()
            check = ("its folder is writable and its disk has room" if kind == "sqlite" else "the database server is up "
                     f"and reachable from this host within {connect_args['connect_timeout']} s (${TIMEOUT_ENV})")
            raise StudyStorageError(
                f"cannot open the Optuna storage {shown!r}: {lines[0] if lines else type(error).__name__}. Check that "
                f"{check}, or pass another one with --storage / ${STORAGE_ENV}"
            ) from None


# Errors of two processes making a new storage's tables or its schema stamp at once (every RDBStorage, readers
# included, stamps an unstamped database): the loser finds the winner's rows and opens the storage again.
_SCHEMA_RACE = ("UNIQUE constraint failed", "already exists", "duplicate key value")
SCHEMA_RACE_TRIES = 5


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
    key = int.from_bytes(hashlib.sha256(f"octft:{study_name}".encode()).digest()[:8], "big", signed=True)
    postgres = engine.dialect.name == "postgresql"
    with engine.connect() as connection:
        if postgres:
            connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": key})
        else:
            connection.execute(text("SELECT GET_LOCK(:key, 600)"), {"key": str(key)})
        try:
            yield
        finally:
            release = text("SELECT pg_advisory_unlock(:key)" if postgres else "SELECT RELEASE_LOCK(:key)")
            connection.execute(release, {"key": key if postgres else str(key)})
            connection.commit()
