"""A content-addressed local cache of preprocessed volumes.

Decoding a DICOM (JPEG 2000 especially) and resizing it costs far more than reading a
small array back, and every trial of a sweep would pay it again. `VolumeCache` stores
each preprocessed clip once, under a key made of the source's identity and the
preprocessing settings.

On disk, an entry is two files under `root/<key[:2]>/`:
  `<key>.npy`   the clip, float16 by default (half the size; after normalisation float16
                keeps ~3 significant digits, far below the noise of an OCT scan);
  `<key>.json`  the commit record: format, source_id, spec, shape, dtype, crc32 of the data, and
                the source's decoded dtype (`source_dtype`, e.g. "uint8"), which decides whether
                a pack may store the clip in 8 bits (see `octft.data.dataset.resolve_pack_dtype`).
Both are written to unique temporary names and `os.replace`d, the record last, so the
record is the commit point: a reader never sees half an entry, and any number of
processes may build the same key at once. Reading checks the record against the data;
a truncated, corrupted or record-less entry counts as missing and is rebuilt (removed
first, except data whose record may still be on its way: see ORPHAN_DATA_SECONDS).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import pickle
import time
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from tqdm.auto import tqdm

from octft.data.preprocess import Preprocessing, preprocess
from octft.data.volume import OctReadError, Volume
from octft.io import DiskFullError, atomic_file, remove_stale_temporaries, write_text_atomic

# Bump when the entry layout or the preprocessing code changes what a key's bytes mean.
CACHE_FORMAT = 1

# A temporary file (`octft.io`) older than this belongs to a writer that died (a live writer renames its file
# within seconds).
STALE_TEMP_SECONDS = 3600.0
# Data older than this without its record was left by a writer that died between renames.
ORPHAN_DATA_SECONDS = 60.0

StorageDtype = Literal["float16", "float32"]
Loader = Callable[[], "Volume | np.ndarray"]


@dataclass
class CacheReport:
    """What `VolumeCache.build` did: entries built, entries already valid, and loaders that failed."""

    built: int = 0
    reused: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (source_id, reason)


class VolumeCache:
    """Preprocessed clips on local disk, keyed by (source_id, preprocessing).

    `source_id` is the caller's identity of the source object, including what changes
    when the object does, e.g. ``"b2://bucket/key|size|sha1"`` or
    ``"file:///data/x.dcm|size|mtime_ns"``. Arrays always come back float32.

    >>> from octft.data.readers import read_volume
    >>> cache = VolumeCache("/tmp/octft-cache", Preprocessing(frames=16))  # doctest: +SKIP
    >>> clip = cache.get_or_build("file:///data/x.dcm|4194918|1700000000",
    ...                           lambda: read_volume("/data/x.dcm"))  # doctest: +SKIP
    """

    def __init__(self, root: str | Path, spec: Preprocessing, *, dtype: StorageDtype = "float16"):
        if dtype not in ("float16", "float32"):
            raise ValueError(f"VolumeCache dtype must be 'float16' or 'float32', got {dtype!r}")
        self.root = Path(root)
        self.spec = spec
        self.dtype = dtype

    def __repr__(self) -> str:
        return f"VolumeCache(root={str(self.root)!r}, spec={self.spec.key()!r}, dtype={self.dtype!r})"

    def entry_key(self, source_id: str) -> str:
        """The hex sha256 naming `source_id`'s entry under this cache's settings."""
        identity = json.dumps([CACHE_FORMAT, source_id, self.spec.key(), self.dtype])
        return hashlib.sha256(identity.encode("utf-8")).hexdigest()

    def entry_paths(self, source_id: str) -> tuple[Path, Path]:
        """(data file, commit record) of `source_id`'s entry, whether or not they exist."""
        key = self.entry_key(source_id)
        folder = self.root / key[:2]
        return folder / f"{key}.npy", folder / f"{key}.json"

    def entry_bytes(self) -> int:
        """Disk one entry takes: its data (with the .npy header) and its record, in 4 KiB blocks."""
        data = 128 + self.spec.frames * self.spec.height * self.spec.width * np.dtype(self.dtype).itemsize
        return -(-data // 4096) * 4096 + 4096

    # -- reading -------------------------------------------------------------------------

    def has(self, source_id: str) -> bool:
        """Whether `source_id` has a committed entry of the right size, without reading its data.

        A preparation resuming over tens of thousands of entries asks this instead of `get`:
        the checksum is still checked when the entry is read, and a bad one rebuilt then.
        """
        data_path, record_path = self.entry_paths(source_id)
        try:
            record = json.loads(record_path.read_text(encoding="utf-8"))
            size = data_path.stat().st_size
        except (OSError, ValueError):
            return False
        items = self.spec.frames * self.spec.height * self.spec.width
        return (
            isinstance(record, dict)
            and record.get("format") == CACHE_FORMAT
            and record.get("source_id") == source_id
            and record.get("spec") == asdict(self.spec)
            and record.get("dtype") == self.dtype
            and size >= items * np.dtype(self.dtype).itemsize
            and size <= items * np.dtype(self.dtype).itemsize + 4096
        )

    def source_dtype(self, source_id: str) -> str | None:
        """The dtype `source_id` decoded to when its entry was built ("uint8", "uint16", ...), from the
        entry's record; None when there is no entry or it predates the field (counts as not 8-bit)."""
        _, record_path = self.entry_paths(source_id)
        try:
            record = json.loads(record_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        value = record.get("source_dtype") if isinstance(record, dict) else None
        return value if isinstance(value, str) else None

    def get(self, source_id: str) -> np.ndarray | None:
        """The cached float32 clip of `source_id`, or None when there is no valid entry.

        An entry that fails any check (missing record or data, wrong shape, dtype,
        checksum or source) is removed so that the next build replaces it; data without
        a record is removed only once older than ORPHAN_DATA_SECONDS.
        """
        data_path, record_path = self.entry_paths(source_id)
        try:
            record = json.loads(record_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            # Data without a record: either a writer between its two renames (leave it, the
            # record follows within milliseconds) or one that died there (remove it).
            if _age_s(data_path) > ORPHAN_DATA_SECONDS:
                _remove(data_path)
            return None
        except (OSError, ValueError):
            _remove(record_path, data_path)
            return None
        clip = self._read_checked(data_path, record, source_id)
        if clip is None:
            _remove(record_path, data_path)
        return clip

    def _read_checked(self, data_path: Path, record: object, source_id: str) -> np.ndarray | None:
        expected_shape = [self.spec.frames, self.spec.height, self.spec.width]
        if not (
            isinstance(record, dict)
            and record.get("format") == CACHE_FORMAT
            and record.get("source_id") == source_id
            and record.get("spec") == asdict(self.spec)
            and record.get("shape") == expected_shape
            and record.get("dtype") == self.dtype
            and isinstance(record.get("crc32"), int)
        ):
            return None
        try:
            # mmap: the checksum and the float32 copy read the page cache directly, once each.
            stored = np.load(data_path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError):  # missing, truncated, or a damaged header
            return None
        try:
            if list(stored.shape) != expected_shape or stored.dtype != np.dtype(self.dtype):
                return None
            if zlib.crc32(stored) != record["crc32"]:
                return None
            return np.array(stored, dtype=np.float32)
        finally:
            del stored  # close the mapping now; the file may be replaced or removed next

    # -- writing -------------------------------------------------------------------------

    def put(self, source_id: str, array: np.ndarray, *, source_dtype: str | None = None) -> np.ndarray:
        """Store a preprocessed clip; returns it as a later `get` will (float32, after storage rounding).

        `source_dtype` is the dtype the source decoded to, kept in the record (`source_dtype`).

        Atomic and safe when several processes put the same key at once: the last
        complete write wins and every reader sees one whole entry or none.
        """
        expected = (self.spec.frames, self.spec.height, self.spec.width)
        if tuple(np.shape(array)) != expected:
            raise ValueError(
                f"VolumeCache.put({source_id!r}): expected a preprocessed clip shaped {expected}, "
                f"got {np.shape(array)}; run octft.data.preprocess.preprocess first"
            )
        with np.errstate(over="ignore"):  # overflow is reported below, with what to do
            stored = np.ascontiguousarray(array, dtype=self.dtype)
        if not np.isfinite(stored).all():
            raise ValueError(
                f"VolumeCache.put({source_id!r}): the clip holds NaN or inf (or overflows {self.dtype}); "
                "use dtype='float32' or another intensity normalisation"
            )
        data_path, record_path = self.entry_paths(source_id)
        data_path.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "format": CACHE_FORMAT,
            "source_id": source_id,
            "spec": asdict(self.spec),
            "shape": list(stored.shape),
            "dtype": self.dtype,
            "crc32": zlib.crc32(stored),
        }
        if source_dtype is not None:
            record["source_dtype"] = source_dtype
        # No fsync: a crash can leave a committed record over lost data, and the checksum
        # turns that into a miss instead of a wrong array.
        try:
            with atomic_file(data_path, needed_bytes=stored.nbytes) as temp, open(temp, "wb") as handle:
                np.save(handle, stored, allow_pickle=False)
            write_text_atomic(record_path, json.dumps(record))
        except DiskFullError as error:  # every later entry would fail alike: one line, naming the setting
            raise DiskFullError(f"{error} (the folder: data.cache_dir={self.root})") from None
        return stored.astype(np.float32)

    def get_or_build(self, source_id: str, load: Loader) -> np.ndarray:
        """The cached clip of `source_id`, or `preprocess(load())` stored and returned.

        `load` is only called on a miss. What comes back is identical on a hit and a miss.
        Raises OctReadError when `load` does, and also when the loaded array cannot be
        preprocessed (wrong rank, empty, NaN), naming `source_id`.
        """
        cached = self.get(source_id)
        if cached is not None:
            return cached
        return self._load_and_put(source_id, load)

    def _load_and_put(self, source_id: str, load: Loader) -> np.ndarray:
        loaded = load()
        array = loaded.array if isinstance(loaded, Volume) else np.asarray(loaded)
        try:
            clip = preprocess(array, self.spec)
        except ValueError as exc:
            raise OctReadError(source_id, f"cannot preprocess the volume: {exc}") from exc
        return self.put(source_id, clip, source_dtype=str(array.dtype))

    def build(
        self,
        items: Sequence[tuple[str, Loader]],
        *,
        workers: int = 1,
        progress: bool = True,
    ) -> CacheReport:
        """Make sure every (source_id, load) in `items` has a valid entry.

        A loader's OctReadError is counted in `failed` with its reason and the build goes
        on; any other exception is a bug and stops it. `workers` > 1 runs items in that
        many worker processes, so loaders must pickle (``functools.partial(read_volume,
        path)``, not a lambda): threads gain little, as the JPEG 2000 decoder holds the
        GIL (see benchmarks/bench_cache.py). Also removes temporary files left by writers
        that died.

        >>> report = cache.build([(sid, partial(read_volume, path)) for sid, path in sources])  # doctest: +SKIP
        >>> report.built, report.reused, report.failed  # doctest: +SKIP
        (118, 10, [('file:///data/bad.dcm|12|1700000000', 'not a DICOM file')])
        """
        if workers < 1:
            raise ValueError(f"VolumeCache.build: workers must be >= 1, got {workers}")
        if workers > 1:
            _check_picklable(items)
        self.remove_stale_temp_files()
        report = CacheReport()
        with tqdm(total=len(items), desc="cache", unit="vol", disable=not progress) as bar:

            def record(source_id: str, outcome: tuple[str, str]) -> None:
                status, reason = outcome
                if status == "reused":
                    report.reused += 1
                elif status == "built":
                    report.built += 1
                else:
                    report.failed.append((source_id, reason))
                bar.update(1)

            if workers == 1:
                for source_id, load in items:
                    record(source_id, self.build_one(source_id, load))
            else:
                # spawn, not fork: a forked child inherits torch's thread pools in a broken state.
                threads = max(1, (os.cpu_count() or 1) // workers)
                with ProcessPoolExecutor(
                    max_workers=workers,
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=_limit_torch_threads,
                    initargs=(threads,),
                ) as pool:
                    futures = {pool.submit(self.build_one, sid, load): sid for sid, load in items}
                    try:
                        for future in as_completed(futures):
                            record(futures[future], future.result())
                    except BaseException:
                        pool.shutdown(wait=True, cancel_futures=True)
                        raise
        if report.failed:
            # Keep the order of `items`, not of completion, so reports are comparable.
            order = {source_id: index for index, (source_id, _) in enumerate(items)}
            report.failed.sort(key=lambda failure: order.get(failure[0], len(order)))
        return report

    def build_one(self, source_id: str, load: Loader) -> tuple[str, str]:
        """("reused" | "built" | "failed", the loader's reason when it failed)."""
        if self.get(source_id) is not None:
            return "reused", ""
        try:
            self._load_and_put(source_id, load)
        except OctReadError as exc:
            return "failed", exc.reason
        return "built", ""

    def remove_stale_temp_files(self, older_than_s: float = STALE_TEMP_SECONDS) -> int:
        """Remove temporary files older than `older_than_s` (left by killed writers); returns how many."""
        return remove_stale_temporaries(self.root, older_than_s, "??/*")


def _check_picklable(items: Sequence[tuple[str, Loader]]) -> None:
    for source_id, load in items:
        try:
            pickle.dumps(load)
        except Exception as exc:  # noqa: BLE001 - pickle raises several types
            raise ValueError(
                f"VolumeCache.build(workers>1) runs loaders in worker processes, and the loader for "
                f"{source_id!r} cannot be pickled ({exc}); pass functools.partial(read_volume, path) "
                "or another module-level function, not a lambda or closure, or use workers=1"
            ) from exc


def _limit_torch_threads(threads: int) -> None:
    # Without this every worker process would start one torch thread per core. Imported here, in the pool's
    # processes: the module itself is read by a launch that prepares data without torch.
    import torch

    torch.set_num_threads(threads)


def _age_s(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def _remove(*paths: Path) -> None:
    for path in paths:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
