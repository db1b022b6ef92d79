"""The report's parameter importances are optuna-dashboard's: one evaluator, PED-ANOVA with its defaults, judging a
maximised objective by its high values (as optuna-dashboard does from 0.21 on, negating it before PED-ANOVA)."""

from __future__ import annotations

import warnings

import optuna
import pytest

from octft.report.study import FIGURES, IMPORTANCE_EVALUATOR, ReportContext

def _study() -> optuna.Study:
    """x decides the best trials, y the worst: an evaluator that judged the wrong end would rank y first."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda trial: max(trial.suggest_float("x", -1, 1), 0) + min(trial.suggest_float("y", -1, 1), 0),
                   n_trials=60)
    return study


def test_the_report_ranks_params_as_optuna_dashboard_does():
    study = _study()
    context = ReportContext(study, study.trials, store=None, objective="value", min_class_f1=0.05)  # reads no runs
    [bars] = FIGURES["param_importances"](context).data
    shown = dict(zip(bars.y, bars.x))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PED-ANOVA warns that a given target is taken as lower-is-better
        dashboard = optuna.importance.get_param_importances(study, evaluator=IMPORTANCE_EVALUATOR(),
                                                            target=lambda trial: -trial.values[0])
        low_end = optuna.importance.get_param_importances(study, evaluator=IMPORTANCE_EVALUATOR(),
                                                          target=lambda trial: trial.values[0])
    assert shown == pytest.approx(dashboard)
    assert max(shown, key=shown.get) == "x" and max(low_end, key=low_end.get) == "y"  # the two ends differ here
