"""MLflow side of a sweep: one parent run per study, a child run per trial, and their end states.

The parent run is created once, at the study's first launch, and found again through the study user attr
`mlflow_parent_run_id`. Child runs are created by the trial runners (`octft.sweep.trial`); the worker
calls `settle_run` afterwards so a run's status always matches its Optuna trial, even when the trial
process died before it could end its run:

    COMPLETE -> FINISHED,  PRUNED -> KILLED (tag octft.end_reason),  FAIL -> FAILED (tag octft.end_reason)
"""

from __future__ import annotations

import json
from typing import Any

import optuna
from optuna.trial import TrialState

from octft.sweep.spec import SweepSpec, sampler_settings
from octft.track import END_REASON_TAG, MlflowTracker

PARENT_ATTR = "mlflow_parent_run_id"
NOTE_TAG = "mlflow.note.content"  # the run description the MLflow UI shows on the run's page
REPORT_ARTIFACT = "report.html"
RUN_STATUS_OF = {TrialState.COMPLETE: "FINISHED", TrialState.PRUNED: "KILLED", TrialState.FAIL: "FAILED"}


def parent_params(spec: SweepSpec) -> dict[str, Any]:
    """What the parent run records: the spec (storage redacted), its space, sampler and pruner settings."""
    params: dict[str, Any] = {
        "spec.base": spec.base,
        "spec.study_name": spec.study_name,
        "spec.storage": spec.storage_redacted,
        "spec.n_trials": spec.n_trials,
        "spec.timeout_s": spec.timeout_s,
        "spec.objective.metric": spec.objective.metric,
        "spec.objective.direction": spec.objective.direction,
        "spec.mlflow.experiment": spec.mlflow.experiment,
        "promote.model_name": spec.promote.model_name,
        "promote.min_class_f1": spec.promote.min_class_f1,
    }
    params.update({f"fixed.{key}": value for key, value in spec.fixed.items()})
    params.update({f"space.{key}": json.dumps(entry.model_dump()) for key, entry in spec.space.items()})
    params.update({f"sampler.{key}": value for key, value in sampler_settings(spec).items()})
    for section, settings in spec.pruner.model_dump().items():
        params.update({f"pruner.{section}.{key}": value for key, value in settings.items()})
    return params


def ensure_parent_run(study: optuna.Study, spec: SweepSpec, tracking_uri: str) -> str:
    """The study's parent run id: created (and its params logged) at first launch, found again afterwards.

    Call it while holding the study's lock (`octft.sweep.study.study_lock`), so two hosts launching at
    once do not both create one.
    """
    run_id = study.user_attrs.get(PARENT_ATTR)
    if run_id:
        return str(run_id)
    parent = MlflowTracker(
        tracking_uri, spec.mlflow.experiment, f"study-{spec.study_name}",
        tags={"optuna.study": spec.study_name, "octft.kind": "study", "octft.storage": spec.storage_redacted},
    )
    parent.log_params(parent_params(spec))
    study.set_user_attr(PARENT_ATTR, parent.run_id)
    return str(parent.run_id)


def open_tracking_store(tracking_uri: str) -> None:
    """Import MLflow and open the store of `tracking_uri` (MLflow keeps it for the process): a trial runner
    does this while it waits for its first trial, so that trial does not wait for it.
    Never raises: a store that cannot be opened fails again where it is used, inside a trial, with its context."""
    try:
        from mlflow.tracking import MlflowClient

        MlflowClient(tracking_uri=tracking_uri)._tracking_client.store
    except Exception:
        pass


def settle_run(tracking_uri: str, run_id: str | None, state: TrialState, reason: str | None = None) -> None:
    """Make the child run's status match the trial's `state` (see the module docstring).

    A run the trial process already ended correctly is left alone; one it left RUNNING (the process was
    killed) or ended otherwise is ended again with `reason`.
    """
    if not run_id or state not in RUN_STATUS_OF:
        return
    from mlflow.tracking import MlflowClient

    wanted = RUN_STATUS_OF[state]
    client = MlflowClient(tracking_uri=tracking_uri)
    if client.get_run(run_id).info.status == wanted:
        return
    MlflowTracker(tracking_uri, run_id=run_id).finish(wanted, reason)


def update_parent_best(tracking_uri: str, parent_run_id: str, study: optuna.Study, metric: str) -> None:
    """Log the best trial so far to the parent run: metric `best/<metric>` (step = trial number), tag `best_trial`."""
    from mlflow.tracking import MlflowClient

    try:
        best = study.best_trial
    except ValueError:  # no completed trial yet
        return
    client = MlflowClient(tracking_uri=tracking_uri)
    client.log_metric(parent_run_id, f"best/{metric.replace('/', '_')}", float(best.value), step=best.number)
    _set_shared_tag(client, parent_run_id, "best_trial", str(best.number))
    if best.user_attrs.get("mlflow_run_id"):
        _set_shared_tag(client, parent_run_id, "best_run_id", str(best.user_attrs["mlflow_run_id"]))


def _set_shared_tag(client, run_id: str, key: str, value: str) -> None:
    """Set a tag that several workers may set at once. Two first writes race in MLflow's SQL store (it looks
    the tag up, then inserts): the loser fails on the UNIQUE key (seen: two workers, one sqlite store) while
    the row now exists, so setting it again updates it."""
    from mlflow.exceptions import MlflowException

    try:
        client.set_tag(run_id, key, value)
    except MlflowException as error:
        if "UNIQUE constraint" not in str(error):
            raise
        client.set_tag(run_id, key, value)


def end_parent_run(tracking_uri: str, parent_run_id: str, status: str = "FINISHED", reason: str | None = None) -> None:
    """End the parent run `status` (a later launch that adds trials reopens it); `reason` lands in its
    `octft.end_reason` tag."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    if reason:
        client.set_tag(parent_run_id, END_REASON_TAG, reason)
    client.set_terminated(parent_run_id, status=status)


def reopen_parent_run(tracking_uri: str, parent_run_id: str) -> None:
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri=tracking_uri).update_run(parent_run_id, status="RUNNING")


def parent_note(study: optuna.Study, spec: SweepSpec, *, report_logged: bool) -> str:
    """The parent run's description (markdown): best trial and its replay command, how trials ended, where
    the report and the champion are."""
    from collections import Counter

    from octft.sweep.promote import CHAMPION_ATTR, evaluations_on_test
    from octft.sweep.reporting import replay_command

    trials = study.get_trials(deepcopy=False)
    ended = Counter(
        f"pruned ({trial.user_attrs.get('prune_reason', 'no reason')})" if trial.state == TrialState.PRUNED
        else trial.state.name.lower() for trial in trials
    )
    lines = [f"### Optuna study `{spec.study_name}`", "",
             f"**Trials:** {len(trials)}: " + ", ".join(f"{count} {name}" for name, count in sorted(ended.items())), ""]
    try:
        best = study.best_trial
    except ValueError:
        lines.append(f"**Best trial:** none has completed yet ({spec.objective.metric}, {spec.objective.direction}).")
    else:
        epoch = best.user_attrs.get("best_epoch", "?")
        lines += [f"**Best trial:** {best.number}, {spec.objective.metric} = {best.value:.4f} at epoch {epoch}; replay it with",
                  "", f"    {replay_command(study, best.number, spec)}"]
    champion = study.user_attrs.get(CHAMPION_ATTR)
    scored = sorted({evaluation.trial for evaluation in evaluations_on_test(study)})
    if champion:
        lines += ["", f"**Champion:** trial {champion['trial']}, `models:/{champion['model_name']}@champion` "
                  f"(version {champion['version']}); test split scored for {len(scored)} trial(s): {scored}."]
    lines += ["", f"**Report:** artifact `{REPORT_ARTIFACT}` of this run." if report_logged
              else f"**Report:** not rendered yet (`octft report SPEC` logs `{REPORT_ARTIFACT}` here)."]
    return "\n".join(lines)


def update_parent_note(tracking_uri: str, study: optuna.Study, spec: SweepSpec) -> None:
    """Write the study's summary as its parent run's description; a study without a parent run is left alone."""
    from mlflow.tracking import MlflowClient

    parent_run_id = study.user_attrs.get(PARENT_ATTR)
    if not parent_run_id:
        return
    client = MlflowClient(tracking_uri=tracking_uri)
    report_logged = any(entry.path == REPORT_ARTIFACT for entry in client.list_artifacts(str(parent_run_id)))
    client.set_tag(str(parent_run_id), NOTE_TAG, parent_note(study, spec, report_logged=report_logged))
