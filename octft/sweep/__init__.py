"""Optuna sweeps over experiment configs: spec, search space, collapse-aware pruner, launch, promotion, report.

    >>> from octft.sweep import launch, load_sweep, promote, render_report
    >>> launch("sweeps/demo.yaml", workers=2)                       # doctest: +SKIP
    >>> promote(load_sweep("sweeps/demo.yaml"))                     # doctest: +SKIP
"""

import importlib
from typing import Any

# Imported on first use (PEP 562): `octft sweep status` must not import promotion's data and model stack.
_HOMES = {
    "promote": "promote",
    "CollapsePruner": "pruners", "build_pruner": "pruners", "epoch_attr": "pruners", "record_epoch": "pruners",
    "render_report": "report",
    "CategoricalParam": "space", "FloatParam": "space", "IntParam": "space", "Param": "space",
    "distributions": "space", "parse_space": "space", "suggest": "space",
    "STORAGE_ENV": "spec", "SweepSpec": "spec", "build_sampler": "spec", "format_value": "spec",
    "load_sweep": "spec", "sampler_settings": "spec",
    "redact_url": "spec",
    "launch": "study",
}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)


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
