"""The one loss octft trains with, reported as `train/loss`; `val/loss` is the same function with no class weights
and no smoothing (`octft.train.loop.evaluate_logits`), so that it has one scale for every trial of a study.

Per row: class-weighted, label-smoothed cross-entropy (`row_losses`). Per batch: the mean over the real
rows, `sum(w * row_losses) / sum(w)` with `w` the 0/1 padding mask (`octft.train.step.train_step`). This is
NOT torch's weighted mean (`F.cross_entropy(..., weight=...)` divides by the summed class weight of the
targets): with balanced weights both have the same expectation, but only the row mean splits exactly into
micro-batches and devices, whose class mixes differ. Fixed shapes and no branch on tensor values, so
padded and full batches share one compiled graph.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F


def balanced_class_weights(labels: Sequence[int], num_classes: int) -> torch.Tensor:
    """Per-class weights `n_samples / (num_classes * count)`, as scikit-learn's 'balanced' weighting.

    Every class must occur in `labels` (the training split): a weight for a class with no samples is
    undefined, and a split that lacks a class cannot teach it.

    >>> balanced_class_weights([0, 0, 0, 1], num_classes=2)
    tensor([0.6667, 2.0000])
    """
    label_array = np.asarray(labels)
    if label_array.ndim != 1 or label_array.size == 0:
        raise ValueError(f"labels must be a non-empty 1-D sequence of class indices, got shape {label_array.shape}")
    if not np.issubdtype(label_array.dtype, np.integer):
        raise ValueError(f"labels must be integer class indices, got dtype {label_array.dtype}")
    out_of_range = np.unique(label_array[(label_array < 0) | (label_array >= num_classes)]).tolist()
    if out_of_range:
        raise ValueError(f"labels {out_of_range} are outside 0..{num_classes - 1}; check the label mapping")
    counts = np.bincount(label_array, minlength=num_classes)
    missing = [index for index in range(num_classes) if counts[index] == 0]
    if missing:
        raise ValueError(
            f"class index {missing} has no samples: the training split lacks it, so its balanced weight is "
            "undefined; rebuild the split so that every class is present in train"
        )
    weights = label_array.size / (num_classes * counts.astype(np.float64))
    return torch.tensor(weights, dtype=torch.float32)


def row_losses(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    class_weights: torch.Tensor | None = None,
    label_smoothing: float | torch.Tensor = 0.0,
) -> torch.Tensor:
    """(B,) float32 loss per row: `class_weights[target] * (1 - s) * nll + (s / C) * sum_c class_weights[c] * -log p_c`.

    Exactly `F.cross_entropy(logits, targets, weight=class_weights, label_smoothing=s, reduction="none")`
    (the smoothing mass is spread uniformly, each class term scaled by that class's weight), computed in
    float32 whatever the logits' dtype. Targets must be valid class indices: the step gives padding rows
    class 0 and weight 0.

    >>> logits, targets = torch.tensor([[2.0, 0.0], [0.0, 2.0]]), torch.tensor([0, 0])
    >>> row_losses(logits, targets, class_weights=torch.tensor([2.0, 1.0]))
    tensor([0.2539, 4.2539])
    """
    if logits.ndim != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"expected logits (B, C) and targets (B,), got {tuple(logits.shape)} and {tuple(targets.shape)}")
    if not isinstance(label_smoothing, torch.Tensor) and not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if class_weights is not None:
        if class_weights.shape != (logits.shape[1],):
            raise ValueError(f"class_weights must have shape ({logits.shape[1]},), got {tuple(class_weights.shape)}")
        class_weights = class_weights.to(device=logits.device, dtype=torch.float32)
    if isinstance(label_smoothing, torch.Tensor):
        # A (1,) device tensor, so that XLA takes it as graph data (a warm trial runner's next trial with
        # another value compiles nothing); F.cross_entropy wants a float, so the same formula written out.
        num_classes = logits.shape[1]
        weights = class_weights if class_weights is not None else torch.ones(num_classes, device=logits.device)
        log_probs = F.log_softmax(logits.float(), dim=1)
        nll = -log_probs.gather(1, targets[:, None]).squeeze(1) * weights[targets]
        smooth = -(log_probs * weights[None, :]).sum(dim=1)
        return (1.0 - label_smoothing) * nll + (label_smoothing / num_classes) * smooth
    return F.cross_entropy(logits.float(), targets, weight=class_weights, label_smoothing=label_smoothing, reduction="none")


def mean_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    class_weights: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
) -> float:
    """The training loss's value over a whole set of rows (no padding): the mean of `row_losses`.

    With no weights and no smoothing, what `val/loss` reports over participants' averaged logits.
    """
    if len(targets) == 0:
        return float("nan")
    return float(row_losses(logits, targets, class_weights=class_weights, label_smoothing=label_smoothing).mean())
