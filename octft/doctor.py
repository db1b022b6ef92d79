"""`octft doctor`: what octft sees on this machine, and whether the stores it will use answer.

Runs before anything else on a new VM (and on every host of a pod slice). It reads, never writes: a
sqlite store that does not exist yet is reported as "will be created", and nothing is created. Every
failed check says what to do; any failed check makes the command exit non-zero. Network stores get
$OCTFT_STORE_TIMEOUT_S seconds each, so an unreachable database fails fast instead of hanging. A store
"answers" only when it opens as octft will open it: with the SQL driver that is installed (the one the
sweep's processes will use), MLflow's through the checks `MlflowStore` makes.

    >>> report = diagnose(storage="sqlite:////tmp/none/optuna.db", tracking_uri=None, data=None)  # doctest: +SKIP
    >>> report.ok, report.runtime.platform                                                     # doctest: +SKIP
    (True, 'CPU')
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import sqlite3
from dataclasses import asdict, dataclass, field
from pathlib import Path

import sqlalchemy
import torch

from octft.data.storage import open_storage
from octft.errors import OctftError
from octft.redaction import redact
from octft.stores import (ARTIFACT_ROOT_ENV, DEFAULT_STORAGE, STORAGE_ENV, artifact_root, check_shared_artifacts,
                          dialect, is_database_server, missing_driver, open_failure, resolve_tracking_uri,
                          sqlalchemy_url, sqlite_path, store_timeout_s)
from octft.track.mlflow_store import check_store
from octft.train import devices
from octft.train.runtime import xla_device_facts

B2_KEY_ENV = ("B2_APPLICATION_KEY_ID", "B2_APPLICATION_KEY")


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class RuntimeFacts:
    platform: str  # TPU, CPU (XLA:CPU), CUDA, or cpu / cuda for the eager runtimes
    devices: int | None
    hosts: int | None
    process_index: int | None
    chip: str | None
    memory_per_device_gib: float | None
    libtpu: str | None
    torch: str | None
    torch_xla: str | None
    precision: str
    compile_cache_dir: str | None


@dataclass
class DoctorReport:
    runtime: RuntimeFacts
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.checks)

    def to_dict(self) -> dict:
        return {"ok": self.ok, "runtime": asdict(self.runtime), "checks": [asdict(check) for check in self.checks]}

    def lines(self) -> list[str]:
        facts = self.runtime
        out = [
            f"platform          {facts.platform}",
            f"devices / hosts   {facts.devices} devices, {facts.hosts} host(s); this process is host {facts.process_index}",
            f"chip              {facts.chip or 'n/a'}"
            + (f", {facts.memory_per_device_gib:g} GiB per device" if facts.memory_per_device_gib else ""),
            f"versions          torch {facts.torch}, torch_xla {facts.torch_xla or 'absent'}, libtpu {facts.libtpu or 'absent'}",
            f"precision         {facts.precision} (runtime.precision=auto)",
            f"compile cache     {facts.compile_cache_dir or 'off'}",
        ]
        out += [f"{'ok  ' if check.ok else 'FAIL'}  {check.name}: {check.detail}" for check in self.checks]
        return out


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def runtime_facts(compile_cache_dir: str | None = "~/.cache/octft/xla") -> tuple[RuntimeFacts, list[Check]]:
    """Platform, devices and hosts as `octft train` would see them (starts the XLA runtime, takes the chips)."""
    platform = devices.platform()
    chips = devices.local_tpu_chips()
    xla = importlib.util.find_spec("torch_xla") is not None
    checks: list[Check] = []
    count = hosts = index = None
    if xla and platform:
        try:
            count, hosts, index = xla_device_facts()
            checks.append(Check("devices", True, f"XLA sees {count} {platform} devices on {hosts} host(s)"))
        except Exception as error:  # the XLA runtime did not start: chips taken, libtpu missing, bad env
            first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
            checks.append(Check("devices", False, (
                f"the XLA runtime did not start on {platform}: {first_line}. If another octft process (a sweep) "
                "holds the chips, run doctor when it is done; on a TPU VM check that `make install TPU=1` installed libtpu"
            )))
    else:
        platform = "cuda" if torch.cuda.is_available() else "cpu"
        count, hosts, index = (torch.cuda.device_count() if platform == "cuda" else 1), 1, 0
        if chips:
            checks.append(Check("devices", False, (
                f"{len(chips)} TPU chips are attached but torch_xla is not installed: run `make install TPU=1`")))
    if platform == "TPU" and not _version("libtpu"):
        checks.append(Check("libtpu", False, "PJRT_DEVICE=TPU but libtpu is not installed: run `make install TPU=1`"))
    cache_dir, _ = devices.compile_cache_note(compile_cache_dir, platform)
    facts = RuntimeFacts(
        platform=platform, devices=count, hosts=hosts, process_index=index,
        chip=chips[0].kind if chips else None,
        memory_per_device_gib=float(chips[0].hbm_gib) if chips and platform == "TPU" else None,
        libtpu=_version("libtpu"), torch=_version("torch"), torch_xla=_version("torch_xla"),
        precision=devices.auto_precision(platform), compile_cache_dir=cache_dir,
    )
    return facts, checks


def check_database(name: str, url: str, *, env_hint: str) -> Check:
    """Does the SQL store at `url` answer? sqlite files are opened read-only; a missing one is fine."""
    shown = str(redact(url))
    kind = dialect(url)
    if kind == "sqlite":
        path = sqlite_path(url) or Path(":memory:")
        if not path.exists():
            folder = next((p for p in path.absolute().parents if p.exists()), Path("/"))
            if not os.access(folder, os.W_OK):
                return Check(name, False, f"{shown}: {path} does not exist and {folder} is not writable; {env_hint}")
            return Check(name, True, f"{shown}: does not exist yet, will be created")
        try:
            with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=store_timeout_s()) as connection:
                tables = connection.execute("select count(*) from sqlite_master where type='table'").fetchone()[0]
        except sqlite3.Error as error:
            return Check(name, False, f"{shown}: cannot be read ({error}); {env_hint}")
        return Check(name, True, f"{shown}: answers ({tables} tables)")
    if kind in ("postgresql", "postgres", "mysql", "mariadb"):
        problem = missing_driver(url)
        if problem:
            return Check(name, False, problem)
        driver_url = sqlalchemy_url(url)
        try:
            engine = sqlalchemy.create_engine(driver_url, connect_args={"connect_timeout": store_timeout_s()})
            with engine.connect() as connection:
                connection.execute(sqlalchemy.text("select 1"))
            engine.dispose()
        except Exception as error:  # sqlalchemy's OperationalError and friends: refused, timed out, bad auth
            first_line = (str(redact(str(error))).strip().splitlines() or [type(error).__name__])[0]
            happened, advice = open_failure(first_line)
            return Check(name, False, f"{shown}: {happened} ({first_line}); {advice}, {env_hint}")
        return Check(name, True, f"{shown}: answers")
    return Check(name, False, f"{shown}: not a URL octft can use; {env_hint}")


def check_tracking(uri: str) -> Check:
    """Does the MLflow store at `uri` open as `MlflowStore` opens it? A sqlite file that does not exist yet is fine."""
    hint = "or pass another with --tracking-uri / $MLFLOW_TRACKING_URI"
    if dialect(uri) == "sqlite" and not (sqlite_path(uri) or Path(":memory:")).exists():
        return check_database("mlflow", uri, env_hint=hint)  # "will be created", or its folder is not writable
    if "://" in uri and not uri.startswith("file:"):
        try:
            return Check("mlflow", True, f"{redact(uri)}: {check_store(uri)}")
        except OctftError as error:
            return Check("mlflow", False, str(error))
    path = Path(uri.removeprefix("file://").removeprefix("file:"))
    if path.is_dir():
        return Check("mlflow", True, f"{uri}: a folder that exists")
    return Check("mlflow", True, f"{uri}: does not exist yet, will be created")


def check_artifacts(uri: str) -> Check | None:
    """Where new experiments of a database tracking store (PostgreSQL, MySQL) keep their artifacts: somewhere every
    host can read ($OCTFT_ARTIFACT_ROOT), or a launch refuses. None for other stores: a SQLite store is one machine's,
    a tracking server decides. (An existing experiment's own location is checked by the launch that uses it.)"""
    if not is_database_server(uri):
        return None
    try:
        root = artifact_root()
        check_shared_artifacts(uri, None if root is None else f"{root}/<experiment>", "<experiment>", exists=False)
    except OctftError as error:
        return Check("artifacts", False, str(error))
    return Check("artifacts", True, f"new experiments keep their artifacts in {root}/<experiment> "
                                    f"(${ARTIFACT_ROOT_ENV}): every host must read and write there")


def check_data(uri: str) -> Check:
    """Does the data URI list? B2 credentials are reported present or absent, never shown."""
    credentials = ""
    if uri.startswith("b2://"):
        missing = [name for name in B2_KEY_ENV if not os.environ.get(name)]
        if missing:
            return Check("data", False, f"{uri}: B2 credentials absent ({', '.join(missing)} not set): export both, "
                                        "from the application key made for this bucket")
        credentials = "; B2 credentials present"
    try:
        first = next(iter(open_storage(uri).list()), None)
    except Exception as error:  # a missing folder, refused credentials, no network
        return Check("data", False, f"{uri}: cannot be listed ({redact(str(error))}); check --data / data.uri")
    if first is None:
        return Check("data", False, f"{uri}: lists nothing; check --data / data.uri points at the release root")
    return Check("data", True, f"{uri}: lists (first key {first.key}){credentials}")


def diagnose(*, storage: str | None, tracking_uri: str | None, data: str | None,
             compile_cache_dir: str | None = "~/.cache/octft/xla") -> DoctorReport:
    facts, checks = runtime_facts(compile_cache_dir)
    report = DoctorReport(facts, checks)
    storage_url = storage or os.environ.get(STORAGE_ENV) or DEFAULT_STORAGE
    report.checks.append(check_database("optuna", storage_url, env_hint=f"or pass another with --storage / ${STORAGE_ENV}"))
    tracking = resolve_tracking_uri(tracking_uri)
    report.checks.append(check_tracking(tracking))
    artifacts = check_artifacts(tracking)
    if artifacts is not None:
        report.checks.append(artifacts)
    if data:
        report.checks.append(check_data(data))
    return report
