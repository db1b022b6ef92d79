"""`octft data audit`: what was found, what matched, what was lost and why.

Every file found under the OCT prefix lands in exactly one bucket:

    found = matched + unlabeled + unparsed + excluded

`unparsed` carries a reason per file, `excluded` the selection rule that removed it. What the storage refused
to list (a link out of the data root, a broken link, a FIFO) is not a file found: it is counted as `refused`,
each entry with its reason. Guards turn the
numbers into a pass/fail with thresholds from config; training refuses a failed audit unless the
failed guard is overridden by name.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd
from tqdm import tqdm

from octft.io import file_kind
from octft.data.labels import Labels, LabelsError, load_labels
from octft.data.layout import CLASSES, DEVICES, LABELS_KEY, SPLITS
from octft.data.locator import Located, OctFile, locate
from octft.data.readers import read_volume
from octft.data.storage import open_storage
from octft.data.volume import OctReadError

SAMPLE_SIZE = 5


@dataclass(frozen=True)
class Guard:
    name: str
    passed: bool
    detail: str


@dataclass(frozen=True)
class FileCounts:
    """Every file found, in exactly one bucket: found = matched + unlabeled + unparsed + excluded."""

    found: int
    matched: int
    unlabeled: int
    unparsed: int
    excluded: int
    by_device: dict[str, int]
    by_extension: dict[str, int]
    refused: int = 0  # entries not listed at all (links out of the data root, FIFOs): not among `found`


@dataclass(frozen=True)
class ParticipantCounts:
    """Participants on both sides: with OCT files, with labels, with both (and who is on one side only)."""

    with_oct: int
    with_labels: int
    matched: int
    labels_without_oct: list[str]
    oct_without_labels: list[str]


@dataclass
class AuditReport:
    """What `audit` found: every file accounted for, the participants on both sides, the split x class counts, what
    went wrong (with keys and reasons), the guards, and the matched volumes (`volumes`, the table training uses)."""

    data: str
    labels: str
    manifest_used: bool
    split_source: str
    selection: dict[str, Any]
    files: FileCounts
    participants: ParticipantCounts
    match_rate: float
    splits: dict[str, dict[str, int]]  # split -> class -> participants
    volumes_per_split: dict[str, dict[str, int]]  # split -> class -> volumes
    samples: dict[str, list[str]]  # a few IDs from each side, to see an ID format mismatch at a glance
    unparsed: list[dict[str, Any]]
    refused: list[dict[str, Any]]
    unlabeled: list[dict[str, Any]]
    excluded: list[dict[str, Any]]
    duplicates: list[list[str]]
    id_mismatches: list[Any]
    manifest_missing: list[dict[str, Any]]
    manifest_invalid: list[Any]
    labels_invalid: list[dict[str, Any]]
    labels_conflicting: list[dict[str, Any]]
    labels_duplicate_rows_merged: int
    volumes: pd.DataFrame  # the matched volumes: key, participant_id, label, class_name, split, device, ...
    guards: list[Guard] = field(default_factory=list)
    seconds: float | None = None

    @property
    def passed(self) -> bool:
        return all(guard.passed for guard in self.guards)

    def failed_guards(self, allowed: Sequence[str] = ()) -> list[Guard]:
        return [g for g in self.guards if not g.passed and g.name not in set(allowed)]

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON types (`octft data audit --json`), the volume table left out."""
        out = {item.name: getattr(self, item.name) for item in fields(self) if item.name not in ("volumes", "guards")}
        out["files"], out["participants"] = asdict(self.files), asdict(self.participants)
        out["match_rate"] = round(self.match_rate, 4)
        return {**out, "guards": [asdict(guard) for guard in self.guards], "passed": self.passed}


def selection_rule(
    item: OctFile, *, regions: Sequence[str] | None, devices: Sequence[str] | None, lateralities: Sequence[str] | None
) -> str | None:
    """The rule that excludes `item`, or None when it is selected."""
    if regions is not None and item.region not in regions:
        return f"region {item.region!r} not in {list(regions)}"
    if devices is not None and item.device not in devices:
        return f"device {item.device!r} not in {list(devices)}"
    if lateralities is not None and item.laterality not in lateralities:
        return f"laterality {item.laterality!r} not in {list(lateralities)}"
    return None


def _one_per_eye(items: list[OctFile], device_order: Sequence[str]) -> dict[str, str]:
    """Keys excluded by the one-per-eye rule -> the key kept in their place.

    Per participant and eye the kept volume is the first by: device order, then most frames, then key.
    """
    rank = {device: i for i, device in enumerate(device_order)}
    groups: dict[tuple, list[OctFile]] = defaultdict(list)
    for item in items:
        groups[(item.participant_id, item.laterality)].append(item)
    dropped: dict[str, str] = {}
    for group in groups.values():
        group.sort(key=lambda f: (rank.get(f.device, len(rank)), -(f.frames or 0), f.key))
        for item in group[1:]:
            dropped[item.key] = group[0].key
    return dropped


def _verify(items: list[OctFile], read: Callable[[str], Any], workers: int, progress: bool) -> None:
    """Decode each file; a failure becomes the file's problem (it is then counted as unparsed)."""
    def check(item: OctFile) -> None:
        try:
            read(item.key)
        except OctReadError as error:
            item.problem = f"unreadable: {error.reason}"

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        iterator = pool.map(check, items)
        if progress:
            iterator = tqdm(iterator, total=len(items), desc="verify", unit="file")
        for _ in iterator:
            pass


def audit(
    located: Located,
    labels: Labels,
    *,
    data_uri: str = "",
    regions: Sequence[str] | None = ("macula",),
    devices: Sequence[str] | None = None,
    lateralities: Sequence[str] | None = None,
    per_participant: str = "all",
    min_match_rate: float = 0.9,
    min_per_class: int = 1,
    max_duplicate_files: int = 0,
    verify_read: Callable[[str], Any] | None = None,
    verify_workers: int = 4,
    progress: bool = False,
) -> AuditReport:
    """Account for every located file against the labels and check the guards.

    `verify_read(key)`, when given, decodes each file that would be used (a truncated DICOM is only found this
    way); files that fail it are counted as unparsed with the reader's reason.
    """
    started = time.perf_counter()
    label_of = labels.by_participant()
    files = located.files
    # Unparsed: the path or manifest already says what is wrong. Unlabeled: a participant the labels lack.
    unlabeled = [item for item in files if item.problem is None and item.participant_id not in label_of]
    candidates = [item for item in files if item.problem is None and item.participant_id in label_of]
    selected, excluded = _select(candidates, located.duplicates, regions=regions, devices=devices,
                                 lateralities=lateralities, per_participant=per_participant)
    if verify_read is not None:
        _verify(selected, verify_read, verify_workers, progress)
        selected = [item for item in selected if item.problem is None]
    unparsed = [item for item in files if item.problem is not None]
    assert len(files) == len(selected) + len(unlabeled) + len(unparsed) + len(excluded), "a file fell out of the accounting"

    with_oct = {item.participant_id for item in files if item.participant_id is not None and item.problem is None}
    with_labels = set(label_of)
    matched = with_oct & with_labels
    match_rate = len(matched) / len(with_labels) if with_labels else 0.0
    volumes = _volume_table(selected, label_of)
    splits = participants_per_class(volumes)
    report = AuditReport(
        data=data_uri, labels=labels.source, manifest_used=located.manifest_used, split_source=labels.split_source,
        selection={"regions": list(regions) if regions is not None else None,
                   "devices": list(devices) if devices is not None else None,
                   "lateralities": list(lateralities) if lateralities is not None else None,
                   "per_participant": per_participant, "verified": verify_read is not None},
        files=FileCounts(len(files), len(selected), len(unlabeled), len(unparsed), len(excluded),
                         dict(sorted(Counter(item.device or "(none)" for item in files).items())),
                         dict(sorted(Counter(item.extension for item in files).items())), len(located.refused)),
        participants=ParticipantCounts(len(with_oct), len(with_labels), len(matched),
                                       sorted(with_labels - with_oct, key=_id_order),
                                       sorted(with_oct - with_labels, key=_id_order)),
        match_rate=match_rate, splits=splits, volumes_per_split=_volumes_per_split(volumes),
        samples={"label_ids": sorted(with_labels, key=_id_order)[:SAMPLE_SIZE],
                 "file_participant_folders": sorted({item.folder for item in files if item.folder})[:SAMPLE_SIZE],
                 "file_participant_ids": sorted(with_oct, key=_id_order)[:SAMPLE_SIZE]},
        unparsed=[{"key": item.key, "reason": item.problem} for item in unparsed], refused=located.refused,
        unlabeled=[{"key": item.key, "participant_id": item.participant_id} for item in unlabeled],
        excluded=excluded, duplicates=located.duplicates, id_mismatches=located.id_mismatches,
        manifest_missing=located.manifest_missing, manifest_invalid=located.manifest_invalid,
        labels_invalid=[{"row": r, "id": i, "reason": why} for r, i, why in labels.invalid],
        labels_conflicting=[{"participant_id": c.participant_id,
                             "rows": [{"row": n, "id": i, "class": k, "split": s} for n, i, k, s in c.rows]}
                            for c in labels.conflicts],
        labels_duplicate_rows_merged=labels.duplicate_rows, volumes=volumes,
    )
    report.guards = _guards(report, labels, located, min_match_rate=min_match_rate, min_per_class=min_per_class,
                            max_duplicate_files=max_duplicate_files)
    report.seconds = round(time.perf_counter() - started, 3)
    return report


def _select(candidates: list[OctFile], duplicates: list[list[str]], *, regions, devices, lateralities,
            per_participant: str) -> tuple[list[OctFile], list[dict]]:
    """(selected files, excluded rows with their rule): the selection rule, then duplicates, then one-per-eye."""
    excluded: list[dict] = []
    selected: list[OctFile] = []
    for item in candidates:
        rule = selection_rule(item, regions=regions, devices=devices, lateralities=lateralities)
        if rule is None:
            selected.append(item)
        else:
            excluded.append({"key": item.key, "rule": rule})
    duplicate_of = {key: group[0] for group in duplicates for key in group[1:]}
    excluded += [{"key": item.key, "rule": f"duplicate of {duplicate_of[item.key]}"} for item in selected
                 if item.key in duplicate_of]
    selected = [item for item in selected if item.key not in duplicate_of]
    if per_participant == "one_per_eye":
        dropped = _one_per_eye(selected, list(devices or DEVICES))
        excluded.extend({"key": key, "rule": f"one_per_eye: kept {kept}"} for key, kept in sorted(dropped.items()))
        selected = [item for item in selected if item.key not in dropped]
    return selected, excluded


VOLUME_COLUMNS = ["key", "participant_id", "label", "class_name", "split", "device", "laterality", "region", "size",
                  "sha1", "version"]


def _volume_table(selected: list[OctFile], label_of: dict) -> pd.DataFrame:
    rows = [{"key": item.key, "participant_id": item.participant_id, "label": label_of[item.participant_id][0],
             "class_name": CLASSES[label_of[item.participant_id][0]], "split": label_of[item.participant_id][1],
             "device": item.device, "laterality": item.laterality, "region": item.region, "size": item.size,
             "sha1": item.sha1, "version": item.version} for item in selected]
    return pd.DataFrame(rows, columns=VOLUME_COLUMNS)


def _volumes_per_split(volumes: pd.DataFrame) -> dict[str, dict[str, int]]:
    counts = {split: {name: 0 for name in CLASSES} for split in SPLITS}
    if len(volumes):
        for (split, name), count in volumes.groupby(["split", "class_name"]).size().items():
            counts[split][name] = int(count)
    return counts


def _guards(report: AuditReport, labels: Labels, located: Located, *, min_match_rate: float, min_per_class: int,
            max_duplicate_files: int) -> list[Guard]:
    people = report.participants
    guards = [Guard("match_rate", report.match_rate >= min_match_rate,
                    f"{people.matched} of {people.with_labels} labelled participants have OCT files "
                    f"({report.match_rate:.1%}; minimum {min_match_rate:.0%})")]
    guards += split_class_guards(report.splits, min_per_class)
    conflicts = [c.participant_id for c in labels.conflicts]
    guards.append(Guard(
        "conflicting_labels", not conflicts,
        f"every participant has one class and one split ({labels.duplicate_rows} identical duplicate rows merged)"
        if not conflicts else f"{len(conflicts)} participants with rows of different classes or splits, left out: "
        f"{', '.join(conflicts[:10])}{' ...' if len(conflicts) > 10 else ''}"))
    duplicates = sum(len(group) - 1 for group in located.duplicates)
    guards.append(Guard("duplicate_files", duplicates <= max_duplicate_files,
                        f"{duplicates} duplicate files (maximum {max_duplicate_files})"
                        + (f": {located.duplicates[:5]}" if located.duplicates else "")))
    return guards


def participants_per_class(volumes: pd.DataFrame) -> dict[str, dict[str, int]]:
    """{split: {class name: participants}} of a volume table (every split and class present, zeros included)."""
    splits = {split: {name: 0 for name in CLASSES} for split in SPLITS}
    if len(volumes):
        for (split, name), count in volumes.groupby(["split", "class_name"])["participant_id"].nunique().items():
            splits[split][name] = int(count)
    return splits


def split_class_guards(splits: dict[str, dict[str, int]], min_per_class: int) -> list[Guard]:
    """`classes_in_<split>`: every class has at least `min_per_class` participants (at least 1) in the split.

    The audit checks the files it found; training checks again what survived the cache, with this same rule.
    """
    guards = []
    for split in SPLITS:
        short = [name for name, n in splits[split].items() if n < max(min_per_class, 1)]
        guards.append(
            Guard(
                f"classes_in_{split}",
                not short,
                f"{split}: " + ", ".join(f"{name}={n}" for name, n in splits[split].items())
                + (f"; below {max(min_per_class, 1)}: {', '.join(short)}" if short else ""),
            )
        )
    return guards


def _id_order(participant_id: str) -> tuple[int, str]:
    return (int(participant_id) if participant_id.isdigit() else 0, participant_id)


def format_report(report: AuditReport) -> str:
    """The human-readable audit: numbers first, then what went wrong, then the guards."""
    d = report.to_dict()
    files, people = d["files"], d["participants"]
    lines = [
        f"data: {d['data']}   labels: {d['labels']}   manifest: {'yes' if d['manifest_used'] else 'no'}   split: {d['split_source']}",
        f"files found {files['found']} = matched {files['matched']} + unlabeled {files['unlabeled']} "
        f"+ unparsed {files['unparsed']} + excluded {files['excluded']}"
        + (f"   (and {files['refused']} refused, not read: see below)" if files["refused"] else ""),
        "  by device: " + ", ".join(f"{k}={v}" for k, v in files["by_device"].items()),
        "  by extension: " + ", ".join(f"{k}={v}" for k, v in files["by_extension"].items()),
        f"participants: with OCT {people['with_oct']}, with labels {people['with_labels']}, matched {people['matched']} "
        f"(match rate {d['match_rate']:.1%})",
        f"  sample label IDs: {d['samples']['label_ids']}   sample folders: {d['samples']['file_participant_folders']}",
    ]
    if people["labels_without_oct"]:
        lines.append(f"  labelled without OCT ({len(people['labels_without_oct'])}): {people['labels_without_oct'][:20]}")
    if people["oct_without_labels"]:
        lines.append(f"  OCT without labels ({len(people['oct_without_labels'])}): {people['oct_without_labels'][:20]}")
    header = "split".ljust(7) + "".join(name[:12].rjust(14) for name in CLASSES)
    lines += ["participants (volumes) per split x class:", "  " + header]
    for split in SPLITS:
        lines.append(
            "  " + split.ljust(7)
            + "".join(f"{d['splits'][split][n]} ({d['volumes_per_split'][split][n]})".rjust(14) for n in CLASSES)
        )
    for title, rows, fmt in (
        ("unparsed", d["unparsed"], lambda r: f"{r['key']}: {r['reason']}"),
        ("refused", d["refused"], lambda r: f"{r['key']}: {r['reason']}"),
        ("manifest rows without a file", d["manifest_missing"], lambda r: f"row {r['row']}: {r['filepath']}"),
        ("ID mismatches", d["id_mismatches"], lambda r: str(r)),
        ("unusable label rows", d["labels_invalid"], lambda r: f"row {r['row']}: {r['reason']}"),
        ("conflicting label rows", d["labels_conflicting"], lambda r: f"{r['participant_id']}: " + ", ".join(
            f"row {x['row']} {x['id']!r} {x['class']}/{x['split'] or '-'}" for x in r["rows"])),
    ):
        if rows:
            lines.append(f"{title} ({len(rows)}):")
            lines += [f"  {fmt(r)}" for r in rows[:15]]
            if len(rows) > 15:
                lines.append(f"  ... {len(rows) - 15} more (see --json)")
    if d["excluded"]:
        # Selection rules exclude many files for one reason: count them by rule, list them in --json.
        by_rule = Counter(
            "duplicate of another file" if r["rule"].startswith("duplicate of")
            else "one_per_eye: another volume kept" if r["rule"].startswith("one_per_eye")
            else r["rule"]
            for r in d["excluded"]
        )
        lines.append(f"excluded ({len(d['excluded'])}, keys in --json):")
        lines += [f"  {n} x {rule}" for rule, n in by_rule.most_common()]
    lines.append("guards:")
    lines += [f"  [{'pass' if g['passed'] else 'FAIL'}] {g['name']}: {g['detail']}" for g in d["guards"]]
    lines.append("audit passed" if d["passed"] else "audit FAILED")
    return "\n".join(lines)


def read_labels_source(labels_uri: str, storage, data_uri: str) -> tuple[bytes, str]:
    """Labels may live beside the data (any storage) or in a local file."""
    base = data_uri.rstrip("/") + "/"
    if labels_uri.startswith(base):
        return storage.read_bytes(labels_uri[len(base):]), labels_uri
    if "://" in labels_uri and not labels_uri.startswith("file://"):
        parent, _, name = labels_uri.rpartition("/")
        return open_storage(parent).read_bytes(name), labels_uri
    path = Path(labels_uri.removeprefix("file://"))
    if not path.exists():
        raise LabelsError(f"{labels_uri}: labels file not found; pass --labels or set data.labels")
    if not path.is_file():  # a FIFO would block the read; a folder is no table
        raise LabelsError(f"{labels_uri}: is {file_kind(path.stat().st_mode)}, not a regular file; pass --labels "
                          "with the participants table")
    return path.read_bytes(), labels_uri


def audit_dataset(
    uri: str,
    labels: str | None = None,
    *,
    use_manifest: bool = True,
    verify: bool = False,
    regions: Sequence[str] | None = ("macula",),
    devices: Sequence[str] | None = None,
    lateralities: Sequence[str] | None = None,
    per_participant: str = "all",
    min_match_rate: float = 0.9,
    min_per_class: int = 1,
    max_duplicate_files: int = 0,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    split_seed: int = 0,
    cache_dir: str | None = None,
    storage=None,
    progress: bool = False,
) -> AuditReport:
    """Open the data, read the labels, locate and audit: the whole `octft data audit`.

        >>> report = audit_dataset("demo/data")            # doctest: +SKIP
        >>> report.passed, report.to_dict()["files"]       # doctest: +SKIP
    """
    if storage is None:
        storage = open_storage(uri, cache_dir=cache_dir)
    labels_uri = labels or uri.rstrip("/") + "/" + LABELS_KEY
    data, name = read_labels_source(labels_uri, storage, uri)
    table = load_labels(data, name=name, val_fraction=val_fraction, test_fraction=test_fraction, seed=split_seed)
    located = locate(storage, use_manifest=use_manifest)
    verify_read = None
    if verify:
        def verify_read(key: str):
            return read_volume(storage.read_bytes(key), name=f"{storage.uri.rstrip('/')}/{key}")

    return audit(
        located,
        table,
        data_uri=uri,
        regions=regions,
        devices=devices,
        lateralities=lateralities,
        per_participant=per_participant,
        min_match_rate=min_match_rate,
        min_per_class=min_per_class,
        max_duplicate_files=max_duplicate_files,
        verify_read=verify_read,
        progress=progress,
    )
