"""The runs table of a study: every trial's run carries its result, sorting by the objective puts the study's best trial
first, and `octft ui` opens MLflow's page on the objective over every sampled param (checked in headless Chromium).
The worker loop is real; its runner is scripted, logging what `octft train` logs into each run (params, per-epoch
metrics) and returning the outcome the test writes."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
from optuna.trial import TrialState

from octft.data.layout import CLASS_SHORT_NAMES
from octft.report.ui import VIEW_TAG_PREFIX, study_pages, study_view
from octft.sweep.plan import resolve_plan
from octft.sweep.records import TrialOutcome
from octft.sweep.spec import load_sweep
from octft.sweep.storage import open_study_storage
from octft.sweep.study import create_or_load_study
from octft.sweep.worker import run_worker
from octft.track.mlflow_store import MlflowStore, MlflowTracker
from sweeps import load, records, write_spec

SPACE = {
    "optim.lr_head": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
    "optim.lr_encoder": {"type": "float", "low": 1e-4, "high": 3e-3, "log": True},
    "train.unfreeze_epoch": {"type": "int", "low": 0, "high": 1},
    "loss.label_smoothing": {"type": "float", "low": 0.0, "high": 0.2},
    "train.accumulation_steps": {"type": "categorical", "choices": [1, 2]},
}
OBJECTIVE = "val/balanced_accuracy"
RESULT_KEYS = {f"best/{OBJECTIVE}", "best/epoch", *(f"best/val/f1_{name}" for name in CLASS_SHORT_NAMES)}


def _f1s(level: float) -> dict[str, float]:
    return {f"val/f1_{name}": level + 0.01 * index for index, name in enumerate(CLASS_SHORT_NAMES)}


# Trial 1 is the study's best (0.80 at epoch 1) though its last epoch (0.55) is below trial 0's and trial 3's: the last
# epoch's metrics would rank it third. Trial 2 is pruned with a best-so-far (0.90) above every complete trial's.
EPOCHS = {0: [0.60, 0.70], 1: [0.50, 0.80, 0.55], 2: [0.90, 0.30], 3: [0.65, 0.75, 0.74]}
OUTCOMES = {
    0: TrialOutcome(status="completed", best_value=0.70, best_epoch=1, epochs_run=2,
                    best_metrics={OBJECTIVE: 0.70, **_f1s(0.6)}),
    1: TrialOutcome(status="early_stopped", best_value=0.80, best_epoch=1, epochs_run=3,
                    best_metrics={OBJECTIVE: 0.80, **_f1s(0.7)}),
    2: TrialOutcome(status="pruned", best_value=0.90, best_epoch=0, epochs_run=2,
                    best_metrics={OBJECTIVE: 0.90, **_f1s(0.0)},
                    stop_reason="pruned (collapse): collapsed", prune_reason="collapse", prune_epoch=1,
                    prune_detail="92% of predictions are healthy"),
    3: TrialOutcome(status="completed", best_value=0.75, best_epoch=1, epochs_run=3,
                    best_metrics={OBJECTIVE: 0.75, **_f1s(0.65)}),
    4: TrialOutcome(status="failed", stop_reason="ValueError: a bad checkpoint"),
}


class TrainingRunner:
    """Logs into each trial's run what training would (its params, one value per epoch), then returns its outcome."""

    pid = 4242

    def start(self):
        pass

    def run(self, plan, number):
        record = records(plan.storage_url(), plan.study_name)[number]
        tracker = MlflowTracker(plan.tracking_url(), run_id=record.mlflow_run_id, ends_run=False)
        tracker.log_params({"seed": 0, **dict(override.split("=", 1) for override in record.overrides)})
        for epoch, value in enumerate(EPOCHS.get(number, [])):
            tracker.log_metrics({OBJECTIVE: value, "val/loss": 1 - value}, step=epoch)
        tracker.finish("FINISHED")
        return OUTCOMES[number]

    def close(self, timeout=60):
        pass


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A study of 5 trials run by the real worker loop: complete, complete (the best), pruned, complete, failed."""
    root = tmp_path_factory.mktemp("runs-table")
    spec_path, storage, tracking_uri = write_spec(root, study_name="table", n_trials=5, space=SPACE,
                                                  objective={"metric": OBJECTIVE, "direction": "maximize"})
    plan, _ = resolve_plan(spec_path, overrides=[f"output_dir={root / 'runs'}"])
    _, plan = create_or_load_study(plan, open_study_storage(plan.storage_url()))
    plan.write()
    assert run_worker(plan, 0, TrainingRunner(), echo=lambda line: None) == 5
    return {"root": root, "spec": spec_path, "storage": storage, "tracking_uri": tracking_uri, "plan": plan}


def test_sorting_the_runs_by_the_objective_puts_the_studys_best_trial_first(study):
    optuna_study = load(study["storage"], "table")
    store = MlflowStore(study["tracking_uri"])
    parent = study["plan"].parent_run_id
    experiment_id = store.run(parent).experiment_id
    runs = store.client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'",
                                    order_by=[f"metrics.`best/{OBJECTIVE}` DESC"])
    numbers = [int(run.data.tags["optuna.trial_number"]) for run in runs]
    assert numbers[0] == optuna_study.best_trial.number == 1
    last_epochs = store.client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'",
                                           order_by=[f"metrics.`{OBJECTIVE}` DESC"])
    assert last_epochs[0].data.tags["optuna.trial_number"] == "3"  # what sorting ranked by before: the last epoch
    assert numbers[:3] == [1, 3, 0] and set(numbers[3:]) == {2, 4}  # pruned and failed: no result, last
    for run in runs:
        number = int(run.data.tags["optuna.trial_number"])
        trial = optuna_study.trials[number]
        assert RESULT_KEYS <= set(run.data.metrics), number  # the same keys in every run
        assert run.data.tags["optuna.state"] == trial.state.name
        if trial.state == TrialState.COMPLETE:
            assert run.data.metrics[f"best/{OBJECTIVE}"] == trial.value
            assert run.data.metrics["best/epoch"] == OUTCOMES[number].best_epoch
            assert run.data.metrics["best/val/f1_healthy"] == OUTCOMES[number].best_metrics["val/f1_healthy"]
        else:
            assert math.isnan(run.data.metrics[f"best/{OBJECTIVE}"])
    pruned = next(run for run in runs if run.data.tags["optuna.state"] == "PRUNED")
    assert pruned.info.status == "KILLED" and pruned.data.tags["octft.prune_reason"] == "collapse"
    assert pruned.data.tags["octft.prune_detail"] == "epoch 1: 92% of predictions are healthy"
    assert pruned.data.metrics["best/epoch"] == 0 and pruned.data.metrics["best/val/f1_healthy"] == 0.0  # best so far

    parent_run = store.client.get_run(parent)
    assert parent_run.data.metrics[f"best/{OBJECTIVE}"] == optuna_study.best_value == 0.80
    assert parent_run.data.metrics["best/trial"] == 1 and parent_run.data.tags["best_trial"] == "1"
    assert store.metric_history(parent, f"best/{OBJECTIVE}") == [(1, 0.70), (2, 0.80)]  # step: trials ended so far
    assert store.client.get_experiment(experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    assert [record.status for record in records(study["storage"], "table")] == [
        "completed", "early_stopped", "pruned", "completed", "failed"]


def test_the_view_sorts_by_the_objective_and_charts_it_over_every_sampled_param(study):
    spec = load_sweep(study["spec"])
    pages = study_pages(spec)
    view = study_view(spec)
    assert view["orderByKey"] == f"metrics.`best/{OBJECTIVE}`" and view["orderByAsc"] is False
    assert view["searchFilter"] == "tags.`optuna.study` = 'table'"
    [chart] = view["compareRunCharts"]
    assert chart["type"] == "PARALLEL" and sorted(chart["selectedParams"]) == sorted(SPACE)
    assert chart["selectedMetrics"] == [f"best/{OBJECTIVE}"]
    base = "http://127.0.0.1:5000"
    view = f"{base}/#/experiments/{pages.experiment_id}/runs?viewStateShareKey=octft-study-table"
    assert pages.runs_url(base) == f"{view}&workflowType=machine_learning"
    assert pages.compare_url(base) == pages.runs_url(base) + "&compareRunsMode=CHART"


CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--window-size=1600,1200", "--virtual-time-budget=60000",
]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _text(dom: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S)))


@pytest.mark.integration
def test_octft_ui_opens_the_study_sorted_by_the_objective_and_charted_over_every_sampled_param(study):
    browser = next((path for name in ("chromium", "chromium-browser", "google-chrome") if (path := shutil.which(name))), None)
    if browser is None:
        pytest.skip("no chromium binary: install Debian's chromium (apt-get install -y chromium) to run the browser check")
    root, port = study["root"], _free_port()
    log = root / "ui.log"
    with log.open("w") as sink:  # the tracking URI comes from the sweep file
        # SIGINT as a terminal delivers it, even when the test run itself was started in the background (a
        # background job ignores SIGINT, and so would its children).
        process = subprocess.Popen([sys.executable, "-m", "octft.cli", "ui", str(study["spec"]), "--port", str(port)],
                                   stdout=sink, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"),
                                   start_new_session=True,
                                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 420  # MLflow imports slowly on a busy machine
        while "Ctrl-C stops it" not in log.read_text():
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(1)
        lines = log.read_text().splitlines()
        runs_url = next(line.split()[-1] for line in lines if line.startswith("runs of study table, best first:"))
        compare_url = next(line.split()[-1] for line in lines if line.startswith("compare its 5 trials:"))

        def page(url: str, profile: str) -> str:
            done = subprocess.run([browser, *CHROMIUM_FLAGS, f"--user-data-dir={root / profile}", "--dump-dom", url],
                                  capture_output=True, text=True, timeout=240)
            assert done.returncode == 0, done.stderr[-2000:]
            return _text(done.stdout)

        runs = page(runs_url, "runs")
        compare = page(compare_url, "compare")
    finally:
        os.killpg(process.pid, signal.SIGINT)  # as Ctrl-C in a terminal: octft ui and its server
        process.wait(timeout=120)
    # The runs table: the model-training layout, sorted by the objective, the study's best trial first.
    assert "Model registry" in runs and "Observability" not in runs, runs[:2000]
    assert f"Sort: best/{OBJECTIVE}" in runs and "6 matching runs" in runs
    order = [match.group(1) for match in re.finditer(r"\b(trial-\d|study-table)\b", runs)]
    assert order[:3] == ["trial-1", "study-table", "trial-3"], order  # the parent holds the study's best: a tie
    # The chart: one parallel-coordinates plot of the objective over every sampled param.
    chart = compare[compare.index("Parallel Coordinates"):]
    for key in [*SPACE, f"best/{OBJECTIVE}"]:
        assert key in chart, key
    assert '"GET /' not in log.read_text()  # no access log
    # What opened them: the study's saved view, in the experiment's "Views" menu under the study's name.
    spec = load_sweep(study["spec"])
    experiment = MlflowStore(study["tracking_uri"]).client.get_experiment(study_pages(spec).experiment_id)
    envelope = json.loads(experiment.tags[VIEW_TAG_PREFIX + "octft-study-table"])
    assert envelope["name"] == "octft study table" and json.loads(envelope["state"]) == study_view(spec)
