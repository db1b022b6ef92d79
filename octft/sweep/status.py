"""What `octft sweep status`, `octft sweep show` and `octft sweep stop-rules` print: a table of trials, the best one,
a replay command, what other stop rules would have spent; read from the trials' records.

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
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from octft.errors import UsageError
from octft.sweep.pruners import Replay, build_pruner, replay
from octft.sweep.records import trial_record
from octft.sweep.spec import PrunerSpec, SweepSpec, format_value


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


# The grid `octft sweep stop-rules` replays: collapse (grace_epochs, patience), None for the rule off, and the wrapped
# pruner's n_warmup_steps, None for no wrapped pruner; the sweep's own settings are added where missing.
STOP_RULE_COLLAPSE: tuple[tuple[int, int] | None, ...] = ((0, 1), (1, 1), (1, 2), (2, 2), (3, 2), None)
STOP_RULE_WARMUPS: tuple[int | None, ...] = (0, 1, 2, 4, None)


def stop_rule_replays(trials: list[FrozenTrial], spec: SweepSpec) -> dict[tuple, Replay]:
    """`replay` of `trials` under the sweep's pruner at each collapse (grace, patience) x wrapped warm-up of the grid,
    keyed (collapse, warm-up) as in STOP_RULE_COLLAPSE and STOP_RULE_WARMUPS; (None, None) turns every rule off."""
    own = spec.pruner
    collapses = list(STOP_RULE_COLLAPSE)
    if own.collapse.enabled and (own.collapse.grace_epochs, own.collapse.patience) not in collapses:
        collapses.insert(-1, (own.collapse.grace_epochs, own.collapse.patience))
    warmups = list(STOP_RULE_WARMUPS) if own.wrapped.type != "none" else [None]
    if own.wrapped.type != "none" and own.wrapped.n_warmup_steps not in warmups:
        warmups.insert(-1, own.wrapped.n_warmup_steps)
    direction = StudyDirection.MINIMIZE if spec.objective.direction == "minimize" else StudyDirection.MAXIMIZE
    replays = {}
    for collapse in collapses:
        rule = (own.collapse.model_copy(update={"enabled": False}) if collapse is None else
                own.collapse.model_copy(update={"enabled": True, "grace_epochs": collapse[0], "patience": collapse[1]}))
        for warmup in warmups:
            wrapped = (own.wrapped.model_copy(update={"type": "none"}) if warmup is None else
                       own.wrapped.model_copy(update={"n_warmup_steps": warmup}))
            variant = spec.model_copy(update={"pruner": PrunerSpec(collapse=rule, wrapped=wrapped)})
            replays[(collapse, warmup)] = replay(trials, build_pruner(variant), direction)
    return replays


def format_stop_rules(study: optuna.Study, spec: SweepSpec) -> str:
    """The study's finished trials replayed under the sweep's stop rules at other grace, patience and warm-up settings
    (`stop_rule_replays`): per setting, epochs spent relative to no pruning and the best value; the sweep's own marked."""
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    trials = [trial for trial in trials if (outcome := trial_record(trial).outcome) and outcome.epochs_run]
    if not trials:
        raise UsageError(f"study {study.study_name!r} has no finished trials to replay; run some first "
                         f"(octft sweep status shows its trials)")
    replays = stop_rule_replays(trials, spec)
    collapses = list(dict.fromkeys(collapse for collapse, _ in replays))
    warmups = list(dict.fromkeys(warmup for _, warmup in replays))
    unpruned = replays[(None, None)]
    own = spec.pruner
    own_key = ((own.collapse.grace_epochs, own.collapse.patience) if own.collapse.enabled else None,
               own.wrapped.n_warmup_steps if own.wrapped.type != "none" else None)
    was_pruned = sum(trial.state == TrialState.PRUNED for trial in trials)
    at_least = " or more" if unpruned.unknown else ""
    lines = [f"study {study.study_name}: {len(trials)} finished trials replayed in trial order ({was_pruned} pruned by "
             f"the study); no pruning spends {unpruned.epochs} epochs{at_least}, best {_value(unpruned.best_value)}",
             f"each cell: epochs spent relative to no pruning, and the best value; * the sweep's own "
             f"(collapse max_class_share {own.collapse.max_class_share}, chance_margin {own.collapse.chance_margin}; "
             f"{own.wrapped.type} as the sweep has it but for its warm-up, counted from each trial's unfreeze epoch)"]
    columns = [f"warm-up {warmup}" if warmup is not None else f"no {own.wrapped.type}" if own.wrapped.type != "none"
               else "no wrapped" for warmup in warmups]
    width = max(14, *(len(column) + 2 for column in columns))
    lines.append(f"{'collapse':<22}" + "".join(f"{column:>{width}}" for column in columns))
    for collapse in collapses:
        label = "off" if collapse is None else f"grace {collapse[0]}, patience {collapse[1]}"
        cells = []
        for warmup in warmups:
            result = replays[(collapse, warmup)]
            mark = "*" if (collapse, warmup) == own_key else ""
            bound = ">=" if result.unknown else ""
            cells.append(f"{mark}{bound}{result.epochs / unpruned.epochs:.0%} {_value(result.best_value)}")
        lines.append(f"{label:<22}" + "".join(f"{cell:>{width}}" for cell in cells))
    if was_pruned:
        lines.append(f">=: the study pruned {was_pruned} trial(s); rules that would let one run past that epoch spend at "
                     "least this, and its value is unknown. Exact on a study run with pruner.collapse.enabled=false "
                     "pruner.wrapped.type=none")
    if _ran_side_by_side(trials):
        lines.append("trials of this study ran side by side (several workers, or heads trained in one pass): its wrapped "
                     "pruner compared each trial with those finished when it judged it, not with every earlier one as "
                     "here, so the wrapped pruner's columns are close, not exact")
    return "\n".join(lines)


def _ran_side_by_side(trials: list[FrozenTrial]) -> bool:
    """Whether a trial started before one numbered below it had finished (so a replay in trial order is not the order
    in which the study's pruner saw trials finish)."""
    finished_by = None
    for trial in sorted(trials, key=lambda trial: trial.number):
        if finished_by is not None and trial.datetime_start is not None and trial.datetime_start < finished_by:
            return True
        if trial.datetime_complete is not None:
            finished_by = max(finished_by or trial.datetime_complete, trial.datetime_complete)
    return False


def _value(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
