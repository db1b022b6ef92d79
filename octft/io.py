"""Files that are whole or absent: every octft writer that others may read at the same time goes through here.

A file is written under a temporary name beside its destination, then renamed over it: a reader sees the old
file or the new one, never half of one, and a writer killed half-way leaves only its temporary, which
`remove_stale_temporaries` deletes once it is old. Temporary names are `.<name>.<pid>.<random>.partial`, unique
per writer, so concurrent writers of one file never share one; listings skip them (`is_temporary`).

A write that fails for want of room (a full disk, a spent quota, a file-size limit) raises `DiskFullError`: one
line naming the file, the room it needed and what to do. Writers often report it without an errno (numpy's
"4096 requested and 1936 written", torch's "file write failed"), so the file system is asked as well.

    >>> with atomic_file(Path("cache/entry.npy")) as temp:          # doctest: +SKIP
    ...     np.save(temp, array)
    >>> write_text_atomic(Path("plan.json"), text)                 # doctest: +SKIP

This module imports nothing beyond the standard library and `octft.errors`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import shutil
import stat
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from octft.errors import OctftError

TEMP_SUFFIX = ".partial"
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
# A failed write with this little room left on its file system was for want of room, whatever the writer said.
_NEARLY_FULL_BYTES = 1 << 20


class DiskFullError(OctftError, OSError):
    """A write found no room: its file system is full, the user's quota is spent, or the file outgrew this
    process's file-size limit. The message names the file, the room needed (when known) and what to do."""


_FILE_KINDS = {stat.S_IFDIR: "a directory", stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFCHR: "a character device",
               stat.S_IFBLK: "a block device", stat.S_IFSOCK: "a socket"}


def file_kind(mode: int) -> str:
    """What a file of `os.stat` mode `mode` is, in words: 'a FIFO (named pipe)', ..., 'a regular file'."""
    return "a regular file" if stat.S_ISREG(mode) else _FILE_KINDS.get(stat.S_IFMT(mode), "not a regular file")


def temporary_beside(path: Path) -> Path:
    """A fresh temporary name in `path`'s folder: `.<name>.<pid>.<random>.partial`."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}{TEMP_SUFFIX}")


def is_temporary(name: str) -> bool:
    """Whether a file name is one of `temporary_beside`'s (a write in progress or abandoned)."""
    return name.startswith(".") and name.endswith(TEMP_SUFFIX)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, *, durable: bool = False, keep_existing: bool = False,
                needed_bytes: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block ends without an error it replaces `path`.

    On an error (or Ctrl-C) the temporary is removed and `path` keeps what it held; an error for want of room
    becomes a `DiskFullError` (`needed_bytes`, when the caller knows it, goes into its message). `durable=True`
    syncs the file and its folder to disk before and after the rename (checkpoints, downloads: what a power cut
    must not lose); otherwise the rename alone keeps readers from half a file. `keep_existing=True` never
    replaces: when another writer made `path` meanwhile, theirs is kept and this one dropped.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = temporary_beside(path)
    try:
        yield temp
        if durable:
            _fsync(temp, os.O_RDONLY)
        if keep_existing:
            with contextlib.suppress(FileExistsError):
                os.link(temp, path)  # atomic, and fails where `path` exists
        else:
            os.replace(temp, path)
        if durable:  # the rename itself is only durable once the folder entry is on disk
            _fsync(path.parent, os.O_RDONLY)
    except Exception as error:
        problem = None if isinstance(error, DiskFullError) else _want_of_room(error, temp, needed_bytes)
        if problem is None:
            raise
        raise DiskFullError(f"cannot write {path}: {problem}") from None
    finally:
        temp.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str, *, durable: bool = False) -> None:
    """Write `text` (UTF-8) to `path` whole or not at all (see `atomic_file`)."""
    data = text.encode("utf-8")
    with atomic_file(path, durable=durable, needed_bytes=len(data)) as temp:
        temp.write_bytes(data)


def disk_full_message(error: OSError) -> str | None:
    """One line for an `OSError` of a full disk, a spent quota or a file-size limit (whoever wrote); None for others.

    >>> disk_full_message(OSError(errno.ENOSPC, "No space left on device", "/scratch/run/last.pt"))  # doctest: +SKIP
    'cannot write /scratch/run/last.pt: its file system is full (0 B free); free space there, or ...'
    """
    if error.errno not in DISK_FULL_ERRNOS:
        return None
    if error.filename:
        return f"cannot write {error.filename}: {_want_of_room(error, Path(error.filename), None)}"
    # Python names no file when a write (not an open) fails: the file system is unknown, the limit is not.
    if error.errno == errno.EFBIG and _file_size_limit() is not None:
        return (f"a write failed: a file outgrows this process's file-size limit (ulimit -f: "
                f"{_size(_file_size_limit())}); raise the limit, or write smaller files")
    return (f"a write failed: {error.strerror or error}; free space on the disks octft writes to (output_dir, "
            "data.cache_dir, the stores), or point it at folders on another disk")


def _want_of_room(error: BaseException, temp: Path, needed_bytes: int | None) -> str | None:
    """Why writing `temp` failed for want of room (and what to do), or None when it failed for another reason."""
    code = next((cause.errno for cause in _causes(error) if isinstance(cause, OSError)
                 and cause.errno in DISK_FULL_ERRNOS), None)
    written = temp.stat().st_size if temp.is_file() else 0
    size_limit = _file_size_limit()
    if code == errno.EFBIG or (code is None and size_limit is not None and written >= size_limit - _NEARLY_FULL_BYTES):
        after = f" after {_size(written)}" if written else ""
        if size_limit is not None:
            return (f"the file outgrows this process's file-size limit (ulimit -f: {_size(size_limit)}){after}; raise "
                    "the limit, or write smaller files")
        return f"the file outgrows the largest its file system holds{after}; write to another file system"
    folder = next((parent for parent in (temp, *temp.parents) if parent.is_dir()), Path("/"))
    free = shutil.disk_usage(folder).free
    still_needed = max((needed_bytes or 0) - written, 0)
    if code is None and free >= max(still_needed, _NEARLY_FULL_BYTES):
        return None
    what = "the disk quota of this user is spent" if code == errno.EDQUOT else "its file system is full"
    room = (f"{_size(needed_bytes)} needed, " if needed_bytes else
            f"{_size(written)} written before it failed, " if written else "") + f"{_size(free)} free"
    return f"{what} ({room}); free space on the disk of {folder}, or point octft at a folder on another disk"


def _file_size_limit() -> int | None:
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    return None if limit == resource.RLIM_INFINITY else limit


def _causes(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _size(count: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if count < 1000 or unit == "TB":
            break
        count /= 1000
    return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"


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
