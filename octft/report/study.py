"""`octft report SPEC`: one self-contained HTML page about a study, from the Optuna storage and the MLflow store.

What the page shows is defined in `dashboards/study_report.yaml` (figures, titles, captions, in order) and
`dashboards/study_report.html` (the page around them); this module holds one small builder per figure id
(`FIGURES`). plotly.js is inlined, so the page opens offline and fetches nothing. A figure that cannot be
drawn yet (too few trials, say) becomes a note saying why, never a crash.

    >>> path = render_report(load_sweep("sweeps/demo.yaml"))        # doctest: +SKIP
    >>> path                                                         # doctest: +SKIP
    PosixPath('demo/runs/sweeps/demo/report.html')
"""

from __future__ import annotations

import html
import string
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
import plotly.graph_objects as go
from optuna.trial import FrozenTrial, TrialState
from plotly.offline import get_plotlyjs

from octft.config import ConfigError, read_yaml
from octft.data.layout import CLASS_SHORT_NAMES
from octft.errors import MissingInputError, UsageError
from octft.redaction import redact_url
from octft.registry.promote import CI_SCORES, TEST_REUSE_TAG, caveats, select_trial
from octft.stores import resolve_tracking_uri
from octft.sweep.records import CHAMPION_ATTR, output_folder, test_evaluations, trial_record
from octft.sweep.spec import SweepSpec
from octft.sweep.storage import open_existing_study
from octft.sweep.tracking import parent_run_id, update_parent_note
from octft.track.mlflow_store import MlflowStore
from octft.train.metrics import confusion_matrix

DASHBOARDS = Path(__file__).resolve().parents[2] / "dashboards"
DEFAULT_DEFINITION = DASHBOARDS / "study_report.yaml"
REPORT_NAME = "report.html"
# One colour per trial outcome, so a pruned trial's reason reads at a glance.
OUTCOME_COLOURS = {
    "complete": "#1f77b4",
    "pruned: collapse": "#d62728",
    "pruned: median": "#ff7f0e",
    "failed": "#7f7f7f",
    "running": "#2ca02c",
}


class FigureUnavailable(Exception):
    """A figure that cannot be drawn from this study yet; the message is shown in its place."""


@dataclass
class ReportContext:
    """What every figure builder may read: the study, its trials, the MLflow store and the best trial."""

    study: optuna.Study
    trials: list[FrozenTrial]
    store: MlflowStore
    objective: str
    min_class_f1: float

    @property
    def complete(self) -> list[FrozenTrial]:
        return [trial for trial in self.trials if trial.state == TrialState.COMPLETE]

    def best_trial(self) -> tuple[FrozenTrial | None, str]:
        """The trial promotion would pick, else the best complete one; with a sentence saying which."""
        try:
            trial, _ = select_trial(self.study, self.min_class_f1)
            return trial, f"trial {trial.number}, the best complete trial that did not collapse"
        except ValueError:
            if not self.complete:
                return None, "no trial has completed"
            trial = self.study.best_trial
            return trial, f"trial {trial.number}, the best complete trial (every complete trial collapsed)"


# ---------------------------------------------------------------------------------------------
# Figures


def _optimization_history(context: ReportContext):
    if not context.complete:
        raise FigureUnavailable("no trial has completed yet, so there is no objective to plot")
    return optuna.visualization.plot_optimization_history(context.study, target_name=context.objective)


def outcome(trial: FrozenTrial) -> str:
    """'complete', 'pruned: <reason>', 'failed' or 'running': how a trial ended, for legends and tables."""
    if trial.state == TrialState.PRUNED:
        pruned = trial_record(trial).outcome
        return f"pruned: {pruned.prune_reason if pruned and pruned.prune_reason else 'unknown'}"
    if trial.state == TrialState.FAIL:
        return "failed"
    return trial.state.name.lower()


def _intermediate_values(context: ReportContext):
    reported = [trial for trial in context.trials if trial.intermediate_values]
    if not reported:
        raise FigureUnavailable("no trial has reported an epoch yet")
    figure = go.Figure()
    in_legend: set[str] = set()
    for trial in reported:
        label = outcome(trial)
        colour = OUTCOME_COLOURS.get(label, "#9467bd")
        epochs = sorted(trial.intermediate_values)
        values = [trial.intermediate_values[epoch] for epoch in epochs]
        hover = [f"trial {trial.number} ({label})<br>epoch {epoch}: {value:.4f}" for epoch, value in zip(epochs, values)]
        figure.add_trace(go.Scatter(
            x=epochs, y=values, mode="lines+markers", name=label, legendgroup=label, showlegend=label not in in_legend,
            line={"color": colour, "width": 1.5}, marker={"size": 5}, hovertext=hover, hoverinfo="text",
        ))
        in_legend.add(label)
        if trial.state == TrialState.PRUNED:
            pruned = trial_record(trial).outcome
            detail = html.escape(str(pruned.prune_detail or "") if pruned else "")
            figure.add_trace(go.Scatter(
                x=[epochs[-1]], y=[values[-1]], mode="markers", legendgroup=label, showlegend=False,
                marker={"symbol": "x", "size": 12, "color": colour},
                hovertext=[f"trial {trial.number} pruned at epoch {epochs[-1]} ({label})<br>{detail}"], hoverinfo="text",
            ))
    figure.update_layout(xaxis_title="epoch", yaxis_title=context.objective, legend_title="outcome")
    return figure


# Below this many complete trials the report warns that its parameter importances are mostly noise.
MIN_TRIALS_FOR_IMPORTANCES = 20
# The one importance evaluator, with its default arguments: Optuna's default and optuna-dashboard's. Both rank a
# maximised objective by its high values from optuna-dashboard 0.21 on; 0.20 and earlier ranked it by its low ones.
IMPORTANCE_EVALUATOR = optuna.importance.PedAnovaImportanceEvaluator
IMPORTANCE_EVALUATOR_NAME = ("PED-ANOVA importances (optuna.importance.PedAnovaImportanceEvaluator, default arguments: "
                             "Optuna's default evaluator and optuna-dashboard's from 0.21)")


def _param_importances(context: ReportContext):
    complete = context.complete
    if len(complete) < 2:
        raise FigureUnavailable(
            f"parameter importances need at least 2 complete trials; this study has {len(complete)} so far"
        )
    if not any(trial.params for trial in complete):
        raise FigureUnavailable("the complete trials have no searched parameters (empty space)")
    try:
        figure = optuna.visualization.plot_param_importances(context.study, evaluator=IMPORTANCE_EVALUATOR(),
                                                             target_name=context.objective)
    except (ValueError, RuntimeError) as error:
        raise FigureUnavailable(f"Optuna could not compute importances from {len(complete)} complete trials: {error}") from None
    title = f"{IMPORTANCE_EVALUATOR_NAME} from {len(complete)} complete trials"
    if len(complete) < MIN_TRIALS_FOR_IMPORTANCES:
        title += (f"<br><b>warning: fewer than {MIN_TRIALS_FOR_IMPORTANCES} complete trials; these importances are "
                  "mostly noise: read them as a hint, not a ranking</b>")
    return figure.update_layout(title=title)


def _parallel_coordinate(context: ReportContext):
    if not any(trial.params for trial in context.complete):
        raise FigureUnavailable("no complete trial with searched parameters yet")
    return optuna.visualization.plot_parallel_coordinate(context.study, target_name=context.objective)


def _class_f1(context: ReportContext):
    best = {trial.number: trial_record(trial).outcome.best_metrics for trial in context.trials
            if trial_record(trial).outcome and trial_record(trial).outcome.best_metrics}
    scored = [trial for trial in context.trials if trial.number in best]
    if not scored:
        raise FigureUnavailable("no trial has recorded its best epoch's metrics yet")
    labels = [f"#{trial.number} ({outcome(trial)})" for trial in scored]
    figure = go.Figure()
    for name in CLASS_SHORT_NAMES:
        values = [best[trial.number].get(f"val/f1_{name}") for trial in scored]
        figure.add_trace(go.Bar(x=labels, y=values, name=name))
    figure.add_hline(y=context.min_class_f1, line_dash="dot", line_color="#d62728",
                     annotation_text=f"promote.min_class_f1 = {context.min_class_f1}")
    figure.update_layout(barmode="group", xaxis_title="trial", yaxis_title="validation F1 (best epoch)",
                         yaxis_range=[0, 1], legend_title="class")
    return figure


def _best_confusion_matrix(context: ReportContext):
    trial, which = context.best_trial()
    if trial is None:
        raise FigureUnavailable(f"no confusion matrix: {which}")
    predictions, source = _val_predictions(context.store, trial)
    if predictions is None:
        raise FigureUnavailable(f"{which} has no val_predictions.csv (looked in {source})")
    index = {name: position for position, name in enumerate(CLASS_SHORT_NAMES)}
    unknown = sorted((set(predictions.true_class) | set(predictions.predicted_class)) - set(index))
    if unknown:
        raise FigureUnavailable(f"val_predictions.csv of trial {trial.number} names unknown classes {unknown}")
    counts = confusion_matrix(predictions.true_class.map(index).to_numpy(), predictions.predicted_class.map(index).to_numpy(),
                              len(CLASS_SHORT_NAMES))
    totals = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
    figure = go.Figure(go.Heatmap(
        z=share, x=list(CLASS_SHORT_NAMES), y=list(CLASS_SHORT_NAMES), text=counts.astype(str).tolist(), texttemplate="%{text}",
        colorscale="Blues", zmin=0, zmax=1, colorbar={"title": "share of true class"},
        hovertemplate="true %{y}, predicted %{x}: %{text} (%{z:.0%})<extra></extra>",
    ))
    figure.update_layout(title=f"{which} (from {source})", xaxis_title="predicted", yaxis_title="true",
                         yaxis_autorange="reversed")
    return figure


def _val_predictions(store: MlflowStore, trial: FrozenTrial):
    """The best epoch's val_predictions.csv: the run's MLflow artifact, else `<run_dir>/best/`."""
    record = trial_record(trial)
    run_id = record.mlflow_run_id
    looked = []
    if run_id:
        looked.append(f"MLflow run {run_id}")
        with tempfile.TemporaryDirectory(prefix="octft-report-") as folder:
            try:
                local = store.download(run_id, "val_predictions.csv", folder)
                return pd.read_csv(local, dtype={"participant_id": str}), f"MLflow run {run_id}"
            except MissingInputError:
                pass
    run_dir = record.run_dir
    if run_dir:  # the folder of the host that ran the trial: here only on that host, while it lasts
        path = Path(run_dir) / "best" / "val_predictions.csv"
        looked.append(f"{path} (a path on host {record.host or '?'})")
        if path.is_file():
            return pd.read_csv(path, dtype={"participant_id": str}), str(path)
    return None, " and ".join(looked) or "nowhere: the trial recorded no MLflow run or run folder"


FIGURES: dict[str, Callable[[ReportContext], Any]] = {
    "optimization_history": _optimization_history,
    "intermediate_values": _intermediate_values,
    "param_importances": _param_importances,
    "parallel_coordinate": _parallel_coordinate,
    "class_f1": _class_f1,
    "best_confusion_matrix": _best_confusion_matrix,
}


# ---------------------------------------------------------------------------------------------
# The definition and the page


def load_definition(path: str | Path = DEFAULT_DEFINITION) -> dict[str, Any]:
    """The report definition: {"template": Path, "figures": [{"id", "title", "caption"}, ...]}, checked."""
    path = Path(path)
    if not path.exists():  # a folder or a FIFO is named as such by read_yaml
        raise ConfigError(f"{path}: no such report definition (the repo ships dashboards/study_report.yaml)")
    tree = read_yaml(path, what="report definition") or {}
    if not isinstance(tree, dict) or not isinstance(tree.get("figures"), list) or not tree["figures"]:
        raise ConfigError(f"{path}: expected `template: <file>` and a non-empty `figures:` list of {{id, title, caption}}")
    unknown_keys = sorted(set(tree) - {"template", "figures"})
    if unknown_keys:
        raise ConfigError(f"{path}: unknown key(s) {unknown_keys}; valid keys: figures, template")
    template = path.parent / str(tree.get("template", "study_report.html"))
    if not template.is_file():
        raise ConfigError(f"{path}: template {template} does not exist; put the HTML template beside the definition")
    figures, seen = [], set()
    for position, entry in enumerate(tree["figures"]):
        if not isinstance(entry, dict) or "id" not in entry:
            raise ConfigError(f"{path}: figures[{position}] must be a mapping with an id (one of {', '.join(FIGURES)})")
        extra = sorted(set(entry) - {"id", "title", "caption"})
        if extra:
            raise ConfigError(f"{path}: figures[{position}] has unknown key(s) {extra}; valid keys: caption, id, title")
        if entry["id"] not in FIGURES:
            raise ConfigError(f"{path}: figures[{position}].id {entry['id']!r} is not a figure; valid ids: {', '.join(FIGURES)}")
        if entry["id"] in seen:
            raise ConfigError(f"{path}: figure {entry['id']!r} is listed twice; list each figure once")
        seen.add(entry["id"])
        figures.append({"id": entry["id"], "title": str(entry.get("title", entry["id"])), "caption": str(entry.get("caption", ""))})
    return {"template": template, "figures": figures}


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(cell))}</th>" for cell in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(cell))}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _summary(context: ReportContext) -> str:
    study = context.study
    outcomes = Counter(outcome(trial) for trial in context.trials)
    parts = [_table(["outcome", "trials"], [[name, count] for name, count in sorted(outcomes.items())])]
    best, which = context.best_trial()
    parts.append(f"<p><b>Best trial:</b> {html.escape(which)}.</p>")
    champion = study.user_attrs.get(CHAMPION_ATTR)
    evaluations = test_evaluations(study.user_attrs)
    if champion:
        metrics = next((item.scores for item in evaluations if item.trial == champion["trial"]), {})
        parts.append(
            f"<p><b>Champion:</b> trial {champion['trial']}, registered as "
            f"models:/{html.escape(str(champion['model_name']))}@champion (version {html.escape(str(champion['version']))}).</p>"
        )
        chosen = next((trial for trial in context.trials if trial.number == champion["trial"]), None)
        for note in caveats(chosen, {}) if chosen is not None else []:
            parts.append(f'<p class="caveat"><b>Note:</b> {html.escape(note)}.</p>')
        rows = [[f"test/{name}", *(f"{metrics.get(f'test/{name}{suffix}', float('nan')):.4f}" for suffix in ("", "_ci_low", "_ci_high"))]
                for name in CI_SCORES]
        parts.append("<p>Test split, participant level, stratified bootstrap 95% interval:</p>"
                     + _table(["score", "value", "low", "high"], rows))
    scored = sorted({evaluation.trial for evaluation in evaluations})
    if not scored:
        parts.append("<p><b>Test split:</b> not scored yet (octft promote scores it).</p>")
    else:
        reuse = f" More than one trial was scored: {TEST_REUSE_TAG}=true on the versions registered since." if len(scored) > 1 else ""
        parts.append(f'<p id="test-evaluations"><b>Test split:</b> scored for {len(scored)} trial(s) '
                     f"({html.escape(', '.join(str(number) for number in scored))}).{html.escape(reuse)}</p>"
                     + _table(["trial", "scored at (UTC)", "test/balanced_accuracy"],
                              [[evaluation.trial, evaluation.time,
                                f"{evaluation.scores.get('test/balanced_accuracy', float('nan')):.4f}"]
                               for evaluation in evaluations]))
    rows = []
    for trial in context.trials:
        record = trial_record(trial)
        why = (record.outcome.prune_detail if record.outcome else None) or record.fail_reason or ""
        best_epoch = record.outcome.best_epoch if record.outcome and record.outcome.best_epoch is not None else ""
        rows.append([trial.number, outcome(trial), "" if trial.value is None else f"{trial.value:.4f}",
                     best_epoch, ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                           for k, v in trial.params.items()), why])
    parts.append("<h2>Trials</h2>" + _table(["trial", "outcome", context.objective, "best epoch", "params", "why it ended"], rows))
    return "\n".join(parts)


def build_report_html(context: ReportContext, definition: dict[str, Any], *, storage: str) -> str:
    """The whole page as one string: template, summary, every figure (or its note), plotly.js inlined."""
    sections = []
    for entry in definition["figures"]:
        try:
            figure = FIGURES[entry["id"]](context)
            body = figure.to_html(full_html=False, include_plotlyjs=False, div_id=f"figure-{entry['id']}",
                                  config={"displaylogo": False, "responsive": True})
        except FigureUnavailable as note:
            body = f'<p class="note">{html.escape(str(note))}</p>'
        sections.append(
            f'<section class="figure" id="{entry["id"]}"><h2>{html.escape(entry["title"])}</h2>'
            f'<p class="caption">{html.escape(entry["caption"])}</p>\n{body}\n</section>'
        )
    template = string.Template(definition["template"].read_text())
    return template.substitute(
        title=html.escape(f"Study {context.study.study_name}"),
        meta=html.escape(f"{len(context.trials)} trials · storage {redact_url(storage)} · direction "
                         f"{context.study.direction.name.lower()} · generated {time.strftime('%Y-%m-%d %H:%M:%S')}"),
        summary=_summary(context),
        figures="\n".join(sections),
        plotly_js=get_plotlyjs(),
    )


def render_report(
    spec: SweepSpec,
    *,
    out: str | Path | None = None,
    storage: str | None = None,
    tracking_uri: str | None = None,
    definition: str | Path = DEFAULT_DEFINITION,
) -> Path:
    """Write the study's report and log it to the study's parent run. Default: `<study dir>/report.html` on the host
    that launched the study while its folder is there, else `./<study name>/report.html` (`output_folder`): a study
    read from another machine writes under the caller's folder, never into a worker host's path."""
    store = MlflowStore(resolve_tracking_uri(tracking_uri or spec.mlflow.tracking_uri), must_exist=True)
    storage = storage or spec.storage
    study = open_existing_study(spec.study_name, storage)
    context = ReportContext(study, study.get_trials(deepcopy=False), store, spec.objective.metric,
                            spec.promote.min_class_f1)
    page = build_report_html(context, load_definition(definition), storage=storage)
    path = Path(out) if out else output_folder(spec.study_name, study.user_attrs) / REPORT_NAME
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(page, encoding="utf-8")
    except OSError as error:
        raise UsageError(f"cannot write the report to {path}: {error.strerror or error}; "
                         "give --out a path in a writable folder") from None
    parent = parent_run_id(study)
    if parent:
        store.log_artifacts(parent, path)
    update_parent_note(store, study, spec)
    return path
