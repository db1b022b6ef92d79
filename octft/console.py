"""What reaches the console: octft's own lines. Library logs and warnings go to the run's log file.

Optuna, MLflow (with alembic and SQLAlchemy under it) and Python's `warnings` all end at the root logger here, never
at a handler of their own. The console shows their errors, and their warnings too until a log file takes them
(`log_to`: the demo's `demo.log`, a launch's `<study dir>/launch.log`); the log file gets Optuna's and MLflow's
records from INFO up, every other library's from WARNING up (an image codec logs each tile it encodes at INFO).
`verbose=True` shows all of it on the console as well. MLflow's artifact download bars are off, in this process and
in those it starts (they inherit the environment). A trial runner's output is its log (`runner-<i>.log`, the trial's
`trial.log`): what XLA's C++ side prints there (GSPMD's deprecation warning) never reaches the console. A training
epoch prints one line (`epoch_line`); in a sweep it goes to the trial's `trial.log`, and `--verbose` repeats it on
the console.

    >>> with quiet_console(verbose=False):                                          # doctest: +SKIP
    ...     log_to(Path("demo/demo.log"))
    ...     run_demo(Path("demo"))
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

# Read by MLflow when it is imported (the first) and when it downloads (the second); children inherit them.
ENVIRONMENT = {
    "MLFLOW_CONFIGURE_LOGGING": "false",  # MLflow's loggers propagate to the root logger instead of their own handler
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}
# Loggers a library gives handlers of its own (or that log at INFO by the line): made to propagate, at these levels.
LIBRARY_LEVELS = {"optuna": logging.INFO, "mlflow": logging.INFO, "alembic": logging.WARNING,
                  "sqlalchemy.engine": logging.WARNING, "huey": logging.WARNING}
_CONSOLE, _FILE = "octft.console", "octft.log_file"
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_EPOCH_LINE = re.compile(r"epoch +\d+  train/loss ")


class _CurrentStderr:
    """`sys.stderr` as it is when written to: a trial's `output_to`, or a test's capture, redirects it."""

    def write(self, text: str) -> None:
        sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


@contextlib.contextmanager
def quiet_console(*, verbose: bool = False) -> Iterator[None]:
    """Route library logs and warnings as the module docstring says while the block runs; logging, warnings and
    the environment are as they were after it."""
    root = logging.getLogger()
    names = [*LIBRARY_LEVELS, "py.warnings"]
    saved_root = root.level, list(root.handlers)
    saved = {name: (logging.getLogger(name).level, list(logging.getLogger(name).handlers),
                    logging.getLogger(name).propagate) for name in names}
    saved_environment = {name: os.environ.get(name) for name in ENVIRONMENT}
    try:
        _route_libraries(verbose)
        yield
    finally:
        logging.captureWarnings(False)
        for handler in root.handlers:
            if handler not in saved_root[1]:
                handler.close()
        root.setLevel(saved_root[0])
        root.handlers = saved_root[1]
        for name, (level, handlers, propagate) in saved.items():
            logger = logging.getLogger(name)
            logger.setLevel(level)
            logger.handlers, logger.propagate = handlers, propagate
        for name, value in saved_environment.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _route_libraries(verbose: bool) -> None:
    for name, value in ENVIRONMENT.items():
        os.environ.setdefault(name, value)  # a user's own MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=true wins
    import optuna  # its root logger gets its default handler at import: imported here to take that handler away

    optuna.logging.disable_default_handler()
    optuna.logging.enable_propagation()
    # MLflow, if imported already, set up its own handlers; otherwise ENVIRONMENT stops it from doing so.
    for name, level in LIBRARY_LEVELS.items():
        logger = logging.getLogger(name)
        logger.handlers, logger.propagate = [], True
        logger.setLevel(level)
    logging.captureWarnings(True)  # `warnings.warn` becomes a WARNING record of logger `py.warnings`
    root = logging.getLogger()
    root.setLevel(logging.WARNING)  # for loggers without a level of their own: LIBRARY_LEVELS set theirs
    handler = logging.StreamHandler(_CurrentStderr())
    handler.set_name(_CONSOLE)
    handler.setLevel(logging.INFO if verbose else logging.WARNING)
    handler.setFormatter(logging.Formatter(_FORMAT))
    root.handlers = [existing for existing in root.handlers if existing.name != _CONSOLE] + [handler]


def log_to(path: Path) -> Path:
    """Send the library records `quiet_console` lets through to `path` (appended; made at the first record) and,
    unless the console is verbose, only errors to the console from now on. Inside `quiet_console`, which closes the
    file at its end. Returns `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    handler = logging.FileHandler(path, encoding="utf-8", delay=True)
    handler.set_name(_FILE)
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter(_FORMAT))
    for existing in list(root.handlers):
        if existing.name == _FILE:
            root.removeHandler(existing)
            existing.close()
        elif existing.name == _CONSOLE and existing.level > logging.INFO:  # a verbose console keeps everything
            existing.setLevel(logging.ERROR)
    root.addHandler(handler)
    return path


def epoch_line(epoch: int, metrics: dict[str, float], encoder: str) -> str:
    """A training epoch in one line (what `octft train` prints, and a trial's `trial.log` holds)."""
    return (f"epoch {epoch:3d}  train/loss {metrics['train/loss']:.4f}  val/loss {metrics['val/loss']:.4f}  "
            f"val/balanced_accuracy {metrics['val/balanced_accuracy']:.3f}  val/macro_f1 {metrics['val/macro_f1']:.3f}  "
            f"encoder {encoder}  {metrics['perf/epoch_seconds']:.1f}s")


def epoch_lines(log_path: Path) -> list[str]:
    """The `epoch_line`s of a log file (none if it is missing)."""
    if not log_path.is_file():
        return []
    return [line for line in log_path.read_text(errors="replace").splitlines() if _EPOCH_LINE.match(line)]


__all__ = ["epoch_line", "epoch_lines", "log_to", "quiet_console"]
