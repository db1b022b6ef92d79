"""CollapsePruner driven through Optuna's ask/tell on in-memory studies: no objective function, no mocks."""

import datetime
import time
from pathlib import Path

import optuna
import pytest
from optuna.distributions import IntDistribution
from optuna.pruners import HyperbandPruner, MedianPruner, PercentilePruner, SuccessiveHalvingPruner
from optuna.trial import TrialState

from octft.sweep.pruners import CollapsePruner, PassReads, build_pruner, epoch_record, record_epoch, replay
from octft.sweep.records import TRIAL_ATTR, EpochRecord, TrialOutcome, TrialRecord
from octft.sweep.spec import SweepSpec
from octft.sweep.spec import load_sweep
from octft.sweep.status import format_stop_rules

HEALTHY = ([0.30, 0.25, 0.25, 0.20], 0.62)
ONE_CLASS = ([0.97, 0.01, 0.01, 0.01], 0.26)  # one class takes 97% of the predictions
NEAR_CHANCE = ([0.40, 0.30, 0.20, 0.10], 0.27)  # spread predictions, but balanced accuracy at chance (0.25)


def study_with(pruner):
    return optuna.create_study(direction="maximize", pruner=pruner)


def decisions(study, epochs, *, unfreeze_param=None, unfreeze_attr=None, value=0.5):
    """Report one epoch per entry of `epochs`; return should_prune() after each (the trial keeps going)."""
    trial = study.ask()
    if unfreeze_param is not None:
        trial.suggest_int("train.unfreeze_epoch", unfreeze_param, unfreeze_param)
    if unfreeze_attr is not None:
        trial.set_user_attr(TRIAL_ATTR, TrialRecord(unfreeze_epoch=unfreeze_attr).to_dict())  # as a worker writes it
    answers = []
    for epoch, (pred_frac, balanced_accuracy) in enumerate(epochs):
        record_epoch(trial, epoch, value, pred_frac, balanced_accuracy)
        answers.append(trial.should_prune())
    return trial, answers


def test_collapse_counts_only_after_the_unfreeze_epoch_plus_grace():
    study = study_with(CollapsePruner(patience=2, grace_epochs=1, wrapped=None))
    # Sampled unfreeze epoch 2, grace 1: epochs 0-2 never count, 3 and 4 are the two collapsed epochs.
    trial, answers = decisions(study, [ONE_CLASS] * 6, unfreeze_param=2)
    assert answers == [False, False, False, False, True, True]
    assert study.pruner.prune_reason(study, trial)["collapsed_epochs"] == [3, 4, 5]


def test_unfreeze_epoch_from_user_attr_then_default_zero():
    study = study_with(CollapsePruner(patience=2, grace_epochs=1, wrapped=None))
    assert decisions(study, [ONE_CLASS] * 5, unfreeze_attr=1)[1] == [False, False, False, True, True]
    assert decisions(study, [ONE_CLASS] * 5)[1] == [False, False, True, True, True]
    # A sampled unfreeze epoch wins over the user attr.
    assert decisions(study, [ONE_CLASS] * 5, unfreeze_param=3, unfreeze_attr=0)[1] == [False] * 5


def test_patience_and_a_healthy_epoch_resets_the_count():
    study = study_with(CollapsePruner(patience=2, grace_epochs=0, wrapped=None))
    _, answers = decisions(study, [ONE_CLASS, HEALTHY, ONE_CLASS, HEALTHY, ONE_CLASS, ONE_CLASS], unfreeze_param=0)
    assert answers == [False, False, False, False, False, True]

    study = study_with(CollapsePruner(patience=3, grace_epochs=0, wrapped=None))
    _, answers = decisions(study, [ONE_CLASS, ONE_CLASS, HEALTHY, ONE_CLASS, ONE_CLASS, ONE_CLASS], unfreeze_param=0)
    assert answers == [False, False, False, False, False, True]


def test_recovery_after_collapse_is_not_pruned():
    study = study_with(CollapsePruner(patience=2, grace_epochs=0, wrapped=None))
    _, answers = decisions(study, [ONE_CLASS, ONE_CLASS, HEALTHY], unfreeze_param=0)
    assert answers == [False, True, False]  # the decision follows the latest epoch


def test_balanced_accuracy_near_chance_is_a_collapse_too():
    study = study_with(CollapsePruner(patience=2, grace_epochs=0, chance_margin=0.05, wrapped=None))
    trial, answers = decisions(study, [NEAR_CHANCE, NEAR_CHANCE], unfreeze_param=0)
    assert answers == [False, True]
    reason = study.pruner.prune_reason(study, trial)
    assert reason["prune_reason"] == "collapse" and "balanced accuracy 0.270" in reason["detail"]
    # A tighter margin no longer calls 0.27 collapsed.
    study = study_with(CollapsePruner(patience=2, grace_epochs=0, chance_margin=0.01, wrapped=None))
    assert decisions(study, [NEAR_CHANCE, NEAR_CHANCE], unfreeze_param=0)[1] == [False, False]


def test_an_epoch_reported_without_its_record_breaks_the_streak():
    study = study_with(CollapsePruner(patience=2, grace_epochs=0, wrapped=None))
    trial = study.ask()
    record_epoch(trial, 0, 0.3, *ONE_CLASS)
    trial.report(0.3, 1)  # no record_epoch: nothing to judge
    assert not trial.should_prune()
    record_epoch(trial, 2, 0.3, *ONE_CLASS)
    assert not trial.should_prune()
    record_epoch(trial, 3, 0.3, *ONE_CLASS)
    assert trial.should_prune()


def finish_good_trials(study, count, values=(0.7, 0.8, 0.8)):
    for _ in range(count):
        trial = study.ask()
        for epoch, value in enumerate(values):
            record_epoch(trial, epoch, value, *HEALTHY)
        study.tell(trial, max(values))


def test_wrapped_median_pruner_still_prunes_ordinary_underperformers():
    study = study_with(CollapsePruner(wrapped=MedianPruner(n_startup_trials=2, n_warmup_steps=1)))
    finish_good_trials(study, 3)
    trial, answers = decisions(study, [HEALTHY] * 3, unfreeze_param=0, value=0.3)
    assert answers == [False, True, True]  # epoch 0 is the median pruner's warm-up
    reason = study.pruner.prune_reason(study, trial)
    assert reason["prune_reason"] == "median" and reason["epoch"] == 2
    assert reason["median"] == 0.8 and reason["best_value"] == 0.3 and reason["n_completed"] == 3
    assert "0.3" in reason["detail"] and "median 0.8" in reason["detail"]
    study.tell(trial, state=TrialState.PRUNED)
    # A good trial is left alone by both.
    assert decisions(study, [HEALTHY] * 3, unfreeze_param=0, value=0.9)[1] == [False] * 3


def test_collapse_wins_over_median_in_the_reason():
    study = study_with(CollapsePruner(patience=2, grace_epochs=0, wrapped=MedianPruner(n_startup_trials=1)))
    finish_good_trials(study, 2)
    trial = study.ask()
    trial.suggest_int("train.unfreeze_epoch", 0, 0)
    record_epoch(trial, 0, 0.1, *ONE_CLASS)
    assert trial.should_prune() and study.pruner.prune_reason(study, trial)["prune_reason"] == "median"
    record_epoch(trial, 1, 0.1, *ONE_CLASS)  # now collapsed for `patience` epochs: that is the reason given
    assert trial.should_prune() and study.pruner.prune_reason(study, trial)["prune_reason"] == "collapse"


def test_without_a_wrapped_pruner_healthy_trials_are_never_pruned():
    study = study_with(CollapsePruner(wrapped=None))
    finish_good_trials(study, 3)
    trial, answers = decisions(study, [HEALTHY] * 6, unfreeze_param=0, value=0.01)
    assert answers == [False] * 6 and study.pruner.prune_reason(study, trial) is None


def test_prune_reason_contents_for_a_live_and_a_frozen_trial():
    study = study_with(CollapsePruner(patience=2, grace_epochs=1, wrapped=None))
    trial, answers = decisions(study, [HEALTHY, ONE_CLASS, ONE_CLASS, ONE_CLASS], unfreeze_param=1)
    assert answers == [False, False, False, True]
    reason = study.pruner.prune_reason(study, trial)
    assert reason["prune_reason"] == "collapse" and reason["epoch"] == 3 and reason["collapsed_epochs"] == [2, 3]
    assert reason["pred_frac"] == ONE_CLASS[0] and reason["balanced_accuracy"] == ONE_CLASS[1]
    assert "class 0" in reason["detail"] and "97.0%" in reason["detail"] and "90.0%" in reason["detail"]
    assert "unfreeze epoch 1" in reason["detail"] and "grace 1" in reason["detail"]
    frozen = study.get_trials(states=(TrialState.RUNNING,))[0]
    # A fresh pruner with the same settings agrees: the reason is derived from what the trial stored.
    assert CollapsePruner(patience=2, grace_epochs=1, wrapped=None).prune_reason(study, frozen) == reason
    trial.set_user_attr("prune", reason)  # what the reporter writes: it must survive storage (JSON)
    assert study.get_trials(states=(TrialState.RUNNING,))[0].user_attrs["prune"] == reason


def test_prune_reason_is_the_decision_that_was_made_even_if_the_median_moves():
    study = study_with(CollapsePruner(wrapped=MedianPruner(n_startup_trials=1, n_warmup_steps=0)))
    finish_good_trials(study, 1, values=(0.8,))
    trial, answers = decisions(study, [HEALTHY], unfreeze_param=0, value=0.5)
    assert answers == [True]
    finish_good_trials(study, 3, values=(0.1,))  # another worker finishes worse trials: the median drops
    assert study.pruner.prune_reason(study, trial)["median"] == 0.8
    assert CollapsePruner(wrapped=MedianPruner(n_startup_trials=1)).prune_reason(study, trial) is None


def test_record_epoch_stores_the_record_and_rejects_shares_that_are_not_shares():
    study = study_with(CollapsePruner(wrapped=None))
    trial = study.ask()
    record_epoch(trial, 4, 0.5, [0.5, 0.5, 0.0, 0.0], 0.5)
    frozen = study.get_trials()[0]
    assert frozen.intermediate_values == {4: 0.5}
    assert frozen.user_attrs[EpochRecord.attr(4)] == {"pred_frac": [0.5, 0.5, 0.0, 0.0], "balanced_accuracy": 0.5}
    with pytest.raises(ValueError, match="epoch 5"):
        record_epoch(trial, 5, 0.5, [120, 30, 0, 0], 0.5)  # counts, not shares


def test_bad_pruner_settings_are_errors():
    with pytest.raises(ValueError, match="max_class_share"):
        CollapsePruner(max_class_share=0.2, n_classes=4)
    with pytest.raises(ValueError, match="patience"):
        CollapsePruner(patience=0)


def test_build_pruner_follows_the_spec():
    spec = SweepSpec.model_validate({
        "base": "experiments/demo.yaml", "study_name": "t",
        "pruner": {"collapse": {"max_class_share": 0.8, "chance_margin": 0.02, "patience": 3, "grace_epochs": 0},
                   "wrapped": {"type": "percentile", "percentile": 25, "n_startup_trials": 2, "n_warmup_steps": 1}},
    })
    pruner = build_pruner(spec)
    assert (pruner.max_class_share, pruner.chance_margin, pruner.patience, pruner.grace_epochs, pruner.n_classes) == (
        0.8, 0.02, 3, 0, 4)
    assert isinstance(pruner.wrapped, PercentilePruner) and not isinstance(pruner.wrapped, MedianPruner)
    # The warm-up moves to the wrapper, which counts it from each trial's unfreeze epoch.
    assert pruner.warmup_steps == 1 and pruner.wrapped._n_warmup_steps == 0
    for wrapped in (None, "none", {"type": "none"}):
        spec = SweepSpec.model_validate({"base": "b.yaml", "study_name": "t", "pruner": {"wrapped": wrapped}})
        assert build_pruner(spec).wrapped is None
    spec = SweepSpec.model_validate({"base": "b.yaml", "study_name": "t"})
    assert isinstance(build_pruner(spec).wrapped, MedianPruner)
    assert spec.promote.model_name == "t"  # the registered model defaults to the study name


def test_collapse_rule_switched_off_leaves_only_the_wrapped_pruner():
    collapsed = [HEALTHY, ONE_CLASS, ONE_CLASS, ONE_CLASS]
    for enabled, expected in ((True, [False, False, True, True]), (False, [False] * 4)):
        pruner = CollapsePruner(patience=2, grace_epochs=0, wrapped=None, enabled=enabled)
        assert decisions(study_with(pruner), collapsed, unfreeze_param=0)[1] == expected
    # Off, a collapsed trial below the median is still pruned, and the reason is the median's.
    study = study_with(CollapsePruner(patience=2, grace_epochs=0, wrapped=MedianPruner(n_startup_trials=1), enabled=False))
    finished, _ = decisions(study, [HEALTHY] * 4, value=0.8)
    study.tell(finished, 0.8)
    trial, answers = decisions(study, collapsed, unfreeze_param=0, value=0.3)
    assert answers == [True] * 4 and study.pruner.prune_reason(study, trial)["prune_reason"] == "median"


def test_sweep_overrides_switch_the_collapse_rule_and_the_wrapped_pruner_off():
    demo = Path(__file__).resolve().parents[2] / "sweeps" / "demo.yaml"
    assert build_pruner(load_sweep(demo)).enabled is True
    median_alone = build_pruner(load_sweep(demo, ["pruner.collapse.enabled=false"]))
    assert median_alone.enabled is False and isinstance(median_alone.wrapped, MedianPruner)
    nothing = build_pruner(load_sweep(demo, ["pruner.collapse.enabled=false", "pruner.wrapped.type=none"]))
    assert nothing.enabled is False and nothing.wrapped is None


def test_the_median_warm_up_counts_from_each_trials_unfreeze_epoch():
    pruner = build_pruner(SweepSpec.model_validate({
        "base": "b.yaml", "study_name": "t",
        "pruner": {"collapse": {"enabled": False}, "wrapped": {"type": "median", "n_startup_trials": 1, "n_warmup_steps": 2}},
    }))
    study = study_with(pruner)
    finish_good_trials(study, 2, values=(0.8,) * 8)
    # The same poor scores, unfrozen at 0, at 4, and never (a probe run counts from epoch 0).
    assert decisions(study, [HEALTHY] * 8, unfreeze_param=0, value=0.3)[1] == [False, False] + [True] * 6
    assert decisions(study, [HEALTHY] * 8, unfreeze_param=4, value=0.3)[1] == [False] * 6 + [True] * 2
    probe = study.ask()
    probe.set_user_attr(TRIAL_ATTR, TrialRecord(unfreeze_epoch=0).to_dict())  # a worker's for unfreeze_epoch=null
    answers = []
    for epoch in range(4):
        record_epoch(probe, epoch, 0.3, *HEALTHY)
        answers.append(probe.should_prune())
    assert answers == [False, False, True, True]


def test_the_median_interval_counts_from_each_trials_unfreeze_epoch():
    pruner = build_pruner(SweepSpec.model_validate({
        "base": "b.yaml", "study_name": "t",
        "pruner": {"collapse": {"enabled": False},
                   "wrapped": {"type": "median", "n_startup_trials": 1, "n_warmup_steps": 1, "interval_steps": 3}},
    }))
    assert pruner.interval_steps == 3 and pruner.wrapped._interval_steps == 1
    study = study_with(pruner)
    finish_good_trials(study, 2, values=(0.8,) * 9)
    # Checked at warm-up end and every third epoch after it, whatever epoch the encoder unfroze at:
    # unfrozen at 0 -> epochs 1, 4, 7; at 2 -> epochs 3, 6 (not 1, 4, 7 as Optuna's own interval would).
    assert decisions(study, [HEALTHY] * 9, unfreeze_param=0, value=0.3)[1] == [
        False, True, False, False, True, False, False, True, False]
    assert decisions(study, [HEALTHY] * 9, unfreeze_param=2, value=0.3)[1] == [
        False, False, False, True, False, False, True, False, False]


def test_bad_interval_steps_is_an_error():
    with pytest.raises(ValueError, match="interval_steps"):
        CollapsePruner(interval_steps=0)


class CountingSampler(optuna.samplers.RandomSampler):
    """Records how many finished trials the study it samples from holds (a bracket study holds fewer)."""

    def __init__(self):
        super().__init__(seed=0)
        self.seen = []

    def sample_independent(self, study, trial, param_name, param_distribution):
        self.seen.append(len(study.get_trials(states=(TrialState.COMPLETE,))))
        return super().sample_independent(study, trial, param_name, param_distribution)


def _hyperband_study(pruner, storage):
    sampler = CountingSampler()
    study = optuna.create_study(direction="maximize", pruner=pruner, sampler=sampler, study_name="brackets",
                                storage=storage)
    for number in range(12):
        trial = study.ask()
        trial.suggest_float("x", 0, 1)
        for epoch in range(3):
            trial.report(0.5 + 0.01 * number, epoch)
            trial.should_prune()  # as the reporter asks every epoch
        study.tell(trial, 0.5 + 0.01 * number)
    return sampler.seen


def test_hyperband_brackets_reach_the_sampler_through_the_collapse_wrapper(tmp_path):
    spec = SweepSpec.model_validate({
        "base": "b.yaml", "study_name": "t",
        "pruner": {"wrapped": {"type": "hyperband", "min_resource": 1, "max_resource": 9, "reduction_factor": 3}},
    })
    wrapper = build_pruner(spec)
    assert isinstance(wrapper, CollapsePruner) and isinstance(wrapper, HyperbandPruner)
    bare = _hyperband_study(HyperbandPruner(min_resource=1, max_resource=9, reduction_factor=3),
                            f"sqlite:///{tmp_path / 'bare.db'}")
    wrapped = _hyperband_study(wrapper, f"sqlite:///{tmp_path / 'wrapped.db'}")
    # Each trial's sampler sees only the finished trials of its own bracket, as with a bare HyperbandPruner;
    # without the bracket study it would see all of them (0, 1, 2, ... 11).
    assert wrapped[1:] == bare[1:] and wrapped[1:] != list(range(1, 12)), (wrapped, bare)

    # A worker process opens the study with a fresh pruner: its first trial already samples within a bracket.
    sampler = CountingSampler()
    study = optuna.load_study(study_name="brackets", storage=f"sqlite:///{tmp_path / 'wrapped.db'}",
                              sampler=sampler, pruner=build_pruner(spec))
    study.ask().suggest_float("x", 0, 1)
    assert sampler.seen[0] < 12


def test_hyperband_and_successive_halving_prune_with_their_own_reason():
    for kind, cls in (("hyperband", HyperbandPruner), ("successive_halving", SuccessiveHalvingPruner)):
        pruner = build_pruner(SweepSpec.model_validate({
            "base": "b.yaml", "study_name": "t",
            "pruner": {"collapse": {"enabled": False}, "wrapped": {"type": kind, "min_resource": 1, "reduction_factor": 2}},
        }))
        assert isinstance(pruner.wrapped, cls)
        study = study_with(pruner)
        for number in range(10):
            trial, _ = decisions(study, [HEALTHY] * 4, unfreeze_param=0, value=0.9)  # rungs are filled on asking
            study.tell(trial, 0.9)
        pruned = []
        for number in range(10):
            trial = study.ask()
            for epoch in range(4):  # as the reporter does: stop at the first prune decision
                record_epoch(trial, epoch, 0.1, *HEALTHY)
                if trial.should_prune():
                    pruned.append(study.pruner.prune_reason(study, trial)["prune_reason"])
                    study.tell(trial, state=TrialState.PRUNED)
                    break
            else:
                study.tell(trial, 0.1)
        assert pruned and set(pruned) == {kind}, (kind, pruned)


@pytest.mark.parametrize("kind", [SuccessiveHalvingPruner, HyperbandPruner])
def test_rungs_count_epochs_with_a_trainable_encoder(kind):
    """Rung r compares trials after the same number of encoder-trained epochs: a trial that unfreezes at epoch 2 is
    at rung 0 after its epoch 3 (against the others' epoch 1), not at rung 1 against trials trained 4 epochs."""
    wrapped = (SuccessiveHalvingPruner(min_resource=1, reduction_factor=2) if kind is SuccessiveHalvingPruner
               else HyperbandPruner(min_resource=1, max_resource=4, reduction_factor=2))
    # Named: Hyperband puts a trial in a bracket by a hash of the study's name and the trial's number.
    study = optuna.create_study(study_name="rungs", direction="maximize",
                                pruner=CollapsePruner(enabled=False, wrapped=wrapped))

    def run(unfreeze_epoch: int, values: list[float]) -> list[bool]:
        trial = study.ask()
        trial.suggest_int("train.unfreeze_epoch", unfreeze_epoch, unfreeze_epoch)
        answers = []
        for epoch, value in enumerate(values):
            record_epoch(trial, epoch, value, *HEALTHY)
            answers.append(trial.should_prune())
        study.tell(trial, max(values))
        return answers

    for _ in range(8):
        run(0, [0.3, 0.3, 0.6, 0.6])  # 0.3 after one encoder epoch, 0.6 after three
    # 0.4 after one and two encoder epochs: better than the others at the same point of their training.
    assert run(2, [0.1, 0.1, 0.4, 0.4]) == [False] * 4
    # The same numbers from a trial that trained its encoder from epoch 0 are behind at its rungs. (Hyperband's
    # next trial lands in a bracket that does not prune this early: the control is successive halving's.)
    control = run(0, [0.1, 0.1, 0.4, 0.4])
    assert any(control) or kind is HyperbandPruner, control


def test_pruner_arguments_belong_to_their_type():
    for wrapped, says in (({"type": "median", "reduction_factor": 2}, "reduction_factor applies to type: hyperband"),
                          ({"type": "hyperband", "n_startup_trials": 2}, "n_startup_trials applies to type: median"),
                          ({"type": "successive_halving", "max_resource": 9}, "max_resource applies to type: hyperband"),
                          ({"type": "hyperband", "min_resource": 5, "max_resource": 2}, "below min_resource")):
        with pytest.raises(ValueError, match=says):
            SweepSpec.model_validate({"base": "b.yaml", "study_name": "t", "pruner": {"wrapped": wrapped}})


def test_the_heads_of_a_pass_share_a_timed_read_of_the_completed_trials_and_decide_as_should_prune():
    study = optuna.create_study(direction="maximize", pruner=CollapsePruner(wrapped=MedianPruner(n_startup_trials=1)))
    for value in (0.6, 0.7):
        done = study.ask()
        for epoch in range(3):
            record_epoch(done, epoch, value, pred_frac=[0.25] * 4, balanced_accuracy=value)
        study.tell(done, value)
    reads = PassReads(study, every_s=0.5)
    heads = [study.ask() for _ in range(2)]
    for head, value in zip(heads, (0.3, 0.9)):
        record_epoch(head, 0, value, pred_frac=[0.25] * 4, balanced_accuracy=value)
    completed = reads.at(0).get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    assert [t.value for t in completed] == [0.6, 0.7]
    late = study.ask()  # another worker's trial completes during the pass: seen from the next read on
    study.tell(late, 0.1)
    assert reads.at(1).get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) is completed
    assert len(reads.at(0).get_trials(deepcopy=False)) == 5  # any other read goes to the study
    for head in heads:  # the same verdict as should_prune, from the shared read
        frozen = study._storage.get_trial(head._trial_id)
        assert study.pruner.prune(reads.at(0), frozen) == head.should_prune()
    assert [head.should_prune() for head in heads] == [True, False]
    time.sleep(0.5)
    assert len(reads.at(2).get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) == 3


# ---------------------------------------------------------------------------------------------------- replay


def finished(number: int, unfreeze: int, values: list[float], shares: list[list[float]],
             state: TrialState = TrialState.COMPLETE) -> optuna.trial.FrozenTrial:
    """A trial as a worker leaves it: every epoch it ran reported with its record, its outcome counting them."""
    best_epoch = max(range(len(values)), key=values.__getitem__)
    status = "completed" if state == TrialState.COMPLETE else "pruned"
    record = TrialRecord(status=status, unfreeze_epoch=unfreeze, outcome=TrialOutcome(
        status=status, best_value=values[best_epoch], best_epoch=best_epoch, epochs_run=len(values)))
    attrs = {TRIAL_ATTR: record.to_dict()}
    attrs.update({EpochRecord.attr(epoch): epoch_record(epoch, share, value)
                  for epoch, (value, share) in enumerate(zip(values, shares))})
    trial = optuna.trial.create_trial(
        params={"train.unfreeze_epoch": unfreeze}, distributions={"train.unfreeze_epoch": IntDistribution(0, 4)},
        value=values[best_epoch] if state == TrialState.COMPLETE else None, intermediate_values=dict(enumerate(values)),
        user_attrs=attrs, state=state)
    trial.number = number
    return trial


def spec_pruner(collapse: dict, wrapped: dict | str):
    return build_pruner(SweepSpec.model_validate({"base": "b.yaml", "study_name": "t",
                                                   "pruner": {"collapse": collapse, "wrapped": wrapped}}))


def test_replay_stops_a_collapsed_trial_where_the_rule_would_and_keeps_the_rest():
    good = finished(0, 1, [0.4, 0.5, 0.6, 0.62, 0.6, 0.6], [HEALTHY[0]] * 6)
    # Collapsed from its first epoch; unfreezes at 2, so grace 0, patience 2 stops it after epoch 3 (4 epochs run).
    collapsed = finished(1, 2, [0.25] * 8, [ONE_CLASS[0]] * 8)

    nothing = replay([good, collapsed], spec_pruner({"enabled": False}, "none"))
    rule = replay([good, collapsed], spec_pruner({"grace_epochs": 0, "patience": 2}, "none"))

    assert (nothing.epochs, nothing.best_value, nothing.pruned, nothing.unknown) == (14, 0.62, 0, 0)
    assert (rule.epochs, rule.best_value, rule.pruned, rule.unknown) == (6 + 4, 0.62, 1, 0)


def test_replay_counts_from_an_unfreeze_epoch_that_is_not_a_param():
    # A sweep that fixes train.unfreeze_epoch: the worker's record holds it, the params do not.
    collapsed = finished(0, 3, [0.25] * 8, [ONE_CLASS[0]] * 8)
    collapsed.params, collapsed.distributions = {}, {}

    rule = replay([collapsed], spec_pruner({"grace_epochs": 1, "patience": 2}, "none"))

    assert (rule.epochs, rule.pruned) == (3 + 1 + 2, 1)


def test_replay_prunes_below_the_median_of_the_trials_completed_before():
    first = finished(0, 0, [0.5, 0.6, 0.7, 0.7], [HEALTHY[0]] * 4)
    second = finished(1, 0, [0.5, 0.6, 0.7, 0.7], [HEALTHY[0]] * 4)
    poor = finished(2, 0, [0.3, 0.35, 0.4, 0.45], [HEALTHY[0]] * 4)
    median = {"type": "median", "n_startup_trials": 2, "n_warmup_steps": 1}

    replayed = replay([poor, first, second], spec_pruner({"enabled": False}, median))  # in trial-number order
    not_yet = replay([first, poor, second], spec_pruner({"enabled": False}, {**median, "n_startup_trials": 3}))

    assert (replayed.epochs, replayed.pruned, replayed.best_value) == (4 + 4 + 2, 1, 0.7)
    assert (not_yet.epochs, not_yet.pruned) == (12, 0)


def test_a_trial_the_study_pruned_that_laxer_rules_would_keep_is_unknown_not_a_result():
    good = finished(0, 0, [0.5, 0.6, 0.6], [HEALTHY[0]] * 3)
    # The study pruned it after 2 collapsed epochs; with patience 3 it would have run on: how far, nobody knows.
    cut = finished(1, 0, [0.25, 0.25], [ONE_CLASS[0]] * 2, state=TrialState.PRUNED)

    same = replay([good, cut], spec_pruner({"grace_epochs": 0, "patience": 2}, "none"))
    laxer = replay([good, cut], spec_pruner({"grace_epochs": 0, "patience": 3}, "none"))

    assert (same.epochs, same.pruned, same.unknown, same.best_value) == (5, 1, 0, 0.6)
    assert (laxer.epochs, laxer.pruned, laxer.unknown, laxer.best_value) == (5, 0, 1, 0.6)


def test_stop_rules_says_when_trials_ran_side_by_side():
    spec = SweepSpec.model_validate({"base": "b.yaml", "study_name": "t",
                                     "pruner": {"collapse": {"grace_epochs": 0, "patience": 1}, "wrapped": "none"}})
    start = datetime.datetime(2026, 1, 1)

    def study_of(second_starts_after_s: float) -> optuna.Study:
        study = optuna.create_study(direction="maximize", study_name="side")
        for number, begins in enumerate((0.0, second_starts_after_s)):
            trial = finished(number, 0, [0.4, 0.5], [HEALTHY[0]] * 2)
            trial.datetime_start = start + datetime.timedelta(seconds=begins)
            trial.datetime_complete = trial.datetime_start + datetime.timedelta(seconds=10)
            study.add_trial(trial)
        return study

    one_after_another, side_by_side = format_stop_rules(study_of(11), spec), format_stop_rules(study_of(5), spec)

    assert one_after_another.startswith("study side: 2 finished trials replayed in trial order (0 pruned by the study); "
                                        "no pruning spends 4 epochs, best 0.500")
    assert "*100% 0.500" in one_after_another and "ran side by side" not in one_after_another
    assert "ran side by side" in side_by_side
