"""Class-balanced, label-smoothed cross-entropy that ignores the padding rows of a fixed-shape batch.

XLA compiles one graph per input shape, so the last batch of an epoch is padded to full size and carries a
0/1 `weights` mask instead of being shorter. The loss below is written with fixed shapes and no Python
branch on tensor values, so padded and full batches share one compiled graph.
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


def weighted_cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor,
    class_weights: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Mean class-weighted, label-smoothed cross-entropy over the real (weight 1) rows of a padded batch.

    Equals `F.cross_entropy(logits[real], targets[real], weight=class_weights,
    label_smoothing=label_smoothing)`: like torch, the weighted mean divides by the summed class weight of
    the real rows' targets. Padding rows (weight 0) add nothing to the value or the gradient, whatever
    their logits or targets hold. Computed in float32 whatever the logits' dtype.

    >>> logits, targets = torch.randn(4, 3), torch.tensor([0, 2, 1, 0])
    >>> mask = torch.tensor([1.0, 1.0, 1.0, 0.0])  # the last row is padding
    >>> loss = weighted_cross_entropy(logits, targets, mask, torch.tensor([1.0, 2.0, 0.5]))
    >>> torch.allclose(loss, F.cross_entropy(logits[:3], targets[:3], weight=torch.tensor([1.0, 2.0, 0.5])))
    True
    """
    row_losses, row_weights = weighted_cross_entropy_terms(logits, targets, weights, class_weights, label_smoothing)
    # An all-padding batch has a zero denominator; the clamp makes its loss 0 instead of NaN and changes
    # nothing else, since any real row contributes a class weight far above `tiny`.
    return row_losses.sum() / row_weights.sum().clamp_min(torch.finfo(torch.float32).tiny)


def weighted_cross_entropy_terms(
    logits: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor,
    class_weights: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row numerator and denominator of `weighted_cross_entropy`, both (B,) float32.

    `row_losses.sum() / row_weights.sum()` is the loss. Split micro-batches (gradient accumulation) or
    devices reproduce the whole batch's loss exactly by dividing each part's `row_losses.sum()` by the
    whole batch's `row_weights.sum()`; a per-part mean would weigh the parts wrongly. Padding rows are 0
    in both.
    """
    if logits.ndim != 2 or targets.shape != logits.shape[:1] or weights.shape != logits.shape[:1]:
        raise ValueError(
            f"expected logits (B, C), targets (B,) and weights (B,), got {tuple(logits.shape)}, "
            f"{tuple(targets.shape)} and {tuple(weights.shape)}"
        )
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    num_classes = logits.shape[1]
    if class_weights is None:
        class_weights = torch.ones(num_classes, device=logits.device)
    if class_weights.shape != (num_classes,):
        raise ValueError(f"class_weights must have shape ({num_classes},), got {tuple(class_weights.shape)}")

    weights = weights.float()
    class_weights = class_weights.to(device=logits.device, dtype=torch.float32)
    real = weights > 0
    # Padding rows may hold anything (a -1 target, NaN logits from an empty input); zero them before any op
    # so that neither the forward value nor log_softmax's backward can carry them into the real rows.
    safe_targets = torch.where(real, targets, torch.zeros_like(targets))
    safe_logits = torch.where(real[:, None], logits.float(), torch.zeros_like(logits, dtype=torch.float32))

    log_probs = F.log_softmax(safe_logits, dim=1)
    row_weights = class_weights[safe_targets] * weights
    nll = -log_probs.gather(1, safe_targets[:, None]).squeeze(1) * row_weights
    # torch spreads the smoothing mass uniformly, each class term scaled by that class's weight.
    smooth = -(log_probs * class_weights[None, :]).sum(dim=1) * weights
    row_losses = (1.0 - label_smoothing) * nll + (label_smoothing / num_classes) * smooth
    return row_losses, row_weights
