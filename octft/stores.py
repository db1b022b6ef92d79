"""The two stores a sweep writes to, Optuna's storage and MLflow's tracking store: their URLs, defaults and rules.

One parser for SQLite URLs (`sqlite_path`), the defaults (`./optuna.db`, `./mlflow.db`, or what the environment
names), the rule that the two stores never share a database (`check_not_shared`), where an experiment's artifacts go
and the rule that a database store's go where every host can read them (`artifact_location`,
`check_shared_artifacts`), the SQL driver a URL gets (`sqlalchemy_url`, `missing_driver`), how long a network store
may take to answer (`store_timeout_s`) and what to say when it does not open (`open_failure`), the lock that lets
many hosts create a new database's tables at once (`database_lock`), and how a URL shown without its password gets it
back in a process that needs it (`with_password`): only from the environment variable the user set, never from a
file octft wrote. This module imports nothing heavy (`database_lock` is handed the SQLAlchemy engine).

    >>> sqlite_path("sqlite:////tmp/runs.db"), sqlite_path("postgresql://db/x")
    (PosixPath('/tmp/runs.db'), None)
    >>> check_not_shared("sqlite:///mlflow.db", "sqlite:///optuna.db")
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from octft.errors import UsageError
from octft.redaction import REDACTED, normalise_url, redact_url

STORAGE_ENV = "OCTFT_OPTUNA_STORAGE"
TRACKING_ENV = "MLFLOW_TRACKING_URI"
TIMEOUT_ENV = "OCTFT_STORE_TIMEOUT_S"
ARTIFACT_ROOT_ENV = "OCTFT_ARTIFACT_ROOT"  # where new experiments keep artifacts: s3://bucket/prefix, /shared/path
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


def is_database_server(url: str) -> bool:
    """Whether `url` names a database server (PostgreSQL, MySQL, MariaDB, SQL Server), which many hosts can share;
    SQLite is one machine's file."""
    return dialect(url) in _SQL_DIALECTS


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


def artifact_root() -> str | None:
    """$OCTFT_ARTIFACT_ROOT as a URI (an absolute path becomes `file:///...`), or None when unset.

    >>> os.environ[ARTIFACT_ROOT_ENV] = "/mnt/shared/mlartifacts/"; artifact_root()
    'file:///mnt/shared/mlartifacts'
    >>> del os.environ[ARTIFACT_ROOT_ENV]
    """
    text = os.environ.get(ARTIFACT_ROOT_ENV, "").strip().rstrip("/")
    if not text:
        return None
    if "://" in text or text.startswith("file:"):
        return text
    if not Path(text).expanduser().is_absolute():
        raise UsageError(f"${ARTIFACT_ROOT_ENV}={text!r} is a relative path, which names another folder on every host "
                         "(each resolves it from where it starts); give an absolute path on a filesystem every host "
                         "mounts at the same place, or an object store such as s3://bucket/octft")
    return Path(text).expanduser().as_uri()


def artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """Where a new experiment's artifacts go: `$OCTFT_ARTIFACT_ROOT/<experiment>` where that is set; beside a SQLite
    store (`<db folder>/mlartifacts/<experiment>`), not in `./mlruns` of whatever folder a worker started in; None
    (the server's choice, or MLflow's default `./mlruns`) for other stores."""
    root = artifact_root()
    if root is not None:
        return f"{root}/{experiment}"
    path = sqlite_path(tracking_uri)
    return None if path is None else (path.resolve().parent / ARTIFACTS_FOLDER / experiment).as_uri()


def _local_path(location: str) -> Path | None:
    """The folder of artifact location `location` when it is one of the local filesystem (`file:` or no scheme);
    None for an object store, a server's `mlflow-artifacts:`, ...

    >>> _local_path("file:///mnt/shared/a%20b"), _local_path("/mnt/x"), _local_path("s3://bucket/x")
    (PosixPath('/mnt/shared/a b'), PosixPath('/mnt/x'), None)
    """
    if location.startswith("file:"):
        return Path(unquote(urlparse(location).path))
    return None if ":" in location.split("/", 1)[0] else Path(location)


def check_shared_artifacts(tracking_uri: str, location: str | None, experiment: str, *, exists: bool) -> None:
    """Refuse a database tracking store (PostgreSQL, MySQL) whose experiment `experiment` would keep its artifacts on
    one host's disk: every host of a pod records runs in the database, but each would write their checkpoints under
    its own folder, and a workstation could read none. `location`: the experiment's artifact location (`exists`), or
    the one octft would create it with (`artifact_location`; None: MLflow's default `./mlruns`). A local path under
    $OCTFT_ARTIFACT_ROOT is taken for the shared filesystem that variable says it is. Other stores pass: a SQLite
    store is one machine's, a tracking server decides (and proxies, with `mlflow server --serve-artifacts`).

    >>> check_shared_artifacts("postgresql://db/mlflow", "s3://bucket/octft/sweep", "sweep", exists=True)
    >>> check_shared_artifacts("postgresql://db/mlflow", None, "sweep", exists=False)
    Traceback (most recent call last):
    ...
    octft.errors.UsageError: MLflow tracking URI 'postgresql://db/mlflow' is a database, ...
    """
    if not is_database_server(tracking_uri):
        return
    shown = redact_url(tracking_uri)
    options = ("Keep them where every host and a later workstation can read them: (1) an MLflow server that serves "
               f"artifacts (mlflow server --backend-store-uri {sqlalchemy_url(shown)} --serve-artifacts, then "
               f"MLFLOW_TRACKING_URI=http://<server>:5000), (2) an object store "
               f"(${ARTIFACT_ROOT_ENV}=s3://<bucket>/octft; MLflow reads $MLFLOW_S3_ENDPOINT_URL and the AWS "
               f"credentials), or (3) a filesystem every host mounts at the same path "
               f"(${ARTIFACT_ROOT_ENV}=/mnt/shared/mlartifacts)")
    if location is None:
        raise UsageError(f"MLflow tracking URI {shown!r} is a database, and nothing says where experiment "
                         f"{experiment!r} keeps its artifacts: MLflow would put them in ./mlruns on whichever host "
                         f"creates it, and every host would write its checkpoints to its own disk. {options}")
    folder, root = _local_path(location), artifact_root()
    shared_folder = None if root is None else _local_path(root)
    if exists and folder is not None and not (shared_folder is not None and folder.is_relative_to(shared_folder)):
        raise UsageError(f"MLflow experiment {experiment!r} in {shown} keeps its artifacts in {location}, a folder on "
                         "the disk of the host that created it, and other hosts would write theirs to their own "
                         "disks. If that folder is on a filesystem every host mounts at the same path, set "
                         f"${ARTIFACT_ROOT_ENV} to it (or a folder above it). Otherwise set mlflow.experiment to a "
                         "new name and keep its "
                         f"artifacts where every host can read them: {options[options.index('(1)'):]}")


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


def open_failure(first_line: str) -> tuple[str, str]:
    """(what happened, what to do) when a network store did not open, from the first line of the driver's error
    (passwords already hidden). Only a store that did not answer is sent to check whether it is reachable.

    >>> open_failure('connection to server at "db", port 5432 failed: FATAL:  database "optuna" does not exist')
    ('answers, but has no such database', 'create it (createdb), or fix the database name in the URL')
    """
    text = first_line.lower()
    if "timeout expired" in text or "timed out" in text:
        return (f"does not answer within {store_timeout_s()} s", "check that the server is up and reachable from this "
                f"host (firewall, network), or give it longer with ${TIMEOUT_ENV}")
    if "connection refused" in text or "can't connect" in text:
        return ("does not answer: nothing listens at that host and port",
                "start the server, or fix the host and port in the URL")
    if "translate host name" in text or "name or service not known" in text or "unknown host" in text:
        return "does not answer: its host name does not resolve", "fix the host in the URL"
    if ("database" in text and "does not exist" in text) or "unknown database" in text:
        return "answers, but has no such database", "create it (createdb), or fix the database name in the URL"
    if ("authentication failed" in text or "password" in text or "access denied" in text
            or ("role" in text and "does not exist" in text)):
        return "answers, but refuses this user or password", "fix them in the URL, or in ~/.pgpass"
    if "permission denied" in text:
        return ("answers, but refuses this user what octft asked",
                "grant the user the right to create and write tables in that database")
    return "answered, but refused what octft asked", "read the server's reason above, and fix the store or the URL"


@contextlib.contextmanager
def database_lock(engine: Any, name: str, *, wait_s: int = 600) -> Iterator[None]:
    """Hold lock `name` in the database behind SQLAlchemy `engine` for the block, across processes and hosts: a
    PostgreSQL session advisory lock, MySQL's GET_LOCK, on a connection of its own; either is released if its holder
    dies. Waiting longer than `wait_s` is a `UsageError`. Other databases (SQLite, one machine's) get no lock here.

        >>> with database_lock(storage.engine, "optuna-schema"):                           # doctest: +SKIP
        ...     RDBStorage(url)  # creates the tables and stamps their version: one host at a time
    """
    kind = engine.dialect.name
    if kind not in ("postgresql", "mysql", "mariadb"):
        yield
        return
    # A number for PostgreSQL, the same as text for MySQL (names of 64 characters at most): nothing to quote.
    key = int.from_bytes(hashlib.sha256(f"octft:{name}".encode()).digest()[:8], "big", signed=True)
    postgres = kind == "postgresql"
    with engine.connect() as connection:
        if postgres:
            connection.exec_driver_sql(f"SET LOCAL lock_timeout = '{wait_s}s'")
            try:
                connection.exec_driver_sql(f"SELECT pg_advisory_lock({key})")
                got = True
            except Exception as error:  # the driver's own error type: which driver is not known here
                if "lock timeout" not in str(error):
                    raise
                got = False
        else:
            got = connection.exec_driver_sql(f"SELECT GET_LOCK('{key}', {wait_s})").scalar() == 1
        connection.rollback()  # ends the transaction (and SET LOCAL); a session lock outlives it
        if not got:
            raise UsageError(f"waited {wait_s} s for octft's lock {name!r} in {redact_url(str(engine.url))}: another "
                             "octft process holds it and does not finish (a launch stuck on this database?); stop it, "
                             "or run again")
        try:
            yield
        finally:
            release = f"SELECT pg_advisory_unlock({key})" if postgres else f"SELECT RELEASE_LOCK('{key}')"
            connection.exec_driver_sql(release)
            connection.commit()


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
