"""The frozen-feature store: a frozen encoder's outputs for every volume of a run, computed once per sweep.

While the encoder is frozen (and there is no augmentation), its output for a volume is the same in every
trial and every frozen epoch, so a sweep computes it once and every trial trains its head on the stored
arrays. An entry is keyed by everything that decides those numbers (`FeatureKey`): the encoder's weights
(the checkpoint's content hash, or the seed when it starts from scratch), the model config, the
precision, the preprocessing, what is stored (pooled features or token sequences) and each split's
sources in order. Any difference is another entry; an entry is never read under a key that differs.

On disk, an entry is a folder `root/<digest>/` with one `.npy` array per split (memory-mapped when read)
and `record.json`, the commit record: the full key, and each array's shape, dtype and crc32. A builder
writes everything into a private temporary folder, the record last, and renames the folder into place:
the rename is the commit, so readers see a whole entry or none, and several processes (or hosts on a
shared file system) may build the same key at once; the first rename wins and the others discard theirs.
A lock file beside the entry makes a second builder on the same file system wait for the first and then
read its entry instead of computing it again. A damaged entry (checksum, shape, record) is moved aside
and rebuilt, never read.

    >>> store = FeatureStore("demo/features")                                         # doctest: +SKIP
    >>> entry, built = store.get_or_build(key, compute)   # compute(split) -> (rows, ...) array  # doctest: +SKIP
    >>> entry.arrays["train"].shape                                                   # doctest: +SKIP
    (60, 48)
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import shutil
import time
import uuid
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

# Bump when the entry layout or what a key's arrays mean changes.
STORE_FORMAT = 1
RECORD_NAME = "record.json"
TEMP_PREFIX = ".building-"
TRASH_PREFIX = ".damaged-"
# A temporary folder older than this belongs to a builder that died.
STALE_TEMP_SECONDS = 6 * 3600.0

FeatureKind = Literal["pooled", "tokens"]
# Pooled features are small and kept exact; token sequences (~2.4 MB per ViT-B volume in float16) are halved.
STORAGE_DTYPE: dict[str, str] = {"pooled": "float32", "tokens": "float16"}


# The modules whose code turns a volume into its stored features: an edit to either is another key.
FEATURE_CODE = (Path(__file__).with_name("frozen.py"), Path(__file__).parents[1] / "models" / "encoder.py")


@functools.cache
def feature_code_version() -> str:
    """A content hash of the code that computes features (`FEATURE_CODE`): features stored by other code are never
    served to this code, whatever version string it carries."""
    digest = hashlib.sha256()
    for path in FEATURE_CODE:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class FeatureKey:
    """Everything that decides a frozen encoder's outputs for a run's volumes.

    `encoder` is `sha256:<hex>` of the checkpoint file, or `scratch:seed=<n>` for an encoder initialised
    from a seed; `model` the encoder's config values; `preprocessing` how volumes became clips (with the dtypes the
    prepared cache and pack store them in); `sources` each split's source ids in dataset order; `code` the version
    of the feature code (`feature_code_version`). The features' own storage dtype (`STORAGE_DTYPE`) is in the record.
    """

    encoder: str
    model: Mapping[str, object]
    precision: str
    preprocessing: Mapping[str, object]
    kind: FeatureKind
    sources: Mapping[str, Sequence[str]]
    code: str = field(default_factory=feature_code_version)

    def as_record(self) -> dict:
        """Plain JSON types, as stored in (and compared with) the commit record."""
        return json.loads(json.dumps({
            "format": STORE_FORMAT, "encoder": self.encoder, "model": dict(self.model), "precision": self.precision,
            "preprocessing": dict(self.preprocessing), "kind": self.kind, "storage_dtype": STORAGE_DTYPE[self.kind],
            "code": self.code, "sources": {split: list(ids) for split, ids in self.sources.items()},
        }, sort_keys=True))

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.as_record(), sort_keys=True).encode("utf-8")).hexdigest()


@dataclass
class FeatureEntry:
    """One committed entry: read-only memory-mapped arrays per split (float32 or float16)."""

    path: Path
    digest: str
    kind: FeatureKind
    arrays: dict[str, np.ndarray]
    nbytes: int
    build_seconds: float  # what building it cost (recorded by its builder)


@dataclass
class FeaturePlan:
    """What an entry will hold before it is built: rows per split, the per-row shape and the bytes."""

    kind: FeatureKind
    rows: dict[str, int]
    row_shape: tuple[int, ...]
    dtype: str
    nbytes: int = field(init=False)

    def __post_init__(self) -> None:
        per_row = int(np.prod(self.row_shape)) * np.dtype(self.dtype).itemsize
        self.nbytes = per_row * sum(self.rows.values())

    def describe(self) -> str:
        rows = ", ".join(f"{split} {count}" for split, count in self.rows.items())
        return (f"{self.kind} features {self.row_shape} {self.dtype} per volume ({rows}): "
                f"{self.nbytes / 2**20:.1f} MiB")


def checkpoint_identity(path: str | os.PathLike | None, seed: int) -> str:
    """`sha256:<hex>` of a checkpoint's bytes (its content, not its name or mtime), or the scratch seed."""
    if path is None:
        return f"scratch:seed={seed}"
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return f"sha256:{digest.hexdigest()}"


class FeatureStore:
    """Committed feature entries under `root`, one folder per key digest."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"FeatureStore(root={str(self.root)!r})"

    def entry_path(self, key: FeatureKey) -> Path:
        return self.root / key.digest()

    # -- reading -------------------------------------------------------------------------

    def open(self, key: FeatureKey) -> FeatureEntry | None:
        """The committed entry of `key`, checked and memory-mapped, or None.

        An entry whose record disagrees with `key` in any part, or whose arrays fail their shape, dtype or
        checksum, is never returned; a damaged one is moved aside so that the next build replaces it.
        """
        path = self.entry_path(key)
        try:
            record = json.loads((path / RECORD_NAME).read_text(encoding="utf-8"))
        except FileNotFoundError:
            # Entries appear only by renaming a whole folder, record included: a folder without one is damage.
            if path.is_dir():
                self._discard(path)
            return None
        except (OSError, ValueError):
            self._discard(path)
            return None
        entry = _read_checked(path, record, key)
        if entry is None:
            self._discard(path)
        return entry

    # -- writing -------------------------------------------------------------------------

    def get_or_build(self, key: FeatureKey, compute: Callable[[str], np.ndarray]) -> tuple[FeatureEntry, bool]:
        """(the entry of `key`, whether this call built it); `compute(split)` is called only on a miss.

        `compute(split)` returns the split's features in the order of `key.sources[split]`.
        """
        entry = self.open(key)
        if entry is not None:
            return entry, False
        self.root.mkdir(parents=True, exist_ok=True)
        with self._build_lock(key):
            # Another builder may have committed while this one waited for the lock.
            entry = self.open(key)
            if entry is not None:
                return entry, False
            self.remove_stale_temp()
            started = time.perf_counter()
            arrays = {split: compute(split) for split in key.sources}
            self.put(key, arrays, build_seconds=time.perf_counter() - started)
        entry = self.open(key)
        if entry is None:
            raise RuntimeError(f"feature entry {self.entry_path(key)} failed its checks right after being written")
        return entry, True

    def put(self, key: FeatureKey, arrays: Mapping[str, np.ndarray], *, build_seconds: float = 0.0) -> Path:
        """Commit `arrays` (one per split of `key`) as the entry of `key`; returns its folder.

        If another process committed the same key first, its entry stays and this one is discarded: both
        hold the same numbers.
        """
        if set(arrays) != set(key.sources):
            raise ValueError(f"feature arrays for splits {sorted(arrays)}, but the key names {sorted(key.sources)}")
        dtype = STORAGE_DTYPE[key.kind]
        stored = {}
        for split, array in arrays.items():
            if len(array) != len(key.sources[split]):
                raise ValueError(f"{split}: {len(array)} feature rows for {len(key.sources[split])} sources")
            with np.errstate(over="ignore"):
                stored[split] = np.ascontiguousarray(array, dtype=dtype)
            if not np.isfinite(stored[split]).all():
                raise ValueError(
                    f"{split}: the encoder's features hold NaN or inf (in {dtype}): check the checkpoint and precision"
                )
        final = self.entry_path(key)
        temp = self.root / f"{TEMP_PREFIX}{final.name}.{os.getpid()}.{uuid.uuid4().hex}"
        temp.mkdir(parents=True)
        try:
            record = {"key": key.as_record(), "build_seconds": build_seconds, "arrays": {}}
            for split, array in stored.items():
                np.save(temp / f"{split}.npy", array, allow_pickle=False)
                record["arrays"][split] = {"shape": list(array.shape), "dtype": dtype, "crc32": zlib.crc32(array)}
            # The record last: a folder without one is never an entry.
            (temp / RECORD_NAME).write_text(json.dumps(record, sort_keys=True), encoding="utf-8")
            try:
                os.rename(temp, final)
            except OSError:
                if not (final / RECORD_NAME).is_file():
                    raise
                # Another builder committed first; its entry holds the same numbers.
                shutil.rmtree(temp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(temp, ignore_errors=True)
            raise
        return final

    def remove_stale_temp(self, older_than_s: float = STALE_TEMP_SECONDS) -> int:
        """Remove temporary and damaged folders left by builders that died; returns how many."""
        if not self.root.is_dir():
            return 0
        cutoff = time.time() - older_than_s
        removed = 0
        for path in list(self.root.glob(f"{TEMP_PREFIX}*")) + list(self.root.glob(f"{TRASH_PREFIX}*")):
            with contextlib.suppress(FileNotFoundError):
                if path.name.startswith(TRASH_PREFIX) or path.stat().st_mtime < cutoff:
                    shutil.rmtree(path, ignore_errors=True)
                    removed += 1
        return removed

    @contextlib.contextmanager
    def _build_lock(self, key: FeatureKey) -> Iterator[None]:
        # Saves duplicate work only: correctness comes from the atomic rename, so a file system where
        # flock does not reach other hosts costs a second build, never a wrong entry.
        with open(self.root / f".{key.digest()}.lock", "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _discard(self, path: Path) -> None:
        # Renamed aside first, so no reader ever opens a half-removed entry.
        trash = self.root / f"{TRASH_PREFIX}{path.name}.{uuid.uuid4().hex}"
        with contextlib.suppress(FileNotFoundError, OSError):
            os.rename(path, trash)
            shutil.rmtree(trash, ignore_errors=True)


def _read_checked(path: Path, record: object, key: FeatureKey) -> FeatureEntry | None:
    if not isinstance(record, dict) or record.get("key") != key.as_record():
        return None
    described = record.get("arrays")
    if not isinstance(described, dict) or set(described) != set(key.sources):
        return None
    arrays: dict[str, np.ndarray] = {}
    for split, meta in described.items():
        try:
            array = np.load(path / f"{split}.npy", mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError):  # missing, truncated, or a damaged header
            return None
        if (list(array.shape) != meta.get("shape") or str(array.dtype) != meta.get("dtype")
                or len(array) != len(key.sources[split]) or zlib.crc32(array) != meta.get("crc32")):
            return None
        arrays[split] = array
    return FeatureEntry(path=path, digest=path.name, kind=key.kind, arrays=arrays,
                        nbytes=sum(int(a.nbytes) for a in arrays.values()),
                        build_seconds=float(record.get("build_seconds", 0.0)))


__all__ = ["FeatureEntry", "FeatureKey", "FeaturePlan", "FeatureStore", "checkpoint_identity"]
