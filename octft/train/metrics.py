"""Metrics that cannot lie: every score derived on the host from the logits of one evaluation, in numpy.

The loop fetches a validation split's logits once per epoch; the confusion matrix is counted from their argmax
here (`confusion_matrix`), and every score comes from it:

>>> logits = np.array([[2.0, 0.0], [0.0, 1.0], [0.0, 3.0]])
>>> confusion = confusion_matrix(np.array([0, 0, 1]), logits.argmax(axis=1), 2)
>>> classification_metrics(confusion, class_names=["healthy", "insulin"])["balanced_accuracy"]
0.75

Conventions follow scikit-learn: rows are the true class, columns the predicted class, and every score
equals its scikit-learn counterpart on the same predictions (see `classification_metrics`).
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

# MLflow accepts these characters in metric keys; class names become part of the keys.
_KEY_SAFE = re.compile(r"^[A-Za-z0-9_.\-/ ]+$")


def confusion_matrix(targets: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """The (C, C) int64 confusion matrix on the host, as `sklearn.metrics.confusion_matrix(labels=range(C))`.

    >>> confusion_matrix(np.array([0, 1, 1]), np.array([0, 1, 0]), num_classes=2)
    array([[1, 0],
           [1, 1]])
    """
    targets, predictions = np.asarray(targets), np.asarray(predictions)
    if targets.ndim != 1 or targets.shape != predictions.shape:
        raise ValueError(
            f"targets and predictions must be 1-D of one length, got {targets.shape} and {predictions.shape}"
        )
    for name, values in (("targets", targets), ("predictions", predictions)):
        bad = np.unique(values[(values < 0) | (values >= num_classes)])
        if bad.size:
            raise ValueError(f"{name} hold {bad.tolist()}, outside the class indices 0..{num_classes - 1}")
    flat = targets.astype(np.int64) * num_classes + predictions.astype(np.int64)
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64, stable for large logits."""
    shifted = np.asarray(logits, dtype=np.float64)
    shifted = shifted - shifted.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def checked_confusion(confusion: np.ndarray, class_names: Sequence[str]) -> np.ndarray:
    confusion = np.asarray(confusion, dtype=np.float64)
    num_classes = len(class_names)
    if confusion.shape != (num_classes, num_classes):
        raise ValueError(
            f"confusion has shape {confusion.shape} but class_names has {num_classes} names {list(class_names)}"
        )
    if len(set(class_names)) != num_classes or not all(_KEY_SAFE.match(name) for name in class_names):
        raise ValueError(
            f"class_names {list(class_names)} must be distinct and use only letters, digits, '_', '-', '.', "
            "'/' or spaces (they become MLflow metric keys)"
        )
    if not np.all(np.isfinite(confusion)) or np.any(confusion < 0) or np.any(confusion != np.round(confusion)):
        raise ValueError(f"confusion must hold non-negative whole counts, got {confusion.tolist()}")
    if confusion.sum() == 0:
        raise ValueError("confusion is empty: no sample was counted (were all rows padding?)")
    return confusion


def safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, 0 where the denominator is 0 (scikit-learn's zero_division=0)."""
    return np.divide(numerator, denominator, out=np.zeros_like(numerator), where=denominator > 0)


def _auc_macro(probs: np.ndarray, targets: np.ndarray, confusion: np.ndarray, class_names: Sequence[str]) -> float:
    num_classes = len(class_names)
    probs, targets = np.asarray(probs, dtype=np.float64), np.asarray(targets)
    if targets.ndim != 1 or probs.shape != (targets.size, num_classes):
        raise ValueError(f"probs must be (N, {num_classes}) and targets (N,), got {probs.shape} and {targets.shape}")
    if not np.issubdtype(targets.dtype, np.integer):
        raise ValueError(f"targets must be integer class indices, got dtype {targets.dtype}")
    bad = np.unique(targets[(targets < 0) | (targets >= num_classes)])
    if bad.size:
        raise ValueError(f"targets hold {bad.tolist()}, outside the class indices 0..{num_classes - 1}")
    if not np.allclose(probs.sum(axis=1), 1.0):
        raise ValueError("probs rows must sum to 1; pass softmax(logits), not the logits")
    support = np.bincount(targets, minlength=num_classes)
    if not np.array_equal(support, confusion.sum(axis=1)):
        raise ValueError(
            f"targets count {support.tolist()} samples per class but the confusion rows count "
            f"{confusion.sum(axis=1).astype(np.int64).tolist()}: probs/targets and the confusion must describe "
            "the same samples"
        )
    absent = [name for name, count in zip(class_names, support) if count == 0]
    if absent:
        warnings.warn(
            f"auc_macro is NaN: class(es) {absent} never occur in the targets, so their one-vs-rest ROC AUC "
            "is undefined",
            stacklevel=3,
        )
        return math.nan
    return float(np.mean([_roc_auc(probs[:, c], targets == c) for c in range(num_classes)]))


def _roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """One-vs-rest ROC AUC as a rank sum (Mann-Whitney U, ties counted half): scikit-learn's `roc_auc_score`
    to float precision, without its input checks, which cost about 7 ms a call (twice an epoch, every epoch)."""
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    mean_ranks = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based rank of each distinct score, ties averaged
    positives = int(positive.sum())
    negatives = positive.size - positives
    rank_sum = mean_ranks[inverse.reshape(-1)][positive].sum()
    return float((rank_sum - positives * (positives + 1) / 2.0) / (positives * negatives))


def classification_metrics(
    confusion: np.ndarray,
    *,
    probs: np.ndarray | None = None,
    targets: np.ndarray | None = None,
    class_names: Sequence[str],
) -> dict[str, float]:
    """Scores from a confusion matrix (rows true, columns predicted), plus ROC AUC when given probs.

    Returns `accuracy`, `balanced_accuracy`, `macro_f1`, and per class `f1_<name>`, `precision_<name>`,
    `recall_<name>`, `pred_frac_<name>` (share of predictions), each equal to scikit-learn's on the same
    predictions: precision/recall/F1 with `zero_division=0` over all `class_names` (a class never predicted
    or never present scores 0 and counts in `macro_f1`). `balanced_accuracy` is the mean recall over the
    classes present in the targets: like `balanced_accuracy_score`, absent classes are left out, with a
    warning naming them. With `probs` (N, C) and `targets` (N,), `auc_macro` is the one-vs-rest macro ROC
    AUC; it is NaN, with a warning, when a class is absent from the targets.

    >>> confusion = np.array([[3, 1], [0, 2]])
    >>> scores = classification_metrics(confusion, class_names=["healthy", "insulin"])
    >>> scores["accuracy"], scores["recall_healthy"], scores["pred_frac_insulin"]
    (0.8333333333333334, 0.75, 0.5)
    """
    if (probs is None) != (targets is None):
        raise ValueError("pass probs and targets together (for auc_macro), or neither")
    confusion = checked_confusion(confusion, class_names)
    true_positives = np.diag(confusion)
    support = confusion.sum(axis=1)
    predicted = confusion.sum(axis=0)
    total = confusion.sum()

    precision = safe_divide(true_positives, predicted)
    recall = safe_divide(true_positives, support)
    f1 = safe_divide(2 * true_positives, support + predicted)
    present = support > 0
    if not present.all():
        absent = [name for name, here in zip(class_names, present) if not here]
        warnings.warn(
            f"balanced_accuracy leaves out class(es) {absent}: they never occur in the targets "
            "(scikit-learn's balanced_accuracy_score does the same)",
            stacklevel=2,
        )

    scores = {
        "accuracy": float(true_positives.sum() / total),
        "balanced_accuracy": float(recall[present].mean()),
        "macro_f1": float(f1.mean()),
    }
    for index, name in enumerate(class_names):
        scores[f"f1_{name}"] = float(f1[index])
        scores[f"precision_{name}"] = float(precision[index])
        scores[f"recall_{name}"] = float(recall[index])
        scores[f"pred_frac_{name}"] = float(predicted[index] / total)
    if probs is not None and targets is not None:
        scores["auc_macro"] = _auc_macro(probs, targets, confusion, class_names)
    return scores


def aggregate_by_participant(
    participant_ids: Sequence[str], logits: np.ndarray, targets: np.ndarray
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """One row per participant: the mean of their volumes' logits and their (single) target.

    Participants come back in order of first appearance. Participant probabilities are
    `softmax(mean_logits)`. A participant whose volumes disagree on the target is an error, since the
    labels are per participant.

    >>> ids, mean_logits, labels = aggregate_by_participant(
    ...     ["1001", "1002", "1001"], np.array([[2.0, 0.0], [0.0, 1.0], [0.0, 0.0]]), np.array([0, 1, 0]))
    >>> ids, mean_logits.tolist(), labels.tolist()
    (['1001', '1002'], [[1.0, 0.0], [0.0, 1.0]], [0, 1])
    """
    ids = np.asarray([str(participant_id) for participant_id in participant_ids])
    logits, targets = np.asarray(logits, dtype=np.float64), np.asarray(targets)
    if logits.ndim != 2 or ids.shape != logits.shape[:1] or targets.shape != logits.shape[:1]:
        raise ValueError(
            f"expected participant_ids (N,), logits (N, C) and targets (N,), got {ids.shape}, {logits.shape} "
            f"and {targets.shape}"
        )
    if ids.size == 0:
        raise ValueError("no volumes to aggregate: participant_ids is empty")
    if not np.issubdtype(targets.dtype, np.integer):
        raise ValueError(f"targets must be integer class indices, got dtype {targets.dtype}")
    unique_ids, group, participant_targets = _participant_groups(ids, targets)
    return unique_ids.tolist(), _group_means(logits, group), participant_targets


def _participant_groups(ids: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The participants in order of first appearance, each row's participant index, and each participant's target."""
    sorted_ids, first_index, group = np.unique(ids, return_index=True, return_inverse=True)
    # np.unique sorts; renumber the groups by first appearance so the output follows the input order.
    order = np.argsort(first_index, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    group = rank[group]
    unique_ids = sorted_ids[order]

    lowest = np.full(unique_ids.size, np.iinfo(np.int64).max)
    highest = np.full(unique_ids.size, np.iinfo(np.int64).min)
    np.minimum.at(lowest, group, targets.astype(np.int64))
    np.maximum.at(highest, group, targets.astype(np.int64))
    conflicting = np.flatnonzero(lowest != highest)
    if conflicting.size:
        participant = unique_ids[conflicting[0]]
        seen = sorted(set(targets[ids == participant].tolist()))
        raise ValueError(
            f"participant {participant} has volumes with different targets {seen}; a participant has one "
            f"label, so fix the labels table or the volume-to-participant mapping "
            f"({conflicting.size} participant(s) conflict)"
        )
    return unique_ids, group, lowest


def _group_means(logits: np.ndarray, group: np.ndarray) -> np.ndarray:
    """(..., P, C) means of the (..., N, C) float64 logits over each group's rows, summed in row order.

    The order is fixed so that one head scored alone (`aggregate_by_participant`) and K heads scored at once
    (`evaluate_logits_many`) get the same bits: a participant whose mean ties another's, or ties between two
    classes, must fall the same way in the argmax and in the AUC's ranks.
    """
    counts = np.bincount(group)
    rows_by_group = np.argsort(group, kind="stable")
    starts = np.cumsum(counts) - counts
    sums = logits[..., rows_by_group[starts], :]  # every group's first row
    for occurrence in range(1, int(counts.max())):
        members = counts > occurrence
        sums[..., members, :] += logits[..., rows_by_group[starts[members] + occurrence], :]
    return sums / counts[:, None]


def evaluate_logits_many(
    logits: np.ndarray, targets: np.ndarray, participant_ids: Sequence[str], class_names: Sequence[str]
) -> list[dict[str, float]]:
    """`octft.train.loop.evaluate_logits` for K heads scored on the same rows: logits (K, N, C), one dict per head.

    Head k's dict has `evaluate_logits(logits[k], ...)`'s keys in its order and its values: the scores to 1e-12
    (the participant means are summed in the same order, so argmax and rank ties fall the same way) and
    `val/loss` to about 1e-7 relative (here float64 cross-entropy of the float32-rounded participant means;
    `mean_loss` computes it in float32 torch, which this module does not import). The participant grouping,
    the argmax, the confusion counts and the AUC's ranks are computed once for all heads, so 50 heads on
    100 rows cost about what three single calls do. Like `evaluate_logits`, no warning for an absent class:
    its AUC is NaN and `val/classes_present` says so.

    >>> logits = np.array([[[2.0, 0.0], [0.0, 1.0], [1.0, 0.0]], [[0.0, 2.0], [0.0, 1.0], [1.0, 0.0]]])
    >>> heads = evaluate_logits_many(logits, np.array([0, 1, 0]), ["1001", "1002", "1003"], ["healthy", "insulin"])
    >>> [head["val/accuracy"] for head in heads], heads[0]["val/participants"]
    ([1.0, 0.6666666666666666], 3.0)
    """
    num_classes = len(class_names)
    ids = np.asarray([str(participant_id) for participant_id in participant_ids])
    logits, targets = np.asarray(logits, dtype=np.float64), np.asarray(targets)
    if logits.ndim != 3 or logits.shape[2] != num_classes or not ids.shape == targets.shape == logits.shape[1:2]:
        raise ValueError(
            f"expected logits (K, N, {num_classes}), participant_ids (N,) and targets (N,), got {logits.shape}, "
            f"{ids.shape} and {targets.shape}"
        )
    if ids.size == 0 or logits.shape[0] == 0:
        raise ValueError(f"nothing to score: logits has shape {logits.shape} (no heads or no rows)")
    if not np.issubdtype(targets.dtype, np.integer):
        raise ValueError(f"targets must be integer class indices, got dtype {targets.dtype}")
    if not np.all(np.isfinite(logits)):
        bad_heads = np.flatnonzero(~np.isfinite(logits).all(axis=(1, 2))).tolist()
        raise ValueError(f"logits of head(s) {bad_heads} are not finite (NaN or inf); their scores are undefined")
    volume_confusion = _confusions(targets, logits.argmax(axis=2), num_classes)
    checked_confusion(volume_confusion.sum(axis=0), class_names)  # targets in range, class names usable as keys

    unique_ids, group, participant_targets = _participant_groups(ids, targets)
    mean_logits = _group_means(logits, group)
    participant_confusion = _confusions(participant_targets, mean_logits.argmax(axis=2), num_classes)
    participant = _scores_many(participant_confusion, softmax(mean_logits), participant_targets, class_names)
    volume = _scores_many(volume_confusion, softmax(logits), targets, class_names)
    losses = _cross_entropy(mean_logits.astype(np.float32).astype(np.float64), participant_targets).tolist()
    counts = {
        "val/participants": float(unique_ids.size),
        "val/classes_present": float(np.unique(participant_targets).size),
    }
    return [
        {
            "val/loss": loss,
            **{f"val/{key}": value for key, value in participant_scores.items()},
            **{f"val_volume/{key}": value for key, value in volume_scores.items()},
            **counts,
        }
        for loss, participant_scores, volume_scores in zip(losses, participant, volume)
    ]


def _confusions(targets: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """(K, C, C) confusion matrices of (K, M) predictions against one (M,) targets, in one count."""
    heads = np.arange(predictions.shape[0])[:, None]
    flat = (heads * num_classes + targets.astype(np.int64)) * num_classes + predictions
    counts = np.bincount(flat.ravel(), minlength=predictions.shape[0] * num_classes**2)
    return counts.reshape(-1, num_classes, num_classes)


def _scores_many(
    confusion: np.ndarray, probs: np.ndarray, targets: np.ndarray, class_names: Sequence[str]
) -> list[dict[str, float]]:
    """`classification_metrics(confusion[k], probs=probs[k], targets=targets, ...)` for each head k, no warnings."""
    confusion = confusion.astype(np.float64)
    true_positives = np.diagonal(confusion, axis1=1, axis2=2)
    support = confusion.sum(axis=2)
    predicted = confusion.sum(axis=1)
    total = confusion.sum(axis=(1, 2))[:, None]
    precision = safe_divide(true_positives, predicted)
    recall = safe_divide(true_positives, support)
    f1 = safe_divide(2 * true_positives, support + predicted)
    present = np.bincount(targets, minlength=len(class_names)) > 0  # the same for every head

    columns = {
        "accuracy": true_positives.sum(axis=1) / total[:, 0],
        "balanced_accuracy": recall[:, present].mean(axis=1),
        "macro_f1": f1.mean(axis=1),
    }
    for index, name in enumerate(class_names):
        columns[f"f1_{name}"] = f1[:, index]
        columns[f"precision_{name}"] = precision[:, index]
        columns[f"recall_{name}"] = recall[:, index]
        columns[f"pred_frac_{name}"] = predicted[:, index] / total[:, 0]
    # A class absent from the targets has no one-vs-rest AUC, so neither has the macro mean.
    if present.all():
        columns["auc_macro"] = _roc_auc_many(probs, targets).mean(axis=1)
    else:
        columns["auc_macro"] = np.full(len(probs), math.nan)
    keys, rows = list(columns), zip(*(column.tolist() for column in columns.values()))
    return [dict(zip(keys, row)) for row in rows]


def _roc_auc_many(probs: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """(K, C) one-vs-rest ROC AUC of (K, M, C) probs, as `_roc_auc` on each head and class: ranks along the rows,
    ties averaged (the mean of a tied run's first and last 1-based rank, exactly `_roc_auc`'s), as a rank sum."""
    scores = np.ascontiguousarray(np.moveaxis(probs, 2, 1))  # (K, C, M): sorting along a contiguous axis is faster
    rows = scores.shape[2]
    order = np.argsort(scores, axis=2)  # the order within a tied run does not matter: the run shares one rank
    ranked = np.take_along_axis(scores, order, axis=2)
    position = np.arange(rows)
    run_starts = np.ones(ranked.shape, dtype=bool)
    run_starts[..., 1:] = ranked[..., 1:] != ranked[..., :-1]
    run_ends = np.ones(ranked.shape, dtype=bool)
    run_ends[..., :-1] = run_starts[..., 1:]
    first = np.maximum.accumulate(np.where(run_starts, position, 0), axis=2)
    last = np.minimum.accumulate(np.where(run_ends, position, rows)[..., ::-1], axis=2)[..., ::-1]
    mean_ranks = (first + last) / 2.0 + 1.0

    classes = np.arange(scores.shape[1])[:, None]
    positive = targets[order] == classes  # (K, C, M): is the row at each sorted place of class c
    positives = np.bincount(targets, minlength=scores.shape[1]).astype(np.float64)
    negatives = rows - positives
    rank_sum = np.where(positive, mean_ranks, 0.0).sum(axis=2)
    return (rank_sum - positives * (positives + 1) / 2.0) / (positives * negatives)


def _cross_entropy(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """(K,) mean plain cross-entropy of (K, M, C) logits against (M,) targets, in float64."""
    shift = logits.max(axis=2, keepdims=True)
    log_normaliser = np.log(np.exp(logits - shift).sum(axis=2)) + shift[..., 0]
    chosen = logits[:, np.arange(len(targets)), targets]
    return (log_normaliser - chosen).mean(axis=1)


class BootstrapInterval(NamedTuple):
    """A score on all rows and its bootstrap interval; `resamples` counts the resamples behind the interval
    (fewer than asked for when the score was undefined on some)."""

    point: float
    low: float
    high: float
    resamples: int


def bootstrap_ci(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    probs: np.ndarray | None,
    metric: Callable[[np.ndarray, np.ndarray, np.ndarray | None], float],
    n_resamples: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    *,
    stratify: bool = False,
) -> BootstrapInterval:
    """`metric` on all rows, and its percentile bootstrap (1 - alpha) interval.

    Rows are participants (aggregate volumes first), resampled with replacement; with `stratify`, within
    each class of `y_true`, so every resample keeps the class counts and no class is ever drawn out (a
    per-class score then never meets an empty class). `metric` is called as `metric(y_true, y_pred, probs)`
    (probs is None when not given). Resamples where the metric is NaN (a class drawn out, say) are left out
    of the interval, with a warning giving their count; `resamples` says how many remain.

    >>> y = np.array([0, 1] * 20)
    >>> accuracy = lambda y_true, y_pred, _: float((y_true == y_pred).mean())
    >>> bootstrap_ci(y, y, None, accuracy, n_resamples=100)
    BootstrapInterval(point=1.0, low=1.0, high=1.0, resamples=100)
    """
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_true.ndim != 1 or y_true.shape != y_pred.shape or y_true.size == 0:
        raise ValueError(
            f"y_true and y_pred must be non-empty 1-D of one length, got {y_true.shape} and {y_pred.shape}"
        )
    if probs is not None and np.asarray(probs).shape[0] != y_true.size:
        raise ValueError(f"probs has {np.asarray(probs).shape[0]} rows but y_true has {y_true.size}")
    if n_resamples < 1 or not 0.0 < alpha < 1.0:
        raise ValueError(f"need n_resamples >= 1 and 0 < alpha < 1, got n_resamples={n_resamples}, alpha={alpha}")
    probs = None if probs is None else np.asarray(probs)
    strata = [np.flatnonzero(y_true == label) for label in np.unique(y_true)] if stratify else [np.arange(y_true.size)]

    point = float(metric(y_true, y_pred, probs))
    rng = np.random.default_rng(seed)
    values = np.empty(n_resamples)
    for resample in range(n_resamples):
        rows = np.concatenate([stratum[rng.integers(0, stratum.size, size=stratum.size)] for stratum in strata])
        values[resample] = metric(y_true[rows], y_pred[rows], None if probs is None else probs[rows])
    defined = values[~np.isnan(values)]
    if defined.size < n_resamples:
        warnings.warn(
            f"bootstrap_ci: the metric is NaN on {n_resamples - defined.size} of {n_resamples} resamples; "
            "the interval uses the rest",
            stacklevel=2,
        )
    if defined.size == 0:
        return BootstrapInterval(point, math.nan, math.nan, 0)
    low, high = np.quantile(defined, [alpha / 2, 1 - alpha / 2])
    return BootstrapInterval(point, float(low), float(high), int(defined.size))


def is_collapsed(
    pred_frac: Sequence[float],
    balanced_accuracy: float,
    n_classes: int,
    max_class_share: float,
    chance_margin: float,
) -> tuple[bool, str]:
    """Whether a classifier has collapsed, and why: the one definition the loop and the sweep's pruner share.

    Collapsed means one class takes at least `max_class_share` of the predictions, or balanced accuracy
    is at most chance (1 / n_classes) plus `chance_margin`, or balanced accuracy is NaN.

    >>> is_collapsed([0.97, 0.01, 0.01, 0.01], 0.26, n_classes=4, max_class_share=0.9, chance_margin=0.05)[0]
    True
    """
    shares = [float(share) for share in pred_frac]
    if len(shares) != n_classes:
        raise ValueError(f"pred_frac has {len(shares)} entries but n_classes is {n_classes}")
    if not 1.0 / n_classes <= max_class_share <= 1.0 or chance_margin < 0:
        raise ValueError(
            f"need 1/n_classes <= max_class_share <= 1 and chance_margin >= 0, got max_class_share="
            f"{max_class_share}, chance_margin={chance_margin}"
        )
    top_class = int(np.argmax(shares))
    chance = 1.0 / n_classes
    reasons = []
    if shares[top_class] >= max_class_share:
        reasons.append(
            f"class {top_class} takes {shares[top_class]:.1%} of predictions (limit {max_class_share:.1%})"
        )
    if math.isnan(balanced_accuracy):
        reasons.append("balanced accuracy is NaN")
    elif balanced_accuracy <= chance + chance_margin:
        reasons.append(
            f"balanced accuracy {balanced_accuracy:.3f} is within {chance_margin:.3f} of chance {chance:.3f}"
        )
    if reasons:
        return True, "collapsed: " + "; ".join(reasons)
    return False, (
        f"not collapsed: top class {top_class} takes {shares[top_class]:.1%} of predictions, "
        f"balanced accuracy {balanced_accuracy:.3f} vs chance {chance:.3f}"
    )
