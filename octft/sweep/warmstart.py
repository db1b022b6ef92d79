"""Warm start: enqueue parameter sets that did well before, so a new study tries them first.

    octft sweep launch sweeps/scenario_a.yaml study_name=scenario_a_v2 --enqueue-from sweeps/scenario_a.yaml --enqueue-top 3
    octft sweep launch sweeps/scenario_a.yaml study_name=scenario_a_v2 --enqueue-from models:/octft-scenario-a@champion

A source is an earlier sweep file (its study's best `top` COMPLETE trials, ranked in that study's
direction) or a registered model (`models:/NAME@ALIAS` or `models:/NAME/VERSION`: the params of the run
the version was registered from, i.e. what it was trained with). Each set goes to Optuna's
`enqueue_trial`, so it counts against `n_trials` and is taken before any sampled trial (sets beyond the budget
wait for a launch with a larger one). A parameter the new
space does not have, or a value outside its range or choices, is refused with the names; a space key the
source lacks is sampled as usual. Sets already in the study (a relaunch) are not enqueued twice.

Each set's run must have been trained on this study's data release and split, encoder checkpoint, class order
and preprocessing (`octft.train.provenance`): parameters chosen on other data were chosen for that data, so a
source whose run records another (or none) is refused, naming the field and both values.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import TrialState

from octft.config import parse_override
from octft.errors import MissingInputError, OctftError, UsageError
from octft.stores import resolve_tracking_uri
from octft.sweep.records import ENQUEUED_ATTR, TRIAL_ATTR, TrialRecord, trial_record
from octft.sweep.space import CategoricalParam, FloatParam, IntParam, Param, distributions
from octft.sweep.spec import SweepSpec, format_value, load_sweep
from octft.sweep.storage import open_existing_study
from octft.track.mlflow_store import MlflowStore
from octft.train.provenance import PROVENANCE_TAGS, provenance_mismatch

MODEL_PREFIX = "models:/"


class WarmStartError(OctftError, ValueError):
    """A warm-start source that cannot be used; the message names the source and the parameters."""


@dataclass(frozen=True)
class WarmStart:
    """One parameter set to enqueue, where it came from (a trial of a study, or a model version's run) and that
    run's provenance tags."""

    origin: str
    params: dict[str, Any]
    provenance: dict[str, str]


def from_sweep(path: str, top: int) -> list[WarmStart]:
    """The best `top` COMPLETE trials of the study of sweep file `path`, best first."""
    source = load_sweep(path)
    try:
        study = open_existing_study(source.study_name, source.storage)
    except (MissingInputError, UsageError) as error:
        raise WarmStartError(f"--enqueue-from {path}: {error}") from None
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if t.value is not None and not math.isnan(t.value)]
    if not complete:
        raise WarmStartError(f"--enqueue-from {path}: study {source.study_name!r} has no completed trial to start from")
    sign = -1.0 if study.direction == optuna.study.StudyDirection.MAXIMIZE else 1.0
    ranked = sorted(complete, key=lambda t: (sign * t.value, t.number))[:top]
    store = MlflowStore(resolve_tracking_uri(source.mlflow.tracking_uri))
    return [WarmStart(f"{path} trial {t.number} ({source.objective.metric} {t.value:.4g})", dict(t.params),
                      _provenance(store, trial_record(t).mlflow_run_id)) for t in ranked]


def _provenance(store: MlflowStore, run_id: str | None) -> dict[str, str]:
    if not run_id:
        return {}
    try:
        tags = store.run(run_id).tags
    except (MissingInputError, UsageError):  # a run deleted since: it shows nothing, and is refused as such
        return {}
    return {tag: tags[tag] for tag in PROVENANCE_TAGS if tag in tags}


def from_model(uri: str, store: MlflowStore, space: dict[str, Param]) -> list[WarmStart]:
    """The space's params as logged on the run that registered model version `uri` (MLflow params are text)."""
    try:
        version = store.model_version(uri)
        logged = store.run(version.run_id).params
    except (MissingInputError, UsageError) as error:
        raise WarmStartError(f"--enqueue-from {error}") from None
    missing = sorted(set(space) - set(logged))
    if missing:
        raise WarmStartError(f"--enqueue-from {uri}: run {version.run_id} has no params {', '.join(missing)}; "
                             "it was not trained with these keys")
    params = {key: _from_text(logged[key], entry) for key, entry in space.items()}
    return [WarmStart(f"{MODEL_PREFIX}{version.name} version {version.version} (run {version.run_id})", params,
                      _provenance(store, version.run_id))]


def _from_text(text: str, entry: Param) -> Any:
    # Params are logged with str() (None -> "None", True -> "True"); read them as the override parser would.
    value = None if text == "None" else parse_override(f"key={text}")[1]
    if isinstance(entry, FloatParam) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(entry, IntParam) and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def check_in_space(starts: list[WarmStart], space: dict[str, Param], source: str) -> None:
    """Refuse parameters the space does not have and values outside it, naming each one."""
    dists = distributions(space)
    problems = []
    for start in starts:
        unknown = sorted(set(start.params) - set(space))
        if unknown:
            problems.append(f"{start.origin}: {', '.join(unknown)} not in the space")
        for key, value in start.params.items():
            if key in dists and not _contains(dists[key], value):
                problems.append(f"{start.origin}: {key}={format_value(value)} outside {_describe(space[key])}")
    if problems:
        raise WarmStartError(
            f"--enqueue-from {source}: parameters outside the new space ({'; '.join(problems)}); widen the space "
            f"(space.<key>.low/high/choices) or start from another source"
        )


def check_provenance(starts: list[WarmStart], expected: dict[str, str], source: str) -> None:
    """Refuse sets whose run was trained on other data, split, encoder checkpoint, class order or preprocessing than
    `expected` (this study's), naming the first such set, the field and both values."""
    for start in starts:
        mismatch = provenance_mismatch(start.provenance, expected)
        if mismatch:
            raise WarmStartError(
                f"--enqueue-from {source}: {start.origin} {mismatch}; warm-start from a study or model trained on this "
                "study's data, split, encoder checkpoint and preprocessing"
            )


def _contains(distribution: optuna.distributions.BaseDistribution, value: Any) -> bool:
    try:
        return distribution._contains(distribution.to_internal_repr(value))
    except (ValueError, TypeError):
        return False


def _describe(entry: Param) -> str:
    if isinstance(entry, CategoricalParam):
        return f"choices {entry.choices}"
    return f"{entry.low}..{entry.high}"


def enqueue(study: optuna.Study, starts: list[WarmStart], source: str) -> list[dict[str, Any]]:
    """Enqueue each set unless the study already holds it; return what was enqueued (for the records)."""
    enqueued = []
    for start in starts:
        before = len(study.get_trials(deepcopy=False))
        study.enqueue_trial(start.params, user_attrs={TRIAL_ATTR: TrialRecord(enqueued_from=start.origin).to_dict()},
                            skip_if_exists=True)
        if len(study.get_trials(deepcopy=False)) > before:
            enqueued.append({"source": source, "origin": start.origin, "params": start.params})
    return enqueued


def warm_start(study: optuna.Study, spec: SweepSpec, source: str, *, top: int, store: MlflowStore,
               parent_run_id: str, provenance: dict[str, str]) -> list[dict[str, Any]]:
    """Read `source`, check it against `spec.space` and this study's `provenance` (`octft.train.provenance`), enqueue
    it and record it on the study and its parent run."""
    if top < 1:
        raise WarmStartError(f"--enqueue-top must be at least 1, got {top}")
    if source.startswith(MODEL_PREFIX):
        starts = from_model(source, store, spec.space)
    else:
        starts = from_sweep(source, top)
    check_in_space(starts, spec.space, source)
    check_provenance(starts, provenance, source)
    enqueued = enqueue(study, starts, source)
    if enqueued:
        history = list(study.user_attrs.get(ENQUEUED_ATTR, [])) + enqueued
        study.set_user_attr(ENQUEUED_ATTR, history)
        store.set_tag(parent_run_id, "octft.enqueued_from", json.dumps(sorted({e["source"] for e in history}))[:5000])
        store.log_dict(parent_run_id, history, "warm_start.json")
    return enqueued
