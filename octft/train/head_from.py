"""LP-FT: start a run's head from another run's trained head (`init.head_from: runs:/<MLflow run id>`).

Only the head moves: the run fine-tunes its own encoder from the probe's head. A sweep may name a probe sweep
file instead; it resolves that to one run at launch (`octft.sweep.plan`), so every trial and every replay
command names the same `runs:/<id>` here.

    >>> load_head(model, head_state("runs:/3f2a...", MlflowStore(tracking_uri)), "runs:/3f2a...")  # doctest: +SKIP

This module imports no torch (a sweep's workers read `head_settings`); `octft.train.recipe.head_state` downloads the
weights.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from octft.errors import MissingInputError, OctftError
from octft.train.provenance import provenance_mismatch

if TYPE_CHECKING:
    from octft.track.mlflow_store import MlflowStore

RUNS_PREFIX = "runs:/"
# The settings that shape a head: a warm start needs the same ones, so a sweep takes them from the run.
HEAD_KEYS = ("model.head", "model.head_hidden_features", "model.head_dropout")


class HeadFromError(OctftError, ValueError):
    """`init.head_from` names nothing usable; the message says what it named and what to do."""


def is_run_uri(value: str) -> bool:
    return value.startswith(RUNS_PREFIX) and len(value.strip("/")) > len(RUNS_PREFIX)


def run_id_of(head_from: str) -> str:
    if not is_run_uri(head_from):
        raise HeadFromError(f"init.head_from={head_from!r} must be runs:/<MLflow run id> here (a sweep resolves a "
                            "probe sweep file to its best run when it launches)")
    return head_from[len(RUNS_PREFIX):].strip("/")


def load_head(model, state: dict, head_from: str) -> None:
    """Load `state` (`octft.train.recipe.head_state` of `head_from`) into `model.head`, refusing another shape."""
    try:
        model.head.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise HeadFromError(
            f"init.head_from={head_from!r}: its head does not fit this model's ({' '.join(str(error).split())[:400]}); "
            "use the same model.head and model.head_hidden_features as the probe run"
        ) from None


def check_provenance(head_from: str, head_tags: dict[str, str], expected: dict[str, str]) -> None:
    """Refuse a head trained on anything but this run's data, split, encoder checkpoint, class order and
    preprocessing (`octft.train.provenance`), naming the field and both values."""
    mismatch = provenance_mismatch(head_tags, expected)
    if mismatch:
        raise HeadFromError(f"init.head_from={head_from!r} {mismatch}; use a probe run on this data, split, encoder "
                            "checkpoint, class order and preprocessing")


def head_settings(head_from: str, store: MlflowStore) -> dict[str, str]:
    """The `HEAD_KEYS` values the run of `head_from` was trained with, as logged (strings)."""
    try:
        params = store.run(run_id_of(head_from)).params
    except MissingInputError as error:
        raise HeadFromError(f"init.head_from={head_from!r}: {error}") from None
    return {key: params[key] for key in HEAD_KEYS if key in params}
