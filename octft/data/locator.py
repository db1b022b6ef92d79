"""Find every OCT file of an AI-READI release and say whose it is.

Layout: `retinal_oct/structural_oct/<device>/<participant folder>/<files>`. When
`retinal_oct/manifest.tsv` exists it is the authority for each file's participant and attributes.
Without it, the participant comes from the participant folder, never from a pattern over the whole
key (the old pipeline's regex `\\b(1[0-9]{3})\\b` matched one site of three and lost 66% of the data).

Every object found under the OCT prefix comes back as an `OctFile`; one that cannot be used carries
the reason in `problem`, so callers count it instead of dropping it. What the storage refuses to list (a link
out of the data root, a FIFO) is never a file found: it comes back in `Located.refused`, with the reason.
"""

from __future__ import annotations

import io
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable

import pandas as pd

from octft.data.ids import canonical_participant_id
from octft.data.layout import DEVICES, MANIFEST_KEY, OCT_PREFIX
from octft.data.labels import LabelsError

IMAGE_EXTENSIONS = (".dcm", ".dicom", ".nii", ".nii.gz", ".npy", ".npz")
MANIFEST_ID_COLUMNS = ("participant_id", "person_id")


@dataclass
class OctFile:
    key: str
    size: int
    sha1: str | None = None
    version: str | None = None  # the listing's version of the object (see ObjectInfo.version)
    participant_id: str | None = None
    folder: str | None = None  # the participant folder as written on storage
    device: str | None = None
    laterality: str | None = None
    region: str | None = None
    frames: int | None = None
    height: int | None = None
    width: int | None = None
    problem: str | None = None  # why the file cannot be used; None when it can
    name_id: str | None = None  # the participant ID a file name starts with, if any

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1]

    @property
    def extension(self) -> str:
        return file_extension(self.name)


@dataclass
class Located:
    files: list[OctFile]
    manifest_used: bool
    manifest_missing: list[dict] = field(default_factory=list)  # manifest rows whose file is not on storage
    manifest_invalid: list[dict] = field(default_factory=list)  # manifest rows that name no usable participant
    id_mismatches: list[dict] = field(default_factory=list)  # file name or manifest disagrees with the folder
    duplicates: list[list[str]] = field(default_factory=list)  # groups of keys with identical content
    refused: list[dict] = field(default_factory=list)  # entries the storage would not list: key, reason


def file_extension(name: str) -> str:
    """`.dcm`, `.nii.gz`, ... of a file name, lower-case; "(none)" when it has none."""
    name = name.lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    stem, dot, suffix = name.rpartition(".")
    return f".{suffix}" if dot and stem else "(none)"


def normalise_laterality(value: object) -> str | None:
    """'L' or 'R' from the ways manifests and DICOM tags write an eye (L, left, OS ...), else None."""
    text = str(value).strip().upper() if value is not None else ""
    return {"L": "L", "LEFT": "L", "OS": "L", "R": "R", "RIGHT": "R", "OD": "R"}.get(text)


def normalise_region(value: object) -> str | None:
    """A region name as `data.selection.regions` writes it (`optic_disc`), else None."""
    text = str(value).strip().lower().replace(" ", "_").replace("-", "_") if value is not None else ""
    if not text or text == "nan":
        return None
    return "optic_disc" if text in ("optic_disc", "optic_nerve_head", "onh", "disc") else text


def _int_or_none(value: object) -> int | None:
    try:
        return int(float(str(value)))
    except (TypeError, ValueError):
        return None


_LATERALITY_TOKENS = {"l": "L", "left": "L", "os": "L", "r": "R", "right": "R", "od": "R"}


def name_tokens(name: str) -> tuple[str | None, str | None, str | None]:
    """(leading id, laterality, region) from an AI-READI file name like `1001_maestro2_macula_oct_l_<uid>.dcm`.

    The extension goes first, so a token just before it counts like any other (`..._oct_r.dcm`,
    `..._l_macula.dcm`); tokens split at `_`, `-`, `.` and spaces (a DICOM UID's dots leave only digits).

    >>> name_tokens("1001_maestro2_oct_l_macula.dcm")
    ('1001', 'L', 'macula')
    """
    extension = file_extension(name)
    stem = name[: -len(extension)] if extension != "(none)" else name
    tokens = re.split(r"[_\-. ]+", stem.lower())
    leading = tokens[0] if tokens and tokens[0].isdigit() else None
    laterality = next((_LATERALITY_TOKENS[t] for t in tokens[1:] if t in _LATERALITY_TOKENS), None)
    region = "macula" if "macula" in tokens else "optic_disc" if ("disc" in tokens or "optic" in tokens) else None
    return leading, laterality, region


def parse_key(key: str, size: int, sha1: str | None = None, version: str | None = None) -> OctFile:
    """Attribute one object key from its path alone (the no-manifest rule)."""
    item = OctFile(key=key, size=size, sha1=sha1, version=version)
    parts = key.split("/")
    prefix = OCT_PREFIX.split("/")
    if parts[: len(prefix)] != prefix or len(parts) < len(prefix) + 3:
        item.problem = f"not under {OCT_PREFIX}/<device>/<participant>/"
        return item
    device, folder, name = parts[len(prefix)], parts[len(prefix) + 1], parts[-1]
    item.device, item.folder = device, folder
    if device not in DEVICES:
        item.problem = f"unknown device folder {device!r} (known: {', '.join(DEVICES)})"
        return item
    extension = file_extension(name)
    if extension not in IMAGE_EXTENSIONS and extension != "(none)":
        item.problem = f"not an image file (extension {extension})"
        return item
    item.participant_id = canonical_participant_id(folder)
    if item.participant_id is None:
        item.problem = f"participant folder {folder!r} is not a participant ID"
        return item
    leading, item.laterality, item.region = name_tokens(name)
    item.name_id = canonical_participant_id(leading) if leading is not None else None
    return item


def read_manifest(data: bytes, *, name: str = MANIFEST_KEY) -> pd.DataFrame:
    frame = pd.read_csv(io.BytesIO(data), sep="\t", dtype=str, keep_default_na=False)
    frame.columns = [str(c).strip().lstrip("\ufeff") for c in frame.columns]
    id_column = next((c for c in MANIFEST_ID_COLUMNS if c in frame.columns), None)
    if id_column is None or "filepath" not in frame.columns:
        raise LabelsError(
            f"{name}: needs columns 'filepath' and one of {MANIFEST_ID_COLUMNS}; found {list(frame.columns)}. "
            "Fix the manifest or set data.use_manifest=false to attribute files by folder."
        )
    frame = frame.apply(lambda col: col.str.strip())
    return frame.rename(columns={id_column: "participant_id"})


def _manifest_key(filepath: str) -> str:
    key = filepath.strip().lstrip("/")
    return key if key.startswith("retinal_oct/") else f"retinal_oct/{key}"


def find_duplicates(files: Iterable[OctFile], sha1_of) -> list[list[str]]:
    """Groups of keys whose content is identical. Only same-size files are hashed, and only when the
    listing did not already give a SHA-1, so a release of distinct files costs no reads."""
    by_size: dict[int, list[OctFile]] = defaultdict(list)
    for item in files:
        by_size[item.size].append(item)
    groups: list[list[str]] = []
    for same_size in by_size.values():
        if len(same_size) < 2:
            continue
        by_hash: dict[str, list[str]] = defaultdict(list)
        for item in same_size:
            if item.sha1 is None:
                item.sha1 = sha1_of(item.key)
            by_hash[item.sha1].append(item.key)
        groups.extend(sorted(keys) for keys in by_hash.values() if len(keys) > 1)
    return sorted(groups)


def locate(storage, *, use_manifest: bool = True) -> Located:
    """Every object under the OCT prefix of `storage`, attributed to a participant or given a problem."""
    refused: list[tuple[str, str]] = []
    listing = [info for info in storage.list(OCT_PREFIX + "/", refused=refused)]
    manifest_used = use_manifest and storage.exists(MANIFEST_KEY)
    files = [parse_key(info.key, info.size, info.sha1, info.version) for info in listing]
    located = Located(files=files, manifest_used=manifest_used,
                      refused=[{"key": key, "reason": reason} for key, reason in refused])

    for item in files:
        if item.problem is None and item.name_id is not None and item.name_id != item.participant_id:
            located.id_mismatches.append({"key": item.key, "folder_id": item.participant_id, "file_name_id": item.name_id})

    if manifest_used:
        manifest = read_manifest(storage.read_bytes(MANIFEST_KEY))
        by_key = {item.key: item for item in files}
        listed: set[str] = set()
        columns = list(manifest.columns)
        # Plain lists: iterating pandas' string columns element by element is several times slower.
        for row_number, values in enumerate(zip(*(manifest[c].tolist() for c in columns)), start=2):
            row = dict(zip(columns, values))
            key = _manifest_key(row["filepath"])
            pid = canonical_participant_id(row["participant_id"])
            if pid is None:
                located.manifest_invalid.append(
                    {"row": row_number, "filepath": row["filepath"], "reason": f"participant_id {row['participant_id']!r} is not an ID"}
                )
                continue
            item = by_key.get(key)
            if item is None:
                located.manifest_missing.append({"row": row_number, "filepath": row["filepath"], "participant_id": pid})
                continue
            listed.add(key)
            if item.participant_id is not None and item.participant_id != pid:
                located.id_mismatches.append({"key": key, "folder_id": item.participant_id, "manifest_id": pid})
            item.participant_id = pid
            item.laterality = normalise_laterality(row.get("laterality")) or item.laterality
            item.region = normalise_region(row.get("anatomic_region")) or item.region
            item.frames = _int_or_none(row.get("number_of_frames"))
            item.height = _int_or_none(row.get("height"))
            item.width = _int_or_none(row.get("width"))
            if item.problem is not None and item.problem.startswith("participant folder"):
                item.problem = None  # the manifest names the participant; the folder no longer matters
        for item in files:
            if item.key not in listed and item.problem is None:
                item.problem = f"not listed in {MANIFEST_KEY}"

    usable = [item for item in files if item.problem is None]
    located.duplicates = find_duplicates(usable, storage.sha1)
    return located

