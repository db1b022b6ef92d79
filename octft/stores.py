"""The two stores a sweep writes to, Optuna's storage and MLflow's tracking store: their URLs, defaults and rules.

One parser for SQLite URLs (`sqlite_path`), the defaults (`./optuna.db`, `./mlflow.db`, or what the environment
names), the rule that the two stores never share a database (`check_not_shared`), the SQL driver a URL gets
(`sqlalchemy_url`, `missing_driver`), how long a network store may take to answer (`store_timeout_s`), and how a
URL shown without its password gets it back in a process that needs it (`with_password`): only from the
environment variable the user set, never from a file octft wrote. This module imports nothing heavy.

    >>> sqlite_path("sqlite:////tmp/runs.db"), sqlite_path("postgresql://db/x")
    (PosixPath('/tmp/runs.db'), None)
    >>> check_not_shared("sqlite:///mlflow.db", "sqlite:///optuna.db")
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from urllib.parse import unquote, urlparse

from octft.errors import UsageError
from octft.redaction import REDACTED, normalise_url, redact_url

STORAGE_ENV = "OCTFT_OPTUNA_STORAGE"
TRACKING_ENV = "MLFLOW_TRACKING_URI"
TIMEOUT_ENV = "OCTFT_STORE_TIMEOUT_S"
DEFAULT_STORAGE = "sqlite:///optuna.db"
DEFAULT_TRACKING_DB = "mlflow.db"
ARTIFACTS_FOLDER = "mlartifacts"  # beside a SQLite tracking store, as MLflow's own server keeps them
# Long enough for a database or server across a data centre, short enough that a wrong host fails before anyone
# wonders whether octft hangs.
DEFAULT_STORE_TIMEOUT_S = 10

_SQL_DIALECTS = ("postgresql", "postgres", "mysql", "mariadb", "mssql")
# Each SQL dialect's drivers, SQLAlchemy's default first: (driver, the module it imports, the package installing it).
_DRIVERS = {
    "postgresql": (("psycopg", "psycopg", "psycopg[binary]"), ("psycopg2", "psycopg2", "psycopg2-binary"),
                   ("pg8000", "pg8000", "pg8000")),
    "mysql": (("mysqldb", "MySQLdb", "mysqlclient"), ("pymysql", "pymysql", "PyMySQL"),
              ("mysqlconnector", "mysql.connector", "mysql-connector-python")),
    "mariadb": (("mysqldb", "MySQLdb", "mysqlclient"), ("pymysql", "pymysql", "PyMySQL")),
    "mssql": (("pyodbc", "pyodbc", "pyodbc"), ("pymssql", "pymssql", "pymssql")),
}


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


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # `mysql.connector` without `mysql`
        return False


def sqlalchemy_url(url: str) -> str:
    """A SQL URL with a driver that is installed: `postgresql://` (SQLAlchemy 2.1 would pick psycopg 3, octft ships
    psycopg2) becomes `postgresql+psycopg2://`, `mysql://` without mysqlclient `mysql+pymysql://` where PyMySQL is
    installed, `postgres://` (which SQLAlchemy no longer reads) `postgresql://`. A URL naming its driver, one whose
    default driver is installed or none is, and other URLs come back unchanged.

    >>> sqlalchemy_url("postgres://octft@db/optuna").split("://")[0] in ("postgresql", "postgresql+psycopg2")
    True
    """
    scheme, _, rest = url.partition("://")
    kind = "postgresql" if dialect(url) == "postgres" else dialect(url)
    if "+" in scheme or kind not in _DRIVERS:
        return url
    drivers = _DRIVERS[kind]
    usable = next((driver for driver, module, _ in drivers if _installed(module)), drivers[0][0])
    return f"{kind}://{rest}" if usable == drivers[0][0] else f"{kind}+{usable}://{rest}"


def missing_driver(url: str) -> str | None:
    """What to install when the SQL driver `url` needs (after `sqlalchemy_url`) is absent; None when it is there or
    `url` is no SQL URL octft knows the drivers of.

    >>> missing_driver("mysql+nosuchdriver://db/x") is None
    True
    """
    scheme = sqlalchemy_url(url).split("://", 1)[0].lower()
    kind, _, driver = scheme.partition("+")
    drivers = _DRIVERS.get(kind, ())
    wanted = next(((name, module, package) for name, module, package in drivers if name == (driver or drivers[0][0])),
                  None)
    if wanted is None or _installed(wanted[1]):
        return None
    name, module, package = wanted
    others = [f"{package} ({kind}+{other}://)" for other, _, package in drivers if other != name]
    return (f"{redact_url(url)} needs the Python package {package} (module {module}, SQLAlchemy's {name} driver), which "
            f"is not installed: pip install {package}" + (f", or install {' or '.join(others)}" if others else ""))


def store_timeout_s() -> int:
    """Seconds a network store (an MLflow server, PostgreSQL, MySQL) gets to answer a connection: ${TIMEOUT_ENV},
    else 10."""
    text = os.environ.get(TIMEOUT_ENV, "").strip()
    if not text:
        return DEFAULT_STORE_TIMEOUT_S
    try:
        seconds = int(text)
    except ValueError:
        seconds = 0
    if seconds < 1:
        raise UsageError(f"${TIMEOUT_ENV}={text!r} is not a whole number of seconds of at least 1; set it to e.g. "
                         f"{DEFAULT_STORE_TIMEOUT_S}, or unset it")
    return seconds


def http_credentials(url: str) -> tuple[str, str | None, str | None]:
    """(`url` without its credentials, user, password) of `http(s)://user:password@host/...`, the password
    percent-decoded; (url, None, None) for a URL without a password or of another scheme.

    >>> http_credentials("http://alice:p%40ss@mlflow:5000")
    ('http://mlflow:5000', 'alice', 'p@ss')
    """
    shown = redact_url(url)
    if dialect(url) not in ("http", "https") or shown == url:
        return url, None, None
    head, rest = shown.split(f":{REDACTED}@", 1)  # a user holds no ':', so this is the credentials' end
    scheme, user = head.split("://", 1)
    password = url[len(head) + 1 : len(url) - len(rest) - 1]
    return f"{scheme}://{rest}", unquote(user), unquote(password)


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
