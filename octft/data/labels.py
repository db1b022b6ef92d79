"""Participant labels: `participants.tsv` -> one row per participant with class index and split.

AI-READI ships `participants.tsv` (CRLF or LF) with `participant_id` (older exports: `person_id`),
`study_group` and `recommended_split`. IDs go through `canonical_participant_id`, the same function
the locator uses, so that `1001`, `01001` and `sub-1001` are one participant on both sides.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from octft.data.ids import canonical_participant_id
from octft.data.layout import CLASS_ALIASES, CLASSES, SPLITS
from octft.errors import OctftError

ID_COLUMNS = ("participant_id", "person_id")
_SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


class LabelsError(OctftError, ValueError):
    """A labels file that cannot be used at all (the message names the file and what to do)."""


@dataclass(frozen=True)
class LabelConflict:
    """One participant whose label rows disagree: each row as (row number, raw id, class name, split)."""

    participant_id: str
    rows: tuple[tuple[int, str, str, str | None], ...]


@dataclass
class Labels:
    """Usable labels plus every row that could not be used, with the reason.

    `table` columns: participant_id (canonical str), label (int, index into CLASSES), class_name, split.
    `invalid` rows: (row number in the file, raw id, reason). `conflicts`: participants whose rows (after ID
    normalisation: `1001` and `01001` are one) disagree on class or split, with the rows; they are left out
    of `table`, so that no first row silently wins. `duplicate_rows`: rows that repeat an earlier row of
    the same participant exactly, merged into it. `split_source` is "recommended_split" or "stratified(seed=...)".
    """

    table: pd.DataFrame
    invalid: list[tuple[int, str, str]] = field(default_factory=list)
    conflicts: list[LabelConflict] = field(default_factory=list)
    duplicate_rows: int = 0
    split_source: str = "recommended_split"
    source: str = ""

    def by_participant(self) -> dict[str, tuple[int, str]]:
        return {row.participant_id: (int(row.label), row.split) for row in self.table.itertuples(index=False)}


def class_index(study_group: object) -> int | None:
    """The index of a `study_group` value in CLASSES, accepting known spelling variants."""
    if not isinstance(study_group, str):
        return None
    name = study_group.strip().lower()
    name = CLASS_ALIASES.get(name, name)
    return CLASSES.index(name) if name in CLASSES else None


def stratified_split(
    participant_ids: list[str], labels: list[int], *, val_fraction: float, test_fraction: float, seed: int
) -> dict[str, str]:
    """A seeded, class-stratified split by participant (used when labels carry no split).

    Within each class, participants are shuffled with `seed` and cut by the fractions; a class with
    at least three participants always gets one in each split.
    """
    rng = np.random.default_rng(seed)
    assignment: dict[str, str] = {}
    for label in sorted(set(labels)):
        members = sorted(pid for pid, lab in zip(participant_ids, labels) if lab == label)
        rng.shuffle(members)
        n = len(members)
        n_test = int(round(n * test_fraction))
        n_val = int(round(n * val_fraction))
        if n >= 3:
            n_test, n_val = max(n_test, 1), max(n_val, 1)
        for i, pid in enumerate(members):
            assignment[pid] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    return assignment


def load_labels(
    source: str | Path | bytes,
    *,
    name: str | None = None,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
) -> Labels:
    """Read `participants.tsv` (a path or its bytes).

    >>> labels = load_labels(b"participant_id\\tstudy_group\\trecommended_split\\r\\n1001\\thealthy\\ttrain\\r\\n", name="p.tsv")
    >>> labels.table.to_dict("records")
    [{'participant_id': '1001', 'label': 0, 'class_name': 'healthy', 'split': 'train'}]
    """
    label = name or (str(source) if not isinstance(source, bytes) else "<labels>")
    try:
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
    except FileNotFoundError:
        raise LabelsError(f"{label}: labels file not found; pass --labels or set data.labels") from None
    try:
        frame = pd.read_csv(io.BytesIO(data), sep="\t", dtype=str, keep_default_na=False)
    except Exception as exc:  # noqa: BLE001 - pandas raises many types; the user needs one message
        raise LabelsError(f"{label}: not a readable tab-separated file ({exc})") from None
    frame.columns = [str(c).strip().lstrip("\ufeff") for c in frame.columns]
    id_column = next((c for c in ID_COLUMNS if c in frame.columns), None)
    if id_column is None or "study_group" not in frame.columns:
        raise LabelsError(
            f"{label}: needs an id column ({' or '.join(ID_COLUMNS)}) and 'study_group'; "
            f"found columns {list(frame.columns)}"
        )
    frame = frame.apply(lambda col: col.str.strip())
    has_split = "recommended_split" in frame.columns and (frame["recommended_split"] != "").any()

    rows, invalid = [], []
    columns = list(frame.columns)
    for number, values in enumerate(zip(*(frame[c].tolist() for c in columns)), start=2):  # row 1 is the header
        record = dict(zip(columns, values))
        raw_id = record[id_column]
        pid = canonical_participant_id(raw_id)
        if pid is None:
            invalid.append((number, raw_id, f"{id_column} {raw_id!r} is not a participant ID"))
            continue
        index = class_index(record["study_group"])
        if index is None:
            invalid.append((number, raw_id, f"study_group {record['study_group']!r} is not one of {list(CLASSES)}"))
            continue
        split = None
        if has_split:
            split = _SPLIT_ALIASES.get(record["recommended_split"].lower())
            if split is None:
                invalid.append((number, raw_id, f"recommended_split {record['recommended_split']!r} is not one of {list(SPLITS)}"))
                continue
        rows.append((pid, index, split, number, raw_id))

    # One participant, one class, one split. Zero-padded duplicates collapse here too: identical rows merge,
    # disagreeing ones leave the participant out and are reported.
    by_participant: dict[str, list[tuple[int, str | None, int, str]]] = {}
    for pid, index, split, number, raw_id in rows:
        by_participant.setdefault(pid, []).append((index, split, number, raw_id))
    table: dict[str, tuple[int, str | None, int]] = {}
    conflicts: list[LabelConflict] = []
    duplicate_rows = 0
    for pid, entries in by_participant.items():
        if len({(index, split) for index, split, _, _ in entries}) > 1:
            conflicts.append(LabelConflict(pid, tuple(
                (number, raw_id, CLASSES[index], split) for index, split, number, raw_id in entries)))
            continue
        duplicate_rows += len(entries) - 1
        index, split, number, _ = entries[0]
        table[pid] = (index, split, number)

    split_source = "recommended_split"
    ids = sorted(table)
    if not has_split:
        assignment = stratified_split(
            ids, [table[p][0] for p in ids], val_fraction=val_fraction, test_fraction=test_fraction, seed=seed
        )
        table = {p: (table[p][0], assignment[p], table[p][2]) for p in ids}
        split_source = f"stratified(seed={seed})"
    result = pd.DataFrame(
        {
            "participant_id": ids,
            "label": [table[p][0] for p in ids],
            "class_name": [CLASSES[table[p][0]] for p in ids],
            "split": [table[p][1] for p in ids],
        }
    )
    conflicts.sort(key=lambda conflict: conflict.rows[0][0])
    return Labels(result, invalid, conflicts, duplicate_rows, split_source, label)
