"""What `octft sweep status` and `octft sweep show` print: a table of trials, the best one, a replay command, read
from the trials' records.

    >>> print(format_status(study))                                     # doctest: +SKIP
    trial  state     best val/balanced_accuracy  epoch  epochs  pruned    params
    0      COMPLETE  0.6250                      3      6                 optim.lr_head=0.0012 ...
"""

from __future__ import annotations

import math
import shlex
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from octft.errors import UsageError
from octft.sweep.records import trial_record
from octft.sweep.spec import format_value


def trial_rows(study: optuna.Study) -> list[dict[str, Any]]:
    """One dict per trial: number, state, params, best value and epoch, epochs run, prune/fail reason, origin."""
    rows = []
    for trial in study.get_trials(deepcopy=False):
        record = trial_record(trial)
        outcome = record.outcome
        rows.append({
            "number": trial.number,
            "state": trial.state.name,
            "value": trial.value,
            "best_epoch": outcome.best_epoch if outcome else None,
            "epochs_run": outcome.epochs_run if outcome else None,
            "prune_reason": outcome.prune_reason if outcome else None,
            "fail_reason": record.fail_reason,
            "retry_of": record.retry_of,
            "params": dict(trial.params),
            "mlflow_run_id": record.mlflow_run_id,
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
        record = trial_record(best)
        lines.append(f"best: trial {best.number}, {metric} {best.value:.4f} at epoch "
                     f"{record.outcome.best_epoch if record.outcome else '?'}, MLflow run {record.mlflow_run_id}")
    return "\n".join(lines)


def replay_command(study: optuna.Study, number: int) -> str:
    """The `octft train ...` command that reruns trial `number`: exactly what its runner ran."""
    trials = [trial for trial in study.get_trials(deepcopy=False) if trial.number == number]
    if not trials:
        raise UsageError(f"study {study.study_name!r} has no trial {number}; it has trials 0..{len(study.trials) - 1} "
                         "(see octft sweep status)")
    replay = trial_record(trials[0]).replay
    if not replay:  # waiting, or its worker died before it started
        raise UsageError(f"trial {number} of study {study.study_name!r} has not started yet; nothing to replay")
    return replay


def replay_here(study: optuna.Study, number: int, base_here: str | Path) -> tuple[str, list[str]]:
    """Trial `number`'s replay command as this machine can run it, and notes on what of it is not here.

    The command is the one the trial ran, but for its base experiment: recorded as a path on the host that ran the
    trial (a pod's worker, released since), it is replaced, where that path is not on this machine, by `base_here`
    (the sweep file's own base in this checkout; relative to the current folder when it lies under it), and a note
    says so. Paths among the overrides that are not on this machine (the host's output folder, say) are named in a
    note, not changed: the command stays the trial's config.

    >>> replay_here(study, 3, "experiments/demo.yaml")                          # doctest: +SKIP
    ('octft train experiments/demo.yaml optim.lr_head=0.001 ...', ['trial 3 ran on host tpu-w1: ...'])
    """
    words = shlex.split(replay_command(study, number))
    host = trial_record(next(trial for trial in study.get_trials(deepcopy=False) if trial.number == number)).host
    where = f"trial {number} ran on host {host or '?'}"
    notes = []
    if not Path(words[2]).is_file():
        local = Path(base_here).resolve()
        shown = local.relative_to(Path.cwd()) if local.is_relative_to(Path.cwd()) else local
        notes.append(f"{where}: its base experiment {words[2]} is not on this machine; shown with this checkout's {shown}")
        words[2] = str(shown)
    missing = [word for word in words[3:] if word.partition("=")[2].startswith("/")
               and not Path(word.partition("=")[2]).exists()]
    if missing:
        notes.append(f"{where}: these paths of its command are not on this machine: {' '.join(missing)}; "
                     "change them to where the data and outputs are here before running it")
    return shlex.join(words), notes
