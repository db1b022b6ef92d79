"""Files that are whole or absent: every octft writer that others may read at the same time goes through here.

A file is written under a temporary name beside its destination, then renamed over it: a reader sees the old
file or the new one, never half of one, and a writer killed half-way leaves only its temporary, which
`remove_stale_temporaries` deletes once it is old. Temporary names are `.<name>.<pid>.<random>.partial`, unique
per writer, so concurrent writers of one file never share one; listings skip them (`is_temporary`).

    >>> with atomic_file(Path("cache/entry.npy")) as temp:          # doctest: +SKIP
    ...     np.save(temp, array)
    >>> write_text_atomic(Path("plan.json"), text)                 # doctest: +SKIP

This module imports nothing beyond the standard library.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

TEMP_SUFFIX = ".partial"


def temporary_beside(path: Path) -> Path:
    """A fresh temporary name in `path`'s folder: `.<name>.<pid>.<random>.partial`."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}{TEMP_SUFFIX}")


def is_temporary(name: str) -> bool:
    """Whether a file name is one of `temporary_beside`'s (a write in progress or abandoned)."""
    return name.startswith(".") and name.endswith(TEMP_SUFFIX)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, *, durable: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block ends without an error it replaces `path`.

    On an error (or Ctrl-C) the temporary is removed and `path` keeps what it held. `durable=True` syncs the
    file and its folder to disk before and after the rename (checkpoints, downloads: what a power cut must
    not lose); otherwise the rename alone keeps readers from half a file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = temporary_beside(path)
    try:
        yield temp
        if durable:
            _fsync(temp, os.O_RDONLY)
        os.replace(temp, path)
        if durable:  # the rename itself is only durable once the folder entry is on disk
            _fsync(path.parent, os.O_RDONLY)
    finally:
        temp.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str, *, durable: bool = False) -> None:
    """Write `text` (UTF-8) to `path` whole or not at all (see `atomic_file`)."""
    with atomic_file(path, durable=durable) as temp:
        temp.write_text(text, encoding="utf-8")


def remove_stale_temporaries(folder: Path, older_than_s: float, pattern: str = "*") -> int:
    """Delete temporaries under `folder` (matching `pattern`, e.g. `??/*`) older than `older_than_s` seconds:
    those of writers that died. A live writer's temporary is fresh, so it is never touched. Returns how many."""
    if not folder.is_dir():
        return 0
    cutoff = time.time() - older_than_s
    removed = 0
    for path in folder.glob(pattern):
        if not is_temporary(path.name):
            continue
        try:
            if path.stat().st_mtime < cutoff:
                path.unlink()
                removed += 1
        except FileNotFoundError:  # its writer finished, or another process removed it first
            pass
    return removed


def _fsync(path: Path, flags: int) -> None:
    descriptor = os.open(path, flags)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
