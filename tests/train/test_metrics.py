"""Metrics checked against scikit-learn on the same predictions, and the device confusion on XLA."""

from __future__ import annotations

import doctest
import math
import warnings

import numpy as np
import pytest
import torch
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    f1_score,
    precision_recall_fscore_support,
    roc_auc_score,
)
from sklearn.metrics import confusion_matrix as sklearn_confusion_matrix

from octft.data.layout import CLASS_SHORT_NAMES
from octft.train import metrics
from octft.train.figures import confusion_matrix_figure
from octft.train.metrics import (
    aggregate_by_participant,
    bootstrap_ci,
    classification_metrics,
    confusion_matrix,
    is_collapsed,
    softmax,
)

NAMES = list(CLASS_SHORT_NAMES)
LABELS = list(range(len(NAMES)))


def _predictions(seed: int, n: int = 120, never_predicted: int | None = None, absent_target: int | None = None):
    """Random logits and targets, with one class optionally never predicted or never a target."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, len(NAMES))).astype(np.float32)
    if never_predicted is not None:
        logits[:, never_predicted] = -10.0
    choices = [c for c in LABELS if c != absent_target]
    targets = rng.choice(choices, size=n)
    return logits, targets


def _sklearn_scores(targets: np.ndarray, predictions: np.ndarray) -> dict[str, float]:
    precision, recall, f1, _ = precision_recall_fscore_support(
        targets, predictions, labels=LABELS, zero_division=0
    )
    expected = {
        "accuracy": accuracy_score(targets, predictions),
        "balanced_accuracy": balanced_accuracy_score(targets, predictions),
        "macro_f1": f1_score(targets, predictions, labels=LABELS, average="macro", zero_division=0),
    }
    np.testing.assert_allclose(f1, f1_score(targets, predictions, labels=LABELS, average=None, zero_division=0))
    for index, name in enumerate(NAMES):
        expected[f"f1_{name}"] = f1[index]
        expected[f"precision_{name}"] = precision[index]
        expected[f"recall_{name}"] = recall[index]
        expected[f"pred_frac_{name}"] = float(np.mean(predictions == index))
    return expected


def _assert_scores_match(actual: dict[str, float], expected: dict[str, float]) -> None:
    for key, value in expected.items():
        assert actual[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key


def test_docstring_examples_hold():
    assert doctest.testmod(metrics).failed == 0


def test_host_confusion_matrix_equals_sklearn_and_rejects_unknown_classes():
    logits, targets = _predictions(seed=1)
    predictions = logits.argmax(axis=1)
    np.testing.assert_array_equal(
        confusion_matrix(targets, predictions, 4), sklearn_confusion_matrix(targets, predictions, labels=LABELS)
    )
    with pytest.raises(ValueError, match=r"predictions hold \[4\]"):
        confusion_matrix(np.array([0, 1]), np.array([0, 4]), 4)


def test_metrics_equal_sklearn_with_a_class_never_predicted():
    logits, targets = _predictions(seed=2, never_predicted=2)
    predictions = logits.argmax(axis=1)
    assert 2 not in predictions and 2 in targets
    probs = softmax(logits)
    confusion = confusion_matrix(targets, predictions, len(NAMES))

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every class is a target: nothing to warn about
        scores = classification_metrics(confusion, probs=probs, targets=targets, class_names=NAMES)

    _assert_scores_match(scores, _sklearn_scores(targets, predictions))
    assert scores["f1_oral_med"] == 0.0 and scores["precision_oral_med"] == 0.0
    assert scores["auc_macro"] == pytest.approx(
        roc_auc_score(targets, probs, multi_class="ovr", average="macro", labels=LABELS), rel=1e-12
    )


def test_class_absent_from_targets_gives_nan_auc_and_warnings_not_a_crash():
    logits, targets = _predictions(seed=3, absent_target=1)
    predictions = logits.argmax(axis=1)
    assert 1 in predictions and 1 not in targets
    confusion = confusion_matrix(targets, predictions, 4)

    with pytest.warns(UserWarning) as caught:
        scores = classification_metrics(confusion, probs=softmax(logits), targets=targets, class_names=NAMES)
    messages = [str(warning.message) for warning in caught]
    assert any("auc_macro is NaN" in message and "'prediabetes'" in message for message in messages)
    assert any("balanced_accuracy leaves out" in message and "'prediabetes'" in message for message in messages)
    assert math.isnan(scores["auc_macro"])

    with pytest.warns(UserWarning, match="y_pred contains classes not in y_true"):
        expected = _sklearn_scores(targets, predictions)  # scikit-learn also drops the absent class
    _assert_scores_match(scores, expected)
    assert scores["recall_prediabetes"] == 0.0


def test_all_one_class_predictions_are_scored_and_flagged_as_collapse():
    _, targets = _predictions(seed=4)
    predictions = np.zeros_like(targets)
    scores = classification_metrics(confusion_matrix(targets, predictions, 4), class_names=NAMES)
    _assert_scores_match(scores, _sklearn_scores(targets, predictions))
    assert scores["pred_frac_healthy"] == 1.0
    assert scores["balanced_accuracy"] == pytest.approx(0.25)

    collapsed, reason = is_collapsed(
        [scores[f"pred_frac_{name}"] for name in NAMES],
        scores["balanced_accuracy"],
        n_classes=4,
        max_class_share=0.9,
        chance_margin=0.05,
    )
    assert collapsed
    assert "class 0 takes 100.0%" in reason and "chance" in reason


def test_metrics_reject_inputs_that_would_lie():
    confusion = np.array([[3, 1], [0, 2]])
    probs = np.array([[0.9, 0.1]] * 6)
    with pytest.raises(ValueError, match="same samples"):  # 5 targets of class 0, confusion says 4
        classification_metrics(confusion, probs=probs, targets=np.array([0, 0, 0, 0, 0, 1]), class_names=["a", "b"])
    with pytest.raises(ValueError, match="sum to 1"):
        classification_metrics(confusion, probs=probs * 3, targets=np.array([0, 0, 0, 0, 1, 1]), class_names=["a", "b"])
    with pytest.raises(ValueError, match="together"):
        classification_metrics(confusion, probs=probs, class_names=["a", "b"])
    with pytest.raises(ValueError, match="empty"):
        classification_metrics(np.zeros((2, 2)), class_names=["a", "b"])
    with pytest.raises(ValueError, match="whole counts"):
        classification_metrics(np.array([[1.5, 0.0], [0.0, 1.0]]), class_names=["a", "b"])
    with pytest.raises(ValueError, match=r"3 names"):
        classification_metrics(confusion, class_names=["a", "b", "c"])
    with pytest.raises(ValueError, match="distinct"):
        classification_metrics(confusion, class_names=["a", "a"])


@pytest.mark.parametrize(
    ("pred_frac", "balanced_accuracy", "expected", "reason_part"),
    [
        ([0.3, 0.2, 0.25, 0.25], 0.6, False, "not collapsed"),
        ([0.95, 0.05, 0.0, 0.0], 0.6, True, "class 0 takes 95.0%"),
        ([0.05, 0.92, 0.03, 0.0], 0.6, True, "class 1 takes 92.0%"),
        ([0.3, 0.2, 0.25, 0.25], 0.29, True, "within 0.050 of chance 0.250"),
        ([0.3, 0.2, 0.25, 0.25], 0.31, False, "not collapsed"),
        ([0.3, 0.2, 0.25, 0.25], float("nan"), True, "NaN"),
    ],
)
def test_is_collapsed(pred_frac, balanced_accuracy, expected, reason_part):
    collapsed, reason = is_collapsed(pred_frac, balanced_accuracy, n_classes=4, max_class_share=0.9, chance_margin=0.05)
    assert collapsed is expected
    assert reason_part in reason


def test_is_collapsed_rejects_inconsistent_arguments():
    with pytest.raises(ValueError, match="n_classes is 4"):
        is_collapsed([0.5, 0.5], 0.5, n_classes=4, max_class_share=0.9, chance_margin=0.05)
    with pytest.raises(ValueError, match="max_class_share"):
        is_collapsed([0.5, 0.5], 0.5, n_classes=2, max_class_share=0.3, chance_margin=0.05)


def test_aggregate_by_participant_averages_volume_logits():
    rng = np.random.default_rng(5)
    participant_ids = ["7001", "1002", "7001", "4003", "1002", "7001"]
    labels = {"7001": 2, "1002": 0, "4003": 3}
    logits = rng.normal(size=(6, 4))
    targets = np.array([labels[participant_id] for participant_id in participant_ids])

    ids, mean_logits, participant_targets = aggregate_by_participant(participant_ids, logits, targets)

    assert ids == ["7001", "1002", "4003"]  # first appearance, not sorted
    for row, participant_id in enumerate(ids):
        volumes = [index for index, value in enumerate(participant_ids) if value == participant_id]
        np.testing.assert_allclose(mean_logits[row], logits[volumes].mean(axis=0))
        assert participant_targets[row] == labels[participant_id]
    np.testing.assert_allclose(
        softmax(mean_logits), torch.softmax(torch.from_numpy(mean_logits), dim=1).numpy(), rtol=1e-12
    )


def test_aggregate_by_participant_names_a_participant_with_conflicting_targets():
    with pytest.raises(ValueError, match=r"participant 4003 has volumes with different targets \[1, 3\]"):
        aggregate_by_participant(["1001", "4003", "4003"], np.zeros((3, 4)), np.array([0, 1, 3]))
    with pytest.raises(ValueError, match="participant_ids"):
        aggregate_by_participant(["1001"], np.zeros((2, 4)), np.array([0, 1]))


def test_confusion_matrix_figure_annotates_counts(tmp_path):
    confusion = np.array([[5, 1, 0, 0], [2, 3, 0, 0], [0, 0, 0, 0], [0, 1, 0, 7]])
    figure = confusion_matrix_figure(confusion, NAMES, "val, epoch 3")
    axes = figure.axes[0]
    cell_texts = [text.get_text().splitlines()[0] for text in axes.texts]
    assert cell_texts == [str(count) for count in confusion.flatten()]
    assert [label.get_text() for label in axes.get_xticklabels()] == NAMES
    assert [label.get_text() for label in axes.get_yticklabels()] == NAMES
    assert axes.get_title() == "val, epoch 3"
    figure.savefig(tmp_path / "confusion.png")
    assert (tmp_path / "confusion.png").stat().st_size > 1000


def _accuracy(y_true, y_pred, _probs):
    return float(np.mean(y_true == y_pred))


def _noisy_predictions(n: int, seed: int):
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, 4, size=n)
    wrong = rng.random(n) < 0.3
    return y_true, np.where(wrong, (y_true + 1) % 4, y_true)


def test_bootstrap_ci_contains_the_point_and_narrows_with_more_participants():
    small = bootstrap_ci(*_noisy_predictions(40, seed=6), None, _accuracy, n_resamples=400)
    large = bootstrap_ci(*_noisy_predictions(1000, seed=6), None, _accuracy, n_resamples=400)
    for interval in (small, large):
        assert interval.low <= interval.point <= interval.high
        assert interval.low < interval.high and interval.resamples == 400
    assert large.high - large.low < 0.5 * (small.high - small.low)
    assert bootstrap_ci(*_noisy_predictions(40, seed=6), None, _accuracy, n_resamples=400) == small  # seeded


def test_bootstrap_ci_passes_resampled_probs_and_counts_undefined_resamples():
    y_true, y_pred = _noisy_predictions(12, seed=7)
    y_true[0] = 3
    y_true[1:] = np.where(y_true[1:] == 3, 0, y_true[1:])  # class 3 held by one participant only
    probs = softmax(np.random.default_rng(7).normal(size=(12, 4)))

    def auc(targets, _predictions, resampled_probs):
        assert resampled_probs.shape == (len(targets), 4)
        if len(np.unique(targets)) < 4:
            return math.nan
        return roc_auc_score(targets, resampled_probs, multi_class="ovr", labels=LABELS)

    with pytest.warns(UserWarning, match=r"NaN on \d+ of 200 resamples"):
        point, low, high, resamples = bootstrap_ci(y_true, y_pred, probs, auc, n_resamples=200)
    assert low <= high and not math.isnan(point)
    assert 0 < resamples < 200  # the resamples that drew class 3 out are not behind the interval

    # Stratified: every resample keeps each class's count, so class 3's one participant is always there.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stratified = bootstrap_ci(y_true, y_pred, probs, auc, n_resamples=200, stratify=True)
    assert stratified.resamples == 200 and stratified.low <= stratified.high
