"""Synthetic AI-READI: layout, DICOM validity, determinism, class signal, and the planted faults.

The faults are checked by an independent audit written here (`_observed_faults`), which walks the
files and tables from scratch: it must find exactly what the report claims, and nothing on clean data.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless

from octft.data.ids import canonical_participant_id
from octft.data.layout import CLASSES, DEVICES, LABELS_KEY, MANIFEST_KEY, OCT_PREFIX, SITE_DIGITS, SPLITS
from octft.data.synth import (
    FAULT_KINDS,
    MANIFEST_COLUMNS,
    MIN_PARTICIPANTS,
    PARTICIPANT_COLUMNS,
    RELEASE_COUNTS,
    REPORT_NAME,
    split_class_counts,
    synthesize,
)

OCT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.5.4"
FILE_NAME = re.compile(
    r"^(?P<participant>\d{4})_(?P<short>spectralis|maestro2|triton|cirrus)_(?P<region>macula|optic_disc)"
    r"_oct_(?P<eye>[lr])_(?P<uid>[0-9.]+)\.dcm$"
)


def _read_tsv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _observed_faults(root: Path) -> dict[str, list]:
    """Faults found by walking `root`, in the report's shape."""
    labels = {row["participant_id"] for row in _read_tsv(root / LABELS_KEY)}
    manifest = _read_tsv(root / MANIFEST_KEY)
    manifest_keys = {row["filepath"].lstrip("/") for row in manifest}
    oct_root = root / OCT_PREFIX
    on_disk = {p.relative_to(root).as_posix() for p in oct_root.rglob("*") if p.is_file()}
    folders = {p.name for device in oct_root.iterdir() for p in device.iterdir() if p.is_dir()}
    ids_with_files = {canonical_participant_id(name) for name in folders}

    truncated, non_image = [], []
    by_hash: dict[str, list[str]] = {}
    for key in sorted(on_disk):
        data = (root / key).read_bytes()
        if data[128:132] != b"DICM":
            non_image.append(key)
            continue
        by_hash.setdefault(hashlib.sha256(data).hexdigest(), []).append(key)
        try:
            pydicom.dcmread(root / key).pixel_array
        except ValueError:
            truncated.append(key)
    duplicates = [sorted(keys) for keys in by_hash.values() if len(keys) > 1]
    return {
        "zero_padded_folders": sorted(name for name in folders if name.startswith("0")),
        "prefixed_folders": sorted(name for name in folders if not name.isdigit() and not name.startswith("0")),
        "unlabelled_participants": sorted({row["participant_id"] for row in manifest} - labels),
        "labelled_without_files": sorted(labels - ids_with_files),
        "truncated": truncated,
        "non_image": non_image,
        "duplicates": duplicates,
        "not_in_manifest": sorted(on_disk - manifest_keys - set(non_image)),
        "manifest_missing_file": sorted(manifest_keys - on_disk),
    }


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    root = tmp_path_factory.mktemp("clean")
    return root, synthesize(root, participants=120, seed=0)


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    root = tmp_path_factory.mktemp("messy")
    return root, synthesize(root, participants=120, seed=0, messy=True)


def test_tables_have_ai_readi_columns_and_sites(clean):
    root, report = clean
    labels = _read_tsv(root / LABELS_KEY)
    assert tuple(labels[0]) == PARTICIPANT_COLUMNS
    assert len(labels) == report.participants == 120
    assert b"\r\n" not in (root / LABELS_KEY).read_bytes()
    sites = {"1": "UW", "4": "UAB", "7": "UCSD"}
    for row in labels:
        assert re.fullmatch(r"[147]\d{3}", row["participant_id"]), row
        assert row["clinical_site"] == sites[row["participant_id"][0]]
        assert row["study_group"] in CLASSES and row["recommended_split"] in SPLITS
        assert 40 <= int(row["age"]) <= 85 and row["retinal_oct"] == "TRUE"
    assert {row["participant_id"][0] for row in labels} == set(SITE_DIGITS)
    assert len({row["participant_id"] for row in labels}) == 120

    manifest = _read_tsv(root / MANIFEST_KEY)
    assert tuple(manifest[0]) == MANIFEST_COLUMNS
    assert len(manifest) == report.manifest_rows == report.files
    for row in manifest:
        device, folder, name = row["filepath"].removeprefix(f"/{OCT_PREFIX}/").split("/")
        match = FILE_NAME.match(name)
        assert device in DEVICES and folder == row["participant_id"] and match, row["filepath"]
        assert match["participant"] == row["participant_id"] and match["uid"] == row["sop_instance_uid"]
        assert match["region"] == row["anatomic_region"] and match["eye"] == row["laterality"].lower()
        assert device.endswith(match["short"])
        assert (root / row["filepath"].lstrip("/")).is_file()

    assert json.loads((root / REPORT_NAME).read_text()) == report.to_dict()


def test_every_participant_has_both_eyes_on_one_or_two_devices(clean):
    root, _ = clean
    scans: dict[str, set[tuple[str, str, str]]] = {}
    for row in _read_tsv(root / MANIFEST_KEY):
        device = row["filepath"].split("/")[3]
        scans.setdefault(row["participant_id"], set()).add((device, row["anatomic_region"], row["laterality"]))
    assert len(scans) == 120
    for participant_id, seen in scans.items():
        devices = {device for device, _, _ in seen}
        assert 1 <= len(devices) <= 2, participant_id
        for device, region, _ in seen:
            assert {(device, region, "L"), (device, region, "R")} <= seen, participant_id
        assert any(region == "macula" for _, region, _ in seen), participant_id
    regions = {region for seen in scans.values() for _, region, _ in seen}
    assert regions == {"macula", "optic_disc"}
    assert {device for seen in scans.values() for device, _, _ in seen} == set(DEVICES)
    assert 2.0 <= sum(len(seen) for seen in scans.values()) / len(scans) <= 4.0


@pytest.mark.parametrize("participants", [24, 25, 57, 120, 1067])
def test_split_class_counts_keep_every_cell_and_follow_the_release(participants):
    counts = split_class_counts(participants)
    assert sum(n for split in counts.values() for n in split.values()) == participants
    assert all(n >= 2 for split in counts.values() for n in split.values())
    assert set(counts) == set(SPLITS) and all(tuple(split) == CLASSES for split in counts.values())
    if participants == 1067:  # the release's own size gives the release's own counts
        assert {split: tuple(c.values()) for split, c in counts.items()} == RELEASE_COUNTS
    if participants >= 120:  # large enough for proportions to show: train is mostly healthy, few insulin
        train = counts["train"]
        assert train[CLASSES[0]] > train[CLASSES[2]] > train[CLASSES[1]] > train[CLASSES[3]]


def test_table_matches_reported_split_class_counts(clean):
    root, report = clean
    seen: dict[str, dict[str, int]] = {split: dict.fromkeys(CLASSES, 0) for split in SPLITS}
    for row in _read_tsv(root / LABELS_KEY):
        seen[row["recommended_split"]][row["study_group"]] += 1
    assert seen == report.split_class_counts == split_class_counts(120)


@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        ({"participants": MIN_PARTICIPANTS - 1}, "participants=23"),
        ({"participants": 3000}, "participants=3000"),
        ({"participants": 24, "height": 8}, "height=8"),
        ({"participants": 24, "frames": 0}, "frames=0"),
    ],
)
def test_bad_arguments_raise_naming_the_value(tmp_path, arguments, named):
    with pytest.raises(ValueError, match=re.escape(named)):
        synthesize(tmp_path / "out", **arguments)
    assert not (tmp_path / "out").exists()


def test_dicoms_decode_in_all_three_transfer_syntaxes(tmp_path, capsys):
    report = synthesize(tmp_path, participants=24, seed=7, frames=5, height=32, width=48, progress=True)
    assert "synthetic OCT" in capsys.readouterr().err  # the tqdm bar

    syntaxes: dict[str, int] = {}
    for row in _read_tsv(tmp_path / MANIFEST_KEY):
        path = tmp_path / row["filepath"].lstrip("/")
        assert path.read_bytes()[128:132] == b"DICM"
        ds = pydicom.dcmread(path)
        syntax = ds.file_meta.TransferSyntaxUID
        syntaxes[syntax] = syntaxes.get(syntax, 0) + 1
        assert ds.SOPClassUID == OCT_SOP_CLASS == ds.file_meta.MediaStorageSOPClassUID
        assert ds.SOPInstanceUID == row["sop_instance_uid"]
        assert ds.Modality == "OPT" and ds.PhotometricInterpretation == "MONOCHROME2"
        assert ds.BitsAllocated == 8 and ds.NumberOfFrames == 5 and (ds.Rows, ds.Columns) == (32, 48)
        assert ds.PatientID == row["participant_id"] and ds.ImageLaterality == row["laterality"]
        assert ds.Manufacturer == row["manufacturer"]
        assert ds.ManufacturerModelName == row["manufacturers_model_name"]
        assert f"[{ds.PixelSpacing[0]}, {ds.PixelSpacing[1]}]" == row["pixel_spacing"]
        assert float(ds.SliceThickness) == float(row["slice_thickness"]) == pytest.approx(6.0 / 5)
        pixels = ds.pixel_array
        assert pixels.shape == (5, 32, 48) and pixels.dtype == np.uint8
        assert pixels.std() > 10  # an image, not a constant fill
    assert set(syntaxes) == {ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless}
    for syntax in (JPEG2000Lossless, RLELossless):
        assert 0.1 <= syntaxes[syntax] / report.files <= 0.3
    assert sum(report.transfer_syntaxes.values()) == report.files == sum(syntaxes.values())


def test_same_seed_writes_identical_bytes_and_another_seed_differs(tmp_path):
    runs = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        synthesize(tmp_path / name, participants=24, seed=seed)
        runs[name] = _tree_bytes(tmp_path / name)
        del runs[name][REPORT_NAME]  # it names its own root
    assert runs["a"] == runs["b"]

    assert runs["a"][LABELS_KEY] != runs["c"][LABELS_KEY]
    first_volume = [
        pydicom.dcmread(tmp_path / name / _read_tsv(tmp_path / name / MANIFEST_KEY)[0]["filepath"].lstrip("/"))
        for name in ("a", "c")
    ]
    pixels = [ds.pixel_array for ds in first_volume]
    assert pixels[0].shape == pixels[1].shape and not np.array_equal(pixels[0], pixels[1])


def _participant_brightness(root: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean macula brightness, class index, is-training) per labelled participant of a synthetic release."""
    brightness: dict[str, list[float]] = {}
    for row in _read_tsv(root / MANIFEST_KEY):
        if row["anatomic_region"] == "macula":
            pixels = pydicom.dcmread(root / row["filepath"].lstrip("/")).pixel_array
            brightness.setdefault(row["participant_id"], []).append(float(pixels.mean()))
    labels = _read_tsv(root / LABELS_KEY)
    feature = np.array([np.mean(brightness[row["participant_id"]]) for row in labels])
    target = np.array([CLASSES.index(row["study_group"]) for row in labels])
    is_train = np.array([row["recommended_split"] == "train" for row in labels])
    return feature, target, is_train


def test_classes_differ_in_a_simple_statistic_but_overlap(clean):
    """Mean brightness per participant is ordered by class; a nearest centroid beats chance on held-out people."""
    root, _ = clean
    feature, target, is_train = _participant_brightness(root)

    class_means = np.array([feature[target == c].mean() for c in range(len(CLASSES))])
    assert np.all(np.diff(class_means) < 0), class_means  # healthy brightest ... insulin dimmest
    pooled_std = np.sqrt(np.mean([feature[target == c].var() for c in range(len(CLASSES))]))
    assert class_means[0] - class_means[-1] > 2 * pooled_std

    centroids = np.array([feature[is_train & (target == c)].mean() for c in range(len(CLASSES))])
    predicted = np.abs(feature[~is_train, None] - centroids[None, :]).argmin(axis=1)
    accuracy = (predicted == target[~is_train]).mean()
    assert accuracy >= 0.4, accuracy  # chance is 0.25

    # Not trivially separable: neighbouring classes overlap.
    for c in range(len(CLASSES) - 1):
        assert feature[target == c].min() < feature[target == c + 1].max()


def test_a_weaker_class_signal_brings_the_classes_together_and_keeps_the_people(clean, tmp_path):
    """class_signal=0.25 keeps every participant, split and label but a quarter of the gap between the classes."""
    root, report = clean
    weak_root = tmp_path / "weak"
    weak = synthesize(weak_root, participants=120, seed=0, class_signal=0.25)

    assert weak.split_class_counts == report.split_class_counts
    assert (weak.class_signal, report.class_signal) == (0.25, 1.0)  # recorded in synth_report.json
    assert _read_tsv(weak_root / LABELS_KEY) == _read_tsv(root / LABELS_KEY)
    full, target, _ = _participant_brightness(root)
    faint, weak_target, _ = _participant_brightness(weak_root)
    assert np.array_equal(target, weak_target)
    gap = [np.ptp([values[target == c].mean() for c in range(len(CLASSES))]) for values in (full, faint)]
    assert 0.1 < gap[1] / gap[0] < 0.45, gap
    with pytest.raises(ValueError, match="class_signal=1.5"):
        synthesize(tmp_path / "bad", participants=24, class_signal=1.5)
    assert not (tmp_path / "bad").exists()


def _normalised(faults: dict[str, list]) -> dict[str, list]:
    return {kind: sorted(sorted(v) if isinstance(v, list) else v for v in values) for kind, values in faults.items()}


def test_clean_data_has_no_faults(clean):
    root, report = clean
    assert report.faults == {kind: [] for kind in FAULT_KINDS}
    assert _observed_faults(root) == report.faults


def test_messy_faults_are_exactly_the_reported_ones(messy):
    root, report = messy
    assert set(report.faults) == set(FAULT_KINDS)
    assert all(report.faults[kind] for kind in FAULT_KINDS), report.faults
    assert _observed_faults(root) == _normalised(report.faults)


def test_messy_fault_details(messy):
    root, report = messy
    faults = report.faults
    manifest = _read_tsv(root / MANIFEST_KEY)
    manifest_paths = {row["filepath"] for row in manifest}

    # Odd folder names: the manifest uses them, the IDs inside them stay plain.
    for folder in faults["zero_padded_folders"] + faults["prefixed_folders"]:
        assert folder in {"0" + folder.lstrip("0"), "sub-" + folder.removeprefix("sub-")}
        rows = [row for row in manifest if f"/{folder}/" in row["filepath"]]
        assert rows and all(row["participant_id"] == canonical_participant_id(folder) for row in rows)
        assert all(pydicom.dcmread(root / row["filepath"].lstrip("/")).PatientID == rows[0]["participant_id"]
                   for row in rows)

    # Cut in the middle of Pixel Data, still listed.
    (truncated,) = faults["truncated"]
    assert "/" + truncated in manifest_paths
    ds = pydicom.dcmread(root / truncated)
    expected = ds.NumberOfFrames * ds.Rows * ds.Columns
    assert 0 < len(ds.PixelData) < expected
    with pytest.raises(ValueError, match="less than expected"):
        ds.pixel_array

    (note,) = faults["non_image"]
    assert not note.endswith(".dcm") and "/" + note not in manifest_paths
    assert (root / note).read_bytes()[128:132] != b"DICM"

    ((original, copy),) = faults["duplicates"]
    assert original != copy and (root / original).read_bytes() == (root / copy).read_bytes()
    assert {"/" + original, "/" + copy} <= manifest_paths

    (unlisted,) = faults["not_in_manifest"]
    assert "/" + unlisted not in manifest_paths
    assert pydicom.dcmread(root / unlisted).pixel_array.shape == (8, 64, 64)

    (vanished,) = faults["manifest_missing_file"]
    assert "/" + vanished in manifest_paths and not (root / vanished).exists()

    label_bytes = (root / LABELS_KEY).read_bytes()
    lines = label_bytes.split(b"\n")[:-1]
    assert lines and all(line.endswith(b"\r") for line in lines)
    labels = _read_tsv(root / LABELS_KEY)
    assert all(row["participant_id"].isdigit() and not row["participant_id"].startswith("0") for row in labels)
    assert b"\r" not in (root / MANIFEST_KEY).read_bytes()
    assert json.loads((root / REPORT_NAME).read_text()) == report.to_dict()


def test_messy_keeps_the_clean_labels(clean, messy):
    """Faults draw from their own random stream: the labelled cohort is the same, clean or messy."""
    clean_root, _ = clean
    messy_root, _ = messy
    assert _read_tsv(clean_root / LABELS_KEY) == _read_tsv(messy_root / LABELS_KEY)
