"""`evaluate_logits_many` against `evaluate_logits`, head by head, on the same rows."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from octft.data.layout import CLASS_SHORT_NAMES
from octft.train.loop import evaluate_logits
from octft.train.metrics import evaluate_logits_many

NAMES = list(CLASS_SHORT_NAMES)


def _rows(seed: int, heads: int, participants: int = 40, volumes: int = 100, absent_target: int | None = None):
    """K heads' logits on `volumes` rows from `participants` participants (most with several rows), rounded
    to halves so that ties occur within and across rows, and each participant's one target."""
    rng = np.random.default_rng(seed)
    classes = [c for c in range(len(NAMES)) if c != absent_target]
    participant_targets = rng.choice(classes, size=participants)
    extra_rows = rng.integers(0, participants, volumes - participants)
    participant_of_row = np.concatenate([np.arange(participants), extra_rows])  # every participant has a row
    rng.shuffle(participant_of_row)
    logits = (np.round(rng.normal(scale=1.5, size=(heads, volumes, len(NAMES))) * 2) / 2).astype(np.float32)
    ids = [f"10{index:02d}" for index in participant_of_row]
    return logits, participant_targets[participant_of_row], ids


def _assert_equal_per_head(logits: np.ndarray, targets: np.ndarray, ids: list[str]) -> list[dict[str, float]]:
    many = evaluate_logits_many(logits, targets, ids, NAMES)
    assert len(many) == len(logits)
    for head, scores in enumerate(many):
        expected = evaluate_logits(logits[head], targets, ids, NAMES)
        assert list(scores) == list(expected), f"head {head}: keys or their order differ"
        for key, value in expected.items():
            if math.isnan(value):
                assert math.isnan(scores[key]), f"head {head}: {key} is {scores[key]}, expected NaN"
            elif key == "val/loss":  # float32 torch there, float64 here
                assert scores[key] == pytest.approx(value, rel=1e-6), f"head {head}: {key}"
            else:
                assert scores[key] == pytest.approx(value, rel=1e-12, abs=1e-12), f"head {head}: {key}"
    return many


@pytest.mark.parametrize("seed", range(5))
def test_each_head_equals_evaluate_logits(seed: int) -> None:
    logits, targets, ids = _rows(seed, heads=7)
    many = _assert_equal_per_head(logits, targets, ids)
    assert all(not math.isnan(scores["val/auc_macro"]) for scores in many)
    assert many[0]["val/participants"] == 40.0


def test_class_absent_from_targets_gives_nan_auc_and_no_warning() -> None:
    logits, targets, ids = _rows(seed=11, heads=5, absent_target=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        many = _assert_equal_per_head(logits, targets, ids)
    for scores in many:
        assert math.isnan(scores["val/auc_macro"]) and math.isnan(scores["val_volume/auc_macro"])
        assert scores["val/classes_present"] == 3.0
        assert scores["val/recall_oral_med"] == 0.0


def test_a_head_collapsed_onto_one_class() -> None:
    logits, targets, ids = _rows(seed=3, heads=4)
    logits[1] = np.array([0.0, 5.0, 0.0, 0.0], dtype=np.float32)  # head 1 predicts prediabetes for every row
    logits[2, :, 3] += 20.0  # head 2 predicts insulin for every row, and its scores still rank the rows
    many = _assert_equal_per_head(logits, targets, ids)
    assert many[1]["val/pred_frac_prediabetes"] == 1.0 and many[1]["val_volume/pred_frac_prediabetes"] == 1.0
    assert many[1]["val/auc_macro"] == 0.5  # every score tied
    assert many[2]["val/pred_frac_insulin"] == 1.0
    assert many[2]["val/balanced_accuracy"] == 0.25
    assert many[0]["val/pred_frac_insulin"] < 1.0  # the other heads are scored on their own predictions


def test_one_head_and_single_row_participants() -> None:
    logits, targets, _ = _rows(seed=5, heads=1, volumes=60, participants=60)
    _assert_equal_per_head(logits, targets, [f"p{index}" for index in range(60)])


def test_errors_name_the_problem() -> None:
    logits, targets, ids = _rows(seed=0, heads=2)
    with pytest.raises(ValueError, match="expected logits"):
        evaluate_logits_many(logits[0], targets, ids, NAMES)
    shared = next(participant for participant in ids if ids.count(participant) > 1)
    conflicting = targets.copy()
    conflicting[ids.index(shared)] = (conflicting[ids.index(shared)] + 1) % len(NAMES)
    with pytest.raises(ValueError, match=f"participant {shared} has volumes with different targets"):
        evaluate_logits_many(logits, conflicting, ids, NAMES)
    logits[1, 0, 0] = np.nan
    with pytest.raises(ValueError, match=r"head\(s\) \[1\]"):
        evaluate_logits_many(logits, targets, ids, NAMES)
