"""Where a release lives: one small interface over a local folder and a Backblaze B2 bucket.

A storage lists objects and hands out their bytes; everything above it (locator, audit, readers)
sees keys such as ``"retinal_oct/structural_oct/topcon_maestro2/1001/a.dcm"`` and never a
back end. `open_storage` picks the back end from the URI:

>>> storage = open_storage("/data/aireadi")                      # doctest: +SKIP
>>> storage = open_storage("b2://my-bucket/aireadi-v2")          # doctest: +SKIP
>>> [info.key for info in storage.list("retinal_oct/")][:1]      # doctest: +SKIP
['retinal_oct/manifest.tsv']
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable
from urllib.parse import unquote, urlparse

import requests
from b2sdk.v2 import B2Api, InMemoryAccountInfo, InMemoryCache, make_progress_listener
from b2sdk.v2.exception import (
    AccessDenied,
    B2Error,
    BrokenPipe,
    ConnectionReset,
    FileNotPresent,
    MissingAccountData,
    NonExistentBucket,
    NotAllowedByAppKeyError,
    Unauthorized,
    v3BucketIdNotFound,
)
from tqdm import tqdm

from octft.io import file_kind
from octft.errors import OctftError
from octft.io import atomic_file, is_temporary, remove_stale_temporaries, write_text_atomic
from octft.redaction import redact_text, redact_url

logger = logging.getLogger(__name__)

KEY_ID_ENV = "B2_APPLICATION_KEY_ID"
KEY_ENV = "B2_APPLICATION_KEY"
CACHE_DIR_ENV = "OCTFT_CACHE_DIR"

# A temporary download untouched this long belongs to a killed download (a live one keeps writing).
STALE_PARTIAL_S = 3600.0
# Sidecars saying "this cache entry was verified" live in a tree that no bucket name can
# collide with (B2 bucket names never start with a dot).
_STAMP_DIR = ".verified"

_URI_FORMS = "a local path, file:///abs/path or b2://bucket/prefix"

T = TypeVar("T")


@dataclass(frozen=True)
class ObjectInfo:
    """One object in a storage.

    `key` is relative to the storage root and '/'-separated; `sha1` is the hex content SHA-1
    when the listing knows it (B2 does, a local folder does not); `version` is what the listing
    says changes whenever the object does (B2's file id, a local file's modification time in ns),
    so that an object's identity never needs its bytes.
    """

    key: str
    size: int
    sha1: str | None = None
    version: str | None = None


@runtime_checkable
class Storage(Protocol):
    """What the data layer needs from a place holding files."""

    uri: str  # display form; never contains secrets

    def list(self, prefix: str = "", *, refused: list[tuple[str, str]] | None = None) -> Iterator[ObjectInfo]:
        """Every object whose key starts with `prefix`, recursively, sorted by key.

        Entries under `prefix` that are not listed (a link out of the root, a FIFO) are appended to `refused`
        as (key, reason), so a caller can count them; without `refused` they are logged as warnings.
        """
        ...

    def read_bytes(self, key: str) -> bytes: ...

    def local_path(self, key: str) -> Path:
        """A complete local file holding the object."""
        ...

    def exists(self, key: str) -> bool: ...

    def sha1(self, key: str) -> str: ...

    def info(self, key: str) -> ObjectInfo:
        """What a listing says about `key` (size, SHA-1 when known, version)."""
        ...

    def release_download(self, key: str, *, keep: bool = False, budget_bytes: int = 0) -> None:
        """Done with `local_path(key)`: a downloaded copy is deleted or kept within the budget."""
        ...


class StorageError(OctftError):
    """A storage that cannot be used: missing credentials, a service that keeps failing,
    content that does not match its listing."""


class StorageURIError(StorageError, ValueError):
    """A storage URI, root or key that does not name a usable place."""


class MissingObjectError(StorageError, FileNotFoundError):
    """A root folder, bucket or object that does not exist."""


class AccessDeniedError(StorageError, PermissionError):
    """The storage refused the credentials or the access."""


@dataclass(frozen=True)
class Retry:
    """Exponential backoff for transient failures: waits `base_delay_s`, then twice that, ...
    capped at `max_delay_s`, for at most `attempts` tries in all.

    `sleep` is the clock's seam: tests pass one that records the waits instead of waiting.
    """

    attempts: int = 5
    base_delay_s: float = 1.0
    max_delay_s: float = 60.0
    sleep: Callable[[float], None] = time.sleep

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"Retry.attempts must be at least 1, got {self.attempts}")

    def delay_s(self, failed_attempts: int) -> float:
        """The wait after the `failed_attempts`-th failure (1-based)."""
        return min(self.max_delay_s, self.base_delay_s * 2 ** (failed_attempts - 1))


def open_storage(
    uri: str | Path,
    *,
    cache_dir: str | Path | None = None,
    b2_api: Any = None,
    retry: Retry | None = None,
    progress: bool = False,
) -> Storage:
    """The storage behind `uri`: a local path, ``file:///abs/path`` or ``b2://bucket/prefix``.

    For B2, `b2_api` is a `b2sdk.v2.B2Api`; without one (or with one not yet authorised) the
    credentials come from the environment (`B2_APPLICATION_KEY_ID`, `B2_APPLICATION_KEY`).
    `cache_dir` (B2 only) holds verified downloads; `retry` (B2 only) sets the backoff;
    `progress` shows tqdm bars for listings and downloads.

    >>> storage = open_storage("file:///data/aireadi")                   # doctest: +SKIP
    >>> storage = open_storage("b2://my-bucket/aireadi", cache_dir="/scratch/b2")  # doctest: +SKIP
    """
    text = str(uri)
    if text.startswith("b2://"):
        bucket_name, _, prefix = text[len("b2://") :].partition("/")
        if not bucket_name:
            raise StorageURIError(f"storage URI {text!r} names no bucket; use {_URI_FORMS}")
        if b2_api is None:
            b2_api = process_b2_api()
        elif not _is_authorized(b2_api):
            b2_api = authorize_b2(b2_api)
        return B2Storage(
            b2_api,
            bucket_name,
            prefix,
            cache_dir=cache_dir,
            retry=retry or Retry(),
            progress=progress,
        )
    if text.startswith("file:"):
        parsed = urlparse(text)
        if parsed.netloc not in ("", "localhost") or not parsed.path.startswith("/"):
            raise StorageURIError(f"storage URI {text!r} is not an absolute file URI; use {_URI_FORMS}")
        return LocalStorage(unquote(parsed.path), progress=progress)
    if not text or "://" in text:
        raise StorageURIError(f"unsupported storage URI {redact_url(text)!r}; use {_URI_FORMS}")
    return LocalStorage(text, progress=progress)


def _check_key(key: str, uri: str) -> str:
    """Refuse keys that would leave the root once joined to a local path."""
    parts = key.split("/")
    if not key or key.startswith("/") or "\\" in key or any(p in ("", ".", "..") for p in parts):
        raise StorageURIError(
            f"storage key {key!r} is not a relative '/'-separated path inside {uri}; "
            "give it as listed, e.g. 'retinal_oct/manifest.tsv'"
        )
    return key


def _file_sha1(path: Path) -> str:
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha1").hexdigest()


# ---------------------------------------------------------------------------------------------
# Local folder


class LocalStorage:
    """A release in a local (or mounted) folder.

    Keys are paths relative to `root` with '/'; symlinked files and folders are followed while they stay
    inside `root` (after resolving every link). A link out of the root, a broken link, a link back to a folder
    above it and anything that is not a regular file or folder (a FIFO, a device) are refused: never listed, read
    or hashed, and reported with their reason (`list(refused=...)`). A link out of the root would otherwise put
    any file the user can read into a release's listing, its hashes and its cache. Our own ``*.partial``
    temporaries are not listed.

    >>> storage = LocalStorage("/data/aireadi")                          # doctest: +SKIP
    >>> next(storage.list("retinal_oct/structural_oct/"))                # doctest: +SKIP
    ObjectInfo(key='retinal_oct/structural_oct/topcon_maestro2/1001/a.dcm', size=52428800, sha1=None)
    >>> storage.local_path("participants.tsv")                           # doctest: +SKIP
    PosixPath('/data/aireadi/participants.tsv')
    """

    def __init__(self, root: str | Path, *, progress: bool = False):
        root = Path(root).expanduser().absolute()
        if not root.exists():
            raise MissingObjectError(
                f"storage root {root} does not exist; check the path (or that its disk is mounted)"
            )
        if not root.is_dir():
            raise StorageURIError(f"storage root {root} is not a folder; give the folder holding the release")
        if not os.access(root, os.R_OK | os.X_OK):
            raise AccessDeniedError(f"storage root {root} is not readable by this user; check its permissions")
        self.root = root
        self.real_root = Path(os.path.realpath(root))  # where links must lead to be followed
        self.uri = root.as_uri()
        self.progress = progress

    def __repr__(self) -> str:
        return f"LocalStorage({self.uri!r})"

    def list(self, prefix: str = "", *, refused: list[tuple[str, str]] | None = None) -> Iterator[ObjectInfo]:
        # Only the folder named by the prefix is walked, not the whole tree.
        folder = prefix.rpartition("/")[0]
        start = self.root / _check_key(folder, self.uri) if folder else self.root
        if not start.is_dir():
            return
        if not self._inside(start):  # the prefix's own folder is a link out of the root
            self._refuse(refused, folder + "/", self._refusal(start) or "outside the data root: not followed")
            return
        start_stat = start.stat()
        walk = self._walk(start, folder + "/" if folder else "", prefix, {(start_stat.st_dev, start_stat.st_ino)},
                          refused)
        yield from tqdm(walk, desc=f"listing {self.uri}", unit=" files", disable=not self.progress)

    def _inside(self, path: str | Path) -> bool:
        """Whether `path`, every link resolved, lies inside the root."""
        return Path(os.path.realpath(path)).is_relative_to(self.real_root)

    def _refuse(self, refused: list[tuple[str, str]] | None, key: str, reason: str) -> None:
        if refused is None:
            logger.warning("not listing %s in %s: %s", key, self.uri, reason)
        else:
            refused.append((key, reason))

    def _refusal(self, path: str | Path) -> str | None:
        """Why the link `path` is not followed, or None when it leads somewhere inside the root."""
        if not os.path.exists(path):
            return f"a broken link (to {os.readlink(path)}, which does not exist)"
        target = os.path.realpath(path)
        if not Path(target).is_relative_to(self.real_root):
            return (f"a link to {target}, outside the data root {self.real_root}: not followed; copy the file into "
                    "the release (or link only within it)")
        return None

    def _walk(
        self, folder: Path, relative: str, prefix: str, ancestors: set[tuple[int, int]],
        refused: list[tuple[str, str]] | None,
    ) -> Iterator[ObjectInfo]:
        try:
            with os.scandir(folder) as scan:
                entries = [(entry, entry.is_dir()) for entry in scan]
        except PermissionError:
            # Not skipped: files there would silently be missing from the release.
            raise AccessDeniedError(f"cannot list {folder} in {self.uri}: permission denied; check its permissions") from None
        # A folder sorts as its name plus '/', so that this depth-first walk yields keys in
        # the order of sorted(keys), as B2 lists them: "a-b" < "a.txt" < "a/x". Sorting bare
        # names would put folder "a" first.
        entries.sort(key=lambda item: item[0].name + "/" if item[1] else item[0].name)
        for entry, is_dir in entries:
            key = relative + entry.name + ("/" if is_dir else "")
            if not (key.startswith(prefix) or (is_dir and prefix.startswith(key))):
                continue
            if entry.is_symlink() and (reason := self._refusal(entry.path)) is not None:
                self._refuse(refused, key, reason)
            elif is_dir:
                entry_stat = entry.stat()
                identity = (entry_stat.st_dev, entry_stat.st_ino)
                if identity in ancestors:
                    self._refuse(refused, key, "a link back to a folder above it (a loop): not followed")
                    continue
                yield from self._walk(Path(entry.path), key, prefix, ancestors | {identity}, refused)
            elif entry.is_file():
                if is_temporary(entry.name):  # our own writes in progress
                    continue
                entry_stat = entry.stat()
                yield ObjectInfo(key=key, size=entry_stat.st_size, version=str(entry_stat.st_mtime_ns))
            else:
                self._refuse(refused, key, f"{file_kind(entry.stat().st_mode)}, not a regular file: not read")

    def info(self, key: str) -> ObjectInfo:
        """What a listing would say about `key`."""
        path_stat = self.local_path(key).stat()
        return ObjectInfo(key=key, size=path_stat.st_size, version=str(path_stat.st_mtime_ns))

    def local_path(self, key: str) -> Path:
        """The file of `key`: a regular file inside the root, every link resolved (what `list` lists)."""
        path = self.root / _check_key(key, self.uri)
        try:
            mode = path.stat().st_mode
        except FileNotFoundError:
            raise MissingObjectError(f"no object {key!r} in {self.uri} (looked for {path})") from None
        except OSError as error:
            raise StorageError(f"cannot read {path}: {error.strerror or error}; check its permissions") from None
        if not stat.S_ISREG(mode):
            raise StorageError(f"{path} ({key!r} in {self.uri}) is {file_kind(mode)}, not a regular file")
        if not self._inside(path):
            raise AccessDeniedError(f"{path} ({key!r} in {self.uri}) is a link to {os.path.realpath(path)}, outside "
                                    "the data root: refused; copy the file into the release")
        return path

    def read_bytes(self, key: str) -> bytes:
        path = self.local_path(key)
        try:
            return path.read_bytes()
        except OSError as error:
            raise StorageError(f"cannot read {path}: {error.strerror or error}; check its permissions") from None

    def release_download(self, key: str, *, keep: bool = False, budget_bytes: int = 0) -> None:
        """Nothing to do: `local_path` is the user's own file, never a copy."""

    def exists(self, key: str) -> bool:
        return (self.root / _check_key(key, self.uri)).is_file()

    def sha1(self, key: str) -> str:
        return _file_sha1(self.local_path(key))


# ---------------------------------------------------------------------------------------------
# Backblaze B2


def _is_authorized(b2_api: Any) -> bool:
    try:
        b2_api.account_info.get_account_id()
    except MissingAccountData:
        return False
    return True


def authorize_b2(b2_api: Any = None, *, retry: Retry | None = None, realm: str = "production") -> Any:
    """Authorise `b2_api` (a new `b2sdk.v2.B2Api` when None) with the key in the environment.

    The key itself never reaches a message, a log line or an exception's text, in any encoding.
    `realm` is b2sdk's: "production", or the URL of another B2-compatible endpoint.

    >>> api = authorize_b2()   # reads B2_APPLICATION_KEY_ID and B2_APPLICATION_KEY  # doctest: +SKIP
    """
    key_id = os.environ.get(KEY_ID_ENV, "").strip()
    key = os.environ.get(KEY_ENV, "").strip()
    missing = [name for name, value in ((KEY_ID_ENV, key_id), (KEY_ENV, key)) if not value]
    if missing:
        raise StorageError(
            f"B2 credentials missing: set {' and '.join(missing)} in the environment "
            "(an application key with read access to the bucket)"
        )
    if b2_api is None:
        b2_api = B2Api(InMemoryAccountInfo(), cache=InMemoryCache())
    shown_id = key_id[:6] + "..."
    # HTTP Basic sends "id:key" base64-encoded: a server or proxy echoing headers would show it so.
    secrets_shown = (key, f"{key_id}:{key}")
    try:
        _call_with_retry(
            lambda: b2_api.authorize_account(realm, key_id, key),
            retry=retry or Retry(),
            what=f"B2 authorisation with key id {shown_id}",
        )
    # `from None` below: the b2sdk errors in the chain are not ours to vouch for, and may quote the key.
    except (B2Error, PermissionError) as exc:
        reason = redact_text(str(exc), secrets_shown)
        raise AccessDeniedError(
            f"B2 refused the application key ({KEY_ID_ENV}={shown_id}): {reason}. "
            f"Check that {KEY_ID_ENV} and {KEY_ENV} hold a current key with read access."
        ) from None
    except StorageError as exc:  # the service kept failing
        raise StorageError(redact_text(str(exc), secrets_shown)) from None
    return b2_api


# The B2 client this process opens storages with: (the key id it was authorised with from the
# environment, or None when set by `use_b2_api`; the client).
_process_client: tuple[str | None, Any] | None = None
_process_client_lock = threading.Lock()


def use_b2_api(b2_api: Any) -> None:
    """Make `b2_api` (an authorised `b2sdk.v2.B2Api`) the client every ``b2://`` storage of this
    process opens with, e.g. one on b2sdk's simulator, or a client authorised another way.
    ``use_b2_api(None)`` goes back to the environment's key."""
    global _process_client
    with _process_client_lock:
        _process_client = None if b2_api is None else (None, b2_api)


def process_b2_api() -> Any:
    """This process's B2 client: the one given to `use_b2_api`, else one authorised once with the
    key in the environment and reused (the audit, the cache build and the training samples all open
    the release; one authorisation serves them all)."""
    global _process_client
    with _process_client_lock:
        key_id = os.environ.get(KEY_ID_ENV, "").strip()
        if _process_client is not None and _process_client[0] in (None, key_id):
            return _process_client[1]
        api = authorize_b2()
        _process_client = (key_id, api)
        return api


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, _ContentMismatch):
        return True
    if isinstance(exc, B2Error):
        # B2ConnectionError, timeouts, 5xx (ServiceError), TooManyRequests, truncated and
        # checksum-mismatched downloads all say so themselves.
        return exc.should_retry_http() or isinstance(exc, (ConnectionReset, BrokenPipe))
    return isinstance(exc, (ConnectionError, TimeoutError, requests.exceptions.RequestException))


def _call_with_retry(call: Callable[[], T], *, retry: Retry, what: str) -> T:
    """`call()`, again after a backoff while it fails transiently; permanent errors at once."""
    for attempt in range(1, retry.attempts + 1):
        try:
            return call()
        # Error texts from B2 or a proxy may echo request headers (the key, the auth token): redacted,
        # and `from None` keeps the original exception, which holds them, out of any traceback.
        except (FileNotPresent, NonExistentBucket, v3BucketIdNotFound) as exc:
            raise MissingObjectError(f"{what}: not found in B2 ({redact_text(str(exc))})") from None
        except (Unauthorized, AccessDenied, NotAllowedByAppKeyError) as exc:
            raise AccessDeniedError(
                f"{what}: B2 refused access ({redact_text(str(exc))}); check that the application key can read it"
            ) from None
        except Exception as exc:
            if not _is_transient(exc):
                raise
            if attempt == retry.attempts:
                raise StorageError(
                    f"{what}: gave up after {attempt} attempts; last error: {redact_text(str(exc))}"
                ) from None
            delay = max(retry.delay_s(attempt), float(getattr(exc, "retry_after_seconds", None) or 0))
            logger.warning(
                "%s failed (%s: %s); attempt %d of %d, retrying in %.3g s",
                what, type(exc).__name__, redact_text(str(exc)), attempt, retry.attempts, delay,
            )
            retry.sleep(delay)
    raise AssertionError("unreachable")  # the loop returns or raises


class _ContentMismatch(Exception):
    """Downloaded bytes that differ from the listing: retried, the object may have changed."""


def _listing_sha1(entry: dict[str, Any]) -> str | None:
    sha1 = entry.get("contentSha1")
    if sha1 and sha1 != "none":
        return sha1.removeprefix("unverified:")
    # Large files carry no content SHA-1; uploaders usually put it in the file info.
    return (entry.get("fileInfo") or {}).get("large_file_sha1")


def default_cache_dir() -> Path:
    """`$OCTFT_CACHE_DIR/b2`, or ``~/.cache/octft/b2``."""
    base = os.environ.get(CACHE_DIR_ENV)
    return Path(base).expanduser() / "b2" if base else Path.home() / ".cache" / "octft" / "b2"


class B2Storage:
    """A release in a Backblaze B2 bucket, under an optional name prefix.

    Listings follow B2's pages to the end and show only the latest version of each file.
    `local_path` downloads into ``cache_dir/<bucket>/<file name>`` through a ``*.partial``
    file that is checked against the listing's size and SHA-1 before it is moved into place,
    so a cache entry is always whole; later calls reuse it without downloading. Transient
    failures are retried with `retry`'s backoff.

    >>> from b2sdk.v2 import B2Api, InMemoryAccountInfo                 # doctest: +SKIP
    >>> api = B2Api(InMemoryAccountInfo())                              # doctest: +SKIP
    >>> api.authorize_account("production", key_id, key)                # doctest: +SKIP
    >>> storage = B2Storage(api, "my-bucket", "aireadi-v2", cache_dir="/scratch/b2")  # doctest: +SKIP
    >>> storage.local_path("participants.tsv")                          # doctest: +SKIP
    PosixPath('/scratch/b2/my-bucket/aireadi-v2/participants.tsv')
    """

    def __init__(
        self,
        b2_api: Any,
        bucket_name: str,
        prefix: str = "",
        *,
        cache_dir: str | Path | None = None,
        retry: Retry | None = None,
        page_size: int = 1000,
        progress: bool = False,
    ):
        prefix = prefix.strip("/")
        self.uri = f"b2://{bucket_name}/{prefix}" if prefix else f"b2://{bucket_name}"
        if prefix:
            _check_key(prefix, self.uri)
        self.bucket_name = bucket_name
        self.retry = retry or Retry()
        self.page_size = page_size
        self.progress = progress
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        self._api = b2_api
        self._name_prefix = prefix + "/" if prefix else ""
        # What listings said about each key, so that reading after listing costs no extra call.
        self._known: dict[str, ObjectInfo] = {}
        self._bucket = _call_with_retry(
            lambda: b2_api.get_bucket_by_name(bucket_name), retry=self.retry, what=f"bucket {self.uri}"
        )
        self._kept = _KeptDownloads(self.cache_dir / self.bucket_name / self._name_prefix)

    def __repr__(self) -> str:
        return f"B2Storage({self.uri!r})"

    def _where(self, key: str) -> str:
        return f"{self.uri}/{key}"

    def _page(self, start_name: str | None, count: int, name_prefix: str) -> dict[str, Any]:
        return _call_with_retry(
            lambda: self._api.session.list_file_names(
                self._bucket.id_, start_name, count, name_prefix or None
            ),
            retry=self.retry,
            what=f"listing {self.uri} from {start_name or name_prefix or 'the start'}",
        )

    def _infos(self, page: dict[str, Any]) -> Iterator[ObjectInfo]:
        for entry in page["files"]:
            # list_file_names gives the latest version only; hidden files are not objects.
            if entry.get("action", "upload") != "upload":
                continue
            info = ObjectInfo(
                key=entry["fileName"][len(self._name_prefix) :],
                size=int(entry["contentLength"]),
                sha1=_listing_sha1(entry),
                # A new upload under the same name gets a new file id.
                version=entry.get("fileId"),
            )
            self._known[info.key] = info
            yield info

    def list(self, prefix: str = "", *, refused: list[tuple[str, str]] | None = None) -> Iterator[ObjectInfo]:
        # `refused` stays empty: a bucket holds objects only, no links or special files.
        listing = self._list(prefix)
        yield from tqdm(listing, desc=f"listing {self.uri}", unit=" files", disable=not self.progress)

    def _list(self, prefix: str) -> Iterator[ObjectInfo]:
        name_prefix = self._name_prefix + prefix
        start_name = name_prefix or None
        while True:
            page = self._page(start_name, self.page_size, name_prefix)
            yield from self._infos(page)
            start_name = page.get("nextFileName")
            if start_name is None:
                return

    def info(self, key: str) -> ObjectInfo:
        """What B2 says about `key` (from the last listing when there was one)."""
        if key in self._known:
            return self._known[key]
        name = self._name_prefix + _check_key(key, self.uri)
        for info in self._infos(self._page(name, 1, name)):
            if info.key == key:
                return info
        raise MissingObjectError(f"no object {key!r} in {self.uri}; check the key against a listing")

    def exists(self, key: str) -> bool:
        try:
            self.info(key)
        except FileNotFoundError:
            return False
        return True

    def sha1(self, key: str) -> str:
        info = self.info(key)
        if info.sha1 is not None:
            return info.sha1
        path = self._local_copy(key)
        stamp = _read_stamp(self._stamp_path(key), path)
        return stamp or _file_sha1(path)

    def _download(self, key: str, file: io.BufferedIOBase) -> None:
        listener = make_progress_listener(self._where(key), quiet=not self.progress)
        downloaded = self._bucket.download_file_by_name(self._name_prefix + key, listener)
        downloaded.save(file)

    def _check_content(self, key: str, info: ObjectInfo, size: int, sha1: str) -> None:
        if size != info.size or (info.sha1 is not None and sha1 != info.sha1):
            # The object may have been replaced since the listing: ask again next attempt.
            self._known.pop(key, None)
            raise _ContentMismatch(
                f"downloaded {size} bytes with SHA-1 {sha1}, listing says {info.size} bytes"
                f" with SHA-1 {info.sha1}"
            )

    def read_bytes(self, key: str) -> bytes:
        _check_key(key, self.uri)

        def attempt() -> bytes:
            info = self.info(key)
            buffer = io.BytesIO()
            self._download(key, buffer)
            data = buffer.getvalue()
            self._check_content(key, info, len(data), hashlib.sha1(data).hexdigest())
            return data

        return _call_with_retry(attempt, retry=self.retry, what=f"reading {self._where(key)}")

    # -- download cache ---------------------------------------------------------------------

    def cache_path(self, key: str) -> Path:
        """Where `local_path` keeps `key` (whether or not it is there yet)."""
        return self.cache_dir / self.bucket_name / (self._name_prefix + _check_key(key, self.uri))

    def _stamp_path(self, key: str) -> Path:
        return self.cache_dir / _STAMP_DIR / self.bucket_name / (self._name_prefix + key)

    def local_path(self, key: str) -> Path:
        """The verified local copy of `key`, downloaded when absent; in use (never evicted) until `release_download`."""
        self._kept.hold(key)
        try:
            return self._local_copy(key)
        except BaseException:
            self._kept.let_go(key)
            raise

    def _local_copy(self, key: str) -> Path:
        path = self.cache_path(key)
        info = self.info(key)
        if self._cache_entry_ok(key, path, info):
            self._kept.touch(key, path)
            return path
        if path.exists():
            logger.warning(
                "cache entry %s does not match %s; downloading it again", path, self._where(key)
            )
            path.unlink(missing_ok=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path.parent, STALE_PARTIAL_S, f".{path.name}.*")
        _call_with_retry(
            lambda: self._download_to_cache(key, path),
            retry=self.retry,
            what=f"downloading {self._where(key)}",
        )
        return path

    def release_download(self, key: str, *, keep: bool = False, budget_bytes: int = 0) -> None:
        """Done with `local_path(key)`'s copy: delete it, or with `keep` leave it for next time while
        the kept downloads of this storage fit in `budget_bytes`, evicting the least recently used."""
        path = self.cache_path(key)
        self._kept.let_go(key)
        if not keep:
            self._forget(key)
            return
        for evicted in self._kept.add(key, path, budget_bytes):
            self._forget(evicted)

    def _forget(self, key: str) -> None:
        self._kept.discard(key)
        self.cache_path(key).unlink(missing_ok=True)
        self._stamp_path(key).unlink(missing_ok=True)

    def _cache_entry_ok(self, key: str, path: Path, info: ObjectInfo) -> bool:
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return False
        if size != info.size:
            return False
        stamp_path = self._stamp_path(key)
        sha1 = _read_stamp(stamp_path, path)
        if sha1 is None:  # no stamp, or the file changed since it was stamped
            sha1 = _file_sha1(path)
            if info.sha1 is not None and sha1 != info.sha1:
                return False
            _write_stamp(stamp_path, path, sha1)
        return info.sha1 is None or sha1 == info.sha1

    def _download_to_cache(self, key: str, path: Path) -> None:
        info = self.info(key)
        # Unique per process and call: concurrent downloads of one key never share a file; readers see the old
        # entry or the whole new one.
        with atomic_file(path, durable=True) as partial:
            with open(partial, "w+b") as file:
                self._download(key, file)
            sha1 = _file_sha1(partial)
            self._check_content(key, info, partial.stat().st_size, sha1)
        _write_stamp(self._stamp_path(key), path, sha1)


class _KeptDownloads:
    """The downloads kept under `root`, least recently used first, for a byte budget.

    Use is recorded as the file's access time, set explicitly (mounts with noatime or relatime do
    not keep it), so the order survives the process; the modification time, which the
    verification stamp checks, is left alone. A download handed out and not yet released is in use
    (`hold`): it is never evicted, even when the folder scan that builds the index finds it.
    """

    def __init__(self, root: Path):
        self.root = root
        self._lock = threading.Lock()
        self._files: dict[str, tuple[int, int]] | None = None  # key -> (last use in ns, size)
        self._in_use: dict[str, int] = {}  # key -> how many holders

    def hold(self, key: str) -> None:
        with self._lock:
            self._in_use[key] = self._in_use.get(key, 0) + 1

    def let_go(self, key: str) -> None:
        with self._lock:
            left = self._in_use.get(key, 0) - 1
            if left > 0:
                self._in_use[key] = left
            else:
                self._in_use.pop(key, None)

    def _index(self) -> dict[str, tuple[int, int]]:
        if self._files is None:
            self._files = {}
            if self.root.is_dir():
                for path in self.root.rglob("*"):
                    if is_temporary(path.name) or not path.is_file():
                        continue
                    stat = path.stat()
                    self._files[path.relative_to(self.root).as_posix()] = (stat.st_atime_ns, stat.st_size)
        return self._files

    def touch(self, key: str, path: Path) -> None:
        now = time.time_ns()
        try:
            stat = path.stat()
            os.utime(path, ns=(now, stat.st_mtime_ns))
        except OSError:
            return
        with self._lock:
            if key in self._index():
                self._index()[key] = (now, stat.st_size)

    def add(self, key: str, path: Path, budget_bytes: int) -> list[str]:
        """Record `key` as just used; returns the keys to evict so that all fit in `budget_bytes`."""
        now = time.time_ns()
        try:
            stat = path.stat()
            os.utime(path, ns=(now, stat.st_mtime_ns))
        except FileNotFoundError:
            return []
        with self._lock:
            files = self._index()
            files[key] = (now, stat.st_size)
            total = sum(size for _, size in files.values())
            evicted = []
            for old_key, (_, size) in sorted(files.items(), key=lambda item: item[1][0]):
                if total <= budget_bytes:
                    break
                if old_key in self._in_use:  # being read (decoded in another thread or process) right now
                    continue
                evicted.append(old_key)
                total -= size
            for old_key in evicted:
                del files[old_key]
            return evicted

    def discard(self, key: str) -> None:
        with self._lock:
            if self._files is not None:
                self._files.pop(key, None)


def _read_stamp(stamp_path: Path, path: Path) -> str | None:
    """The SHA-1 recorded for `path`, if the stamp still describes the file as it is."""
    try:
        stamp = json.loads(stamp_path.read_text())
        stat = path.stat()
    except (OSError, ValueError):
        return None
    if not isinstance(stamp, dict):
        return None
    if (stamp.get("size"), stamp.get("mtime_ns")) != (stat.st_size, stat.st_mtime_ns):
        return None
    sha1 = stamp.get("sha1")
    return sha1 if isinstance(sha1, str) else None


def _write_stamp(stamp_path: Path, path: Path, sha1: str) -> None:
    stat = path.stat()
    stamp_path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(stamp_path, json.dumps({"sha1": sha1, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}))
