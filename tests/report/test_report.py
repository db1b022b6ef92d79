"""The study report: one self-contained HTML file, every figure rendered by a real headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import numpy as np
import optuna
import pytest
import yaml
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from octft.cli import main
from octft.config import ConfigError, load_experiment, save_resolved
from octft.data.layout import CLASS_SHORT_NAMES
from octft.errors import UsageError
from octft.report.study import FIGURES, IMPORTANCE_EVALUATOR_NAME, load_definition, render_report
from octft.sweep.pruners import record_epoch
from octft.sweep.records import PLAN_ATTR, TRIAL_ATTR, TrialOutcome, TrialRecord
from octft.sweep.spec import load_sweep
from octft.track.mlflow_store import MlflowStore, MlflowTracker
from octft.train.loop import write_best_artifacts

DISTRIBUTIONS = {
    "optim.lr_head": FloatDistribution(1e-4, 1e-1, log=True),
    "train.unfreeze_epoch": IntDistribution(0, 2),
    "train.accumulation_steps": CategoricalDistribution([1, 2, 4]),
}
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--enable-logging=stderr", "--v=0", "--virtual-time-budget=10000",
    # Any fetch the page tried would fail loudly instead of reaching a network.
    "--host-resolver-rules=MAP * ~NOTFOUND",
]


def _study(root, *, trials: list[tuple[TrialState, float, dict]]):
    """A study as a sweep's workers leave it, a parent MLflow run, and a spec file pointing at both."""
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    storage = f"sqlite:///{root / 'optuna.db'}"
    parent = MlflowTracker(tracking_uri, "report-test", "study")
    parent.finish("FINISHED")
    study = optuna.create_study(study_name="report-test", storage=storage, direction="maximize",
                                sampler=optuna.samplers.RandomSampler(seed=0))
    study.set_user_attr(PLAN_ATTR, {"parent_run_id": parent.run_id, "study_dir": str(root / "runs")})
    for state, value, attrs in trials:
        trial = study.ask(DISTRIBUTIONS)
        epochs = attrs.pop("epochs", 3)
        for epoch in range(epochs):
            step_value = value * (epoch + 1) / epochs
            record_epoch(trial, epoch, step_value, pred_frac=[0.25] * 4, balanced_accuracy=step_value)
        f1 = attrs.pop("f1", (0.5, 0.4, 0.45, 0.6))
        status = {TrialState.COMPLETE: "completed", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed"}[state]
        outcome = TrialOutcome(status, best_value=value, best_epoch=epochs - 1, epochs_run=epochs,
                               best_metrics={f"val/f1_{n}": f for n, f in zip(CLASS_SHORT_NAMES, f1)},
                               prune_reason=attrs.pop("prune_reason", None), prune_epoch=attrs.pop("prune_epoch", None),
                               prune_detail=attrs.pop("prune_detail", None), stop_reason=attrs.pop("fail_reason", None))
        record = TrialRecord(status=status, run_dir=str(root / "runs" / f"trial-{trial.number}"), outcome=outcome,
                             mlflow_run_id=attrs.pop("mlflow_run_id", None))
        assert not attrs, attrs
        trial.set_user_attr(TRIAL_ATTR, record.to_dict())
        study.tell(trial, value) if state == TrialState.COMPLETE else study.tell(trial, state=state)

    experiment = root / "base.yaml"
    save_resolved(load_experiment("experiments/demo.yaml"), experiment)
    spec = root / "sweep.yaml"
    spec.write_text(yaml.safe_dump({
        "base": str(experiment), "study_name": "report-test", "storage": storage,
        "mlflow": {"tracking_uri": tracking_uri},
        "space": {"optim.lr_head": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
                  "train.unfreeze_epoch": {"type": "int", "low": 0, "high": 2},
                  "train.accumulation_steps": {"type": "categorical", "choices": [1, 2, 4]}},
    }))
    return spec, tracking_uri, parent.run_id


def _trial_run_with_predictions(root, tracking_uri):
    """An MLflow run holding val_predictions.csv as the training loop writes it (participant level)."""
    rng = np.random.default_rng(0)
    targets = np.repeat(np.arange(4), 6)
    logits = rng.normal(size=(24, 4)) + 2.0 * np.eye(4)[targets]
    (root / "best-run").mkdir()
    write_best_artifacts(root / "best-run", logits, targets, [str(1000 + i) for i in range(24)], CLASS_SHORT_NAMES, {})
    with MlflowTracker(tracking_uri, "report-test", "trial") as run:
        run.log_artifact(root / "best-run" / "best" / "val_predictions.csv")
    return run.run_id, logits.argmax(axis=1), targets


def _chromium() -> str | None:
    return next((path for name in ("chromium", "chromium-browser", "google-chrome") if (path := shutil.which(name))), None)


@pytest.mark.integration
def test_every_figure_renders_in_headless_chromium_without_console_errors(tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("no chromium binary: install Debian's chromium (apt-get install -y chromium) to run the browser check")
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id, predictions, targets = _trial_run_with_predictions(tmp_path, tracking_uri)
    collapsed = {"f1": (0.0, 0.0, 0.0, 0.9), "prune_reason": "collapse", "prune_epoch": 1,
                 "prune_detail": "collapsed: class 3 takes 97.0% of predictions", "epochs": 2}
    median = {"prune_reason": "median", "prune_epoch": 1, "prune_detail": "best value 0.3 is below the median 0.5", "epochs": 2}
    spec, _, parent_run_id = _study(tmp_path, trials=[
        (TrialState.COMPLETE, 0.55, {}), (TrialState.COMPLETE, 0.72, {"mlflow_run_id": run_id}),
        (TrialState.COMPLETE, 0.40, {}), (TrialState.COMPLETE, 0.61, {}), (TrialState.PRUNED, 0.2, collapsed),
        (TrialState.PRUNED, 0.3, median), (TrialState.FAIL, 0.0, {"fail_reason": "TrainingError: loss is nan", "epochs": 1}),
    ])

    (tmp_path / "runs").mkdir(exist_ok=True)  # the study's folder, on the host that launched it: the report goes there
    assert main(["report", str(spec)]) == 0
    out = tmp_path / "runs" / "report.html"  # the study's folder: where its trials' run folders are
    page = out.read_text()
    assert not re.search(r"<script[^>]+src=|<link[^>]+href=|@import", page), "the report must not fetch anything"
    assert "pruned: collapse" in page and "pruned: median" in page and "TrainingError: loss is nan" in page
    assert 'class="note"' not in page, "with 4 complete trials every figure can be drawn"
    assert "trial 1, the best complete trial that did not collapse" in page
    # Importances by optuna-dashboard's evaluator, named, with the warning four complete trials deserve.
    assert f"{IMPORTANCE_EVALUATOR_NAME} from 4 complete trials" in page
    assert "warning: fewer than 20 complete trials" in page
    # The confusion matrix counts come from the run's val_predictions.csv.
    counts = np.bincount(targets * 4 + predictions, minlength=16).reshape(4, 4)
    assert '"text":' + json.dumps(counts.astype(str).tolist()).replace(" ", "") in page.replace(" ", "")
    # Logged to the study's parent run, whose status stays as it was.
    store = MlflowStore(tracking_uri)
    assert store.has_artifact(parent_run_id, "report.html")
    assert store.run(parent_run_id).status == "FINISHED"

    done = subprocess.run([browser, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", out.as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    console = [line for line in done.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert console == [], console
    sections = dict(re.findall(r'<section class="figure" id="([a-z0-9_]+)">(.*?)</section>', done.stdout, flags=re.S))
    assert list(sections) == [entry["id"] for entry in load_definition()["figures"]]
    for figure_id, body in sections.items():
        assert 'class="main-svg"' in body, f"figure {figure_id} did not render"


def test_too_few_trials_give_notes_not_a_crash(tmp_path):
    spec, tracking_uri, parent_run_id = _study(tmp_path, trials=[(TrialState.COMPLETE, 0.5, {})])
    out = render_report(load_sweep(spec), out=tmp_path / "one.html")
    page = out.read_text()
    assert "parameter importances need at least 2 complete trials; this study has 1 so far" in page
    assert "has no val_predictions.csv" in page  # trial 0 never logged predictions: said, not crashed
    assert page.count('class="plotly-graph-div"') == 4  # history, curves, parallel coordinates, class F1


def test_the_report_definition_is_checked_with_the_file_named(tmp_path):
    assert [entry["id"] for entry in load_definition()["figures"]] == list(FIGURES)
    definition = tmp_path / "report.yaml"
    (tmp_path / "study_report.html").write_text("${figures}")
    definition.write_text(yaml.safe_dump({"template": "study_report.html", "figures": [{"id": "loss_landscape"}]}))
    with pytest.raises(ConfigError, match=r"report.yaml: figures\[0\].id 'loss_landscape' is not a figure; valid ids: optimization_history"):
        load_definition(definition)
    definition.write_text(yaml.safe_dump({"template": "missing.html", "figures": [{"id": "class_f1"}]}))
    with pytest.raises(ConfigError, match="template .*missing.html does not exist"):
        load_definition(definition)


def test_an_unwritable_out_path_is_a_usage_error_naming_it(tmp_path):
    spec, _, _ = _study(tmp_path, trials=[(TrialState.COMPLETE, 0.5, {})])
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(UsageError, match=r"cannot write the report to .*a-file/report.html"):
        render_report(load_sweep(spec), out=blocker / "report.html")
