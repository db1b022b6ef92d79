"""Runners: where a worker's trials train. One small protocol, three implementations:

- `WarmProcessRunner` (the default): one long-lived process per worker (`python -m octft.sweep.trial`) that
  imports torch and torch_xla once and keeps, from trial to trial, its compiled XLA graphs (every per-trial value
  enters them as device data), the opened study and what its runs built (`RunCache`: the audited data, the
  encoder, the frozen features). A runner that dies (segfault, out-of-memory kill, XLA abort) fails only the
  trial it was running; the next trial starts a new one.
- `FreshProcessRunner`: a new process for every trial (isolation, for debugging a runner).
- `InProcessRunner`: the trial trains in the worker's own process: probe studies (a head on stored features is
  milliseconds a step; a process hand-off would cost more than the trial) and tests. Its `run_many` trains a probe
  study's trials together, their heads stacked in one pass over the features (`octft.sweep.trial.run_trials`).

Each runs `octft.sweep.trial.run_trial(plan, number, cache)`, which trains exactly what the trial's replay command
runs. A process runner (`python -m octft.sweep.trial`) is given a trial as one line `{"plan": <plan path>,
"trial": <number>}` on its input and answers one `TrialOutcome` line on a file descriptor of its own.

    >>> runner = make_runner(plan, worker_index=0)                                     # doctest: +SKIP
    >>> outcome = runner.run(plan, 3)                                                  # doctest: +SKIP
    >>> runner.close()                                                                 # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TextIO

from octft.redaction import redact
from octft.sweep.plan import LaunchPlan
from octft.sweep.records import TrialOutcome
from octft.train.devices import trial_device_env

if TYPE_CHECKING:
    from octft.data.dataset import DataSetup

LOG_TAIL_LINES = 20


class Runner(Protocol):
    """Trains trials of a plan, one at a time."""

    @property
    def pid(self) -> int:
        """The process its next trial trains in (a process runner starts it now if it has none)."""

    def start(self) -> None:
        """Get ready for a first trial (a warm runner's process imports torch and MLflow), without waiting for it."""

    def run(self, plan: LaunchPlan, number: int) -> TrialOutcome:
        """Train trial `number` of `plan`'s study; never raises for a bad trial (its outcome says `failed`)."""

    def run_many(self, plan: LaunchPlan, numbers: list[int]) -> list[TrialOutcome]:
        """Train the trials `numbers` (an in-process runner stacks a probe study's heads in one pass); their outcomes."""

    def close(self, timeout: float = 60) -> None:
        """Let go of the runner: a process ends after its current trial, or is killed after `timeout` seconds."""


class InProcessRunner:
    """Trials in this process, sharing one `TrialCache` (so its data, encoder and features) from trial to trial."""

    def __init__(self) -> None:
        self.cache = None

    @property
    def pid(self) -> int:
        return os.getpid()

    def start(self) -> None:
        self._trial()

    def run(self, plan: LaunchPlan, number: int) -> TrialOutcome:
        trial = self._trial()
        with trial.output_to(plan.trial_dir(number) / "trial.log"):  # where a process runner's trial writes too
            return trial.run_trial(plan, number, self.cache)

    def run_many(self, plan: LaunchPlan, numbers: list[int]) -> list[TrialOutcome]:
        trial = self._trial()
        log = Path(plan.study_dir) / "passes" / f"trials-{numbers[0]}-{numbers[-1]}.log"
        for number in numbers:  # each trial's own log says where the pass's output went; its epochs follow
            plan.trial_dir(number).mkdir(parents=True, exist_ok=True)
            with (plan.trial_dir(number) / "trial.log").open("a") as handle:
                handle.write(f"trial {number} trains in one pass with trials {', '.join(map(str, numbers))}; "
                             f"the pass's output: {log}\n")
        with trial.output_to(log):
            return trial.run_trials(plan, numbers, self.cache)

    def prepare(self, data, plan: LaunchPlan | None = None) -> DataSetup:
        """Audit and prepare `data` (a config's data section) into the cache its trials will find it in; for a probe
        `plan`, start the MLflow writer of its stacked passes meanwhile (its imports take a second or two)."""
        self._trial()
        if plan is not None and plan.is_probe():
            self.cache.writer(plan)
        return self.cache.run.data(data, progress=True)

    def close(self, timeout: float = 60) -> None:
        if self.cache is not None:
            self.cache.close(min(timeout, 10))
        self.cache = None

    def _trial(self):
        from octft.sweep import trial  # torch and the training stack: only a process that trains here imports them

        if self.cache is None:
            self.cache = trial.TrialCache()
            # What this process made so far lives as long as it: out of the collector's sight, the collection after
            # each trial scans only what trials make (measured: 0.19 s a trial otherwise, most of a probe trial).
            gc.freeze()
        return trial


class WarmProcessRunner:
    """The worker's handle on its warm runner process, started by `start` (`make_runner` starts it at once) or on
    first use. `env`: the process environment (its devices, the stores' passwords)."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env = env
        self.log_path = log_path  # the runner's own output between trials (imports, warnings)
        self.process: subprocess.Popen | None = None
        self._replies: TextIO | None = None

    @property
    def pid(self) -> int:
        self.start()
        return self.process.pid

    def start(self) -> None:
        if self.process is not None:
            return
        read_fd, write_fd = os.pipe()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "octft.sweep.trial", "--reply-fd", str(write_fd)], stdin=subprocess.PIPE,
                stdout=log, stderr=subprocess.STDOUT, env=self.env, pass_fds=(write_fd,), text=True)
        os.close(write_fd)  # the runner holds the only write end: its death reads as end of file here
        self._replies = os.fdopen(read_fd, "r")

    def run(self, plan: LaunchPlan, number: int) -> TrialOutcome:
        self.start()
        try:
            self.process.stdin.write(json.dumps({"plan": str(plan.path), "trial": number}) + "\n")
            self.process.stdin.flush()
            line = self._replies.readline()
        except BrokenPipeError:
            line = ""
        if line:
            return TrialOutcome.from_json(line)
        returncode = self.process.wait()
        self._forget()
        return TrialOutcome(status="failed", stop_reason=describe_exit(returncode, plan.trial_dir(number) / "trial.log"))

    def run_many(self, plan: LaunchPlan, numbers: list[int]) -> list[TrialOutcome]:
        return [self.run(plan, number) for number in numbers]

    def close(self, timeout: float = 60) -> None:
        """Close its input (it exits after its current trial); kill it if it does not."""
        if self.process is None:
            return
        with contextlib.suppress(BrokenPipeError, OSError):
            self.process.stdin.close()
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._forget()

    def _forget(self) -> None:
        if self._replies is not None:
            self._replies.close()
        if self.process is not None and self.process.stdin is not None:
            with contextlib.suppress(BrokenPipeError, OSError):
                self.process.stdin.close()
        self.process, self._replies = None, None


class FreshProcessRunner:
    """A new runner process for every trial: slower (every trial imports and compiles again), for debugging."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.process_runner = WarmProcessRunner(env, log_path)

    @property
    def pid(self) -> int:
        return self.process_runner.pid

    def start(self) -> None:
        self.process_runner.start()

    def run(self, plan: LaunchPlan, number: int) -> TrialOutcome:
        try:
            return self.process_runner.run(plan, number)
        finally:
            self.process_runner.close()

    def run_many(self, plan: LaunchPlan, numbers: list[int]) -> list[TrialOutcome]:
        return [self.run(plan, number) for number in numbers]

    def close(self, timeout: float = 60) -> None:
        self.process_runner.close(timeout)


def make_runner(plan: LaunchPlan, worker_index: int) -> Runner:
    """The runner `plan` asks for, for worker `worker_index` (its own devices, its own log). A process runner's
    process starts now: its imports (torch, MLflow: 3-4 s) are the longest step before a worker's first trial, so a
    caller makes its runner first and opens the study meanwhile. An in-process runner imports them when it is
    started or first used: in the caller's own process they overlap nothing."""
    if plan.launch.runner == "in_process":
        return InProcessRunner()
    env = {**runner_environment(plan, worker_index), **plan.store_environment()}
    log_path = Path(plan.study_dir) / f"runner-{worker_index}.log"
    runner = (WarmProcessRunner if plan.launch.runner == "warm" else FreshProcessRunner)(env, log_path)
    runner.start()
    return runner


def runner_environment(plan: LaunchPlan, worker_index: int) -> dict[str, str]:
    """A runner process's environment: this one's (where the stores' passwords are, if the user gave any), and which
    devices its trials get (`octft.train.devices.trial_device_env`)."""
    return dict(os.environ, **trial_device_env(worker_index, plan.launch.devices_per_trial), PYTHONUNBUFFERED="1")


def describe_exit(returncode: int, log_path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """Why a runner process died: its exit code or signal and the last `lines` its trial wrote, redacted."""
    if returncode < 0:
        name = signal.Signals(-returncode).name if -returncode in signal.valid_signals() else str(-returncode)
        hint = " (the out-of-memory killer sends SIGKILL)" if -returncode == signal.SIGKILL else ""
        head = f"trial process killed by signal {name}{hint}"
    else:
        head = f"trial process exited with code {returncode}"
    tail = log_path.read_text(errors="replace").splitlines()[-lines:] if log_path.is_file() else []
    return str(redact(head + (":\n" + "\n".join(tail) if tail else "")))[-4000:]


__all__ = ["FreshProcessRunner", "InProcessRunner", "Runner", "WarmProcessRunner", "describe_exit", "make_runner"]
