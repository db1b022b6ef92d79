"""The one figure a run draws: its best epoch's confusion matrix, participant level, as a PNG beside its predictions.

Built without pyplot (an Agg canvas, no global figure state). Drawing takes about 0.1 s and importing matplotlib
about a second, which is why only the recipe imports this module, and only for runs that fine-tune (see
`octft.train.recipe`).

    >>> write_confusion_figure(Path("demo/runs/demo"), CLASS_SHORT_NAMES)        # doctest: +SKIP
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from octft.train.metrics import checked_confusion, safe_divide, confusion_matrix


def confusion_matrix_figure(confusion: np.ndarray, class_names: Sequence[str], title: str) -> Figure:
    """A matplotlib figure of the confusion matrix: counts annotated, colour = share of the true class.

    Built without pyplot (an Agg canvas, no global figure state), ready for `mlflow.log_figure`.
    """
    counts = checked_confusion(confusion, class_names)
    num_classes = len(class_names)
    row_share = safe_divide(counts, counts.sum(axis=1, keepdims=True).repeat(num_classes, axis=1))
    figure = Figure(figsize=(2.0 + 1.3 * num_classes, 1.5 + 1.2 * num_classes), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.imshow(row_share, cmap="Blues", vmin=0.0, vmax=1.0)
    for true_index in range(num_classes):
        for predicted_index in range(num_classes):
            share = row_share[true_index, predicted_index]
            axes.text(
                predicted_index,
                true_index,
                f"{int(counts[true_index, predicted_index])}\n{share:.0%}",
                ha="center",
                va="center",
                color="white" if share > 0.5 else "black",
            )
    axes.set_xticks(range(num_classes), labels=list(class_names), rotation=30, ha="right")
    axes.set_yticks(range(num_classes), labels=list(class_names))
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(title)
    return figure


def write_confusion_figure(run_dir: Path, class_names: Sequence[str]) -> Path:
    """`best/confusion_matrix.png`, participant level, from the classes in `best/val_predictions.csv`."""
    index = {name: i for i, name in enumerate(class_names)}
    with (run_dir / "best" / "val_predictions.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    targets = np.asarray([index[row["true_class"]] for row in rows], dtype=np.int64)
    predictions = np.asarray([index[row["predicted_class"]] for row in rows], dtype=np.int64)
    confusion = confusion_matrix(targets, predictions, len(class_names))
    figure = confusion_matrix_figure(confusion, class_names, "validation, participant level (best epoch)")
    path = run_dir / "best" / "confusion_matrix.png"
    figure.savefig(path, dpi=100)
    return path
