"""Preprocessing and the local volume cache, on tiny volumes made in each test."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import time
from functools import partial
from pathlib import Path

import numpy as np
import pytest

from octft.data.cache import CACHE_FORMAT, ORPHAN_DATA_SECONDS, STALE_TEMP_SECONDS, VolumeCache
from octft.data.preprocess import Preprocessing, frame_indices, preprocess
from octft.data.readers import read_volume
from octft.data.volume import OctReadError, Volume

SMALL = Preprocessing(frames=4, height=24, width=20)


def oct_like(frames: int = 9, height: int = 40, width: int = 36, *, seed: int = 0, dtype=np.uint8) -> np.ndarray:
    """Speckle-like intensities with a bright band, like a retina in a B-scan."""
    rng = np.random.default_rng(seed)
    top = np.iinfo(dtype).max if np.issubdtype(dtype, np.integer) else 1.0
    volume = rng.gamma(2.0, top / 12, (frames, height, width))
    volume[:, height // 3 : height // 2, :] *= 3
    return np.clip(volume, 0, top).astype(dtype)


def save_npy(path: Path, array: np.ndarray) -> Path:
    np.save(path, array)
    return path


def counting_loader(array: np.ndarray):
    calls = []

    def load() -> Volume:
        calls.append(1)
        return Volume(array=array)

    return load, calls


def stored_as(clip: np.ndarray, dtype: str = "float16") -> np.ndarray:
    return clip.astype(dtype).astype(np.float32)


def temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(".partial")]


# -- Preprocessing ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings, message",
    [({"frames": 0}, "frames"), ({"height": -1}, "height"), ({"width": 2.5}, "width"), ({"intensity": "clahe"}, "intensity")],
)
def test_spec_rejects_bad_settings_naming_them(settings, message):
    with pytest.raises(ValueError, match=message):
        Preprocessing(**settings)


def test_spec_key_is_stable_and_changes_with_every_setting():
    base = Preprocessing()
    assert base.key() == Preprocessing(16, 224, 224, "percentile").key()
    variants = [
        Preprocessing(frames=8),
        Preprocessing(height=256),
        Preprocessing(width=256),
        Preprocessing(intensity="zscore"),
        Preprocessing(intensity="minmax"),
    ]
    keys = {base.key(), *(spec.key() for spec in variants)}
    assert len(keys) == 1 + len(variants)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.float64])
@pytest.mark.parametrize("intensity", ["percentile", "zscore", "minmax"])
def test_preprocess_shape_dtype_and_determinism(dtype, intensity):
    spec = Preprocessing(frames=5, height=16, width=24, intensity=intensity)
    volume = oct_like(11, 50, 30, dtype=dtype)
    first = preprocess(volume, spec)
    assert first.shape == (5, 16, 24) and first.dtype == np.float32
    assert np.isfinite(first).all()
    assert preprocess(volume.copy(), spec).tobytes() == first.tobytes()


def test_frames_are_picked_evenly_first_and_last_included():
    assert frame_indices(10, 4).tolist() == [0, 3, 6, 9]
    assert frame_indices(97, 16)[[0, -1]].tolist() == [0, 96]
    assert frame_indices(1, 3).tolist() == [0, 0, 0]
    # Frame i holds the value i, so minmax maps the picked frames to index / 9.
    volume = np.broadcast_to(np.arange(10, dtype=np.uint8)[:, None, None], (10, 6, 6)).copy()
    clip = preprocess(volume, Preprocessing(frames=4, height=6, width=6, intensity="minmax"))
    np.testing.assert_allclose(clip[:, 0, 0], np.array([0, 3, 6, 9]) / 9, rtol=1e-6)


def test_fewer_frames_than_requested_repeat_evenly():
    volume = oct_like(3, 12, 12, seed=1)
    assert frame_indices(3, 6).tolist() == [0, 0, 1, 1, 2, 2]
    clip = preprocess(volume, Preprocessing(frames=6, height=12, width=12))
    for pair in range(3):
        np.testing.assert_array_equal(clip[2 * pair], clip[2 * pair + 1])
    assert not np.array_equal(clip[0], clip[2])


@pytest.mark.parametrize("intensity", ["percentile", "zscore", "minmax"])
@pytest.mark.parametrize("value", [0, 37, 65535])
def test_constant_volume_gives_zeros_never_nan(intensity, value):
    volume = np.full((5, 30, 30), value, dtype=np.uint16)
    clip = preprocess(volume, Preprocessing(frames=4, height=16, width=16, intensity=intensity))
    assert np.array_equal(clip, np.zeros((4, 16, 16), np.float32))


def test_uint16_normalisations_reach_their_ranges():
    volume = oct_like(8, 64, 64, seed=2, dtype=np.uint16)
    assert volume.max() > 255  # really uses the 16-bit range
    for intensity in ("percentile", "minmax"):
        clip = preprocess(volume, Preprocessing(8, 32, 32, intensity))
        assert clip.min() == 0.0 and clip.max() == 1.0, intensity
    zscore = preprocess(volume, Preprocessing(8, 32, 32, "zscore"))
    assert abs(float(zscore.mean())) < 1e-4 and abs(float(zscore.std()) - 1) < 1e-3


def test_percentile_ignores_hot_pixels_that_squash_minmax():
    volume = np.random.default_rng(3).integers(1000, 2000, (4, 50, 50)).astype(np.uint16)
    volume[0, 0, :5] = 65535  # a few saturated pixels, 0.05% of the volume
    spec = dict(frames=4, height=50, width=50)
    minmax = preprocess(volume, Preprocessing(**spec, intensity="minmax"))
    percentile = preprocess(volume, Preprocessing(**spec, intensity="percentile"))
    assert np.median(minmax) < 0.03  # the tissue is crushed into the bottom 3%
    assert 0.4 < np.median(percentile) < 0.6
    assert percentile.max() == 1.0 and percentile.min() == 0.0


def test_percentile_keeps_sparse_signal_in_a_mostly_constant_volume():
    volume = np.zeros((4, 40, 40), np.uint8)
    volume[1, 10, 10:14] = 200  # far fewer than 1% of the pixels: both percentiles are 0
    clip = preprocess(volume, Preprocessing(frames=4, height=40, width=40))
    assert clip.max() == 1.0 and clip[1, 10, 10] == 1.0 and clip[0].max() == 0.0


@pytest.mark.parametrize(
    "array, message",
    [
        (np.zeros((8, 8), np.uint8), "frames, height, width"),
        (np.zeros((0, 8, 8), np.uint8), "empty"),
        (np.full((2, 8, 8), np.nan), "NaN"),
        (np.array([[["a"]]]), "numeric"),
    ],
)
def test_preprocess_rejects_unusable_arrays(array, message):
    with pytest.raises(ValueError, match=message):
        preprocess(array, SMALL)


# -- VolumeCache: hits, misses, keys ------------------------------------------------------


def test_miss_builds_once_then_hits(tmp_path):
    cache = VolumeCache(tmp_path / "cache", SMALL)
    volume = oct_like()
    load, calls = counting_loader(volume)
    assert cache.get("file:///a|1|2") is None
    built = cache.get_or_build("file:///a|1|2", load)
    again = cache.get_or_build("file:///a|1|2", load)
    assert len(calls) == 1
    assert built.dtype == again.dtype == np.float32
    # A miss returns what a hit will: the float16-rounded clip.
    np.testing.assert_array_equal(built, again)
    np.testing.assert_array_equal(built, stored_as(preprocess(volume, SMALL)))
    data_path, record_path = cache.entry_paths("file:///a|1|2")
    assert data_path.stat().st_size < preprocess(volume, SMALL).nbytes  # float16 on disk
    record = json.loads(record_path.read_text())
    assert record["source_id"] == "file:///a|1|2" and record["format"] == CACHE_FORMAT
    assert temp_files(tmp_path) == []


def test_float32_storage_returns_the_exact_clip(tmp_path):
    cache = VolumeCache(tmp_path, SMALL, dtype="float32")
    volume = oct_like(seed=4)
    clip = cache.get_or_build("s", lambda: volume)  # a bare array is a valid load result
    assert clip.tobytes() == preprocess(volume, SMALL).tobytes()
    assert cache.get("s").tobytes() == clip.tobytes()


def test_key_changes_with_source_settings_and_dtype(tmp_path):
    cache = VolumeCache(tmp_path, SMALL)
    keys = {
        cache.entry_key("b2://bucket/a.dcm|10|abc"),
        cache.entry_key("b2://bucket/a.dcm|11|abc"),  # the object changed size
        VolumeCache(tmp_path, Preprocessing(frames=5, height=24, width=20)).entry_key("b2://bucket/a.dcm|10|abc"),
        VolumeCache(tmp_path, Preprocessing(4, 24, 20, "zscore")).entry_key("b2://bucket/a.dcm|10|abc"),
        VolumeCache(tmp_path, SMALL, dtype="float32").entry_key("b2://bucket/a.dcm|10|abc"),
    }
    assert len(keys) == 5
    assert cache.entry_key("x") == VolumeCache(tmp_path / "elsewhere", SMALL).entry_key("x")

    cache.get_or_build("x", lambda: oct_like())
    other_spec = VolumeCache(tmp_path, Preprocessing(4, 24, 20, "minmax"))
    load, calls = counting_loader(oct_like())
    assert other_spec.get("x") is None
    assert other_spec.get_or_build("x", load).shape == (4, 24, 20) and len(calls) == 1


def test_put_rejects_a_clip_of_the_wrong_shape_or_with_nan(tmp_path):
    cache = VolumeCache(tmp_path, SMALL)
    with pytest.raises(ValueError, match=r"expected a preprocessed clip shaped \(4, 24, 20\)"):
        cache.put("s", np.zeros((4, 20, 24), np.float32))
    with pytest.raises(ValueError, match="NaN"):
        cache.put("s", np.full((4, 24, 20), np.nan, np.float32))
    with pytest.raises(ValueError, match="overflows float16"):
        cache.put("s", np.full((4, 24, 20), 1e6, np.float32))
    assert cache.get("s") is None and temp_files(tmp_path) == []


def test_bad_dtype_is_named(tmp_path):
    with pytest.raises(ValueError, match="'int8'"):
        VolumeCache(tmp_path, SMALL, dtype="int8")


# -- VolumeCache: damaged entries are never returned --------------------------------------


def _cached_entry(tmp_path: Path):
    cache = VolumeCache(tmp_path / "cache", SMALL)
    volume = oct_like(seed=5)
    expected = cache.get_or_build("src", lambda: volume)
    data_path, record_path = cache.entry_paths("src")
    return cache, volume, expected, data_path, record_path


def _assert_rebuilt(cache: VolumeCache, volume: np.ndarray, expected: np.ndarray) -> None:
    load, calls = counting_loader(volume)
    np.testing.assert_array_equal(cache.get_or_build("src", load), expected)
    assert len(calls) == 1
    np.testing.assert_array_equal(cache.get("src"), expected)


def test_flipped_bytes_in_data_are_a_miss_and_rebuilt(tmp_path):
    cache, volume, expected, data_path, record_path = _cached_entry(tmp_path)
    raw = bytearray(data_path.read_bytes())
    raw[-100] ^= 0xFF  # inside the array, past the .npy header
    data_path.write_bytes(bytes(raw))
    assert cache.get("src") is None
    assert not data_path.exists() and not record_path.exists()
    _assert_rebuilt(cache, volume, expected)


def test_damaged_header_is_a_miss(tmp_path):
    cache, volume, expected, data_path, _ = _cached_entry(tmp_path)
    data_path.write_bytes(b"\x93NUMPY garbage" + data_path.read_bytes()[14:])
    assert cache.get("src") is None
    _assert_rebuilt(cache, volume, expected)


def test_truncated_data_is_a_miss_and_rebuilt(tmp_path):
    cache, volume, expected, data_path, record_path = _cached_entry(tmp_path)
    data_path.write_bytes(data_path.read_bytes()[:-7])
    assert cache.get("src") is None
    assert not record_path.exists()
    _assert_rebuilt(cache, volume, expected)


def test_missing_data_with_a_record_is_a_miss(tmp_path):
    cache, volume, expected, data_path, record_path = _cached_entry(tmp_path)
    data_path.unlink()
    assert cache.get("src") is None and not record_path.exists()
    _assert_rebuilt(cache, volume, expected)


def test_data_without_record_is_a_miss_and_old_orphans_are_removed(tmp_path):
    cache, volume, expected, data_path, record_path = _cached_entry(tmp_path)
    record_path.unlink()
    # A fresh orphan may be a writer between its two renames: a miss, but left alone.
    assert cache.get("src") is None and data_path.exists()
    old = time.time() - ORPHAN_DATA_SECONDS - 5
    os.utime(data_path, (old, old))
    assert cache.get("src") is None and not data_path.exists()
    _assert_rebuilt(cache, volume, expected)


@pytest.mark.parametrize(
    "damage",
    [
        lambda record: "{not json",
        lambda record: json.dumps({**record, "crc32": record["crc32"] ^ 1}),
        lambda record: json.dumps({**record, "source_id": "another"}),
        lambda record: json.dumps({**record, "shape": [4, 20, 24]}),
        lambda record: json.dumps({**record, "format": CACHE_FORMAT + 1}),
        lambda record: json.dumps([record]),
    ],
    ids=["not-json", "wrong-crc", "wrong-source", "wrong-shape", "old-format", "not-an-object"],
)
def test_bad_record_is_a_miss(tmp_path, damage):
    cache, volume, expected, data_path, record_path = _cached_entry(tmp_path)
    record_path.write_text(damage(json.loads(record_path.read_text())))
    assert cache.get("src") is None
    assert not data_path.exists() and not record_path.exists()
    _assert_rebuilt(cache, volume, expected)


def test_stray_temp_files_are_never_read_and_old_ones_are_swept(tmp_path):
    cache = VolumeCache(tmp_path, SMALL)
    data_path, record_path = cache.entry_paths("src")
    data_path.parent.mkdir(parents=True)
    # What a writer killed mid-put leaves: a complete-looking data temp and record temp.
    clip = preprocess(oct_like(seed=6), SMALL).astype(np.float16)
    stale_data = data_path.with_name(f".{data_path.name}.999.dead.partial")
    with open(stale_data, "wb") as handle:
        np.save(handle, clip)
    stale_record = record_path.with_name(f".{record_path.name}.999.dead.partial")
    stale_record.write_text("{}")
    fresh = data_path.with_name(f".{data_path.name}.1000.live.partial")
    fresh.write_bytes(b"partial")
    old = time.time() - STALE_TEMP_SECONDS - 5
    for path in (stale_data, stale_record):
        os.utime(path, (old, old))

    assert cache.get("src") is None
    report = cache.build([("src", lambda: oct_like(seed=6))], progress=False)
    assert (report.built, report.reused, report.failed) == (1, 0, [])
    assert not stale_data.exists() and not stale_record.exists()
    assert fresh.exists()  # may belong to a live writer in another process
    np.testing.assert_array_equal(cache.get("src"), clip.astype(np.float32))


# -- VolumeCache.build --------------------------------------------------------------------


def _sources(tmp_path: Path) -> list[tuple[str, object]]:
    good = [save_npy(tmp_path / f"good{i}.npy", oct_like(seed=10 + i)) for i in range(3)]
    not_npy = tmp_path / "broken.npy"
    not_npy.write_bytes(b"this is not an array")
    holes = save_npy(tmp_path / "holes.npy", np.full((3, 8, 8), np.nan, np.float32))
    paths = [good[0], not_npy, good[1], holes, good[2]]
    return [(f"file://{path}", partial(read_volume, path)) for path in paths]


@pytest.mark.parametrize("workers", [1, pytest.param(2, marks=pytest.mark.integration, id="2-processes")])
def test_build_counts_built_reused_and_failed_with_reasons(tmp_path, workers):
    items = _sources(tmp_path)
    cache = VolumeCache(tmp_path / "cache", SMALL)
    report = cache.build(items, workers=workers, progress=False)
    assert (report.built, report.reused) == (3, 0)
    assert [source_id for source_id, _ in report.failed] == [items[1][0], items[3][0]]
    with pytest.raises(OctReadError) as unreadable:
        items[1][1]()
    assert report.failed[0][1] == unreadable.value.reason  # the reader's own reason, unchanged
    assert "pixel values are NaN or infinite" in report.failed[1][1]  # refused by the reader, naming the count

    again = cache.build(items, progress=False)  # one process pool start per test is enough
    assert (again.built, again.reused, len(again.failed)) == (0, 3, 2)
    for source_id, load in (items[0], items[2], items[4]):
        np.testing.assert_array_equal(cache.get(source_id), stored_as(preprocess(load().array, SMALL)))


def test_build_stops_on_errors_that_are_not_read_errors(tmp_path):
    def buggy() -> Volume:
        raise RuntimeError("a bug, not a bad file")

    cache = VolumeCache(tmp_path, SMALL)
    with pytest.raises(RuntimeError, match="a bug"):
        cache.build([("ok", lambda: oct_like()), ("bug", buggy)], progress=False)
    with pytest.raises(ValueError, match="workers"):
        cache.build([], workers=0)


def test_process_build_names_a_loader_that_cannot_be_pickled(tmp_path):
    cache = VolumeCache(tmp_path, SMALL)
    good = partial(read_volume, save_npy(tmp_path / "v.npy", oct_like()))
    with pytest.raises(ValueError, match=r"loader for 'closure' cannot be pickled.*functools.partial"):
        cache.build([("v", good), ("closure", lambda: oct_like())], workers=2, progress=False)
    assert cache.get("v") is None  # checked before anything is built


def test_get_or_build_names_the_source_when_the_volume_is_unusable(tmp_path):
    cache = VolumeCache(tmp_path, SMALL)
    with pytest.raises(OctReadError, match="b2://bucket/x.dcm") as error:
        cache.get_or_build("b2://bucket/x.dcm|3|abc", lambda: np.full((2, 4, 4), np.inf))
    assert "NaN or infinite" in error.value.reason


# -- concurrent builders in separate processes --------------------------------------------


def _concurrent_worker(root: str, paths: list[str], barrier, results) -> None:
    cache = VolumeCache(root, SMALL)
    barrier.wait(timeout=120)
    digests = []
    for round_ in range(15):
        for path in paths:
            clip = cache.get_or_build(f"file://{path}", partial(read_volume, path))
            digests.append(hashlib.sha256(clip.tobytes()).hexdigest())
            if round_ % 3 == 0:
                cache.put(f"file://{path}", clip)  # rewrite while the others read
    results.put(digests)


@pytest.mark.integration
def test_processes_building_the_same_items_agree_and_leave_valid_entries(tmp_path):
    paths = [str(save_npy(tmp_path / f"v{i}.npy", oct_like(seed=20 + i))) for i in range(4)]
    root = tmp_path / "cache"
    context = multiprocessing.get_context("spawn")  # no fork after torch has started threads
    barrier = context.Barrier(3)
    results = context.Queue()
    workers = [
        context.Process(target=_concurrent_worker, args=(str(root), paths, barrier, results)) for _ in range(3)
    ]
    for worker in workers:
        worker.start()
    # Join first, so a worker that crashed fails the test now instead of at a queue timeout.
    for worker in workers:
        worker.join(timeout=240)
    assert [worker.exitcode for worker in workers] == [0, 0, 0]
    collected = [results.get(timeout=10) for _ in workers]

    cache = VolumeCache(root, SMALL)
    expected = [
        hashlib.sha256(stored_as(preprocess(np.load(path), SMALL)).tobytes()).hexdigest() for path in paths
    ]
    for digests in collected:
        assert digests == expected * 15
    assert temp_files(root) == []
    assert sorted(p.suffix for p in root.rglob("*.*")) == [".json"] * 4 + [".npy"] * 4
    for path, digest in zip(paths, expected):
        assert hashlib.sha256(cache.get(f"file://{path}").tobytes()).hexdigest() == digest


# -- DICOM through the project reader -----------------------------------------------------


def write_dicom(path: Path, frames: np.ndarray) -> Path:
    """A minimal uncompressed multi-frame ophthalmic tomography DICOM, written by pydicom."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.77.1.5.4"  # OPT image storage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "OPT"
    ds.PatientID = "1001"
    ds.Laterality = "R"
    ds.NumberOfFrames = frames.shape[0]
    ds.Rows, ds.Columns = frames.shape[1:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    bits = frames.dtype.itemsize * 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    ds.PixelData = frames.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_dicom_volumes_go_through_the_cache(tmp_path):
    frames = oct_like(7, 48, 40, seed=30, dtype=np.uint16)
    path = write_dicom(tmp_path / "scan.dcm", frames)
    try:
        volume = read_volume(path)
    except OctReadError as exc:
        pytest.skip(f"octft.data.readers.read_volume does not read DICOM yet: {exc.reason}")
    np.testing.assert_array_equal(volume.array, frames)

    cache = VolumeCache(tmp_path / "cache", SMALL)
    stat = path.stat()
    source_id = f"file://{path}|{stat.st_size}|{stat.st_mtime_ns}"
    report = cache.build([(source_id, partial(read_volume, path))], progress=False)
    assert (report.built, report.failed) == (1, [])
    np.testing.assert_array_equal(cache.get(source_id), stored_as(preprocess(frames, SMALL)))
