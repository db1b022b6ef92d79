"""What a study records, typed: one record per trial, one per reported epoch, and the study's own.

A trial's `TrialRecord` lives in one user attr (`octft.trial`) and is written whole at each change of state: when
the trial is queued (enqueued from a warm start, or a retry of a trial whose worker died), when a worker starts it,
and when it ends, before Optuna is told (Optuna refuses attrs on finished trials). `sweep status`, `sweep show`,
promotion, the report and the warm start all read it; nothing else about a trial is kept in string attrs. A
retry starts from a record of its own that only links to the attempt it replaces (`retry_of`).

Each reported epoch's `EpochRecord` (`octft.epoch.<n>`) is the evidence the collapse pruner judges.

    >>> record = TrialRecord(status="running", overrides=["optim.lr_head=0.001"], unfreeze_epoch=2)
    >>> TrialRecord.from_dict(record.to_dict()) == record
    True
"""

from __future__ import annotations

import json
import socket
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from optuna.trial import FrozenTrial, TrialState

from octft.data.layout import CLASS_SHORT_NAMES

RECORD_FORMAT = 1
TRIAL_ATTR = "octft.trial"
EPOCH_ATTR_PREFIX = "octft.epoch."
# Study attrs: the launch plan's reference (format, config digest, overrides, parent run, launches), the LP-FT
# head a study resolved once, the warm-start sets it enqueued, its champion and its test evaluations.
PLAN_ATTR = "octft.plan"
HEAD_FROM_ATTR = "octft.head_from"
ENQUEUED_ATTR = "octft.enqueued"
CHAMPION_ATTR = "octft.champion"
TEST_EVALUATION_PREFIX = "octft.test_evaluation.trial_"
# Attrs an octft from before launch plans left on a study: such a study is refused, not adopted.
PRE_PLAN_ATTRS = ("spec_path", "cli_overrides", "mlflow_parent_run_id", "launches")

ENDED = ("completed", "early_stopped", "pruned", "failed")


@dataclass
class TrialOutcome:
    """How a trial ended, as its runner saw it (or, when the runner died, its worker).

    `status`: "completed", "early_stopped", "pruned" or "failed" (`stop_reason` then says why). `best_value` is the
    sweep's objective at the trial's best epoch: the value told to Optuna and the one its replay command reaches.
    `compiles`: XLA compiles this trial caused, not its runner's total. `run_status`: how the runner ended the
    trial's MLflow run (None: it did not).
    """

    status: str
    best_value: float | None = None
    best_epoch: int | None = None
    epochs_run: int | None = None
    best_metrics: dict[str, float] = field(default_factory=dict)
    stop_reason: str | None = None
    prune_reason: str | None = None  # collapse, median, ...
    prune_epoch: int | None = None
    prune_detail: str | None = None
    compiles: int = 0
    compile_seconds: float = 0.0
    epoch_seconds: float = 0.0  # the epochs' own time
    seconds: float = 0.0  # the whole trial inside its runner
    runner_pid: int | None = None
    runner_trials: int = 0  # trials this runner has run, this one included (1: a fresh runner)
    runner_rss_bytes: int | None = None
    run_status: str | None = None

    @property
    def succeeded(self) -> bool:
        return self.status in ("completed", "early_stopped") and self.best_value is not None

    def to_json(self) -> str:
        return json.dumps(asdict(self), default=str)

    @classmethod
    def from_json(cls, text: str) -> "TrialOutcome":
        return cls(**json.loads(text))


@dataclass
class TrialRecord:
    """One trial: where it came from, what it ran (its overrides, exactly its replay command's), where its run and
    files are, and how it ended."""

    status: str = "waiting"  # waiting | running | one of ENDED
    worker: int | None = None
    host: str | None = None
    run_dir: str | None = None
    overrides: list[str] = field(default_factory=list)
    replay: str | None = None
    mlflow_run_id: str | None = None
    runner_pid: int | None = None  # the process that trains it (the worker's own, for an in-process runner)
    unfreeze_epoch: int = 0  # from which epoch the encoder trains: stop rules count from it (0 for a probe)
    retry_of: int | None = None  # the trial whose dead attempt this one replaces
    enqueued_from: str | None = None  # the warm-start source of its params
    outcome: TrialOutcome | None = None
    format: int = RECORD_FORMAT

    @property
    def fail_reason(self) -> str | None:
        return self.outcome.stop_reason if self.outcome is not None and self.outcome.status == "failed" else None

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self), default=str))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrialRecord":
        known = {item.name for item in fields(cls)}
        values = {key: value for key, value in data.items() if key in known}
        if values.get("outcome") is not None:
            values["outcome"] = TrialOutcome(**values["outcome"])
        return cls(**values)

    def save(self, storage, trial_id: int) -> None:
        storage.set_trial_user_attr(trial_id, TRIAL_ATTR, self.to_dict())


def trial_record(trial: FrozenTrial) -> TrialRecord:
    """The trial's record; an empty waiting one for a trial no octft worker has touched (enqueued with Optuna)."""
    data = trial.user_attrs.get(TRIAL_ATTR)
    return TrialRecord.from_dict(data) if isinstance(data, dict) else TrialRecord()


@dataclass(frozen=True)
class EpochRecord:
    """What the collapse pruner judges of one reported epoch: the share of predictions per class and balanced
    accuracy (`octft.train.metrics.is_collapsed`)."""

    pred_frac: list[float]
    balanced_accuracy: float

    @staticmethod
    def attr(epoch: int) -> str:
        return f"{EPOCH_ATTR_PREFIX}{epoch}"

    @classmethod
    def of(cls, trial: FrozenTrial, epoch: int) -> "EpochRecord | None":
        data = trial.user_attrs.get(cls.attr(epoch))
        return None if data is None else cls(list(data["pred_frac"]), float(data["balanced_accuracy"]))


def local_study_folder(user_attrs: dict[str, Any]) -> Path | None:
    """Where the study's first launch put its trial folders and plans (`<output_dir>/sweeps/<study name>`), when that
    folder is this machine's: recorded by a launch on this host and still there. None for a study that moved (its
    hosts released, or read from a workstation): the same path here may be nobody's, or another user's. A study
    that names no host (an octft before hosts were recorded) is judged by its folder being here."""
    recorded = user_attrs.get(PLAN_ATTR) or {}
    folder = recorded.get("study_dir")
    if not folder or recorded.get("host", socket.gethostname()) != socket.gethostname() or not Path(folder).is_dir():
        return None
    return Path(folder)


def output_folder(study_name: str, user_attrs: dict[str, Any], out: str | Path | None = None) -> Path:
    """Where a command run on a study (`octft report`) writes: `out`, else the study's folder
    when it is this machine's (`local_study_folder`), else `./<study name>` under the current folder; never a path
    that belonged to a worker host.

    >>> output_folder("demo", {})                                   # doctest: +SKIP
    PosixPath('/home/me/demo')
    """
    if out is not None:
        return Path(out)
    return local_study_folder(user_attrs) or Path.cwd() / study_name


def launched_before_plans(user_attrs: dict[str, Any]) -> bool:
    """Whether a study was launched by an octft from before launch plans (its records are not these)."""
    return PLAN_ATTR not in user_attrs and any(name in user_attrs for name in PRE_PLAN_ATTRS)


@dataclass
class TestEvaluation:
    """One scoring of one trial on the test split (`octft promote`), recorded on the study."""

    __test__ = False  # not a pytest test class

    trial: int
    time: str  # UTC, ISO 8601
    run_id: str
    scores: dict[str, float]

    @property
    def attr(self) -> str:
        return f"{TEST_EVALUATION_PREFIX}{self.trial}"


def test_evaluations(user_attrs: dict[str, Any]) -> list[TestEvaluation]:
    """Every test evaluation recorded on a study (its user attrs), oldest first."""
    found = [TestEvaluation(int(record["trial"]), str(record["time"]), str(record["run_id"]),
                            {name: float(value) for name, value in record["scores"].items()})
             for key, record in user_attrs.items() if key.startswith(TEST_EVALUATION_PREFIX)]
    return sorted(found, key=lambda evaluation: (evaluation.time, evaluation.trial))


test_evaluations.__test__ = False  # type: ignore[attr-defined]


def unpromotable_reason(trial: FrozenTrial, min_class_f1: float) -> str | None:
    """Why `trial` cannot be promoted or give its head to LP-FT (pruned, failed, collapsed at its best epoch: a class's
    validation F1 not above `min_class_f1`, untracked), or None when it can."""
    number = trial.number
    record = trial_record(trial)
    outcome = record.outcome
    if trial.state == TrialState.PRUNED:
        why = outcome.prune_reason if outcome and outcome.prune_reason else "no reason recorded"
        detail = f": {outcome.prune_detail}" if outcome and outcome.prune_detail else ""
        return f"trial {number} was pruned ({why} at epoch {outcome.prune_epoch if outcome else '?'}{detail})"
    if trial.state == TrialState.FAIL:
        return f"trial {number} failed ({record.fail_reason or 'no reason recorded'})"
    if trial.state != TrialState.COMPLETE:
        return f"trial {number} is {trial.state.name.lower()}, not complete"
    metrics = outcome.best_metrics if outcome else {}
    missing = [f"val/f1_{name}" for name in CLASS_SHORT_NAMES if f"val/f1_{name}" not in metrics]
    if missing:
        return f"trial {number} has no {', '.join(missing)} in its record (was it run by `octft sweep`?)"
    low = [f"{name} {metrics[f'val/f1_{name}']:.3f}" for name in CLASS_SHORT_NAMES
           if not metrics[f"val/f1_{name}"] > min_class_f1]
    if low:
        return (f"trial {number} collapsed at its best epoch {outcome.best_epoch}: validation F1 of {', '.join(low)} "
                f"is not above promote.min_class_f1={min_class_f1}")
    if not record.mlflow_run_id:
        return f"trial {number} recorded no MLflow run, so its checkpoint cannot be found"
    return None
