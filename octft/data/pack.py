"""Packs: many same-shaped rows in one contiguous memory-mapped array, gathered by index.

A training epoch reads every prepared volume of its split; one file per volume, checksummed on every
read, costs a file open and a CRC per sample per epoch. A pack holds a split's rows back to back in
one ``.npy`` that every process (loader threads, trial runners, hosts on a shared disk) maps read-only
at once; its integrity is checked when it is written and once when it is opened, not per sample.
The format knows nothing of volumes: the prepared-volume cache packs clips (T, H, W), and a frozen-
feature store can pack pooled features (D,) or token sequences (N, D) the same way.

On disk, a pack is a folder named by its key (a hash of the caller's `meta` and the row ids):
  ``data.npy``      (rows, *row_shape) of `dtype`;
  ``record.json``   the commit record: format, meta, row ids, row shape, dtype, a CRC-32 per row.
Both are written under unique temporary names and renamed, the record last: the record is the commit
point, so a reader sees a whole pack or none, and any number of processes may write the same pack at
once (they write identical bytes; the last rename wins). A pack whose record or data fails a check at
open is removed and reported as missing, for the caller to write again.

>>> pack = write_pack(root, meta, row_ids, rows, row_shape=(16, 224, 224), dtype="float16")  # doctest: +SKIP
>>> pack = open_pack(root, meta, row_ids) or write_pack(...)                                  # doctest: +SKIP
>>> batch = pack.gather([7, 3, 12])       # (3, 16, 224, 224) float16, in the order asked     # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import shutil
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from octft.io import atomic_file, write_text_atomic

PACK_FORMAT = 1

T = TypeVar("T")
U = TypeVar("U")


def pack_key(meta: dict[str, Any], row_ids: Sequence[str]) -> str:
    """The hex sha256 naming the pack of these rows under these settings."""
    identity = json.dumps([PACK_FORMAT, meta, list(row_ids)], sort_keys=True)
    return hashlib.sha256(identity.encode("utf-8")).hexdigest()


@dataclass
class Pack:
    """An opened pack: `rows` is the read-only memory map; `row_ids[i]` names row i."""

    path: Path
    rows: np.ndarray
    row_ids: list[str]

    def __len__(self) -> int:
        return len(self.row_ids)

    def gather(self, indices: Sequence[int]) -> np.ndarray:
        """The rows at `indices`, in that order, as one new array of the pack's dtype.

        Rows are read in file order, each copied once straight into its place (a fancy index on the map
        would copy twice); numpy releases the GIL for these copies, so loader threads gather in parallel.
        """
        out = np.empty((len(indices), *self.rows.shape[1:]), dtype=self.rows.dtype)
        for position in np.argsort(np.asarray(indices, dtype=np.int64), kind="stable"):
            out[position] = self.rows[indices[position]]
        return out


def _paths(root: Path, key: str) -> tuple[Path, Path, Path]:
    folder = root / key
    return folder, folder / "data.npy", folder / "record.json"


def write_pack(
    root: str | Path,
    meta: dict[str, Any],
    row_ids: Sequence[str],
    rows: Iterable[np.ndarray],
    *,
    row_shape: tuple[int, ...],
    dtype: str,
) -> Pack:
    """Write `rows` (one array of `row_shape` per id, in order) as the pack of (`meta`, `row_ids`) and open it.

    Rows are streamed into the memory-mapped file, so a pack larger than memory is fine; each row's
    CRC-32 is taken as it is written.
    """
    root = Path(root)
    key = pack_key(meta, row_ids)
    folder, data_path, record_path = _paths(root, key)
    folder.mkdir(parents=True, exist_ok=True)
    shape = (len(row_ids), *row_shape)
    with atomic_file(data_path) as temp_data:
        array = np.lib.format.open_memmap(temp_data, mode="w+", dtype=np.dtype(dtype), shape=shape)
        crcs = []
        count = 0
        for index, row in enumerate(rows):
            if index >= len(row_ids):
                raise ValueError(f"write_pack: more rows than the {len(row_ids)} row ids")
            if not np.can_cast(np.asarray(row).dtype, array.dtype, "same_kind"):
                # float into uint8 would truncate silently: the caller decides how to round.
                raise ValueError(f"write_pack: row {index} is {np.asarray(row).dtype}, which a {dtype} pack cannot "
                                 "hold without rounding; convert the rows first")
            array[index] = row
            crcs.append(zlib.crc32(np.ascontiguousarray(array[index])))
            count += 1
        if count != len(row_ids):
            raise ValueError(f"write_pack: {count} rows for {len(row_ids)} row ids")
        array.flush()
        del array
    record = {"format": PACK_FORMAT, "meta": meta, "row_ids": list(row_ids), "row_shape": list(row_shape),
              "dtype": dtype, "crc32": crcs}
    write_text_atomic(record_path, json.dumps(record))  # the commit point: data without its record is no pack
    opened = open_pack(root, meta, row_ids, verify=False)  # just checked, as written
    if opened is None:  # another writer replaced it between our renames with a damaged copy: unlikely
        raise RuntimeError(f"pack {folder} vanished right after it was written")
    return opened


def open_pack(root: str | Path, meta: dict[str, Any], row_ids: Sequence[str], *, verify: bool = True) -> Pack | None:
    """The pack of (`meta`, `row_ids`) under `root`, or None when there is none or it is damaged.

    `verify` checks every row's CRC-32 once, here; later gathers trust the pack. A damaged pack is
    removed so that the next `write_pack` replaces it.
    """
    folder, data_path, record_path = _paths(Path(root), pack_key(meta, row_ids))
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        _remove(folder)
        return None
    ok = (
        isinstance(record, dict)
        and record.get("format") == PACK_FORMAT
        and record.get("meta") == json.loads(json.dumps(meta))
        and record.get("row_ids") == list(row_ids)
        and isinstance(record.get("crc32"), list)
        and len(record["crc32"]) == len(row_ids)
    )
    rows = None
    if ok:
        try:
            rows = np.load(data_path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError):
            ok = False
    if ok:
        ok = rows.shape == (len(row_ids), *record["row_shape"]) and rows.dtype == np.dtype(record["dtype"])
    if ok and verify:
        ok = all(zlib.crc32(rows[index]) == crc for index, crc in enumerate(record["crc32"]))
    if not ok:
        del rows
        _remove(folder)
        return None
    return Pack(folder, rows, list(row_ids))


def _remove(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)


def prefetch(work: Callable[[T], U], tasks: Iterable[T], *, workers: int = 1) -> Iterator[U]:
    """`work(task)` for each of `tasks`, in order, computed ahead by `workers` background threads, so the
    next batches are gathered while the device runs the current step (memory-map copies release the GIL,
    so threads gather in parallel). `workers=0` calls `work` here, when each result is asked for.

    At most `2 * workers` results are in flight or waiting. An exception in `work` is raised here, at the
    task where it happened; a consumer that stops early cancels what was not started.

    >>> list(prefetch(lambda n: n * n, range(5), workers=2))
    [0, 1, 4, 9, 16]
    """
    if workers < 0:
        raise ValueError(f"prefetch: workers must be >= 0, got {workers}")
    if workers == 0:
        for task in tasks:
            yield work(task)
        return
    pending: deque[Future] = deque()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="octft-prefetch") as pool:
        try:
            for task in tasks:
                pending.append(pool.submit(work, task))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()
