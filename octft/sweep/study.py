"""A study in shared storage: created or resumed once per launch, its budget kept exact, dead trials retried once.

K workers on any number of hosts together run exactly `n_trials` trials: a worker takes a trial only while holding
the study lock (`octft.sweep.storage.study_lock`), after counting the trials that already exist. A trial whose
worker died (no heartbeat for the grace period) is marked FAIL, its MLflow run FAILED, and one retry is queued: a
new trial with the same params whose record only links to the attempt it replaces.

    >>> study, index = create_or_load_study(plan, storage)                       # doctest: +SKIP
    >>> trials = next_trials(study, storage, n_trials=8, size=1)                 # doctest: +SKIP
"""

from __future__ import annotations

import socket
import time
import warnings
from collections.abc import Sequence

import optuna
from optuna.distributions import BaseDistribution
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState

from octft.errors import UsageError
from octft.sweep.plan import PLAN_FORMAT, LaunchPlan
from octft.sweep.pruners import build_pruner
from octft.sweep.records import (
    HEAD_FROM_ATTR,
    PLAN_ATTR,
    TRIAL_ATTR,
    TrialOutcome,
    TrialRecord,
    launched_before_plans,
    trial_record,
)
from octft.sweep.spec import build_sampler, sampler_settings
from octft.sweep.storage import study_lock
from octft.sweep.tracking import ensure_parent_run, settle_run
from octft.track.mlflow_store import MlflowStore

DEAD_WORKER = "the worker running this trial died (no heartbeat within the grace period)"


def create_or_load_study(plan: LaunchPlan, storage: RDBStorage) -> tuple[optuna.Study, LaunchPlan]:
    """Create the study or load it; on its first launch record its plan and make its MLflow parent run. Returns the
    study and the plan with the parent run and this launch's index filled in.

    Refused: a study launched by an octft from before launch plans, one created to go the other direction, and a
    relaunch whose trials would get another config (other overrides or fixed keys) than the study's trials got.
    """
    spec = plan.spec()
    with study_lock(storage, spec.study_name):
        study = optuna.create_study(storage=storage, study_name=spec.study_name, direction=spec.objective.direction,
                                    sampler=build_sampler(spec), pruner=build_pruner(spec), load_if_exists=True)
        attrs = study.user_attrs
        if launched_before_plans(attrs):
            raise UsageError(f"study {spec.study_name!r} in {plan.storage} was launched by an earlier octft whose records "
                             "this one does not read; launch it under another study_name (e.g. study_name="
                             f"{spec.study_name}-2), or delete it with `optuna delete-study --study-name {spec.study_name} "
                             f"--storage ...`")
        if study.direction.name.lower() != spec.objective.direction:
            raise UsageError(f"study {spec.study_name!r} in {plan.storage} was created to {study.direction.name.lower()}, "
                             f"but the sweep says {spec.objective.direction}; use another study_name")
        recorded = attrs.get(PLAN_ATTR)
        if recorded is None:
            recorded = {"format": PLAN_FORMAT, "config": plan.config_digest(), "fixed": spec.fixed,
                        # Its first launch's folder, on that host only: readers elsewhere write under their own.
                        "study_dir": plan.study_dir, "host": socket.gethostname(),
                        "experiment_overrides": plan.experiment_overrides,
                        "parent_run_id": ensure_parent_run(plan, spec), "launches": 0,
                        "sampler": sampler_settings(spec), "objective": spec.objective.model_dump()}
        elif recorded["config"] != plan.config_digest():
            raise UsageError(
                f"study {spec.study_name!r} was launched with overrides {recorded['experiment_overrides']} and fixed "
                f"{recorded['fixed']}, now {plan.experiment_overrides} and {spec.fixed}; its trials must share one "
                "config: launch with the same overrides or use another study_name")
        # Each launch gets its own sampler seeds: the same seed again would draw the first launch's params again.
        study.set_user_attr(PLAN_ATTR, {**recorded, "launches": recorded["launches"] + 1})
        if plan.head_from is not None and HEAD_FROM_ATTR not in attrs:
            study.set_user_attr(HEAD_FROM_ATTR, plan.head_from)
        if study.metric_names != [spec.objective.metric]:
            with warnings.catch_warnings():
                # Experimental in Optuna 5, and harmless: optuna-dashboard then shows the metric's name.
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                study.set_metric_names([spec.objective.metric])
    launch = plan.launch.model_copy(update={"index": recorded["launches"]})
    return study, plan.updated(parent_run_id=recorded["parent_run_id"], launch=launch)


def open_worker_study(plan: LaunchPlan, storage: RDBStorage, worker_index: int) -> optuna.Study:
    """The study as worker `worker_index` of `plan`'s launch opens it: the study's pruner, and a sampler seeded apart
    from every other worker's of every launch (on any host)."""
    spec = plan.spec()
    offset = plan.launch.index * 10_007 + worker_index
    return optuna.load_study(study_name=spec.study_name, storage=storage, pruner=build_pruner(spec),
                             sampler=build_sampler(spec, seed_offset=offset))


# ---------------------------------------------------------------------------------------------------- budget


def retried_numbers(trials: Sequence[FrozenTrial]) -> set[int]:
    """Numbers of trials that a later trial retries (their place in the budget went to the retry)."""
    return {number for trial in trials for number in trial.system_attrs.get("retry_history", [])}


def take_trial(study: optuna.Study, n_trials: int | None) -> optuna.trial.Trial | None:
    """The next trial for a worker, or None when the budget is spent. Hold `study_lock` while calling.

    Trials count against `n_trials` in the order they were created (a retry in place of the trial it replaces).
    A waiting trial (a retry, or one enqueued) is taken first when it falls within the budget; enqueued trials
    beyond it stay waiting, for a later launch with a larger budget. Otherwise a new trial is created only while
    fewer than `n_trials` count.
    """
    taken = take_trials(study, n_trials, 1)
    return taken[0] if taken else None


def take_trials(study: optuna.Study, n_trials: int | None, size: int) -> list[optuna.trial.Trial]:
    """Up to `size` trials, as `size` calls of `take_trial` would take them, from one read of the study. Hold
    `study_lock` while calling."""
    if n_trials is None:
        return [study.ask() for _ in range(size)]
    trials = study.get_trials(deepcopy=False)
    replaced = retried_numbers(trials)
    counted = sorted((trial for trial in trials if trial.number not in replaced), key=lambda trial: trial.number)
    # Optuna hands out the oldest waiting trial first: those within the budget, then new ones while fewer count
    # (when fewer count, no trial lies beyond the budget).
    waiting = sum(1 for trial in counted[:n_trials] if trial.state == TrialState.WAITING)
    return [study.ask() for _ in range(min(size, waiting + max(0, n_trials - len(counted))))]


def next_trials(study: optuna.Study, storage: RDBStorage, n_trials: int | None, size: int) -> list[optuna.trial.Trial]:
    """`take_trials` under the study lock: what a worker calls for its next trials (a probe's pass takes several)."""
    with study_lock(storage, study.study_name), warnings.catch_warnings():
        # Optuna warns that heartbeats are meant for Study.optimize; the worker beats for its trials itself.
        warnings.filterwarnings("ignore", message="Heartbeat of storage")
        return take_trials(study, n_trials, size)


# ---------------------------------------------------------------------------------------------------- dead workers


def reap_stale_trials(study: optuna.Study, storage: RDBStorage, store: MlflowStore) -> list[int]:
    """Fail the trials whose worker died (stale heartbeat), end their MLflow runs FAILED, queue one retry of each;
    returns the numbers failed now. What `optuna.storages.fail_stale_trials` does, with the reason recorded while the
    trial still runs (Optuna refuses attrs on finished trials) and a retry that starts clean."""
    failed = []
    # Optuna's own stale-trial query: the one fail_stale_trials uses.
    for trial_id in storage._get_stale_trial_ids(storage.get_study_id_from_name(study.study_name)):
        record = trial_record(storage.get_trial(trial_id))
        record.status = "failed"
        record.outcome = TrialOutcome(status="failed", stop_reason=f"{DEAD_WORKER}; retried once")
        try:
            record.save(storage, trial_id)
            if not storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker reaped it first
        trial = storage.get_trial(trial_id)
        failed.append(trial.number)
        settle_run(store, record.mlflow_run_id, TrialState.FAIL, record.fail_reason)
        retry(study, trial)
    return failed


def await_running_trials(study: optuna.Study, storage: RDBStorage, store: MlflowStore) -> list[int]:
    """For a worker whose budget is spent: wait while trials of other workers (any host) run, reaping each whose
    worker dies meanwhile; returns the trials failed now (their retries queued, for this worker to take), or [] once
    no trial runs. Without it, a trial lost while every other worker was on its last trial would wait for the next
    launch: the slice may be gone by then. Returns at once when the storage keeps no heartbeats."""
    interval = storage.get_heartbeat_interval()
    if not interval:
        return []
    # Only trials a worker started (their record says running, written once their heartbeat began): a trial taken by
    # a worker that died before its first beat has no heartbeat to go stale, and would be waited for forever.
    while any(trial_record(t).status == "running" for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))):
        reaped = reap_stale_trials(study, storage, store)
        if reaped:
            return reaped
        time.sleep(interval)
    return []


def retry(study: optuna.Study, trial: FrozenTrial, max_retry: int = 1) -> bool:
    """Queue a new trial with `trial`'s params, linked to it (`retry_of`) and to nothing else of it; at most
    `max_retry` retries of one original trial. Returns whether one was queued."""
    history = list(trial.system_attrs.get("retry_history", []))
    if len(history) >= max_retry:
        return False
    original = history[0] if history else trial.number
    distributions: dict[str, BaseDistribution] = dict(trial.distributions)
    study.add_trial(optuna.trial.create_trial(
        state=TrialState.WAITING, params=dict(trial.params), distributions=distributions,
        user_attrs={TRIAL_ATTR: TrialRecord(retry_of=trial.number).to_dict()},
        # Optuna's own keys (RetryFailedTrialCallback's): its tools recognise the retry.
        system_attrs={"failed_trial": original, "retry_history": [*history, trial.number]},
    ))
    return True
