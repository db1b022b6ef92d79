"""The MLflow side of a study: one parent run per study, one child run per trial, and their end states.

The parent run is made at the study's first launch and recorded in its plan record. A worker makes each trial's
child run before handing the trial to its runner (so a runner that dies leaves a run its worker can end); the
runner trains into it and ends it. `settle_run` makes a run's status match its Optuna trial whatever happened:

    COMPLETE -> FINISHED,  PRUNED -> KILLED (tag octft.end_reason),  FAIL -> FAILED (tag octft.end_reason)
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import optuna
from optuna.trial import TrialState

from octft.sweep.records import CHAMPION_ATTR, PLAN_ATTR, test_evaluations, trial_record
from octft.sweep.spec import SweepSpec, sampler_settings
from octft.track.mlflow_store import NOTE_TAG, MlflowStore, MlflowTracker

REPORT_ARTIFACT = "report.html"
RUN_STATUS_OF = {TrialState.COMPLETE: "FINISHED", TrialState.PRUNED: "KILLED", TrialState.FAIL: "FAILED"}


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


def start_trial_run(plan, number: int, run_dir: str) -> str:
    """The child run of trial `number` (RUNNING; its runner trains into it and ends it); returns its id."""
    spec = plan.spec()
    run = MlflowTracker(plan.tracking_url(), spec.mlflow.experiment, f"trial-{number}", parent_run_id=plan.parent_run_id,
                        tags={"optuna.study": spec.study_name, "optuna.trial_number": str(number),
                              "octft.run_dir": run_dir, "octft.kind": "probe" if plan.is_probe() else "trial"})
    return str(run.run_id)


def settle_run(store: MlflowStore, run_id: str | None, state: TrialState, reason: str | None = None) -> None:
    """End a trial's run with the status of its Optuna `state`, once Optuna holds that state (a runner leaves its
    trial's run open: a run never says FINISHED for a trial that Optuna does not have COMPLETE); a run already
    ended so is left alone. `reason` goes to the run's `octft.end_reason` tag."""
    if not run_id or state not in RUN_STATUS_OF:
        return
    if store.run(run_id).status != RUN_STATUS_OF[state]:
        store.end_run(run_id, RUN_STATUS_OF[state], reason)


def update_parent_best(store: MlflowStore, parent_run_id: str, study: optuna.Study, metric: str) -> None:
    """Log the best trial so far to the parent run: metric `best/<metric>` (step = trial number), tags `best_trial`
    and `best_run_id`."""
    try:
        best = study.best_trial
    except ValueError:  # no completed trial yet
        return
    store.log_metrics(parent_run_id, {f"best/{metric.replace('/', '_')}": float(best.value)}, step=best.number)
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
