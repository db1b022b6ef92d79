"""`octft ui SPEC`: MLflow's own server on the study's store, and the two pages a user comes for.

MLflow's compare page (`#/compare-runs`) cannot be steered from its address: its parallel-coordinates plot opens on
the first metric the runs share and the first three params that differ. So `octft ui` saves the study as a view of
its experiment (MLflow's "Views" menu; an experiment tag `mlflow.sharedViewState.<key>`, the one thing it writes)
and prints that view's two pages, in MLflow's model-training layout: the study's runs sorted by the objective, best
first (the parent run shows the study's best under the same metric), and the same runs beside one
parallel-coordinates chart of the objective over every sampled param. A store that does not exist is refused, not
created.

    $ octft ui sweeps/demo.yaml --tracking-uri sqlite:///demo/mlflow.db --storage sqlite:///demo/optuna.db
    runs of study demo, best first:  http://127.0.0.1:5000/#/experiments/1/runs?viewStateShareKey=octft-study-demo&...
    compare its 6 trials:  http://127.0.0.1:5000/#/experiments/1/runs?...&compareRunsMode=CHART
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from octft.data.layout import CLASS_SHORT_NAMES
from octft.errors import MissingInputError, UsageError
from octft.redaction import redact_url
from octft.stores import resolve_tracking_uri, sqlite_path
from octft.sweep.records import trial_record
from octft.sweep.spec import SweepSpec
from octft.sweep.storage import open_existing_study
from octft.sweep.tracking import parent_run_id
from octft.track.mlflow_store import MlflowStore

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5000
STARTUP_TIMEOUT_S = 300.0  # MLflow's app takes a while to import on a busy machine
STOP_TIMEOUT_S = 10.0  # a UI server holds nothing to save: graceful for this long, then killed
VIEW_TAG_PREFIX = "mlflow.sharedViewState."  # MLflow's saved views; a page opens one with ?viewStateShareKey=KEY


@dataclass(frozen=True)
class StudyPages:
    """Where the study's runs are in MLflow's UI: its saved view `view_key` of experiment `experiment_id`."""

    experiment_id: str
    trial_run_ids: tuple[str, ...]  # in trial order
    view_key: str

    def runs_url(self, base_url: str) -> str:
        # workflowType: MLflow's model-training side bar, whatever side this browser showed last.
        return (f"{base_url}/#/experiments/{self.experiment_id}/runs?viewStateShareKey={self.view_key}"
                "&workflowType=machine_learning")

    def compare_url(self, base_url: str) -> str:
        return f"{self.runs_url(base_url)}&compareRunsMode=CHART"


def view_key(study_name: str) -> str:
    return "octft-study-" + re.sub(r"[^A-Za-z0-9_-]", "-", study_name)


def study_view(spec: SweepSpec) -> dict:
    """The state of MLflow's experiment page for the study: its runs sorted by the objective, every sampled param and
    the result in the table, one parallel-coordinates chart of the objective over every sampled param."""
    objective = f"best/{spec.objective.metric}"
    params = list(spec.space)
    section = "octft-study"
    chart = {"uuid": "octft-parallel-coordinates", "type": "PARALLEL", "metricSectionId": section, "deleted": False,
             "isGenerated": False, "showAllRuns": True, "selectedParams": params, "selectedMetrics": [objective]}
    results = [objective, "best/epoch", *(f"best/val/f1_{name}" for name in CLASS_SHORT_NAMES)]
    return {
        "searchFilter": f"tags.`optuna.study` = '{spec.study_name}'",
        "orderByKey": f"metrics.`{objective}`", "orderByAsc": spec.objective.direction == "minimize",
        "selectedColumns": [*(f"metrics.`{key}`" for key in dict.fromkeys(results)),
                            *(f"params.`{key}`" for key in params), "tags.`optuna.state`", "tags.`octft.prune_reason`"],
        "runsHiddenMode": "SHOW_ALL",  # else the charts draw the first 10 runs only
        "compareRunCharts": [chart], "isAccordionReordered": True,  # the study's section stays first
        "compareRunSections": [{"uuid": section, "name": f"Study {spec.study_name}", "display": True,
                                "isReordered": False, "deleted": False, "isGenerated": False,
                                "columns": 1, "cardHeight": 480}],  # the chart across the page, not a third of it
    }


def save_study_view(store: MlflowStore, pages: StudyPages, spec: SweepSpec) -> None:
    """Save `study_view` as view `pages.view_key` of the study's experiment, in the envelope MLflow's UI writes."""
    now = int(time.time() * 1000)
    envelope = {"name": f"octft study {spec.study_name}", "createdAt": now, "updatedAt": now,
                "state": json.dumps(study_view(spec))}
    store.set_experiment_tag(pages.experiment_id, VIEW_TAG_PREFIX + pages.view_key, json.dumps(envelope))


def _existing_sqlite(uri: str, what: str, flag: str) -> None:
    path = sqlite_path(uri)
    if path is not None and not path.is_file():
        raise MissingInputError(f"{what} {redact_url(uri)}: no such database file {path}; pass the {flag} the sweep used")


def study_pages(spec: SweepSpec, *, storage: str | None = None, tracking_uri: str | None = None) -> StudyPages:
    """The study's experiment and its trials' runs, read from the Optuna storage and the MLflow store."""
    tracking_uri = resolve_tracking_uri(tracking_uri or spec.mlflow.tracking_uri)
    _existing_sqlite(tracking_uri, "MLflow store", "--tracking-uri")
    study = open_existing_study(spec.study_name, storage or spec.storage)
    trials = sorted(study.get_trials(deepcopy=False), key=lambda trial: trial.number)
    run_ids = tuple(run_id for run_id in (trial_record(trial).mlflow_run_id for trial in trials) if run_id)
    store = MlflowStore(tracking_uri)
    anchor = parent_run_id(study) or (run_ids[0] if run_ids else None)
    if anchor:
        try:
            experiment_id = store.run(anchor).experiment_id
        except MissingInputError as error:
            raise UsageError(f"study {spec.study_name!r}'s runs are not there: {error} (--tracking-uri)") from None
    else:
        experiment_id = store.experiment_id(spec.mlflow.experiment)
        if experiment_id is None:
            raise UsageError(f"the MLflow store {store.shown} has no experiment {spec.mlflow.experiment!r} and study "
                             f"{spec.study_name!r} has no runs yet; run `octft sweep launch` first, or pass --tracking-uri")
    return StudyPages(str(experiment_id), run_ids, view_key(spec.study_name))


def server_command(tracking_uri: str, host: str, port: int) -> list[str]:
    """MLflow's own tracking server on the store, with artifacts served from where the runs put them. The store's URL
    goes in the server's environment (`server_environment`), never on its command line, which any user of the
    machine can read (`ps`)."""
    command = [sys.executable, "-m", "mlflow", "server", "--host", host, "--port", str(port),
               "--workers", "1",  # one user: one worker starts faster
               "--uvicorn-opts", "--no-access-log"]  # a line per request would bury the two addresses printed
    path = sqlite_path(tracking_uri)
    if path is not None:
        # Beside the database, as octft's runs keep them, instead of ./mlartifacts wherever this was started.
        command += ["--artifacts-destination", str(path.resolve().parent / "mlartifacts")]
    return command


def server_address(tracking_uri: str) -> str:
    """A tracking server's address for a browser: no credentials (the browser asks for them), no trailing slash.

    >>> server_address("https://alice:pw@mlflow.example.org:8443/")
    'https://mlflow.example.org:8443'
    """
    parts = urllib.parse.urlsplit(tracking_uri)
    netloc = parts.hostname + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


def _wait_until_up(process: subprocess.Popen, base_url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            raise UsageError(f"MLflow's server exited with code {process.returncode} before answering at {base_url}; "
                          "is the port taken? pass another with --port")
        try:
            urllib.request.urlopen(f"{base_url}/health", timeout=5).read()
            return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            if time.monotonic() > deadline:
                raise UsageError(f"MLflow's server did not answer at {base_url} within {timeout_s:.0f} s") from None
            time.sleep(0.5)


def _stop(process: subprocess.Popen) -> int:
    """Stop the server and its workers (its own process group): SIGTERM, then SIGKILL if it lingers."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=STOP_TIMEOUT_S)
    return process.returncode


def serve(
    spec: SweepSpec,
    *,
    storage: str | None = None,
    tracking_uri: str | None = None,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    echo: Callable[[str], None] = print,
    on_ready: Callable[[StudyPages, str], None] | None = None,
) -> int:
    """Serve the study's MLflow store until interrupted (Ctrl-C or SIGTERM); print the two pages first. A tracking
    server (`http(s)://`) is not served again: its two pages are printed, on that server.

    Returns 0 after an interrupt stopped the server, else the server's own exit code.
    """
    tracking_uri = resolve_tracking_uri(tracking_uri or spec.mlflow.tracking_uri)
    pages = study_pages(spec, storage=storage, tracking_uri=tracking_uri)
    if tracking_uri.startswith(("http://", "https://")):
        # A tracking server (a pod's) serves its own UI, from any machine that reaches it: nothing to start here.
        save_study_view(MlflowStore(tracking_uri), pages, spec)
        base_url = server_address(tracking_uri)
        echo(f"runs of study {spec.study_name}, best first:  {pages.runs_url(base_url)}")
        echo(f"compare its {len(pages.trial_run_ids)} trials:  {pages.compare_url(base_url)}")
        return 0
    base_url = f"http://{host}:{port}"
    # Its own session, so the server's workers go down with it as one group, whoever interrupts us.
    # MLflow's job runner (a dozen worker processes for GenAI jobs) serves nothing a sweep's runs need.
    store = MlflowStore(tracking_uri)
    save_study_view(store, pages, spec)
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION=os.environ.get("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false"),
               # As octft opens it (the installed database driver named), with its password if it has one.
               MLFLOW_BACKEND_STORE_URI=store.mlflow_uri)
    process = subprocess.Popen(server_command(tracking_uri, host, port), start_new_session=True, env=env)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        _wait_until_up(process, base_url, STARTUP_TIMEOUT_S)
        echo(f"runs of study {spec.study_name}, best first:  {pages.runs_url(base_url)}")
        echo(f"compare its {len(pages.trial_run_ids)} trials:  {pages.compare_url(base_url)}")
        echo("serving MLflow's UI; Ctrl-C stops it")
        if on_ready is not None:
            on_ready(pages, base_url)
        return process.wait()
    except KeyboardInterrupt:
        _stop(process)
        echo("stopped MLflow's server")
        return 0
    finally:
        _stop(process)
        signal.signal(signal.SIGTERM, previous)


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def ui_command(spec_path: str | Path, *, storage: str | None = None, tracking_uri: str | None = None,
               port: int = DEFAULT_PORT, overrides: Sequence[str] = ()) -> str:
    """The `octft ui` command line for a study (what `make demo` prints at its end)."""
    parts = ["octft", "ui", str(spec_path), *overrides]
    if storage:
        parts += ["--storage", storage]
    if tracking_uri:
        parts += ["--tracking-uri", tracking_uri]
    if port != DEFAULT_PORT:
        parts += ["--port", str(port)]
    return shlex.join(parts)
