"""The writes of a stacked probe pass, done by a helper process while the pass goes on.

A probe head's epochs take milliseconds; what it records does not. Its MLflow run (params, tags, dataset inputs, a
config artifact, about 500 metric values) costs some 150 ms a head in MLflow's SQL store, and each epoch's Optuna
report and collapse record two commits, most of it Python in the ORMs. A thread would hold the interpreter lock the
pass needs, so the writes go to a second process (`python -m octft.sweep.write_behind`), which makes them in the
order they were sent, one `MlflowTracker` per run and one Optuna storage, while the pass trains and its pruners decide
on its own core from the trials as the pass holds them (`octft.sweep.trial.PassReporter`).

    >>> writer = WriteBehind(tracking_url, storage_url)                           # doctest: +SKIP
    >>> tracker = DeferredTracker(writer, run_id)      # the Tracker seam: log_metrics, set_tags, finish, ...
    >>> writer.write_trial(run_id, trial_id, "set_trial_intermediate_value", 3, 0.61)  # doctest: +SKIP
    >>> writer.drain()                                 # every write so far is done: {run_id: error} of those that failed

What a run's writes leave is what `MlflowTracker` and `Trial.report` would have written themselves. Nobody needs a
running head's epochs before its trial ends (pruners compare it with COMPLETE trials), and its worker drains the
writer before it tells Optuna how the trial ended. A write that fails fails the trial's later writes too; `drain`
names the first error per trial (by its MLflow run id), and the caller fails that trial with it. The frames on the
pipe are pickles between this process and the child it started (never read from a file or another host). The
helper ends when its input closes, and at once when the process that started it is gone.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import pickle
import queue
import select
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

from octft.redaction import redact_text
from octft.sweep.lifetime import watch_parent
from octft.sweep.storage import open_study_storage
from octft.track import RunDataset, RunStatus
from octft.track.mlflow_store import RUN_STATUSES, MlflowTracker

ORPHANED = 3  # the helper's exit code when the process that started it ended first
TRIAL_WRITES = ("set_trial_user_attr", "set_trial_intermediate_value")


class WriteBehind:
    """The handle on one helper process that writes to the MLflow store at `tracking_url` and the Optuna storage at
    `storage_url` (passwords included: they travel on the pipe, never on a command line). `log_path` takes the
    helper's own output (MLflow's warnings).

    Writes are queued here and sent by a thread of this process: a write never waits for the pipe, which fills while
    the helper imports MLflow or writes a batch.
    """

    def __init__(self, tracking_url: str, storage_url: str | None = None, log_path: Path | None = None) -> None:
        read_fd, write_fd = os.pipe()
        log = open(log_path, "ab") if log_path is not None else subprocess.DEVNULL
        try:
            # Ctrl-C reaches the helper too (one process group): it ignores it, and its parent decides what is lost.
            self._process = subprocess.Popen(
                [sys.executable, "-m", "octft.sweep.write_behind", "--reply-fd", str(write_fd)], stdin=subprocess.PIPE,
                stdout=log, stderr=subprocess.STDOUT, pass_fds=(write_fd,))
        finally:
            os.close(write_fd)
            if log_path is not None:
                log.close()
        self._replies: BinaryIO = os.fdopen(read_fd, "rb")
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._broken: str | None = None  # why the pipe could not be written, once it could not
        self._sender = threading.Thread(target=self._send_all, name="mlflow-writer-pipe", daemon=True)
        self._sender.start()
        self._outbox.put(("open", tracking_url, storage_url))

    @property
    def pid(self) -> int:
        return self._process.pid

    def write_run(self, run_id: str, method: str, *args: Any) -> None:
        """Call `MlflowTracker(run_id=run_id).<method>(*args)` in the helper, after every write sent before it."""
        self._outbox.put(("run", run_id, method, args))

    def write_trial(self, run_id: str, trial_id: int, method: str, *args: Any) -> None:
        """Call the Optuna storage's `<method>(trial_id, *args)` (`set_trial_user_attr`, `set_trial_intermediate_value`)
        in the helper, after every write sent before it; its errors count as those of the trial's run `run_id`."""
        if method not in TRIAL_WRITES:
            raise ValueError(f"{method!r} is not one of the trial writes {', '.join(TRIAL_WRITES)}")
        self._outbox.put(("trial", run_id, method, (trial_id, *args)))

    def drain(self) -> dict[str, str]:
        """Wait until every write sent so far is done; the first error of each run whose writes failed."""
        self._outbox.put(("drain",))
        try:
            return pickle.load(self._replies)
        except EOFError:
            raise RuntimeError(f"the MLflow writer (pid {self.pid}) ended (exit code {self._process.wait()}) before it "
                               f"wrote what it was sent{f': {self._broken}' if self._broken else ''}") from None

    def close(self, timeout: float = 10) -> None:
        """End the helper: what it holds is written first, for at most `timeout` seconds, then it is killed."""
        self._outbox.put(None)
        self._sender.join(timeout)
        try:
            self._process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._replies.close()

    def _send_all(self) -> None:
        pipe = self._process.stdin
        while (message := self._outbox.get()) is not None:
            if self._broken:
                continue
            try:
                pickle.dump(message, pipe, protocol=pickle.HIGHEST_PROTOCOL)
                pipe.flush()
            except (BrokenPipeError, OSError) as error:  # the helper died: drain says so
                self._broken = f"{type(error).__name__}: {error}"
        with contextlib.suppress(OSError):
            pipe.close()


class DeferredTracker:
    """The `Tracker` seam for one run whose writes a `WriteBehind` makes: each call checks what it can here (so a bad
    value fails where it is logged) and sends the write on. `finish` records the end as `MlflowTracker(ends_run=False)`
    does: `end_status` now, the reason tag through the helper, the run left RUNNING for its worker to end."""

    def __init__(self, writer: WriteBehind, run_id: str) -> None:
        self.writer, self.run_id = writer, run_id
        self.end_status: str | None = None

    def log_params(self, params: dict[str, object]) -> None:
        self.writer.write_run(self.run_id, "log_params", dict(params))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        values = {}
        for key, value in metrics.items():
            try:
                values[str(key)] = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"metric {key!r} has value {value!r}, which is not a number; log floats (read "
                                 "tensors with .item() at the logging point)") from None
        self.writer.write_run(self.run_id, "log_metrics", values, int(step))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if not Path(path).exists():
            raise FileNotFoundError(f"artifact {str(path)!r} does not exist; write it before logging it")
        self.writer.write_run(self.run_id, "log_artifact", str(path), artifact_path)

    def log_figure(self, figure: Any, name: str) -> None:
        raise NotImplementedError("a figure is not sent to the MLflow writer: save it and log_artifact the file")

    def log_dict(self, obj: dict, name: str) -> None:
        self.writer.write_run(self.run_id, "log_dict", obj, name)

    def set_tags(self, tags: dict[str, str]) -> None:
        self.writer.write_run(self.run_id, "set_tags", dict(tags))

    def log_datasets(self, datasets: Sequence[RunDataset]) -> None:
        self.writer.write_run(self.run_id, "log_datasets", list(datasets))

    def finish(self, status: RunStatus, reason: str | None = None) -> None:
        if status not in RUN_STATUSES:
            raise ValueError(f"run status {status!r} is not one of {', '.join(RUN_STATUSES)}")
        if self.end_status is None:
            self.end_status = status
            self.writer.write_run(self.run_id, "finish", status, reason)


# ---------------------------------------------------------------------------------------------------- the helper process


def serve(requests: BinaryIO, replies: BinaryIO) -> None:
    """Make each write of `requests` in order; answer each drain, once the metrics held so far are written too, with
    the first error of each run that failed since the last drain. Metrics are written in batches whenever nothing
    else waits."""
    trackers: dict[str, MlflowTracker] = {}
    errors: dict[str, str] = {}
    tracking_url = storage = None
    while True:
        if not select.select([requests], [], [], 0)[0]:  # nothing sent meanwhile: write the metrics held so far
            _flush(trackers, errors)
        try:
            message = pickle.load(requests)
        except EOFError:
            return
        kind = message[0]
        if kind == "open":
            tracking_url, storage_url = message[1], message[2]
            storage = open_study_storage(storage_url, heartbeat_interval=None) if storage_url else None
        elif kind == "drain":
            _flush(trackers, errors)
            pickle.dump(errors, replies, protocol=pickle.HIGHEST_PROTOCOL)
            replies.flush()
            errors = {}
        else:
            _, run_id, method, args = message
            if run_id in errors:  # its trial failed a write already: the rest would only fail or mislead
                continue
            try:
                if kind == "trial":
                    getattr(storage, method)(*args)
                    continue
                if run_id not in trackers:
                    # Metrics held until `finish`, which leaves the run RUNNING: its worker ends it, as it does for a
                    # run its trial wrote itself.
                    trackers[run_id] = MlflowTracker(tracking_url, run_id=run_id, flush_interval_s=math.inf,
                                                     ends_run=False)
                getattr(trackers[run_id], method)(*args)
                if method == "finish":
                    del trackers[run_id]
            except Exception as error:
                where = "Optuna" if kind == "trial" else "MLflow"
                errors[run_id] = redact_text(f"{where} {method}: {type(error).__name__}: {error}")[:2000]
                trackers.pop(run_id, None)


def _flush(trackers: dict[str, MlflowTracker], errors: dict[str, str]) -> None:
    """Write the metrics each open run holds (its tracker holds them until told): while the pass trains, so they are
    not all left for its end."""
    for run_id, tracker in list(trackers.items()):
        try:
            tracker.flush()
        except Exception as error:
            errors[run_id] = redact_text(f"MLflow flush: {type(error).__name__}: {error}")[:2000]
            del trackers[run_id]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m octft.sweep.write_behind", description="a stacked pass's MLflow writer")
    parser.add_argument("--reply-fd", type=int, required=True, help="file descriptor the drain answers are written to")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    watch_parent(lambda: os._exit(ORPHANED))
    with os.fdopen(args.reply_fd, "wb") as replies:
        serve(sys.stdin.buffer, replies)
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    os._exit(code)  # every write is done: skip the interpreter's teardown of MLflow and torch
