"""LP-FT: start a run's head from another run's trained head (`init.head_from`).

`init.head_from` is `runs:/<MLflow run id>` (that run's best checkpoint, as every run logs it), or a
sweep file (a probe study) whose best trial is resolved to its run. A sweep resolves the file once, at
launch, and records the run it chose, so every trial and every replay command means the same head:

    >>> resolve_head_from("sweeps/probe.yaml")                    # doctest: +SKIP
    'runs:/3f2a...'
    >>> load_head(model, "runs:/3f2a...", tracking_uri)           # doctest: +SKIP
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from octft.errors import OctftError

RUNS_PREFIX = "runs:/"
# The settings that shape a head: a warm start needs the same ones, so the sweep takes them from the run.
HEAD_KEYS = ("model.head", "model.head_hidden_features", "model.head_dropout")


class HeadFromError(OctftError, ValueError):
    """`init.head_from` names nothing usable; the message says what it named and what to do."""


def is_run_uri(value: str) -> bool:
    return value.startswith(RUNS_PREFIX) and len(value) > len(RUNS_PREFIX)


def resolve_head_from(value: str, *, storage: str | None = None) -> str:
    """`runs:/<id>` as it is; a sweep file -> `runs:/<run id of its best COMPLETE trial>`."""
    if is_run_uri(value):
        return value.rstrip("/")
    if not value.endswith((".yaml", ".yml")):
        raise HeadFromError(
            f"init.head_from={value!r} is neither runs:/<MLflow run id> nor a sweep file (sweeps/<name>.yaml)"
        )
    import optuna

    from octft.sweep.spec import load_sweep
    from octft.sweep.study import open_storage

    spec = load_sweep(value)
    if storage:
        spec.storage = storage
    try:
        study = optuna.load_study(study_name=spec.study_name, storage=open_storage(spec.storage, heartbeat_interval=None))
    except KeyError:
        raise HeadFromError(
            f"init.head_from={value!r}: study {spec.study_name!r} does not exist in {spec.storage_redacted}; "
            f"run `octft sweep launch {value}` first"
        ) from None
    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE" and t.value is not None]
    if not complete:
        raise HeadFromError(f"init.head_from={value!r}: study {spec.study_name!r} has no COMPLETE trial yet")
    best = study.best_trial
    run_id = best.user_attrs.get("mlflow_run_id")
    if not run_id:
        raise HeadFromError(f"init.head_from={value!r}: best trial {best.number} recorded no MLflow run")
    return f"{RUNS_PREFIX}{run_id}"


def load_head(model, head_from: str, tracking_uri: str | None) -> str:
    """Load the head weights of `head_from` (a `runs:/<id>` URI) into `model.head`; return the run id.

    Only the head moves: LP-FT starts fine-tuning from the probe's head over this run's own encoder.
    """
    if not is_run_uri(head_from):
        raise HeadFromError(f"init.head_from={head_from!r} must be runs:/<run id> here (a sweep resolves files at launch)")
    run_id = head_from[len(RUNS_PREFIX):].strip("/")
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from octft.track import resolve_tracking_uri
    from octft.train.runtime import load_state

    with tempfile.TemporaryDirectory() as folder:
        try:
            path = MlflowClient(resolve_tracking_uri(tracking_uri)).download_artifacts(run_id, "checkpoint/best.pt", folder)
        except MlflowException as error:
            raise HeadFromError(
                f"init.head_from={head_from!r}: no checkpoint/best.pt in that run ({str(error).splitlines()[0]}); "
                "name a finished run of this tracking store"
            ) from None
        state = load_state(Path(path))["model"]
    head_state = {name.removeprefix("head."): value for name, value in state.items() if name.startswith("head.")}
    try:
        model.head.load_state_dict(head_state, strict=True)
    except RuntimeError as error:
        raise HeadFromError(
            f"init.head_from={head_from!r}: its head does not fit this model's ({' '.join(str(error).split())[:400]}); "
            "use the same model.head and model.head_hidden_features as the probe run"
        ) from None
    return run_id


def head_settings(head_from: str, tracking_uri: str | None) -> dict[str, str]:
    """The `HEAD_KEYS` values the run of `head_from` (`runs:/<id>`) was trained with, as logged (strings)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from octft.track import resolve_tracking_uri

    run_id = head_from[len(RUNS_PREFIX):].strip("/")
    try:
        params = MlflowClient(resolve_tracking_uri(tracking_uri)).get_run(run_id).data.params
    except MlflowException as error:
        raise HeadFromError(f"init.head_from={head_from!r}: {str(error).splitlines()[0]}") from None
    return {key: params[key] for key in HEAD_KEYS if key in params}
