"""Synthetic AI-READI: a small dataset with the real release's layout, for tests and demos.

The real data cannot leave its licence, so everything downstream (locator, labels, audit, readers,
training) is exercised on this stand-in. It copies what matters about the release: the folders and
tables of `octft.data.layout`, multi-frame Ophthalmic Tomography DICOMs in three transfer syntaxes,
the class and split proportions, and, with `messy=True`, the faults real data brings. The images
carry a class signal a small model can learn (retinal layer bands that thin and dim from healthy to
insulin dependent) with enough per-participant variation that the classes overlap.

>>> report = synthesize("/tmp/aireadi-synth", participants=24, seed=0, messy=True)  # doctest: +SKIP
>>> report.faults["truncated"]  # doctest: +SKIP
['retinal_oct/structural_oct/.../1004_triton_macula_oct_r_1.2.826....dcm']
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    generate_uid,
)
from tqdm import tqdm

from octft.errors import UsageError
from octft.data.layout import (
    CLASSES,
    DEVICES,
    LABELS_KEY,
    LATERALITIES,
    MANIFEST_KEY,
    OCT_PREFIX,
    SITE_DIGITS,
    SPLITS,
)

OPHTHALMIC_TOMOGRAPHY_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.5.4"
REPORT_NAME = "synth_report.json"

# Participants per split and class in AI-READI v2, in CLASSES order; synthesize() scales these.
RELEASE_COUNTS = {
    "train": (292, 162, 235, 58),
    "val": (40, 40, 47, 33),
    "test": (40, 40, 41, 39),
}
MIN_PER_SPLIT_CLASS = 2
MIN_PARTICIPANTS = MIN_PER_SPLIT_CLASS * len(SPLITS) * len(CLASSES)
MAX_PARTICIPANTS = 999 * len(SITE_DIGITS)  # IDs are four digits: a site digit and 001..999

SITE_NAMES = {"1": "UW", "4": "UAB", "7": "UCSD"}

PARTICIPANT_COLUMNS = ("participant_id", "clinical_site", "study_group", "age", "recommended_split", "retinal_oct")
MANIFEST_COLUMNS = (
    "participant_id",
    "manufacturer",
    "manufacturers_model_name",
    "anatomic_region",
    "imaging",
    "laterality",
    "height",
    "width",
    "number_of_frames",
    "pixel_spacing",
    "slice_thickness",
    "sop_instance_uid",
    "filepath",
)
FAULT_KINDS = (
    "zero_padded_folders",
    "prefixed_folders",
    "unlabelled_participants",
    "labelled_without_files",
    "truncated",
    "non_image",
    "duplicates",
    "not_in_manifest",
    "manifest_missing_file",
)

# device folder -> (manufacturer, model, short name in file names, scan depth in mm, relative gain).
# Depth and gain differ so that devices look a little different, as they do in the release.
_DEVICE_INFO = {
    "heidelberg_spectralis": ("Heidelberg", "Spectralis", "spectralis", 1.9, 1.05),
    "topcon_maestro2": ("Topcon", "Maestro2", "maestro2", 2.3, 0.95),
    "topcon_triton": ("Topcon", "Triton", "triton", 2.6, 0.92),
    "zeiss_cirrus": ("Zeiss", "Cirrus", "cirrus", 2.0, 1.0),
}
_SCAN_WIDTH_MM = 6.0

# Class appearance, in CLASSES order: retinal thickness and reflectivity fall with disease, and
# hyperreflective foci (bright spots) appear. Participant spread below makes neighbours overlap.
_CLASS_THICKNESS = (1.0, 0.93, 0.86, 0.78)
_CLASS_REFLECTIVITY = (1.0, 0.94, 0.88, 0.82)
_CLASS_SPOTS = (0.0, 0.3, 1.0, 4.0)  # expected bright spots per volume of 8 frames
_PARTICIPANT_SPREAD = 0.05

# Reflectivity against fractional depth inside the retina (0 = inner surface, 1 = RPE): RNFL,
# GCL/IPL, INL, OPL, ONL, ellipsoid zone, RPE, then the choroid fading below.
_LAYER_DEPTHS = (-0.02, 0.0, 0.12, 0.14, 0.35, 0.37, 0.45, 0.47, 0.52, 0.54, 0.80, 0.82, 0.86, 0.88,
                 0.90, 1.0, 1.05, 1.6)
_LAYER_VALUES = (0.03, 0.80, 0.75, 0.50, 0.50, 0.22, 0.22, 0.45, 0.45, 0.15, 0.15, 0.70, 0.70, 0.30,
                 0.95, 0.95, 0.45, 0.08)

_SYNTAX_SHARE = 0.2  # share of files for each compressed transfer syntax
_ENCODING_PLUGIN = {JPEG2000Lossless: "pylibjpeg", RLELossless: "pydicom"}
_SYNTAX_NAMES = {ExplicitVRLittleEndian: "explicit_vr_little_endian", JPEG2000Lossless: "jpeg2000_lossless",
                 RLELossless: "rle_lossless"}


@dataclass
class SynthReport:
    """What `synthesize` wrote: counts, and the exact keys or IDs of every planted fault.

    Keys are paths relative to the dataset root (`retinal_oct/structural_oct/...`); the manifest's
    `filepath` is the key with a leading '/'. Participant IDs are canonical strings ('1001').
    """

    root: str
    seed: int
    messy: bool
    participants: int  # rows in participants.tsv
    files: int  # DICOM files on disk, whatever their fault
    manifest_rows: int
    split_class_counts: dict[str, dict[str, int]]  # labelled participants per split and class
    transfer_syntaxes: dict[str, int]  # DICOM files per transfer syntax
    faults: dict[str, list] = field(default_factory=lambda: {kind: [] for kind in FAULT_KINDS})
    class_signal: float = 1.0  # share of each class's distance from the classes' mean (synthesize's class_signal)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Participant:
    participant_id: str
    class_index: int
    split: str
    age: int
    thickness: float
    reflectivity: float
    gain: float
    labelled: bool = True
    folder: str = ""
    spots: float | None = None  # expected bright spots per 8 frames; None: its class's (_CLASS_SPOTS)


@dataclass
class _Scan:
    participant: _Participant
    device: str
    region: str
    laterality: str
    sop_uid: str
    syntax: str = ExplicitVRLittleEndian

    @property
    def key(self) -> str:
        return f"{OCT_PREFIX}/{self.device}/{self.participant.folder}/{self.file_name(self.sop_uid)}"

    def file_name(self, uid: str) -> str:
        short = _DEVICE_INFO[self.device][2]
        return f"{self.participant.participant_id}_{short}_{self.region}_oct_{self.laterality.lower()}_{uid}.dcm"


def split_class_counts(participants: int, *, train_majority_share: float | None = None) -> dict[str, dict[str, int]]:
    """Participants per split and class: the release's proportions scaled to `participants`.

    Every cell keeps at least MIN_PER_SPLIT_CLASS participants; the rest follow the release by
    largest remainder, so the counts always sum to `participants`. `train_majority_share` (e.g. 0.7) moves
    training participants into the first class until it holds that share of the training split: a training
    split dominated by one class, as the original pipeline's was after its ID regex dropped participants, on
    which an unweighted loss drives the head to predict that class (validation and test keep the release's mix).

    >>> split_class_counts(24)["test"]["insulin_dependent"]
    2
    """
    if participants < MIN_PARTICIPANTS:
        raise UsageError(
            f"participants={participants} is below the minimum of {MIN_PARTICIPANTS} "
            f"({MIN_PER_SPLIT_CLASS} per class in each of {len(SPLITS)} splits x {len(CLASSES)} classes); "
            f"pass participants >= {MIN_PARTICIPANTS}"
        )
    if participants > MAX_PARTICIPANTS:
        raise UsageError(
            f"participants={participants} is above the maximum of {MAX_PARTICIPANTS} "
            f"(four-digit IDs, 999 per site); pass participants <= {MAX_PARTICIPANTS}"
        )
    cells = [(split, class_index) for split in SPLITS for class_index in range(len(CLASSES))]
    total = sum(sum(counts) for counts in RELEASE_COUNTS.values())
    ideal = {cell: participants * RELEASE_COUNTS[cell[0]][cell[1]] / total for cell in cells}
    counts = {cell: max(MIN_PER_SPLIT_CLASS, math.floor(ideal[cell])) for cell in cells}
    # Raising small cells to the minimum can overshoot: take back from the most over-served cells.
    while sum(counts.values()) > participants:
        cell = max((c for c in cells if counts[c] > MIN_PER_SPLIT_CLASS), key=lambda c: counts[c] - ideal[c])
        counts[cell] -= 1
    while sum(counts.values()) < participants:
        cell = max(cells, key=lambda c: ideal[c] - counts[c])
        counts[cell] += 1
    if train_majority_share is not None:
        _dominate_training_split(counts, train_majority_share)
    return {split: {CLASSES[i]: counts[(split, i)] for i in range(len(CLASSES))} for split in SPLITS}


def _dominate_training_split(counts: dict[tuple[str, int], int], share: float) -> None:
    train = sum(counts[("train", i)] for i in range(len(CLASSES)))
    least = train - MIN_PER_SPLIT_CLASS * (len(CLASSES) - 1)
    if not 1.0 / len(CLASSES) <= share < 1.0 or round(share * train) > least:
        raise UsageError(f"train_majority_share={share} must be in 1/{len(CLASSES)}..1 and leave every other class "
                         f"{MIN_PER_SPLIT_CLASS} of the {train} training participants; lower it or add participants")
    while counts[("train", 0)] < round(share * train):
        donor = max(range(1, len(CLASSES)), key=lambda i: counts[("train", i)])
        counts[("train", donor)] -= 1
        counts[("train", 0)] += 1


def synthesize(
    out_dir: str | Path,
    *,
    participants: int = 120,
    seed: int = 0,
    messy: bool = False,
    train_majority_share: float | None = None,
    class_signal: float = 1.0,
    frames: int = 8,
    height: int = 64,
    width: int = 64,
    progress: bool = False,
) -> SynthReport:
    """Write a synthetic AI-READI release under `out_dir` and return what was written.

    Writes `participants.tsv`, `retinal_oct/manifest.tsv`, the DICOM files under
    `retinal_oct/structural_oct/<device>/<participant_id>/`, and `synth_report.json` (the returned
    report). Same seed, same tables and pixel data. `messy=True` plants the faults listed in
    `SynthReport.faults`. `train_majority_share` makes the first class that share of the training split
    (`split_class_counts`). `class_signal` scales how far each class's retina (thickness, reflectivity, bright spots)
    sits from the four classes' mean: 1 as drawn, 0 no class signal at all, in between a harder task.

    >>> report = synthesize("/tmp/aireadi-synth", participants=24, seed=1)  # doctest: +SKIP
    >>> report.split_class_counts["val"]["healthy"]  # doctest: +SKIP
    2
    """
    cell_counts = split_class_counts(participants, train_majority_share=train_majority_share)
    for name, value, least in (("frames", frames, 1), ("height", height, 16), ("width", width, 16)):
        if value < least:
            raise UsageError(f"{name}={value} is too small for a retinal OCT volume; pass {name} >= {least}")
    if not 0.0 <= class_signal <= 1.0:
        raise UsageError(f"class_signal={class_signal} must be in 0..1 (1: the classes as drawn, 0: no class signal)")
    root = Path(out_dir)
    rng = np.random.default_rng(seed)
    # Faults draw from their own stream so the labelled participants are the same clean or messy.
    fault_rng = np.random.default_rng([seed, 1])

    people = _labelled_participants(cell_counts, rng)
    if class_signal != 1.0:
        _weaken_class_signal(people, class_signal)
    scans = {person.participant_id: _plan_scans(person, seed, rng) for person in people}
    faults: dict[str, list] = {kind: [] for kind in FAULT_KINDS}
    if messy:
        _plant_participant_faults(people, scans, faults, seed, fault_rng)
    all_scans = [scan for person_scans in scans.values() for scan in person_scans]
    _assign_syntaxes(all_scans, np.random.default_rng([seed, 2]))

    written: dict[str, bytes] = {}
    for scan in tqdm(all_scans, desc="synthetic OCT", unit="file", disable=not progress):
        array = _render_volume(scan, seed=seed, frames=frames, height=height, width=width)
        written[scan.key] = _dicom_bytes(array, scan, seed=seed, frames=frames, height=height, width=width)

    manifest = {scan.key: _manifest_row(scan, frames=frames, height=height, width=width) for scan in all_scans}
    extra_files: dict[str, bytes] = {}
    if messy:
        extra_files = _plant_file_faults(all_scans, written, manifest, faults, seed, fault_rng)

    for key, data in {**written, **extra_files}.items():
        path = root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    _write_tsv(root / MANIFEST_KEY, MANIFEST_COLUMNS, [manifest[key] for key in sorted(manifest)], "\n")
    labels = [_participant_row(person) for person in sorted(people, key=lambda p: int(p.participant_id))]
    # AI-READI's tables come from Windows tools often enough; messy data keeps their line ends.
    _write_tsv(root / LABELS_KEY, PARTICIPANT_COLUMNS, labels, "\r\n" if messy else "\n")

    dicom_keys = [key for key in {**written, **extra_files} if key.endswith(".dcm")]
    syntax_counts = {name: 0 for name in _SYNTAX_NAMES.values()}
    for scan in all_scans:
        if scan.key in written:
            syntax_counts[_SYNTAX_NAMES[scan.syntax]] += 1
    for original, _copy in faults["duplicates"]:
        syntax_counts[_SYNTAX_NAMES[next(s.syntax for s in all_scans if s.key == original)]] += 1
    report = SynthReport(
        root=str(root),
        seed=seed,
        messy=messy,
        participants=len(people),
        files=len(dicom_keys),
        manifest_rows=len(manifest),
        split_class_counts=cell_counts,
        transfer_syntaxes=syntax_counts,
        faults=faults,
        class_signal=class_signal,
    )
    (root / REPORT_NAME).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return report


def _labelled_participants(cell_counts: dict[str, dict[str, int]], rng: np.random.Generator) -> list[_Participant]:
    cells = [
        (split, CLASSES.index(name)) for split in SPLITS for name, n in cell_counts[split].items() for _ in range(n)
    ]
    order = rng.permutation(len(cells))
    # Sites take turns so all three appear however few participants there are.
    site_order = rng.permutation(len(SITE_DIGITS))
    next_number = {digit: 1 for digit in SITE_DIGITS}
    people = []
    for position, cell_index in enumerate(order):
        split, class_index = cells[cell_index]
        digit = SITE_DIGITS[site_order[position % len(SITE_DIGITS)]]
        participant_id = f"{digit}{next_number[digit]:03d}"
        next_number[digit] += 1
        people.append(_new_participant(participant_id, class_index, split, rng))
    return people


def _weaken_class_signal(people: list[_Participant], signal: float) -> None:
    """Move each participant's class appearance toward the classes' mean, keeping its own spread: `signal` of the
    class's distance from the mean is left."""
    centre = [float(np.mean(values)) for values in (_CLASS_THICKNESS, _CLASS_REFLECTIVITY, _CLASS_SPOTS)]
    for person in people:
        c = person.class_index
        person.thickness -= (1.0 - signal) * (_CLASS_THICKNESS[c] - centre[0])
        person.reflectivity -= (1.0 - signal) * (_CLASS_REFLECTIVITY[c] - centre[1])
        person.spots = centre[2] + signal * (_CLASS_SPOTS[c] - centre[2])


def _new_participant(participant_id: str, class_index: int, split: str, rng: np.random.Generator) -> _Participant:
    spread = rng.normal(0.0, _PARTICIPANT_SPREAD, size=3)
    return _Participant(
        participant_id=participant_id,
        class_index=class_index,
        split=split,
        age=int(rng.integers(40, 86)),
        thickness=_CLASS_THICKNESS[class_index] + spread[0],
        reflectivity=_CLASS_REFLECTIVITY[class_index] + spread[1],
        gain=1.0 + spread[2],
        folder=participant_id,
    )


def _plan_scans(person: _Participant, seed: int, rng: np.random.Generator) -> list[_Scan]:
    """Both eyes' macula on one device; some participants get a second device or the optic disc."""
    devices = list(rng.choice(DEVICES, size=2, replace=False))
    with_second_device = rng.random() < 0.25
    with_optic_disc = rng.random() < 0.25
    visits = [(devices[0], "macula")]
    if with_second_device:
        visits.append((devices[1], "macula"))
    if with_optic_disc:
        visits.append((devices[0], "optic_disc"))
    return [
        _Scan(person, str(device), region, laterality, _uid(seed, person.participant_id, device, region, laterality))
        for device, region in visits
        for laterality in LATERALITIES
    ]


def _uid(seed: int, *parts: str) -> str:
    return generate_uid(entropy_srcs=[str(seed), *map(str, parts)])


def _plant_participant_faults(
    people: list[_Participant],
    scans: dict[str, list[_Scan]],
    faults: dict[str, list],
    seed: int,
    rng: np.random.Generator,
) -> None:
    """Labels without files, files without labels, and folders named the way exports name them."""
    # Take the file-less participants from the largest cells so every cell keeps participants with files.
    cell_size: dict[tuple[str, int], int] = {}
    for person in people:
        cell_size[(person.split, person.class_index)] = cell_size.get((person.split, person.class_index), 0) + 1
    shuffled = [people[i] for i in rng.permutation(len(people))]
    by_cell_size = sorted(shuffled, key=lambda p: -cell_size[(p.split, p.class_index)])
    without_files = []
    for person in by_cell_size:
        if len(without_files) == 2:
            break
        if all((p.split, p.class_index) != (person.split, person.class_index) for p in without_files):
            without_files.append(person)
    for person in without_files:
        scans[person.participant_id] = []
    faults["labelled_without_files"] = sorted((p.participant_id for p in without_files), key=int)

    others = [p for p in shuffled if p not in without_files]
    for person in others[:2]:
        person.folder = "0" + person.participant_id
    for person in others[2:4]:
        person.folder = "sub-" + person.participant_id
    faults["zero_padded_folders"] = sorted(p.folder for p in others[:2])
    faults["prefixed_folders"] = sorted(p.folder for p in others[2:4])

    # IDs past the last labelled one at two sites: files the label table knows nothing about.
    taken = {int(p.participant_id) for p in people}
    unlabelled = []
    for digit in SITE_DIGITS[1:]:
        number = max(i for i in taken if str(i).startswith(digit)) + 1
        stranger = _new_participant(str(number), int(rng.integers(len(CLASSES))), "none", rng)
        stranger.labelled = False
        scans[stranger.participant_id] = _plan_scans(stranger, seed, rng)
        unlabelled.append(stranger.participant_id)
    faults["unlabelled_participants"] = unlabelled


def _plant_file_faults(
    all_scans: list[_Scan],
    written: dict[str, bytes],
    manifest: dict[str, dict[str, Any]],
    faults: dict[str, list],
    seed: int,
    rng: np.random.Generator,
) -> dict[str, bytes]:
    """One file fault each, on four different plain participants so the faults stay separable."""
    folder_faults = {*faults["zero_padded_folders"], *faults["prefixed_folders"]}
    by_participant: dict[str, list[_Scan]] = {}
    for scan in all_scans:
        person = scan.participant
        if person.labelled and person.folder not in folder_faults:
            by_participant.setdefault(person.participant_id, []).append(scan)
    candidates = [by_participant[pid] for pid in sorted(by_participant, key=int)]
    chosen = [candidates[i] for i in rng.permutation(len(candidates))]
    explicit = next(i for i, group in enumerate(chosen) if any(s.syntax == ExplicitVRLittleEndian for s in group))
    truncate_group = chosen.pop(explicit)
    truncated = next(s for s in truncate_group if s.syntax == ExplicitVRLittleEndian)
    duplicated, unlisted, vanished = (group[int(rng.integers(len(group)))] for group in chosen[:3])

    # Cut inside Pixel Data: it is the file's last element, so half its length back from the end.
    data = written[truncated.key]
    pixel_bytes = len(_pixel_data(data))
    written[truncated.key] = data[: len(data) - pixel_bytes // 2]
    faults["truncated"] = [truncated.key]

    # A re-export under a fresh file name: same bytes, so the same SOP Instance UID inside.
    copy_name = duplicated.file_name(_uid(seed, duplicated.sop_uid, "copy"))
    copy_key = duplicated.key.rsplit("/", 1)[0] + "/" + copy_name
    extra = {copy_key: written[duplicated.key]}
    manifest[copy_key] = {**manifest[duplicated.key], "filepath": "/" + copy_key}
    faults["duplicates"] = [[duplicated.key, copy_key]]

    del manifest[unlisted.key]
    faults["not_in_manifest"] = [unlisted.key]

    del written[vanished.key]
    faults["manifest_missing_file"] = [vanished.key]

    note_key = unlisted.key.rsplit("/", 1)[0] + "/notes.txt"
    extra[note_key] = b"Re-exported after a device update; see the site log.\n"
    faults["non_image"] = [note_key]
    return extra


def _pixel_data(data: bytes) -> bytes:
    return dcmread(io.BytesIO(data)).PixelData


def _assign_syntaxes(all_scans: list[_Scan], rng: np.random.Generator) -> None:
    """About a fifth each JPEG 2000 and RLE, at least one of each, the rest uncompressed."""
    compressed = max(1, round(_SYNTAX_SHARE * len(all_scans)))
    order = rng.permutation(len(all_scans))
    for rank, index in enumerate(order):
        if rank < compressed:
            all_scans[index].syntax = JPEG2000Lossless
        elif rank < 2 * compressed:
            all_scans[index].syntax = RLELossless


def _render_volume(scan: _Scan, *, seed: int, frames: int, height: int, width: int) -> np.ndarray:
    """A (frames, height, width) uint8 macula or optic disc cube with layered retina and speckle."""
    person = scan.participant
    rng = np.random.default_rng(
        [seed, int(person.participant_id), DEVICES.index(scan.device), int(scan.region == "optic_disc"),
         int(scan.laterality == "R")]
    )
    gain = _DEVICE_INFO[scan.device][4] * person.gain
    slow = np.linspace(-1.0, 1.0, frames)[:, None]  # position of the B-scan in the raster
    fast = np.linspace(-1.0, 1.0, width)[None, :]  # position along the B-scan
    centre_shift = rng.normal(0.0, 0.1, size=2)
    radius2 = (fast - centre_shift[0]) ** 2 + (slow - centre_shift[1]) ** 2
    pit_depth, pit_width = (0.45, 0.35) if scan.region == "macula" else (0.85, 0.25)
    thickness = height * 0.30 * person.thickness * (1.0 - pit_depth * np.exp(-radius2 / (2 * pit_width**2)))
    tilt = rng.normal(0.0, 0.04)
    bottom = height * (0.62 + rng.normal(0.0, 0.03) + 0.08 * (fast**2 + 0.5 * slow**2) + tilt * fast)
    top = bottom - thickness

    rows = np.arange(height, dtype=np.float64)[None, :, None]
    depth = (rows - top[:, None, :]) / thickness[:, None, :]
    image = np.interp(depth, _LAYER_DEPTHS, _LAYER_VALUES) * person.reflectivity

    # Hyperreflective foci, more with disease: bright 2x2 spots inside the retina.
    rate = _CLASS_SPOTS[person.class_index] if person.spots is None else person.spots
    spots = rng.poisson(rate * frames / 8)
    for _ in range(spots):
        frame, column = int(rng.integers(frames)), int(rng.integers(width - 1))
        row = int(top[frame, column] + rng.uniform(0.2, 0.8) * thickness[frame, column])
        image[frame, max(row, 0) : row + 2, column : column + 2] += 0.6

    speckle = rng.gamma(shape=4.0, scale=0.25, size=image.shape)
    pixels = 230.0 * gain * image * speckle + rng.normal(6.0, 3.0, size=image.shape)
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def _spacing(scan: _Scan, frames: int, height: int, width: int) -> tuple[float, float, float]:
    """(mm between B-scans, mm per row, mm per column) for a 6 mm raster."""
    depth_mm = _DEVICE_INFO[scan.device][3]
    return round(_SCAN_WIDTH_MM / frames, 6), round(depth_mm / height, 6), round(_SCAN_WIDTH_MM / width, 6)


def _dicom_bytes(array: np.ndarray, scan: _Scan, *, seed: int, frames: int, height: int, width: int) -> bytes:
    manufacturer, model, _short, _depth, _gain = _DEVICE_INFO[scan.device]
    participant_id = scan.participant.participant_id
    between_frames, row_mm, column_mm = _spacing(scan, frames, height, width)

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = OPHTHALMIC_TOMOGRAPHY_SOP_CLASS
    meta.MediaStorageSOPInstanceUID = scan.sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

    ds = Dataset()
    ds.file_meta = meta
    ds.preamble = b"\x00" * 128
    ds.SOPClassUID = OPHTHALMIC_TOMOGRAPHY_SOP_CLASS
    ds.SOPInstanceUID = scan.sop_uid
    ds.StudyInstanceUID = _uid(seed, participant_id, "study")
    ds.SeriesInstanceUID = _uid(seed, scan.sop_uid, "series")
    ds.Modality = "OPT"
    ds.PatientID = participant_id
    ds.PatientName = f"AIREADI^{participant_id}"
    ds.Manufacturer = manufacturer
    ds.ManufacturerModelName = model
    ds.SeriesDescription = f"{scan.region} OCT"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.ImageLaterality = scan.laterality
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.NumberOfFrames = frames
    ds.Rows = height
    ds.Columns = width
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelSpacing = [row_mm, column_mm]
    ds.SliceThickness = between_frames
    if scan.syntax == ExplicitVRLittleEndian:
        ds.PixelData = array.tobytes()
    else:
        ds.compress(scan.syntax, array, encoding_plugin=_ENCODING_PLUGIN[scan.syntax], generate_instance_uid=False)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _manifest_row(scan: _Scan, *, frames: int, height: int, width: int) -> dict[str, Any]:
    manufacturer, model, _short, _depth, _gain = _DEVICE_INFO[scan.device]
    between_frames, row_mm, column_mm = _spacing(scan, frames, height, width)
    return {
        "participant_id": int(scan.participant.participant_id),
        "manufacturer": manufacturer,
        "manufacturers_model_name": model,
        "anatomic_region": scan.region,
        "imaging": "OCT",
        "laterality": scan.laterality,
        "height": height,
        "width": width,
        "number_of_frames": frames,
        "pixel_spacing": f"[{row_mm}, {column_mm}]",
        "slice_thickness": between_frames,
        "sop_instance_uid": scan.sop_uid,
        "filepath": "/" + scan.key,
    }


def _participant_row(person: _Participant) -> dict[str, Any]:
    return {
        "participant_id": int(person.participant_id),
        "clinical_site": SITE_NAMES[person.participant_id[0]],
        "study_group": CLASSES[person.class_index],
        "age": person.age,
        "recommended_split": person.split,
        # TRUE for all: a labelled participant without files is a fault the audit must find.
        "retinal_oct": "TRUE",
    }


def _write_tsv(path: Path, columns: tuple[str, ...], rows: list[dict[str, Any]], line_end: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, delimiter="\t", lineterminator=line_end)
        writer.writeheader()
        writer.writerows(rows)
