"""Tracking: the small seam the training loop logs through. Its MLflow implementation, and everything else octft
does with MLflow, is `octft.track.mlflow_store`, the one module that imports mlflow; this one imports nothing heavy.

>>> tracker = NullTracker()                      # tests and dry runs: logs nothing
>>> tracker.log_metrics({"val/loss": 0.7}, step=1)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

RunStatus = Literal["FINISHED", "FAILED", "KILLED"]


@dataclass(frozen=True)
class RunDataset:
    """Data a run used: `table` (a pandas DataFrame) identified by `digest`, used for `context` ("training")."""

    table: Any
    name: str
    source: str
    digest: str
    context: str
    tags: dict[str, str] = field(default_factory=dict)


@runtime_checkable
class Tracker(Protocol):
    """What the training loop needs from an experiment tracker."""

    run_id: str | None

    def log_params(self, params: dict[str, object]) -> None:
        """Flat dotted keys, e.g. ``{"optim.lr_head": 3e-4}``; logging the same value again is fine."""
        ...

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """`step` is the epoch; NaN is logged as NaN."""
        ...

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...

    def log_figure(self, figure: Any, name: str) -> None:
        """A matplotlib figure, stored as a png."""
        ...

    def log_dict(self, obj: dict, name: str) -> None:
        """A json (default) or yaml (name ends in .yaml/.yml) artifact."""
        ...

    def set_tags(self, tags: dict[str, str]) -> None: ...

    def log_datasets(self, datasets: Sequence[RunDataset]) -> None:
        """The data the run used, all at once."""
        ...

    def finish(self, status: RunStatus, reason: str | None = None) -> None:
        """End the run; `reason` lands in the tag ``octft.end_reason``. Calling it again does nothing."""
        ...


class NullTracker:
    """A tracker that records nothing: for tests, dry runs and workers that must not log."""

    run_id: str | None = None

    def log_params(self, params: dict[str, object]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def log_figure(self, figure: Any, name: str) -> None:
        pass

    def log_dict(self, obj: dict, name: str) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def log_datasets(self, datasets: Sequence[RunDataset]) -> None:
        pass

    def finish(self, status: RunStatus, reason: str | None = None) -> None:
        pass


__all__ = ["NullTracker", "RunDataset", "RunStatus", "Tracker"]
