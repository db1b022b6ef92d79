"""The MLflow side of a study: one parent run per study, one child run per trial, and their end states.

The parent run is made at the study's first launch and recorded in its plan record. A worker makes each trial's
child run before handing the trial to its runner (so a runner that dies leaves a run its worker can end); the
runner trains into it and ends it. `settle_run` makes a run's status match its Optuna trial whatever happened:

    COMPLETE -> FINISHED,  PRUNED -> KILLED (tag octft.end_reason),  FAIL -> FAILED (tag octft.end_reason)

Before that, `log_trial_result` gives the run its result, the same keys in every run, so the runs table sorts by it:
metrics `best/<objective>` (the value Optuna ranks; NaN for a pruned or failed trial, which the study does not rank,
so both sort last either way), `best/epoch` and `best/val/f1_<class>` of the best epoch (so far, for a pruned trial);
when pruned, tags `octft.prune_reason` and `octft.prune_detail`. `settle_run` tags every run with its `optuna.state`.
The parent run holds the study's result under the same name, `best/<objective>`, with `best/trial`.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from typing import Any

import optuna
from optuna.trial import TrialState

from octft.data.layout import CLASS_SHORT_NAMES
from octft.sweep.records import CHAMPION_ATTR, PLAN_ATTR, TrialRecord, test_evaluations, trial_record
from octft.sweep.spec import SweepSpec, sampler_settings
from octft.track.mlflow_store import NOTE_TAG, PARENT_RUN_TAG, MlflowStore, MlflowTracker

REPORT_ARTIFACT = "report.html"
RUN_STATUS_OF = {TrialState.COMPLETE: "FINISHED", TrialState.PRUNED: "KILLED", TrialState.FAIL: "FAILED"}
STATE_TAG = "optuna.state"
PRUNE_REASON_TAG = "octft.prune_reason"
PRUNE_DETAIL_TAG = "octft.prune_detail"


def parent_params(spec: SweepSpec) -> dict[str, Any]:
    """What the parent run records: the spec (storage redacted), its space, sampler and pruner settings."""
    params: dict[str, Any] = {
        "spec.base": spec.base, "spec.study_name": spec.study_name, "spec.storage": spec.storage_redacted,
        "spec.n_trials": spec.n_trials, "spec.timeout_s": spec.timeout_s,
        "spec.objective.metric": spec.objective.metric, "spec.objective.direction": spec.objective.direction,
        "spec.mlflow.experiment": spec.mlflow.experiment, "promote.model_name": spec.promote.model_name,
        "promote.min_class_f1": spec.promote.min_class_f1,
    }
    params.update({f"fixed.{key}": value for key, value in spec.fixed.items()})
    params.update({f"space.{key}": json.dumps(entry.model_dump()) for key, entry in spec.space.items()})
    params.update({f"sampler.{key}": value for key, value in sampler_settings(spec).items()})
    for section, settings in spec.pruner.model_dump().items():
        params.update({f"pruner.{section}.{key}": value for key, value in settings.items()})
    return params


def ensure_parent_run(plan, spec: SweepSpec) -> str:
    """A new parent run for the study of `plan` (call it once, at the study's first launch, under its lock)."""
    parent = MlflowTracker(plan.tracking_url(), spec.mlflow.experiment, f"study-{spec.study_name}",
                           tags={"optuna.study": spec.study_name, "octft.kind": "study", "octft.storage": plan.storage})
    parent.log_params(parent_params(spec))
    return str(parent.run_id)


def start_trial_run(store: MlflowStore, plan, number: int, run_dir: str) -> str:
    """The child run of trial `number` under the study's parent run (RUNNING; its runner trains into it, its worker
    ends it); returns its id."""
    spec = plan.spec()
    return store.start_run(spec.mlflow.experiment, f"trial-{number}", {
        PARENT_RUN_TAG: plan.parent_run_id, "optuna.study": spec.study_name, "optuna.trial_number": str(number),
        "octft.run_dir": run_dir, "octft.kind": "probe" if plan.is_probe() else "trial"})


def settle_run(store: MlflowStore, run_id: str | None, state: TrialState, reason: str | None = None) -> None:
    """End a trial's run with the status of its Optuna `state`, once Optuna holds that state (a runner leaves its
    trial's run open: a run never says FINISHED for a trial that Optuna does not have COMPLETE); a run already
    ended so is left alone. `reason` goes to the run's `octft.end_reason` tag, the state to its `optuna.state`."""
    if not run_id or state not in RUN_STATUS_OF:
        return
    store.set_tag(run_id, STATE_TAG, state.name)
    if store.run(run_id).status != RUN_STATUS_OF[state]:
        store.end_run(run_id, RUN_STATUS_OF[state], reason)


def result_metrics(record: TrialRecord, state: TrialState, metric: str) -> dict[str, float]:
    """A trial run's result metrics (see the module docstring); NaN where the trial has none."""
    outcome = record.outcome
    best = outcome.best_metrics if outcome else {}
    value = outcome.best_value if outcome and state == TrialState.COMPLETE else None
    epoch = outcome.best_epoch if outcome else None
    metrics = {f"best/val/f1_{name}": best.get(f"val/f1_{name}", math.nan) for name in CLASS_SHORT_NAMES}
    return {**metrics, f"best/{metric}": math.nan if value is None else value,
            "best/epoch": math.nan if epoch is None else epoch}


def log_trial_result(store: MlflowStore, record: TrialRecord, state: TrialState, metric: str) -> None:
    """Give trial run `record.mlflow_run_id` its result once Optuna holds the trial's `state` (before `settle_run`, so
    a run that says it ended carries it)."""
    if not record.mlflow_run_id:
        return
    store.log_metrics(record.mlflow_run_id, result_metrics(record, state, metric))
    outcome = record.outcome
    if state == TrialState.PRUNED and outcome:
        store.set_tag(record.mlflow_run_id, PRUNE_REASON_TAG, outcome.prune_reason or "no reason recorded")
        store.set_tag(record.mlflow_run_id, PRUNE_DETAIL_TAG,
                      f"epoch {outcome.prune_epoch}" + (f": {outcome.prune_detail}" if outcome.prune_detail else ""))


def update_parent_best(store: MlflowStore, parent_run_id: str, study: optuna.Study, metric: str) -> None:
    """Log the best trial so far to the parent run: metrics `best/<metric>` and `best/trial`, tags `best_trial` and
    `best_run_id`. The step counts the trials ended so far: it only grows, so the latest value (what the runs table
    shows) is the best even when parallel workers finish trials out of order."""
    try:
        best = study.best_trial
    except ValueError:  # no completed trial yet
        return
    ended = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)))
    store.log_metrics(parent_run_id, {f"best/{metric}": float(best.value), "best/trial": best.number}, step=ended)
    store.set_tag(parent_run_id, "best_trial", str(best.number))
    run_id = trial_record(best).mlflow_run_id
    if run_id:
        store.set_tag(parent_run_id, "best_run_id", run_id)


def parent_run_id(study: optuna.Study) -> str | None:
    return (study.user_attrs.get(PLAN_ATTR) or {}).get("parent_run_id")


def parent_note(study: optuna.Study, spec: SweepSpec, *, report_logged: bool) -> str:
    """The parent run's description (markdown): best trial and its replay command, how trials ended, where the
    report and the champion are."""
    trials = study.get_trials(deepcopy=False)
    ended = Counter(f"pruned ({trial_record(trial).outcome.prune_reason if trial_record(trial).outcome else 'no reason'})"
                    if trial.state == TrialState.PRUNED else trial.state.name.lower() for trial in trials)
    lines = [f"### Optuna study `{spec.study_name}`", "",
             f"**Trials:** {len(trials)}: " + ", ".join(f"{count} {name}" for name, count in sorted(ended.items())), ""]
    try:
        best = study.best_trial
    except ValueError:
        lines.append(f"**Best trial:** none has completed yet ({spec.objective.metric}, {spec.objective.direction}).")
    else:
        record = trial_record(best)
        epoch = record.outcome.best_epoch if record.outcome else "?"
        lines += [f"**Best trial:** {best.number}, {spec.objective.metric} = {best.value:.4f} at epoch {epoch}; replay "
                  "it with", "", f"    {record.replay}"]
    champion = study.user_attrs.get(CHAMPION_ATTR)
    scored = sorted({evaluation.trial for evaluation in test_evaluations(study.user_attrs)})
    if champion:
        lines += ["", f"**Champion:** trial {champion['trial']}, `models:/{champion['model_name']}@champion` "
                  f"(version {champion['version']}); test split scored for {len(scored)} trial(s): {scored}."]
    lines += ["", f"**Report:** artifact `{REPORT_ARTIFACT}` of this run." if report_logged
              else f"**Report:** not rendered yet (`octft report SPEC` logs `{REPORT_ARTIFACT}` here)."]
    return "\n".join(lines)


def update_parent_note(store: MlflowStore, study: optuna.Study, spec: SweepSpec) -> None:
    """Write the study's summary as its parent run's description; a study without a parent run is left alone."""
    run_id = parent_run_id(study)
    if run_id:
        note = parent_note(study, spec, report_logged=store.has_artifact(run_id, REPORT_ARTIFACT))
        store.set_tag(run_id, NOTE_TAG, note)
