"""`octft promote SPEC`: the study's best healthy trial, scored once on the test split, becomes the champion.

The sweep never touches the test split; this is the one place that does, once per trial:

1. pick the best COMPLETE trial whose best epoch did not collapse (every class's validation F1 above
   `promote.min_class_f1`), or the trial asked for, which must be such a trial;
2. evaluate its best checkpoint on the test split at participant level, each score with a bootstrap 95%
   interval, and record the scores (study user attr `test_metrics.trial_<n>`, the trial's MLflow run and
   the study's parent run); a trial whose scores are recorded is not evaluated again;
3. register the run's `checkpoint` artifact under `promote.model_name` and point the alias `champion` at
   it; registering the same run again reuses its version.

    >>> promotion = promote(load_sweep("sweeps/demo.yaml"))              # doctest: +SKIP
    >>> promotion.model_uri, promotion.test_metrics["test/balanced_accuracy"]  # doctest: +SKIP
    ('models:/octft-demo@champion', 0.71)
"""

from __future__ import annotations

import contextlib
import json
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from octft.data.layout import CLASS_SHORT_NAMES
from octft.sweep.spec import SweepSpec, redact_url
from octft.errors import MissingInputError, UsageError

CHAMPION_ALIAS = "champion"
CHECKPOINT_ARTIFACT = "checkpoint"
TEST_PREFIX = "test/"
# Optuna freezes a finished trial's attrs, so a trial's test scores are kept on the study, keyed by trial.
TEST_METRICS_ATTR = "test_metrics.trial_{number}"
CHAMPION_ATTR = "champion"
# The scores that get a bootstrap interval; the rest (counts, accuracy) are reported as they are.
CI_SCORES = ("balanced_accuracy", "macro_f1", "auc_macro", *(f"f1_{name}" for name in CLASS_SHORT_NAMES))


@dataclass
class Promotion:
    """What `promote` did: which trial, which registered version, and its test scores."""

    study_name: str
    trial_number: int
    run_id: str
    model_name: str
    version: str
    test_metrics: dict[str, float]
    evaluated: bool  # False when the test scores were already recorded and reused
    skipped: list[str] = field(default_factory=list)  # better trials passed over, each with the reason

    @property
    def model_uri(self) -> str:
        return f"models:/{self.model_name}@{CHAMPION_ALIAS}"


# ---------------------------------------------------------------------------------------------
# The study


def open_study(spec: SweepSpec, storage: str | None = None) -> optuna.Study:
    """Load the study `spec.study_name` from `storage` (default: the spec's); never creates one."""
    url = storage or spec.storage
    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///").split("?", 1)[0])
        if not path.is_file():
            # Optuna would create an empty database here and then say the study does not exist.
            raise MissingInputError(f"Optuna storage {url}: no such database file {path}; run `octft sweep` first or pass --storage")
    try:
        return optuna.load_study(study_name=spec.study_name, storage=url)
    except KeyError:
        names = optuna.get_all_study_names(storage=url)
        raise UsageError(
            f"study {spec.study_name!r} is not in the Optuna storage {redact_url(url)} (studies there: "
            f"{names or 'none'}); run `octft sweep` first, or pass the storage it used with --storage"
        ) from None


def unpromotable_reason(trial: FrozenTrial, min_class_f1: float) -> str | None:
    """Why `trial` cannot be promoted (pruned, failed, collapsed, untracked), or None when it can."""
    number = trial.number
    attrs = trial.user_attrs
    if trial.state == TrialState.PRUNED:
        why = attrs.get("prune_reason", "no reason recorded")
        detail = f": {attrs['prune_detail']}" if attrs.get("prune_detail") else ""
        return f"trial {number} was pruned ({why} at epoch {attrs.get('prune_epoch', '?')}{detail})"
    if trial.state == TrialState.FAIL:
        return f"trial {number} failed ({attrs.get('fail_reason', 'no reason recorded')})"
    if trial.state != TrialState.COMPLETE:
        return f"trial {number} is {trial.state.name.lower()}, not complete"
    metrics = attrs.get("best_metrics") or {}
    missing = [f"val/f1_{name}" for name in CLASS_SHORT_NAMES if f"val/f1_{name}" not in metrics]
    if missing:
        return f"trial {number} has no {', '.join(missing)} in its best_metrics user attr (was it run by `octft sweep`?)"
    low = [f"{name} {metrics[f'val/f1_{name}']:.3f}" for name in CLASS_SHORT_NAMES
           if not metrics[f"val/f1_{name}"] > min_class_f1]
    if low:
        return (
            f"trial {number} collapsed at its best epoch {attrs.get('best_epoch', '?')}: validation F1 of "
            f"{', '.join(low)} is not above promote.min_class_f1={min_class_f1}"
        )
    absent = [key for key in ("mlflow_run_id", "run_dir") if not attrs.get(key)]
    if absent:
        return f"trial {number} has no {', '.join(absent)} user attr, so its checkpoint cannot be found"
    return None


def select_trial(
    study: optuna.Study, min_class_f1: float, trial_number: int | None = None
) -> tuple[FrozenTrial, list[str]]:
    """The trial to promote and the reasons better trials were passed over.

    With `trial_number`, that trial, or a ValueError saying why it cannot be promoted.
    """
    trials = study.get_trials(deepcopy=False)
    if trial_number is not None:
        chosen = next((trial for trial in trials if trial.number == trial_number), None)
        if chosen is None:
            raise UsageError(
                f"study {study.study_name!r} has no trial {trial_number} (trials 0..{len(trials) - 1}); "
                "see `octft report` for the list"
            )
        reason = unpromotable_reason(chosen, min_class_f1)
        if reason:
            raise UsageError(f"cannot promote: {reason}")
        return chosen, []

    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    complete = [trial for trial in trials if trial.state == TrialState.COMPLETE and trial.value is not None]
    ranked = sorted(complete, key=lambda trial: (-trial.value if maximize else trial.value, trial.number))
    skipped = []
    for trial in ranked:
        reason = unpromotable_reason(trial, min_class_f1)
        if reason is None:
            return trial, skipped
        skipped.append(f"skipped {reason} (value {trial.value:.4f})")
    states = {state.name.lower(): sum(t.state == state for t in trials) for state in TrialState}
    raise UsageError(
        f"no trial of study {study.study_name!r} can be promoted ({', '.join(f'{n} {s}' for s, n in states.items() if n)}"
        f"){': ' + '; '.join(skipped) if skipped else ''}; run more trials, or lower promote.min_class_f1 on purpose"
    )


# ---------------------------------------------------------------------------------------------
# Test scores


def participant_test_scores(
    participant_targets: np.ndarray,
    participant_logits: np.ndarray,
    class_names: Sequence[str] = CLASS_SHORT_NAMES,
    *,
    n_resamples: int = 1000,
    seed: int = 0,
) -> dict[str, float]:
    """Participant-level test scores: `test/<score>` plus `_ci_low` / `_ci_high` (bootstrap 95%) for each
    of balanced accuracy, macro F1, macro AUC and per-class F1; also `test/accuracy` and `test/participants`.

    Every interval resamples the same participants (one seed), so the intervals describe one bootstrap.

    >>> scores = participant_test_scores(np.array([0, 1, 2, 3] * 5), np.eye(4)[[0, 1, 2, 3] * 5], n_resamples=50)
    >>> scores["test/balanced_accuracy"], scores["test/balanced_accuracy_ci_low"]
    (1.0, 1.0)
    """
    from octft.train.metrics import bootstrap_ci, classification_metrics, confusion_matrix, softmax

    targets = np.asarray(participant_targets, dtype=np.int64)
    probabilities = softmax(participant_logits)
    predictions = probabilities.argmax(axis=1)
    num_classes = len(class_names)

    def score(name: str):
        def metric(y_true: np.ndarray, y_pred: np.ndarray, probs: np.ndarray | None) -> float:
            with warnings.catch_warnings():
                # A resample may draw a class out: AUC is then NaN and bootstrap_ci leaves it out, counted.
                warnings.simplefilter("ignore")
                scores = classification_metrics(
                    confusion_matrix(y_true, y_pred, num_classes), probs=probs, targets=y_true, class_names=class_names
                )
            return scores[name]

        return metric

    results: dict[str, float] = {}
    for name in CI_SCORES:
        point, low, high = bootstrap_ci(targets, predictions, probabilities, score(name), n_resamples=n_resamples, seed=seed)
        results.update({f"{TEST_PREFIX}{name}": point, f"{TEST_PREFIX}{name}_ci_low": low, f"{TEST_PREFIX}{name}_ci_high": high})
    results[f"{TEST_PREFIX}accuracy"] = float((predictions == targets).mean())
    results[f"{TEST_PREFIX}participants"] = float(targets.size)
    return results


def evaluate_test_split(checkpoint_dir: str | Path, *, expected_manifest_hash: str | None = None,
                        n_resamples: int = 1000, seed: int = 0, progress: bool = False) -> dict[str, float]:
    """Score a run's `checkpoint/` folder on the test split of the data its config names.

    The data are audited and prepared exactly as training did (the preprocessing cache is reused); when
    `expected_manifest_hash` is given (the run's `octft.data_manifest_hash` tag), data that changed since
    training are refused instead of silently scored.
    """
    from octft.data.dataset import prepare_volumes
    from octft.predict import load_model, predict_logits
    from octft.train.metrics import aggregate_by_participant
    from octft.train.recipe import audited_data, data_manifest_hash

    loaded = load_model(str(checkpoint_dir))
    data = loaded.config.data
    report = audited_data(data)
    # Every split, as training prepared it, so the manifest hash compares like with like (the cache makes
    # the train and validation volumes free).
    prepared = prepare_volumes(volumes=report.volumes, progress=progress, **data.prepare_kwargs())
    if expected_manifest_hash is not None:
        found = data_manifest_hash(prepared.volumes)
        if found != expected_manifest_hash:
            raise UsageError(
                f"the data at {data.uri} changed since the trial trained (manifest hash {found}, the run's "
                f"octft.data_manifest_hash tag says {expected_manifest_hash}); test scores would not describe "
                "that model: restore the data, or retrain on the new data"
            )
    test_volumes = prepared.volumes[prepared.volumes.split == "test"]
    if test_volumes.empty:
        raise UsageError(f"the data at {data.uri} has no test volumes after the audit; check the labels' splits")
    test_set = prepared.dataset("test")
    logits = predict_logits(loaded.model, lambda index: test_set[index]["x"][0].numpy(), len(test_set),
                            batch_size=loaded.config.train.batch_size)
    _, participant_logits, participant_targets = aggregate_by_participant(
        test_set.participant_ids(range(len(test_set))), logits, test_set.labels
    )
    scores = participant_test_scores(participant_targets, participant_logits, n_resamples=n_resamples, seed=seed)
    scores[f"{TEST_PREFIX}volumes"] = float(len(test_set))
    return scores


# ---------------------------------------------------------------------------------------------
# MLflow


@contextlib.contextmanager
def resumed_run(tracking_uri: str, run_id: str) -> Iterator[Any]:
    """A tracker on an existing run that leaves its status and end reason as they were.

    A run that had ended (FINISHED, KILLED, FAILED) ends again with the same status and reason; a run
    still RUNNING (a sweep in progress) is left running.
    """
    from mlflow.tracking import MlflowClient

    from octft.track.mlflow_tracker import END_REASON_TAG, MlflowTracker

    run = MlflowClient(tracking_uri=tracking_uri).get_run(run_id)
    status, reason = run.info.status, run.data.tags.get(END_REASON_TAG)
    tracker = MlflowTracker(tracking_uri, run_id=run_id)
    try:
        yield tracker
    finally:
        if status in ("FINISHED", "FAILED", "KILLED"):
            tracker.finish(status, reason)


def _recorded_test_metrics(study: optuna.Study, trial: FrozenTrial, client) -> dict[str, float] | None:
    recorded = study.user_attrs.get(TEST_METRICS_ATTR.format(number=trial.number))
    if recorded:
        return {key: float(value) for key, value in recorded.items()}
    metrics = client.get_run(trial.user_attrs["mlflow_run_id"]).data.metrics
    on_run = {key: float(value) for key, value in metrics.items() if key.startswith(TEST_PREFIX)}
    return on_run if f"{TEST_PREFIX}balanced_accuracy" in on_run else None


def promote(
    spec: SweepSpec,
    *,
    trial_number: int | None = None,
    storage: str | None = None,
    tracking_uri: str | None = None,
    n_resamples: int = 1000,
    progress: bool = False,
) -> Promotion:
    """Evaluate the chosen trial on the test split (once) and register it as `promote.model_name@champion`."""
    from mlflow.tracking import MlflowClient

    from octft.track.mlflow_tracker import check_not_shared, redact, resolve_tracking_uri

    tracking_uri = resolve_tracking_uri(tracking_uri or spec.mlflow.tracking_uri)
    check_not_shared(tracking_uri, storage or spec.storage)
    study = open_study(spec, storage)
    trial, skipped = select_trial(study, spec.promote.min_class_f1, trial_number)
    run_id = trial.user_attrs["mlflow_run_id"]
    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        run_tags = client.get_run(run_id).data.tags
    except Exception as error:  # mlflow raises MlflowException; say which store and run
        raise UsageError(
            f"trial {trial.number}'s MLflow run {run_id} is not in the MLflow store at {redact(tracking_uri)} "
            f"({type(error).__name__}); pass the store the sweep logged to with --tracking-uri"
        ) from None

    test_metrics = _recorded_test_metrics(study, trial, client)
    evaluated = test_metrics is None
    if test_metrics is None:
        checkpoint_dir = Path(trial.user_attrs["run_dir"]) / CHECKPOINT_ARTIFACT
        test_metrics = evaluate_test_split(
            checkpoint_dir, expected_manifest_hash=run_tags.get("octft.data_manifest_hash"),
            n_resamples=n_resamples, progress=progress,
        )
        with resumed_run(tracking_uri, run_id) as tracker:
            tracker.log_metrics(test_metrics, step=0)
    # Recorded on the study too, so the report (which reads storage) shows it; a no-op when already there.
    study.set_user_attr(TEST_METRICS_ATTR.format(number=trial.number), test_metrics)

    tags = {
        "octft.study": spec.study_name,
        "octft.trial": str(trial.number),
        "octft.params": json.dumps(trial.params, sort_keys=True),
        "octft.val_value": str(trial.value),
        "octft.data_manifest_hash": run_tags.get("octft.data_manifest_hash", "unknown"),
        "octft.git_commit": run_tags.get("octft.git_commit", "unknown"),
        "octft.test_balanced_accuracy": _format_score(test_metrics, "balanced_accuracy"),
    }
    with resumed_run(tracking_uri, run_id) as tracker:
        version = tracker.register_model(run_id, CHECKPOINT_ARTIFACT, spec.promote.model_name, CHAMPION_ALIAS, tags)

    champion = {"trial": trial.number, "model_name": spec.promote.model_name, "version": version, "run_id": run_id}
    if study.user_attrs.get(CHAMPION_ATTR) != champion:
        study.set_user_attr(CHAMPION_ATTR, champion)
        parent_run_id = study.user_attrs.get("mlflow_parent_run_id")
        if parent_run_id:
            with resumed_run(tracking_uri, parent_run_id) as parent:
                parent.log_metrics(test_metrics, step=trial.number)
                parent.set_tags({"octft.champion_trial": str(trial.number), "octft.champion_version": version})
    return Promotion(spec.study_name, trial.number, run_id, spec.promote.model_name, version, test_metrics,
                     evaluated, skipped)


def _format_score(metrics: dict[str, float], name: str) -> str:
    point = metrics.get(f"{TEST_PREFIX}{name}", math.nan)
    low = metrics.get(f"{TEST_PREFIX}{name}_ci_low", math.nan)
    high = metrics.get(f"{TEST_PREFIX}{name}_ci_high", math.nan)
    return f"{point:.4f} [{low:.4f}, {high:.4f}]"


def format_promotion(promotion: Promotion) -> str:
    """What `octft promote` prints: skipped trials, the champion, and every test score with its interval."""
    lines = list(promotion.skipped)
    lines.append(
        f"trial {promotion.trial_number} (MLflow run {promotion.run_id}) -> {promotion.model_uri} "
        f"(version {promotion.version})"
    )
    lines.append("test scores, participant level, bootstrap 95% interval"
                 + ("" if promotion.evaluated else " (recorded earlier; not evaluated again)") + ":")
    for name in CI_SCORES:
        lines.append(f"  test/{name:<22} {_format_score(promotion.test_metrics, name)}")
    for name in ("accuracy", "participants", "volumes"):
        if f"{TEST_PREFIX}{name}" in promotion.test_metrics:
            lines.append(f"  test/{name:<22} {promotion.test_metrics[f'{TEST_PREFIX}{name}']:g}")
    return "\n".join(lines)
