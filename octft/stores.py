"""The two stores a sweep writes to, Optuna's storage and MLflow's tracking store: their URLs, defaults and rules.

One parser for SQLite URLs (`sqlite_path`), the defaults (`./optuna.db`, `./mlflow.db`, or what the environment
names), the rule that the two stores never share a database (`check_not_shared`), and how a URL shown without
its password gets it back in a process that needs it (`with_password`): only from the environment variable the
user set, never from a file octft wrote. This module imports nothing heavy.

    >>> sqlite_path("sqlite:////tmp/runs.db"), sqlite_path("postgresql://db/x")
    (PosixPath('/tmp/runs.db'), None)
    >>> check_not_shared("sqlite:///mlflow.db", "sqlite:///optuna.db")
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from urllib.parse import urlparse

from octft.errors import UsageError
from octft.redaction import REDACTED, normalise_url, redact_url

STORAGE_ENV = "OCTFT_OPTUNA_STORAGE"
TRACKING_ENV = "MLFLOW_TRACKING_URI"
DEFAULT_STORAGE = "sqlite:///optuna.db"
DEFAULT_TRACKING_DB = "mlflow.db"
ARTIFACTS_FOLDER = "mlartifacts"  # beside a SQLite tracking store, as MLflow's own server keeps them

_SQL_DIALECTS = ("postgresql", "postgres", "mysql", "mariadb", "mssql")


def sqlite_path(url: str) -> Path | None:
    """The database file of `sqlite:///relative.db` or `sqlite:////abs.db`; None for other stores and in-memory
    SQLite (`sqlite://`, `:memory:`)."""
    if not url.lower().startswith("sqlite:///"):
        return None
    path = url[len("sqlite:///"):].split("?", 1)[0]
    return None if path in ("", ":memory:") else Path(path).expanduser()


def dialect(url: str) -> str:
    """`postgresql` for `postgresql+psycopg2://...`, `sqlite`, `http`, ...; '' for a plain path."""
    return url.split("://", 1)[0].split("+", 1)[0].lower() if "://" in url else ""


def resolve_tracking_uri(uri: str | None = None) -> str:
    """The MLflow tracking URI to use: `uri`, else $MLFLOW_TRACKING_URI, else `./mlflow.db` made absolute (so a
    worker started from another folder logs to the same file).

    >>> resolve_tracking_uri("sqlite:////tmp/runs.db")
    'sqlite:////tmp/runs.db'
    """
    if uri:
        return normalise_url(uri)
    if os.environ.get(TRACKING_ENV):
        return normalise_url(os.environ[TRACKING_ENV])
    return f"sqlite:///{Path.cwd() / DEFAULT_TRACKING_DB}"


def artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """Where a new experiment's artifacts go: beside a SQLite store (`<db folder>/mlartifacts/<experiment>`), not
    in `./mlruns` of whatever folder a worker started in; None (MLflow's default) for other stores."""
    path = sqlite_path(tracking_uri)
    return None if path is None else (path.resolve().parent / ARTIFACTS_FOLDER / experiment).as_uri()


def database_identity(url: str) -> tuple | None:
    """What names the database behind a SQLAlchemy URL; None for non-SQL stores and in-memory SQLite."""
    kind = dialect(url)
    if kind == "sqlite":
        path = sqlite_path(url)
        return None if path is None else ("sqlite", str(path.resolve()))
    if kind in _SQL_DIALECTS:
        parsed = urlparse(normalise_url(url))
        try:
            port = parsed.port
        except ValueError:  # the message would quote the netloc; name the URL redacted instead
            raise UsageError(f"{redact_url(url)}: the port is not a number; check the URL") from None
        return (kind, (parsed.hostname or "localhost").lower(), port, parsed.path.strip("/"))
    return None


def check_not_shared(tracking_uri: str, storage_url: str | None) -> None:
    """Refuse an MLflow store and an Optuna storage in one SQL database: both keep their schema version in an
    `alembic_version` table, so each one's migrations break the other.

    >>> check_not_shared("sqlite:///runs.db", "sqlite:///./runs.db")
    Traceback (most recent call last):
    ...
    octft.errors.UsageError: MLflow tracking URI 'sqlite:///runs.db' and Optuna storage 'sqlite:///./runs.db' ...
    """
    if not storage_url:
        return
    tracking_db = database_identity(tracking_uri)
    if tracking_db is not None and tracking_db == database_identity(storage_url):
        raise UsageError(
            f"MLflow tracking URI {redact_url(tracking_uri)!r} and Optuna storage {redact_url(storage_url)!r} are the "
            "same database; MLflow and Optuna both keep migration tables (alembic_version) there and would break "
            "each other. Give each its own file or database, e.g. sqlite:///mlflow.db and sqlite:///optuna.db."
        )


def sqlalchemy_url(url: str) -> str:
    """`postgresql://` with the driver that is installed: SQLAlchemy 2.1 defaults to psycopg (3), octft ships
    psycopg2. Other URLs come back unchanged."""
    scheme, _, rest = url.partition("://")
    if "+" in scheme or dialect(url) not in ("postgresql", "postgres"):
        return url
    if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2") is not None:
        return f"postgresql+psycopg2://{rest}"
    return url


# The URLs with passwords this process was given (a launch's --storage, say), by how they are shown: only in memory.
_GIVEN: dict[str, str] = {}


def remember_password(url: str) -> str:
    """Keep `url` in this process's memory (never on disk) so `with_password` finds it; returns it shown redacted."""
    url = normalise_url(url)
    shown = redact_url(url)
    if shown != url:
        _GIVEN[shown] = url
    return shown


def with_password(shown: str, env_name: str) -> str:
    """The URL `shown` (as a launch plan records it: its password, if any, redacted) with its password back: the one
    this process was given (`remember_password`), else $`env_name` when that holds the same URL (a launch passes its
    worker processes the URLs it was given that way). A URL that never had a password comes back as it is
    (PostgreSQL then reads `~/.pgpass`).

    >>> with_password("postgresql://octft@db/optuna", "UNSET_VARIABLE")
    'postgresql://octft@db/optuna'
    """
    if shown in _GIVEN:
        return _GIVEN[shown]
    given = os.environ.get(env_name)
    if given and redact_url(normalise_url(given)) == shown:
        return normalise_url(given)
    if f":{REDACTED}@" in shown:
        raise UsageError(
            f"{shown} needs its password in this process: set ${env_name} to the full URL (as for the launch), or "
            "keep the password in ~/.pgpass and leave it out of the URL"
        )
    return shown
