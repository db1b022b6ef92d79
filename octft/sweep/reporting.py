"""What `octft sweep status` and `octft sweep show` print: a table of trials, the best one, a replay command.

    >>> print(format_status(study))                                     # doctest: +SKIP
    trial  state     best val/balanced_accuracy  epoch  epochs  pruned    params
    0      COMPLETE  0.6250                      3      6                 optim.lr_head=0.0012 ...
"""

from __future__ import annotations

import math
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from octft.sweep.spec import SweepSpec, format_value
from octft.errors import UsageError


def trial_rows(study: optuna.Study) -> list[dict[str, Any]]:
    """One dict per trial: number, state, params, best value and epoch, epochs run, prune/fail reason."""
    rows = []
    for trial in study.get_trials(deepcopy=False):
        attrs = trial.user_attrs
        rows.append({
            "number": trial.number,
            "state": trial.state.name,
            "value": trial.value,
            "best_epoch": attrs.get("best_epoch"),
            "epochs_run": attrs.get("epochs_run"),
            "prune_reason": attrs.get("prune_reason"),
            "fail_reason": attrs.get("fail_reason"),
            "retry_of": trial.system_attrs.get("failed_trial"),
            "params": dict(trial.params),
            "mlflow_run_id": attrs.get("mlflow_run_id"),
        })
    return rows


def _best(study: optuna.Study) -> FrozenTrial | None:
    try:
        return study.best_trial
    except ValueError:
        return None


def format_status(study: optuna.Study, metric: str = "val/balanced_accuracy") -> str:
    """The trial table and the best trial, as plain text."""
    rows = trial_rows(study)
    header = ["trial", "state", f"best {metric}", "epoch", "epochs", "pruned", "params"]
    table = [header]
    for row in rows:
        value = row["value"]
        note = row["prune_reason"] or ""
        if row["state"] == "FAIL" and row["fail_reason"]:
            note = "failed: " + row["fail_reason"].splitlines()[0][:60]
        if row["retry_of"] is not None:
            note = (note + f" (retry of {row['retry_of']})").strip()
        table.append([
            str(row["number"]),
            row["state"],
            "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}",
            "" if row["best_epoch"] is None else str(row["best_epoch"]),
            "" if row["epochs_run"] is None else str(row["epochs_run"]),
            note,
            " ".join(f"{key}={format_value(value)}" for key, value in row["params"].items()),
        ])
    widths = [max(len(line[column]) for line in table) for column in range(len(header) - 1)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line[:-1], widths)) + "  " + line[-1] for line in table]
    counts = {state.name: sum(1 for row in rows if row["state"] == state.name) for state in TrialState}
    lines.append("")
    lines.append(f"study {study.study_name}: {len(rows)} trials (" +
                 ", ".join(f"{count} {name.lower()}" for name, count in counts.items() if count) + ")")
    best = _best(study)
    if best is None:
        lines.append("best: none completed yet")
    else:
        lines.append(f"best: trial {best.number}, {metric} {best.value:.4f} at epoch {best.user_attrs.get('best_epoch')}, "
                     f"MLflow run {best.user_attrs.get('mlflow_run_id')}")
    return "\n".join(lines)


def replay_command(study: optuna.Study, number: int, spec: SweepSpec | None = None) -> str:
    """The `octft train ...` command that reruns trial `number`: base, the trial's overrides, the CLI overrides."""
    trials = [trial for trial in study.get_trials(deepcopy=False) if trial.number == number]
    if not trials:
        raise UsageError(
            f"study {study.study_name!r} has no trial {number}; it has trials 0..{len(study.trials) - 1} "
            "(see octft sweep status)"
        )
    trial = trials[0]
    if trial.user_attrs.get("replay"):
        return str(trial.user_attrs["replay"])
    # A trial whose process never started (waiting, or its worker died first): rebuild from its params.
    if spec is None or set(trial.params) != set(spec.space):
        raise UsageError(f"trial {number} of study {study.study_name!r} has no sampled params yet; nothing to replay")
    return spec.replay_command(trial.params, extra=study.user_attrs.get("cli_overrides", []))
