"""Optuna sweeps over experiment configs: spec, search space, collapse-aware pruner, launch, promotion, report.

    >>> from octft.sweep import launch, load_sweep, promote, render_report
    >>> launch("sweeps/demo.yaml", workers=2)                       # doctest: +SKIP
    >>> promote(load_sweep("sweeps/demo.yaml"))                     # doctest: +SKIP
"""

from octft.sweep.promote import promote
from octft.sweep.pruners import CollapsePruner, build_pruner, epoch_attr, record_epoch
from octft.sweep.report import render_report
from octft.sweep.space import CategoricalParam, FloatParam, IntParam, Param, distributions, parse_space, suggest
from octft.sweep.spec import (
    STORAGE_ENV,
    SweepSpec,
    build_sampler,
    format_value,
    load_sweep,
    redact_url,
    sampler_settings,
)
from octft.sweep.study import launch

__all__ = [
    "STORAGE_ENV",
    "CategoricalParam",
    "CollapsePruner",
    "FloatParam",
    "IntParam",
    "Param",
    "SweepSpec",
    "build_pruner",
    "build_sampler",
    "distributions",
    "epoch_attr",
    "format_value",
    "launch",
    "load_sweep",
    "parse_space",
    "promote",
    "record_epoch",
    "redact_url",
    "render_report",
    "sampler_settings",
    "suggest",
]
