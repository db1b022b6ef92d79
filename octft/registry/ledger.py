"""The test ledger: one per data release and test split, shared by every study, experiment and registered model.

Every scoring of a test split (`octft promote`) is one run of the MLflow experiment `octft-test-ledger` in the
tracking store, which every host of a slice and a later workstation reach. Its key is the data manifest's hash (every
volume, label and split) with the test split's participants, so two studies on the same release share one ledger
whatever their names, experiments or registered models; a second scoring of the same test split is refused unless
asked for (`octft promote --allow-test-reuse`), since choosing among models by their test scores makes the test split
a validation split.

    >>> ledger = TestLedger(MlflowStore("sqlite:///mlflow.db"))                               # doctest: +SKIP
    >>> [entry.describe() for entry in ledger.entries(ledger_key(manifest_hash, participants))]  # doctest: +SKIP
    ["study 'demo' trial 4 (run 3f2a...) on 2026-12-07T16:20:11Z"]

Two promotions started at the same moment are not serialised (the tracking store has no lock): each records its
scoring, so the ledger still shows both.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable
from dataclasses import dataclass

from octft.track.mlflow_store import MlflowStore

LEDGER_EXPERIMENT = "octft-test-ledger"
KEY_TAG = "octft.test_split_id"  # no secret word in the name: tags under such names are redacted


def ledger_key(manifest_hash: str, test_participants: Iterable[str]) -> str:
    """The key of a test split: the data manifest's hash and the sorted participant ids of its test split."""
    text = manifest_hash + "\n" + "\n".join(sorted(set(map(str, test_participants))))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class LedgerEntry:
    """One scoring of a test split: which study, trial and MLflow run, when, and the model it was for."""

    study: str
    trial: int
    run_id: str
    time: str  # UTC, ISO 8601
    model_name: str
    balanced_accuracy: str

    def same_model(self, study: str, trial: int) -> bool:
        return (self.study, self.trial) == (study, trial)

    def describe(self) -> str:
        return f"study {self.study!r} trial {self.trial} (run {self.run_id}) on {self.time}"


class TestLedger:
    """The ledger in one tracking store."""

    __test__ = False  # not a pytest test class

    def __init__(self, store: MlflowStore) -> None:
        self.store = store

    def entries(self, key: str) -> list[LedgerEntry]:
        """Every scoring of the test split `key`, oldest first."""
        return [LedgerEntry(tags.get("octft.study", "?"), int(tags.get("octft.trial", -1)), tags.get("octft.run_id", "?"),
                            tags.get("octft.time", "?"), tags.get("octft.model_name", "?"),
                            tags.get("octft.test_balanced_accuracy", "?"))
                for tags in (run.tags for run in self.store.search_runs(LEDGER_EXPERIMENT, {KEY_TAG: key}))]

    def record(self, key: str, *, study: str, trial: int, run_id: str, model_name: str, balanced_accuracy: str,
               manifest_hash: str, participants: int) -> LedgerEntry:
        entry = LedgerEntry(study, trial, run_id, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), model_name,
                            balanced_accuracy)
        self.store.record_run(LEDGER_EXPERIMENT, f"{study}-trial-{trial}", {
            KEY_TAG: key, "octft.study": study, "octft.trial": str(trial), "octft.run_id": run_id,
            "octft.time": entry.time, "octft.model_name": model_name, "octft.test_balanced_accuracy": balanced_accuracy,
            "octft.data_manifest_hash": manifest_hash, "octft.test_participants": str(participants)})
        return entry
