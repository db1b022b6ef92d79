"""Pruning that stops collapsed trials early, and otherwise defers to an ordinary pruner (median by default).

A fine-tune collapses when the head predicts (nearly) one class, or balanced accuracy sits at chance. Such a
trial rarely recovers, so it is pruned after `patience` collapsed epochs in a row. Epochs before the encoder
unfreezes, plus `grace_epochs`, never count: the head may collapse while the encoder is frozen and recover
once it trains. The wrapped pruner's warm-up counts from the unfreeze epoch too (`warmup_steps`): a trial
that unfreezes at epoch 6 is not compared with the median before its encoder moved. Epochs stay the
reported steps (Optuna refuses negative steps); each trial's warm-up is shifted instead, and successive halving
and Hyperband see each trial's epochs counted from its unfreeze epoch, so their rungs compare trials after the
same number of encoder-trained epochs. Collapse is judged by
`octft.train.metrics.is_collapsed`. The reporter hands over each epoch's prediction shares with `record_epoch`:

    >>> import optuna
    >>> study = optuna.create_study(direction="maximize", pruner=CollapsePruner(patience=2, grace_epochs=0, wrapped=None))
    >>> trial = study.ask()
    >>> for epoch in range(2):
    ...     record_epoch(trial, epoch, 0.25, pred_frac=[0.97, 0.01, 0.01, 0.01], balanced_accuracy=0.25)
    >>> trial.should_prune(), study.pruner.prune_reason(study, trial)["prune_reason"]
    (True, 'collapse')
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import optuna
from optuna.pruners import BasePruner, HyperbandPruner, MedianPruner, PercentilePruner, SuccessiveHalvingPruner
from optuna.study import Study, StudyDirection
from optuna.trial import FrozenTrial, Trial, TrialState

from octft.data.layout import CLASSES
from octft.sweep.records import TRIAL_ATTR, EpochRecord, TrialRecord, trial_record
from octft.sweep.spec import SweepSpec
from octft.train.metrics import is_collapsed

UNFREEZE_PARAM = "train.unfreeze_epoch"


def epoch_record(epoch: int, pred_frac: Sequence[float], balanced_accuracy: float) -> dict[str, Any]:
    """The `EpochRecord` of `epoch` as stored in its trial's user attr `EpochRecord.attr(epoch)`; shares that are not
    shares are refused."""
    shares = [float(share) for share in pred_frac]
    if not shares or any(not 0.0 <= share <= 1.0 for share in shares) or not math.isclose(sum(shares), 1.0, abs_tol=1e-6):
        raise ValueError(
            f"pred_frac {shares} at epoch {epoch} must be the share of predictions per class (each in 0..1, "
            "summing to 1), e.g. the pred_frac_<class> values of classification_metrics"
        )
    return {"pred_frac": shares, "balanced_accuracy": float(balanced_accuracy)}


def record_epoch(
    trial: Trial, epoch: int, value: float, pred_frac: Sequence[float], balanced_accuracy: float
) -> None:
    """Report `value` at step `epoch` and store what CollapsePruner judges (an `EpochRecord`: the share of
    predictions per class and balanced accuracy)."""
    record = epoch_record(epoch, pred_frac, balanced_accuracy)
    # Stored before the report, so a pruner never sees a step without its record.
    trial.set_user_attr(EpochRecord.attr(epoch), record)
    trial.report(value, epoch)


def reads_rungs(pruner: BasePruner) -> bool:
    """Whether `pruner` keeps state in the trial's system attrs (successive halving's and Hyperband's rungs): a copy
    of the trial handed to it must carry them as they stand."""
    wrapped = pruner.wrapped if isinstance(pruner, CollapsePruner) else pruner
    return isinstance(wrapped, (SuccessiveHalvingPruner, HyperbandPruner))


class CollapsePruner(BasePruner):
    """Prune trials whose validation predictions collapsed for `patience` consecutive reported epochs.

    Counting starts at the trial's unfreeze epoch (`params["train.unfreeze_epoch"]` when sampled, else its record's,
    else 0; null, a probe run that never unfreezes, is 0) plus `grace_epochs`; a healthy
    epoch, or one with no record, resets the count. A trial that has not collapsed goes to `wrapped` (None:
    never pruned otherwise) from its unfreeze epoch plus `warmup_steps` on, and then every `interval_steps`
    epochs; give the wrapped pruner no warm-up or interval of its own (`n_warmup_steps=0, interval_steps=1`),
    or it would count from epoch 0 as well. With `enabled=False`
    the collapse rule is off and only `wrapped` decides.
    `prune_reason` says why a trial was pruned, for the trial's user attrs and MLflow.
    """

    def __init__(
        self,
        max_class_share: float = 0.9,
        chance_margin: float = 0.05,
        patience: int = 2,
        grace_epochs: int = 1,
        n_classes: int = len(CLASSES),
        wrapped: BasePruner | None = MedianPruner(),
        enabled: bool = True,
        warmup_steps: int = 0,
        interval_steps: int = 1,
    ) -> None:
        if n_classes < 2 or not 1.0 / n_classes <= max_class_share <= 1.0:
            raise ValueError(
                f"max_class_share must be in 1/n_classes..1 with n_classes >= 2, got max_class_share="
                f"{max_class_share}, n_classes={n_classes}"
            )
        if chance_margin < 0 or patience < 1 or grace_epochs < 0 or warmup_steps < 0 or interval_steps < 1:
            raise ValueError(
                f"need chance_margin >= 0, patience >= 1, grace_epochs >= 0, warmup_steps >= 0 and interval_steps >= 1, "
                f"got chance_margin={chance_margin}, patience={patience}, grace_epochs={grace_epochs}, "
                f"warmup_steps={warmup_steps}, interval_steps={interval_steps}"
            )
        self.max_class_share = max_class_share
        self.chance_margin = chance_margin
        self.patience = patience
        self.grace_epochs = grace_epochs
        self.n_classes = n_classes
        self.wrapped = wrapped
        self.enabled = enabled
        self.warmup_steps = warmup_steps
        self.interval_steps = interval_steps
        # The reason behind each prune decision, so `prune_reason` reports the decision that was made even
        # if other workers finish trials in between (which can change the median).
        self._decisions: dict[tuple[int, int], dict[str, Any]] = {}

    def prune(self, study: Study, trial: FrozenTrial) -> bool:
        reason = self._decide(study, trial)
        if reason is not None:
            self._decisions[(trial.number, reason["epoch"])] = reason
        return reason is not None

    def prune_reason(self, study: Study, trial: Trial | FrozenTrial) -> dict[str, Any] | None:
        """Why `trial` is pruned at its last reported epoch, or None if it is not.

        {"prune_reason": "collapse" | "median" | ..., "epoch": n, "detail": "...", plus the numbers}.
        """
        frozen = trial if isinstance(trial, FrozenTrial) else _frozen(study, trial)
        if frozen.last_step is not None and (frozen.number, frozen.last_step) in self._decisions:
            return dict(self._decisions[(frozen.number, frozen.last_step)])
        return self._decide(study, frozen)

    def _decide(self, study: Study, trial: FrozenTrial) -> dict[str, Any] | None:
        step = trial.last_step
        if step is None:
            return None
        collapse = self._collapse(trial, step) if self.enabled else None
        if collapse is not None:
            return collapse
        first_step = unfreeze_epoch_of(trial) + self.warmup_steps
        if self.wrapped is None or step < first_step or (step - first_step) % self.interval_steps:
            return None
        if self.wrapped.prune(study, _rung_view(self.wrapped, trial)):
            return _wrapped_reason(self.wrapped, study, trial, step)
        return None

    def _collapse(self, trial: FrozenTrial, step: int) -> dict[str, Any] | None:
        unfreeze_epoch = unfreeze_epoch_of(trial)
        first_counted = unfreeze_epoch + self.grace_epochs
        streak: list[tuple[int, str, dict[str, Any]]] = []
        for epoch in sorted(trial.intermediate_values):
            if epoch < first_counted:
                continue
            record = EpochRecord.of(trial, epoch)
            if record is None:  # reported without record_epoch: no evidence, so no collapse counted
                streak = []
                continue
            collapsed, why = is_collapsed(
                record.pred_frac, record.balanced_accuracy, self.n_classes, self.max_class_share, self.chance_margin
            )
            streak = [*streak, (epoch, why, record)] if collapsed else []
        if len(streak) < self.patience or streak[-1][0] != step:
            return None
        epochs = [epoch for epoch, _, _ in streak]
        _, why, record = streak[-1]
        return {
            "prune_reason": "collapse",
            "epoch": step,
            "detail": (
                f"{why} at epoch {step}; collapsed {len(epochs)} consecutive epochs ({epochs[0]}..{epochs[-1]}, "
                f"patience {self.patience}), counted from epoch {first_counted} = unfreeze epoch {unfreeze_epoch} "
                f"+ grace {self.grace_epochs}"
            ),
            "collapsed_epochs": epochs,
            "pred_frac": list(record.pred_frac),
            "balanced_accuracy": record.balanced_accuracy,
        }


class HyperbandCollapsePruner(CollapsePruner, HyperbandPruner):
    """CollapsePruner around a HyperbandPruner, seen by Optuna as a HyperbandPruner.

    Optuna's samplers and `tell` give a trial only the trials of its Hyperband bracket, and they do so only
    when `isinstance(study.pruner, HyperbandPruner)`; this class passes that check and answers the two
    bracket questions with the wrapped pruner's answers, so wrapping keeps brackets working. It is the one
    place octft inherits an implementation, because that isinstance check leaves no other seam.
    """

    def __init__(self, *, wrapped: HyperbandPruner, **kwargs: Any) -> None:
        CollapsePruner.__init__(self, wrapped=wrapped, **kwargs)  # HyperbandPruner's own state is never used

    def _get_bracket_id(self, study: Study, trial: FrozenTrial) -> int:
        hyperband = self.wrapped
        if not hyperband._pruners:
            # Without this, a fresh process (each worker) would put every trial in bracket 0 until its first
            # prune call; with max_resource known the brackets need no trials.
            hyperband._try_initialization(study)
        return hyperband._get_bracket_id(study, trial)

    def _create_bracket_study(self, study: Study, bracket_id: int) -> Study:
        return self.wrapped._create_bracket_study(study, bracket_id)


def _rung_view(pruner: BasePruner, trial: FrozenTrial) -> FrozenTrial:
    """`trial` as a successive-halving or Hyperband pruner must see it: its epochs counted from its unfreeze epoch,
    so that a rung compares trials after the same number of epochs with a trainable encoder (rung 0 of a trial that
    unfreezes at epoch 3 is its epoch 3). Other pruners see the trial as it is (their warm-up is shifted instead)."""
    unfreeze_epoch = unfreeze_epoch_of(trial)
    if not unfreeze_epoch or not isinstance(pruner, (SuccessiveHalvingPruner, HyperbandPruner)):
        return trial
    view = copy.copy(trial)
    view.intermediate_values = {step - unfreeze_epoch: value for step, value in trial.intermediate_values.items()
                                if step >= unfreeze_epoch}
    return view


def collapsed_at_best(trial: FrozenTrial, spec: SweepSpec) -> str | None:
    """Why `trial`'s best epoch collapsed (by the study's collapse settings: one class's share of the predictions, or
    balanced accuracy at chance), or None when it did not; a trial with no record of its best epoch counts as
    collapsed, since nothing shows it did not."""
    outcome = trial_record(trial).outcome
    record = EpochRecord.of(trial, outcome.best_epoch) if outcome and outcome.best_epoch is not None else None
    if record is None:
        return f"trial {trial.number} recorded no predictions of its best epoch"
    collapse = spec.pruner.collapse
    collapsed, why = is_collapsed(record.pred_frac, record.balanced_accuracy, len(CLASSES), collapse.max_class_share,
                                  collapse.chance_margin)
    return f"trial {trial.number} collapsed at its best epoch {outcome.best_epoch}: {why}" if collapsed else None


def unfreeze_epoch_of(trial: FrozenTrial) -> int:
    """The epoch from which the trial's encoder trains; 0 for a probe run (null) or when unknown."""
    value = trial.params[UNFREEZE_PARAM] if UNFREEZE_PARAM in trial.params else trial_record(trial).unfreeze_epoch
    return 0 if value is None else int(value)


@dataclass
class Replay:
    """What a study's trials spend under other stop rules (`replay`).

    `epochs`: epochs run, all trials together; `best_value`: the best value of a trial the rules let complete (None:
    none did); `pruned`: trials the rules prune; `unknown`: trials the study pruned that these rules would let run past
    that epoch, so what they would spend and reach is not known (their recorded epochs are counted: `epochs` is then a
    lower bound, and their values are left out of `best_value`).
    """

    epochs: int
    best_value: float | None
    pruned: int
    unknown: int = 0


def replay(trials: Sequence[FrozenTrial], pruner: BasePruner,
           direction: StudyDirection = StudyDirection.MAXIMIZE) -> Replay:
    """Run a study's finished trials again under `pruner` (built by `build_pruner`): each trial's recorded epochs are
    reported, with their records, to an in-memory study in trial-number order, as one worker reports them, until the
    pruner stops the trial or its recorded epochs end. Training is seeded and nothing but the study's reports and records
    reaches a pruner, so for a study run by one worker whose trials were not pruned (`pruner.collapse.enabled=false
    pruner.wrapped.type=none`) this is what the rules would have spent; early stopping is in the recorded epochs.

        >>> replay(study.get_trials(states=(TrialState.COMPLETE,)), build_pruner(spec)).epochs   # doctest: +SKIP
        126
    """
    study = optuna.create_study(direction=direction, pruner=pruner)
    maximize = direction == StudyDirection.MAXIMIZE
    epochs, best, pruned, unknown = 0, None, 0, 0
    for original in sorted(trials, key=lambda trial: trial.number):
        outcome = trial_record(original).outcome
        if outcome is None or outcome.epochs_run is None:
            raise ValueError(f"trial {original.number} has no recorded outcome: only finished trials can be replayed")
        study.enqueue_trial(original.params)
        trial = study.ask(fixed_distributions=original.distributions)
        # The stop rules count from the unfreeze epoch: a fixed one (not a param) is in the worker's record only.
        trial.set_user_attr(TRIAL_ATTR, TrialRecord(unfreeze_epoch=trial_record(original).unfreeze_epoch).to_dict())
        stop, stopped = outcome.epochs_run, False
        for epoch in sorted(step for step in original.intermediate_values if step < stop):
            record = EpochRecord.of(original, epoch)
            if record is None:
                trial.report(original.intermediate_values[epoch], epoch)
            else:
                record_epoch(trial, epoch, original.intermediate_values[epoch], record.pred_frac,
                             record.balanced_accuracy)
            if trial.should_prune():
                stop, stopped = epoch + 1, True
                break
        epochs += stop
        if stopped:
            pruned += 1
            study.tell(trial, state=TrialState.PRUNED)
        elif original.state != TrialState.COMPLETE:  # pruned by the study earlier than by these rules
            unknown += 1
            study.tell(trial, state=TrialState.FAIL)
        else:
            study.tell(trial, original.value)
            if best is None or (original.value > best if maximize else original.value < best):
                best = original.value
    return Replay(epochs=epochs, best_value=best, pruned=pruned, unknown=unknown)


class PassReads:
    """The study as the pruners of one stacked pass read it: its COMPLETE trials read at most once every `every_s`
    seconds and shared by every head's check (a read of the study costs ~10 ms on SQLite; a pass reports K heads an
    epoch, and its epochs take milliseconds). Every other read goes to the study. No trial of the pass completes
    before the pass ends; trials that other workers complete meanwhile count from the next read on.

        >>> reads = PassReads(study)                                                 # doctest: +SKIP
        >>> pruner.prune(reads.at(epoch), frozen_trial)                              # doctest: +SKIP
    """

    def __init__(self, study: Study, every_s: float = 1.0) -> None:
        self._study = study
        self._every_s = every_s
        self._read_at: float | None = None
        self._completed: list[FrozenTrial] = []

    def at(self, epoch: int) -> "PassReads":
        """The study for the checks of `epoch` (the epoch is kept for the record of who read when)."""
        now = time.monotonic()
        if self._read_at is None or now - self._read_at >= self._every_s:
            self._read_at, self._completed = now, self._study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        return self

    def get_trials(self, deepcopy: bool = True, states: Any = None) -> list[FrozenTrial]:
        if states is not None and tuple(states) == (TrialState.COMPLETE,):
            return copy.deepcopy(self._completed) if deepcopy else self._completed
        return self._study.get_trials(deepcopy=deepcopy, states=states)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)


def _frozen(study: Study, trial: Trial) -> FrozenTrial:
    for frozen in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if frozen.number == trial.number:
            return frozen
    raise ValueError(f"trial {trial.number} is not running in study {study.study_name!r}; pass its FrozenTrial")


def _wrapped_reason(pruner: BasePruner, study: Study, trial: FrozenTrial, step: int) -> dict[str, Any]:
    name = type(pruner).__name__
    label = _PRUNE_REASONS.get(type(pruner), name.lower().removesuffix("pruner"))
    values = np.asarray(list(trial.intermediate_values.values()), dtype=float)
    maximize = study.direction == StudyDirection.MAXIMIZE
    best = float(np.nanmax(values) if maximize else np.nanmin(values)) if not np.all(np.isnan(values)) else math.nan
    reason: dict[str, Any] = {"prune_reason": label, "epoch": step, "best_value": best}
    if isinstance(pruner, MedianPruner):
        completed = [
            t.intermediate_values[step]
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if step in t.intermediate_values
        ]
        median = float(np.nanmedian(completed)) if completed else math.nan
        reason["median"] = median
        reason["n_completed"] = len(completed)
        reason["detail"] = (
            f"best value so far {best:.4g} is {'below' if maximize else 'above'} the median {median:.4g} of "
            f"{len(completed)} completed trials at epoch {step}"
        )
    else:
        reason["detail"] = f"{name} pruned it at epoch {step} (best value so far {best:.4g})"
    return reason


_PRUNE_REASONS: dict[type, str] = {
    MedianPruner: "median",
    PercentilePruner: "percentile",
    HyperbandPruner: "hyperband",
    SuccessiveHalvingPruner: "successive_halving",
}


def build_pruner(spec: SweepSpec) -> CollapsePruner:
    """The pruner a `SweepSpec` describes: CollapsePruner around a median, percentile, Hyperband, successive
    halving or no pruner.

    `n_warmup_steps` and `interval_steps` become the wrapper's per-trial schedule (counted from each trial's
    unfreeze epoch); the Optuna pruner itself gets none. `pruner.collapse.enabled=false` leaves the wrapped pruner alone; with
    `pruner.wrapped.type=none` too, nothing is pruned.
    """
    wrapped_spec = spec.pruner.wrapped
    schedule = {
        "n_startup_trials": wrapped_spec.n_startup_trials,
        "n_warmup_steps": 0,
        "interval_steps": 1,
        "n_min_trials": wrapped_spec.n_min_trials,
    }
    halving = {"min_resource": wrapped_spec.min_resource, "reduction_factor": wrapped_spec.reduction_factor,
               "bootstrap_count": wrapped_spec.bootstrap_count}
    collapse = dict(**spec.pruner.collapse.model_dump(), n_classes=len(CLASSES), warmup_steps=wrapped_spec.n_warmup_steps,
                    interval_steps=wrapped_spec.interval_steps)
    wrapped: BasePruner | None
    if wrapped_spec.type == "median":
        wrapped = MedianPruner(**schedule)
    elif wrapped_spec.type == "percentile":
        wrapped = PercentilePruner(wrapped_spec.percentile, **schedule)
    elif wrapped_spec.type == "hyperband":
        hyperband = HyperbandPruner(max_resource=wrapped_spec.max_resource, **halving)
        return HyperbandCollapsePruner(wrapped=hyperband, **collapse)
    elif wrapped_spec.type == "successive_halving":
        wrapped = SuccessiveHalvingPruner(min_early_stopping_rate=wrapped_spec.min_early_stopping_rate, **halving)
    else:
        wrapped = None
    return CollapsePruner(**collapse, wrapped=wrapped)

