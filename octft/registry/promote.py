"""`octft promote SPEC`: the study's best healthy trial, scored once on the test split, becomes the champion.

The sweep never touches the test split; this is the one place that does, visibly:

1. pick the best COMPLETE trial whose best epoch did not collapse (every class's validation F1 above
   `promote.min_class_f1`), or the trial asked for, which must be such a trial;
2. evaluate its best checkpoint on the test split at participant level, each score with a stratified
   bootstrap 95% interval. Every evaluation is recorded (trial, time, scores) in the test ledger of its data
   release and test split (`octft.registry.ledger`, shared by every study that reads that split), on the
   study, its parent run and the registered version; a trial whose scores are recorded is not evaluated again,
   and once one model has been scored, in this study or any other, scoring another needs `allow_test_reuse` (its
   version is tagged `octft.test_reuse=true` and lists the earlier evaluations in its description), because
   choosing among models by their test scores makes the test split a second validation split;
3. register the trial's MLflow 3 LoggedModel (its best checkpoint as a portable `pyfunc`, `octft.registry.model`;
   logged here when the trial has none yet) under `promote.model_name`, with the test scores among its metrics,
   and point the alias `champion` at it; registering the same model again reuses its version. Nothing here
   reopens the trial's run: its status, start and end time stay as training left them.

With `soup=K` (`octft promote --soup K`), a greedy soup of the K best promotable trials that share the best trial's
data, encoder and architecture (`octft.registry.soup`) is built and logged as its own run and LoggedModel; it takes
the best trial's place in steps 2 and 3 only when its validation value beats the best trial's (both computed the same
way), and the registered version's tags and description say which won, with both values. Only the chosen candidate is
scored on the test split. A soup's number, where the ledger and the study's records want a trial number, is negative
(`octft.registry.soup.soup_number`).

    >>> promotion = promote(load_sweep("sweeps/demo.yaml"))              # doctest: +SKIP
    >>> promotion.model_uri, promotion.test_metrics["test/balanced_accuracy"]  # doctest: +SKIP
    ('models:/octft-demo@champion', 0.71)
"""

from __future__ import annotations

import json
import math
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from octft.data.dataset import prepare_volumes
from octft.data.layout import CLASS_SHORT_NAMES
from octft.errors import MissingInputError, UsageError
from octft.registry.inference import LoadedModel, predict_logits
from octft.registry.ledger import LedgerEntry, TestLedger, ledger_key
from octft.registry.model import log_trial_model, trial_model
from octft.registry.soup import (MEMBERS_TAG, Soup, greedy_soup, log_soup, soup_candidates,
                                 write_soup_checkpoint)
from octft.registry.predict import load_model
from octft.stores import check_not_shared, resolve_tracking_uri
from octft.sweep.records import CHAMPION_ATTR, TestEvaluation, test_evaluations, trial_record, unpromotable_reason
from octft.sweep.spec import SweepSpec
from octft.sweep.storage import open_existing_study
from octft.sweep.tracking import parent_run_id, update_parent_note
from octft.track.mlflow_store import LoggedModelView, MlflowStore
from octft.train.metrics import aggregate_by_participant, bootstrap_ci, classification_metrics, confusion_matrix, softmax
from octft.data.dataset import audited_data, data_manifest_hash

CHAMPION_ALIAS = "champion"
CHECKPOINT_ARTIFACT = "checkpoint"
TEST_PREFIX = "test/"
TEST_REUSE_TAG = "octft.test_reuse"
TEST_EVALUATIONS_TAG = "octft.test_evaluations"
LEDGER_KEY_TAG = "octft.test_split_id"  # on a trial's run: the test split it was scored on (octft.registry.ledger)
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
    evaluations: list[TestEvaluation] = field(default_factory=list)  # every test evaluation of the study
    others: list[LedgerEntry] = field(default_factory=list)  # every scoring of this test split for another model
    notes: list[str] = field(default_factory=list)  # what the numbers need said beside them (see `caveats`)
    model_id: str = ""  # the registered MLflow LoggedModel (models:/<model_id>)
    soup: SoupAttempt | None = None  # what `soup=K` built, when asked for

    @property
    def test_reuse(self) -> bool:
        """True when the test split was scored for another model too (any study: `octft.registry.ledger`)."""
        return bool(self.others)

    @property
    def model_uri(self) -> str:
        return f"models:/{self.model_name}@{CHAMPION_ALIAS}"


@dataclass
class SoupAttempt:
    """A greedy soup tried at promotion: the soup (None when fewer than two trials could share one), its run and
    model, whether it won, and every trial passed over with the reason."""

    soup: Soup | None
    run_id: str = ""
    model: LoggedModelView | None = None
    won: bool = False
    notes: list[str] = field(default_factory=list)

    def verdict(self) -> str:
        """Which won, with both validation values (the registered version's `octft.soup_verdict`)."""
        soup = self.soup
        if soup is None:
            return "no soup: " + "; ".join(self.notes)
        values = (f"{soup.describe()} {soup.metric} {soup.value:.4f} vs trial {soup.best_trial} "
                  f"{soup.best_value:.4f} alone")
        return f"the soup won: {values}" if self.won else f"trial {soup.best_trial} won: {values}"


# ---------------------------------------------------------------------------------------------
# The study


def select_trial(
    study: optuna.Study, min_class_f1: float, trial_number: int | None = None
) -> tuple[FrozenTrial, list[str]]:
    """The trial to promote and the reasons better trials were passed over.

    With `trial_number`, that trial, or a UsageError saying why it cannot be promoted.
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

    skipped = []
    for trial, reason in ranked_trials(study, min_class_f1):
        if reason is None:
            return trial, skipped
        skipped.append(f"skipped {reason} (value {trial.value:.4f})")
    states = {state.name.lower(): sum(t.state == state for t in trials) for state in TrialState}
    raise UsageError(
        f"no trial of study {study.study_name!r} can be promoted ({', '.join(f'{n} {s}' for s, n in states.items() if n)}"
        f"){': ' + '; '.join(skipped) if skipped else ''}; run more trials, or lower promote.min_class_f1 on purpose"
    )


def ranked_trials(study: optuna.Study, min_class_f1: float) -> list[tuple[FrozenTrial, str | None]]:
    """The study's complete trials, best value first, each with the reason it cannot be promoted (None when it can)."""
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    complete = [trial for trial in study.get_trials(deepcopy=False)
                if trial.state == TrialState.COMPLETE and trial.value is not None]
    ranked = sorted(complete, key=lambda trial: (-trial.value if maximize else trial.value, trial.number))
    return [(trial, unpromotable_reason(trial, min_class_f1)) for trial in ranked]


def try_soup(store: MlflowStore, spec: SweepSpec, study: optuna.Study, k: int, scratch: Path, *,
             parent: str | None, progress: bool = False) -> SoupAttempt:
    """The greedy soup of the study's `k` best promotable trials that can share one (`octft.registry.soup`), logged as
    its own run and LoggedModel, and whether it validates better than the best trial alone."""
    ranked = [(trial, trial_record(trial).mlflow_run_id) for trial, reason in ranked_trials(study, spec.promote.min_class_f1)
              if reason is None]
    candidates, notes = soup_candidates(store, ranked, k, scratch / "soup-members")
    if len(candidates) < 2:
        return SoupAttempt(None, notes=[*notes, f"fewer than two of the {k} best promotable trials can share a soup"])
    soup = greedy_soup(candidates, spec.objective.metric, maximize=spec.objective.direction == "maximize",
                       progress=progress)
    folder = write_soup_checkpoint(soup, candidates[0], scratch / "soup" / CHECKPOINT_ARTIFACT)
    run_id, model = log_soup(store, spec.mlflow.experiment, soup, candidates[0], folder, study_name=spec.study_name,
                             parent_run_id=parent)
    return SoupAttempt(soup, run_id, model, soup.beats_best(spec.objective.direction == "maximize"),
                       notes + soup.left_out)


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

    Participants are resampled within their class (a stratified bootstrap), so every resample holds every
    class the test split holds: a class is never drawn out and scored F1 = 0 for being absent. A class
    absent from a resample's targets is still left out of that resample's F1 (NaN, as the AUC is), and where
    an interval rests on fewer resamples than asked for, `test/<score>_resamples` says how many. Every
    interval resamples the same participants (one seed), so the intervals describe one bootstrap.

    >>> scores = participant_test_scores(np.array([0, 1, 2, 3] * 5), np.eye(4)[[0, 1, 2, 3] * 5], n_resamples=50)
    >>> scores["test/balanced_accuracy"], scores["test/balanced_accuracy_ci_low"]
    (1.0, 1.0)
    """
    targets = np.asarray(participant_targets, dtype=np.int64)
    probabilities = softmax(participant_logits)
    predictions = probabilities.argmax(axis=1)
    num_classes = len(class_names)

    def score(name: str):
        f1_class = class_names.index(name.removeprefix("f1_")) if name.startswith("f1_") else None

        def metric(y_true: np.ndarray, y_pred: np.ndarray, probs: np.ndarray | None) -> float:
            if f1_class is not None and not np.any(y_true == f1_class):
                return math.nan  # F1 of a class with no participant in the sample says nothing about the model
            with warnings.catch_warnings():
                # A class absent from a sample: AUC is NaN and bootstrap_ci leaves it out, counted.
                warnings.simplefilter("ignore")
                scores = classification_metrics(
                    confusion_matrix(y_true, y_pred, num_classes), probs=probs, targets=y_true, class_names=class_names
                )
            return scores[name]

        return metric

    results: dict[str, float] = {}
    for name in CI_SCORES:
        with warnings.catch_warnings():
            # The count of resamples left out is recorded below, where the user reads the interval.
            warnings.simplefilter("ignore")
            interval = bootstrap_ci(targets, predictions, probabilities, score(name), n_resamples=n_resamples,
                                    seed=seed, stratify=True)
        results.update({f"{TEST_PREFIX}{name}": interval.point, f"{TEST_PREFIX}{name}_ci_low": interval.low,
                        f"{TEST_PREFIX}{name}_ci_high": interval.high})
        if interval.resamples < n_resamples:
            results[f"{TEST_PREFIX}{name}_resamples"] = float(interval.resamples)
    results[f"{TEST_PREFIX}accuracy"] = float((predictions == targets).mean())
    results[f"{TEST_PREFIX}participants"] = float(targets.size)
    results[f"{TEST_PREFIX}bootstrap_resamples"] = float(n_resamples)
    return results


@dataclass
class TestSplit:
    """A checkpoint's model with the test split of the data its config names, ready to be scored."""

    __test__ = False  # not a pytest test class

    loaded: LoadedModel
    test_set: object
    manifest_hash: str
    participants: list[str]

    @property
    def key(self) -> str:
        """Its key in the test ledger (`octft.registry.ledger`)."""
        return ledger_key(self.manifest_hash, self.participants)


def open_test_split(checkpoint_dir: str | Path, *, expected_manifest_hash: str | None = None,
                    progress: bool = False) -> TestSplit:
    """A run's `checkpoint/` folder and the test split of the data its config names, not yet scored.

    The data are audited and prepared exactly as training did (the preprocessing cache is reused); when
    `expected_manifest_hash` is given (the run's `octft.data_manifest_hash` tag), data that changed since
    training are refused instead of silently scored.
    """
    loaded = load_model(str(checkpoint_dir))
    data = here(loaded.config.data)
    report = audited_data(data)
    # Every split, as training prepared it, so the manifest hash compares like with like (the cache makes
    # the train and validation volumes free).
    prepared = prepare_volumes(volumes=report.volumes, progress=progress, **data.prepare_kwargs())
    found = data_manifest_hash(prepared.volumes)
    if expected_manifest_hash is not None and found != expected_manifest_hash:
        raise UsageError(
            f"the data at {data.uri} changed since the trial trained (manifest hash {found}, the run's "
            f"octft.data_manifest_hash tag says {expected_manifest_hash}); test scores would not describe "
            "that model: restore the data, or retrain on the new data"
        )
    test_volumes = prepared.volumes[prepared.volumes.split == "test"]
    if test_volumes.empty:
        raise UsageError(f"the data at {data.uri} has no test volumes after the audit; check the labels' splits")
    return TestSplit(loaded, prepared.dataset("test"), found, sorted(set(test_volumes.participant_id.astype(str))))


def here(data):
    """A trial's data section as this machine prepares it: a preprocessing cache at an absolute path that is not here
    (a pod host's, released since) becomes the default one under the current folder; never a worker host's path."""
    cache = Path(data.cache_dir).expanduser()
    if not cache.is_absolute() or cache.exists():
        return data
    local = type(data).model_fields["cache_dir"].default
    print(f"the trial's preprocessing cache {cache} is not on this machine: preparing the data in {local} here",
          flush=True)
    return data.model_copy(update={"cache_dir": local})


def score_test_split(split: TestSplit, *, n_resamples: int = 1000, seed: int = 0) -> dict[str, float]:
    """The participant-level test scores of `split`'s model (`participant_test_scores`), and its volume count."""
    test_set, loaded = split.test_set, split.loaded
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


def _recorded_test_scores(study: optuna.Study, number: int) -> dict[str, float] | None:
    return next((evaluation.scores for evaluation in test_evaluations(study.user_attrs)
                 if evaluation.trial == number), None)


def _refuse_test_reuse(split: TestSplit, earlier: list[LedgerEntry], study: str, trial: int) -> None:
    if earlier:
        more = f" and {len(earlier) - 1} more" if len(earlier) > 1 else ""
        raise UsageError(
            f"the test split of this data release (manifest {split.manifest_hash}, {len(split.participants)} test "
            f"participants) was already scored for {earlier[-1].describe()}{more}; scoring study {study!r} trial "
            f"{trial} too would let test scores choose the model. Promote that model again, or pass "
            f"--allow-test-reuse on purpose: the new model version is then tagged {TEST_REUSE_TAG}=true and lists "
            "the earlier evaluations in its description"
        )


def _checkpoint_copy(store: MlflowStore, run_id: str, into: str) -> Path:
    """The run's logged `checkpoint` artifact, downloaded: what promotion scores and packages is what was tracked."""
    try:
        return store.download(run_id, CHECKPOINT_ARTIFACT, into)
    except MissingInputError as error:
        raise UsageError(f"{error}; promote a trial whose run logged its best checkpoint") from None


def promote(
    spec: SweepSpec,
    *,
    trial_number: int | None = None,
    storage: str | None = None,
    tracking_uri: str | None = None,
    n_resamples: int = 1000,
    allow_test_reuse: bool = False,
    soup: int | None = None,
    progress: bool = False,
) -> Promotion:
    """Evaluate the chosen trial (or, with `soup=K`, the greedy soup of the K best trials when it validates better) on
    the test split (once) and register it as `promote.model_name@champion`.

    Scoring the test split for a second model (of this study or any other: the test ledger) is refused unless
    `allow_test_reuse`.
    """
    if soup is not None and (soup < 2 or trial_number is not None):
        raise UsageError(f"--soup {soup}: a soup averages the K >= 2 best trials; give K >= 2, and no --trial with it")
    store = MlflowStore(resolve_tracking_uri(tracking_uri or spec.mlflow.tracking_uri), must_exist=True)
    check_not_shared(store.uri, storage or spec.storage)
    study = open_existing_study(spec.study_name, storage or spec.storage)
    trial, skipped = select_trial(study, spec.promote.min_class_f1, trial_number)
    parent = parent_run_id(study)
    ledger = TestLedger(store)
    with tempfile.TemporaryDirectory(prefix="octft-promote-") as scratch:
        attempt = try_soup(store, spec, study, soup, Path(scratch), parent=parent, progress=progress) if soup else None
        number, run_id = trial.number, trial_record(trial).mlflow_run_id
        if attempt is not None and attempt.won:
            number, run_id = attempt.soup.number, attempt.run_id
        try:
            run_tags = store.run(run_id).tags
        except MissingInputError as error:
            raise UsageError(f"trial {number}: {error}; pass the store the sweep logged to with --tracking-uri") from None
        manifest_hash = run_tags.get("octft.data_manifest_hash")
        key = run_tags.get(LEDGER_KEY_TAG)  # set on the candidate's run when it was scored
        checkpoint_dir = None
        model = attempt.model if attempt is not None and attempt.won else trial_model(store, run_id)
        if model is None:  # a trial whose worker did not log its model: logged from what the run tracked
            checkpoint_dir = _checkpoint_copy(store, run_id, scratch)
            outcome = trial_record(trial).outcome
            model = log_trial_model(store, run_id, checkpoint_dir, outcome.best_metrics, step=outcome.best_epoch or 0)
        test_metrics = _recorded_test_scores(study, number)
        evaluated = test_metrics is None or key is None
        if evaluated:
            # What the candidate's run tracked (the soup's too): what is scored is what gets registered.
            checkpoint_dir = checkpoint_dir or _checkpoint_copy(store, run_id, scratch)
            split = open_test_split(checkpoint_dir, expected_manifest_hash=manifest_hash, progress=progress)
            key = split.key
            if not allow_test_reuse:
                others = [entry for entry in ledger.entries(key) if not entry.same_model(spec.study_name, number)]
                _refuse_test_reuse(split, others, spec.study_name, number)
            test_metrics = score_test_split(split, n_resamples=n_resamples)
            # Logged through the store: nothing reopens the trial's run, so its duration stays as training left it.
            store.log_model_metrics(run_id, model.model_id, test_metrics, step=0)
            store.set_tag(run_id, LEDGER_KEY_TAG, key)
            ledger.record(key, study=spec.study_name, trial=number, run_id=run_id,
                          model_name=spec.promote.model_name, balanced_accuracy=_format_score(test_metrics, "balanced_accuracy"),
                          manifest_hash=split.manifest_hash, participants=len(split.participants))
            # One attr per evaluation (not one list): two promotions at once cannot overwrite each other's record.
            evaluation = TestEvaluation(number, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), run_id, test_metrics)
            study.set_user_attr(evaluation.attr, {**evaluation.__dict__})
        evaluations = test_evaluations(study.user_attrs)
        evaluation_log = json.dumps([{"trial": item.trial, "time": item.time, "test/balanced_accuracy":
                                      item.scores.get(f"{TEST_PREFIX}balanced_accuracy", math.nan)} for item in evaluations])
        if parent and evaluated:
            store.log_metrics(parent, test_metrics, step=trial.number)
            store.set_tag(parent, TEST_EVALUATIONS_TAG, evaluation_log)
            store.set_tag(parent, "octft.test_evaluated_trials", str(len(evaluations)))
        if not evaluated:  # scores recorded before: linked to the model too (the run's points keep their times)
            store.log_model_metrics(run_id, model.model_id, test_metrics, step=0)

    # Every other model this test split has scored, in any study: with one, test scores took part in the choice.
    others = [entry for entry in ledger.entries(key) if not entry.same_model(spec.study_name, number)]
    tags = {
        "octft.study": spec.study_name, "octft.trial": str(number),
        "octft.params": json.dumps(trial.params, sort_keys=True), "octft.val_value": str(trial.value),
        "octft.data_manifest_hash": manifest_hash or "unknown",
        "octft.git_commit": run_tags.get("octft.git_commit", "unknown"),
        "octft.test_balanced_accuracy": _format_score(test_metrics, "balanced_accuracy"),
        TEST_EVALUATIONS_TAG: evaluation_log, TEST_REUSE_TAG: str(bool(others)).lower(),
        "octft.val_precision": run_tags.get("octft.precision", "unknown"), "octft.test_precision": "fp32",
        "octft.best_epoch": str(trial_record(trial).outcome.best_epoch),
        "octft.unfreeze_epoch": str(trial_record(trial).unfreeze_epoch),
    }
    description = []
    if attempt is not None:
        tags.update(_soup_tags(attempt, study))
        description.append(f"Greedy soup at promotion: {attempt.verdict()}.")
    # A soup's weights come from no one epoch of no one trial: the trial's caveats say nothing of them.
    notes = [] if attempt is not None and attempt.won else caveats(trial, run_tags)
    if notes:
        tags["octft.caveats"] = "; ".join(notes)
    version = store.register_logged_model(model, spec.promote.model_name, CHAMPION_ALIAS, tags)
    if others:
        description.append("The test split of this data release was also scored for other models, so it is no longer "
                           "an untouched test split: " + "; ".join(f"{entry.describe()}, test balanced accuracy "
                                                                  f"{entry.balanced_accuracy}" for entry in others))
    if description:
        store.describe_version(spec.promote.model_name, version, "\n\n".join(description))
    champion = {"trial": number, "model_name": spec.promote.model_name, "version": version, "run_id": run_id}
    if attempt is not None and attempt.won:
        champion["soup_members"] = attempt.soup.members
    if study.user_attrs.get(CHAMPION_ATTR) != champion:
        study.set_user_attr(CHAMPION_ATTR, champion)
        if parent:
            store.set_tag(parent, "octft.champion_trial", str(number))
            store.set_tag(parent, "octft.champion_version", version)
    update_parent_note(store, study, spec)
    return Promotion(spec.study_name, number, run_id, spec.promote.model_name, version, test_metrics,
                     evaluated, skipped, evaluations, others, notes, model.model_id, attempt)


def _soup_tags(attempt: SoupAttempt, study: optuna.Study) -> dict[str, str]:
    """The registered version's record of the soup tried: which won, and both validation values."""
    tags = {"octft.soup_verdict": attempt.verdict()}
    soup = attempt.soup
    if soup is None:
        return {**tags, "octft.soup_winner": "none"}
    tags.update({"octft.soup_winner": "soup" if attempt.won else "trial", MEMBERS_TAG: ",".join(map(str, soup.members)),
                 "octft.soup_run_id": attempt.run_id, "octft.soup_val_value": f"{soup.value:.6g}",
                 "octft.soup_best_trial": str(soup.best_trial), "octft.soup_best_trial_val_value": f"{soup.best_value:.6g}"})
    if attempt.won:  # the soup's own values, where a trial's would stand
        members = {trial.number: trial.params for trial in study.get_trials(deepcopy=False) if trial.number in soup.members}
        tags.update({"octft.params": json.dumps({str(number): params for number, params in members.items()}, sort_keys=True),
                     "octft.val_value": str(soup.value), "octft.val_precision": "fp32",
                     "octft.best_epoch": "soup", "octft.unfreeze_epoch": "soup"})
    return tags


def caveats(trial: FrozenTrial, run_tags: dict[str, str]) -> list[str]:
    """What a champion's numbers need said beside them: a best epoch before the encoder ever trained (the fine-tune
    did not improve on the frozen head), and validation scored in another precision than the test (which runs in
    float32 on the CPU)."""
    notes = []
    record = trial_record(trial)
    best_epoch = record.outcome.best_epoch if record.outcome else None
    if record.unfreeze_epoch and best_epoch is not None and best_epoch < record.unfreeze_epoch:
        notes.append(f"the encoder's fine-tune did not improve on the frozen head: trial {trial.number}'s best epoch "
                     f"{best_epoch} came before its encoder unfroze at epoch {record.unfreeze_epoch}")
    precision = run_tags.get("octft.precision", "fp32")
    if precision not in ("fp32", "float32"):
        notes.append(f"validation ran in {precision} ({run_tags.get('octft.runtime', 'its runtime')}), the test in "
                     f"float32 on the CPU: the two figures differ by precision as well")
    return notes


def _format_score(metrics: dict[str, float], name: str) -> str:
    point = metrics.get(f"{TEST_PREFIX}{name}", math.nan)
    low = metrics.get(f"{TEST_PREFIX}{name}_ci_low", math.nan)
    high = metrics.get(f"{TEST_PREFIX}{name}_ci_high", math.nan)
    return f"{point:.4f} [{low:.4f}, {high:.4f}]"


def format_promotion(promotion: Promotion) -> str:
    """What `octft promote` prints: skipped trials, the champion, and every test score with its interval."""
    lines = list(promotion.skipped)
    attempt = promotion.soup
    if attempt is not None:
        lines += attempt.notes
        where = "" if attempt.soup is None else (f"soup run {attempt.run_id}, candidates {attempt.soup.candidates}, "
                                                 "validated on the CPU in float32: ")
        lines.append(where + attempt.verdict())
    chosen = (attempt.soup.describe() if attempt is not None and attempt.won else f"trial {promotion.trial_number}")
    lines.append(f"{chosen} (MLflow run {promotion.run_id}) -> {promotion.model_uri} (version {promotion.version})")
    lines.append("test scores, participant level, stratified bootstrap 95% interval"
                 + ("" if promotion.evaluated else " (recorded earlier; not evaluated again)") + ":")
    for name in CI_SCORES:
        resamples = promotion.test_metrics.get(f"{TEST_PREFIX}{name}_resamples")
        note = "" if resamples is None else f"  ({resamples:g} resamples)"
        lines.append(f"  test/{name:<22} {_format_score(promotion.test_metrics, name)}{note}")
    for name in ("accuracy", "participants", "volumes"):
        if f"{TEST_PREFIX}{name}" in promotion.test_metrics:
            lines.append(f"  test/{name:<22} {promotion.test_metrics[f'{TEST_PREFIX}{name}']:g}")
    trials = sorted({evaluation.trial for evaluation in promotion.evaluations})
    lines.append(f"test split scored for {len(trials)} trial(s) of this study: {', '.join(map(str, trials))}"
                 + (f" ({TEST_REUSE_TAG}=true)" if promotion.test_reuse else ""))
    lines += [f"note: {note}" for note in promotion.notes]
    if promotion.others:
        lines.append("the test ledger holds other scorings of this test split: "
                     + "; ".join(entry.describe() for entry in promotion.others))
    return "\n".join(lines)
