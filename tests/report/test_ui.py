"""`octft ui`: MLflow's own server on a study's store, the pages it prints rendered by a real headless Chromium."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import optuna
import pytest
import yaml
from optuna.distributions import FloatDistribution

from octft.cli import main
from octft.report.ui import StudyPages, study_pages, ui_command, view_key
from octft.sweep.records import PLAN_ATTR, TRIAL_ATTR, TrialRecord
from octft.sweep.spec import load_sweep
from octft.track.mlflow_store import MlflowStore, MlflowTracker

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--window-size=1600,1200", "--virtual-time-budget=60000",
]


def _study(root, trials: int = 3):
    """A study of `trials` trials as the sweep leaves it: parent run, one child run per trial with params,
    `val/balanced_accuracy` per epoch and its result `best/val/balanced_accuracy`; returns the spec path and the runs
    in trial order."""
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    storage = f"sqlite:///{root / 'optuna.db'}"
    parent = MlflowTracker(tracking_uri, "ui-test", "study-ui-test", tags={"optuna.study": "ui-test"})
    study = optuna.create_study(study_name="ui-test", storage=storage, direction="maximize")
    study.set_user_attr(PLAN_ATTR, {"parent_run_id": parent.run_id})
    run_ids = []
    for number in range(trials):
        trial = study.ask({"optim.lr_head": FloatDistribution(1e-4, 1e-1, log=True)})
        with MlflowTracker(tracking_uri, "ui-test", f"trial-{number}", parent_run_id=parent.run_id,
                           tags={"optuna.study": "ui-test", "optuna.trial_number": str(number)}) as run:
            run.log_params({"optim.lr_head": trial.params["optim.lr_head"]})
            for epoch in range(2):
                run.log_metrics({"val/balanced_accuracy": 0.3 + 0.1 * number + 0.05 * epoch}, step=epoch)
            run.log_metrics({"best/val/balanced_accuracy": 0.35 + 0.1 * number}, step=0)
        trial.set_user_attr(TRIAL_ATTR, TrialRecord(mlflow_run_id=run.run_id).to_dict())
        run_ids.append(run.run_id)
        study.tell(trial, 0.35 + 0.1 * number)
    study.ask()  # a trial still waiting for its run: nothing to compare yet
    parent.finish("FINISHED")
    spec_path = root / "sweep.yaml"
    spec_path.write_text(yaml.safe_dump({
        "base": "experiments/demo.yaml", "study_name": "ui-test", "storage": storage,
        "mlflow": {"tracking_uri": tracking_uri, "experiment": "ui-test"},
        "space": {"optim.lr_head": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True}},
    }))
    return spec_path, run_ids, parent.run_id


def test_the_pages_name_the_experiment_and_every_trial_run_in_order(tmp_path):
    spec_path, run_ids, _ = _study(tmp_path)
    pages = study_pages(load_sweep(spec_path))
    assert pages.trial_run_ids == tuple(run_ids)
    base = "http://127.0.0.1:5123"
    view = f"{base}/#/experiments/{pages.experiment_id}/runs?viewStateShareKey=octft-study-ui-test"
    assert pages.runs_url(base) == f"{view}&workflowType=machine_learning"
    assert pages.compare_url(base) == f"{view}&workflowType=machine_learning&compareRunsMode=CHART"
    assert StudyPages("1", (), view_key("a b/c")).runs_url(base).startswith(
        f"{base}/#/experiments/1/runs?viewStateShareKey=octft-study-a-b-c&")
    assert ui_command("sweeps/demo.yaml", tracking_uri="sqlite:///demo/mlflow.db") == (
        "octft ui sweeps/demo.yaml --tracking-uri sqlite:///demo/mlflow.db")


def test_a_store_that_does_not_exist_is_refused_and_not_created(tmp_path, capsys):
    spec_path, _, _ = _study(tmp_path)
    missing = tmp_path / "typo" / "mlflow.db"
    assert main(["ui", str(spec_path), "--tracking-uri", f"sqlite:///{missing}"]) == 2
    assert f"no such database file {missing}" in capsys.readouterr().err
    assert not missing.parent.exists()
    assert main(["ui", str(spec_path), "--storage", f"sqlite:///{tmp_path / 'typo.db'}"]) == 2
    assert "no such database file" in capsys.readouterr().err and not (tmp_path / "typo.db").exists()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _lines_until(process: subprocess.Popen, log, pattern: str, timeout_s: float) -> list[str]:
    """The lines `octft ui` wrote to `log` once one matches `pattern`. A file, not a pipe: MLflow's server
    logs every request, and a pipe nobody reads would fill up and stall it."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        lines = log.read_text().splitlines()
        if any(re.search(pattern, line) for line in lines):
            return lines
        assert process.poll() is None, f"octft ui exited early: {lines[-30:]}"
        time.sleep(1)
    raise AssertionError(f"octft ui printed no line matching {pattern!r} within {timeout_s} s: {lines[-30:]}")


def _port_open(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.integration
def test_octft_ui_serves_the_compare_page_of_every_trial_and_stops_on_ctrl_c(tmp_path):
    browser = next((path for name in ("chromium", "chromium-browser", "google-chrome") if (path := shutil.which(name))), None)
    if browser is None:
        pytest.skip("no chromium binary: install Debian's chromium (apt-get install -y chromium) to run the browser check")
    spec_path, run_ids, parent_run_id = _study(tmp_path)
    port = _free_port()
    log = tmp_path / "ui.log"
    with log.open("w") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "octft.cli", "ui", str(spec_path), "--port", str(port)],
            stdout=sink, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"),
            # SIGINT as a terminal delivers it, even when the test run itself was started in the background.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
    try:
        lines = _lines_until(process, log, r"Ctrl-C stops it", 420)  # MLflow imports slowly on a busy machine
        runs_url = next(line.split()[-1] for line in lines if line.startswith("runs of study ui-test, best first:"))
        compare_url = next(line.split()[-1] for line in lines if line.startswith("compare its 3 trials:"))

        def dom(url: str, profile: str) -> str:
            done = subprocess.run([browser, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / profile}", "--dump-dom", url],
                                  capture_output=True, text=True, timeout=240)
            assert done.returncode == 0, done.stderr[-2000:]
            return done.stdout

        compare = dom(compare_url, "compare")
        for number, run_id in enumerate(run_ids):
            assert f"trial-{number}" in compare or run_id in compare, f"trial {number} is not on the compare page"
        assert "val/balanced_accuracy" in compare and "optim.lr_head" in compare
        runs = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom(runs_url, "runs")))
        # The model-training view: the study's runs table, not the traces.
        assert "study-ui-test" in runs and "Run Name" in runs and "4 matching runs" in runs, runs[-3000:]
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=120)  # the server's grace (10 s) and kill, on a busy machine
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    out = log.read_text()
    assert process.returncode == 0, out[-2000:]
    assert "stopped MLflow's server" in out
    assert not _port_open(port)  # the server and its workers are gone
    assert MlflowStore(load_sweep(spec_path).mlflow.tracking_uri).run(parent_run_id).status == "FINISHED"
