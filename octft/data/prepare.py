"""Streaming preparation: every selected source object fetched, verified, preprocessed into the cache
and its raw copy released, a few at a time, on a disk far smaller than the release.

The AI-READI OCT release is terabytes; a TPU VM's boot disk is about 100 GB. So nothing waits for a
whole download: each of `workers` threads takes one volume, downloads it (B2 checks size and SHA-1
against the listing, retrying transient errors), has it decoded and preprocessed, and deletes the raw
file unless downloads are kept (then the least recently used beyond the budget go). Downloads run on
threads because a b2sdk client holds locks and cannot travel to another process; decoding runs in
those threads or, for large preparations with several workers, in worker processes (the JPEG 2000
decoder holds the GIL; a process costs seconds to start).

Disk use while preparing stays under

    prepared cache + download budget (only with keep) + workers x the largest source file

and `plan_preparation` checks that the disk holds it before anything is fetched. The prepared
entries are the checkpoint: an interrupted preparation, started again, fetches only what has no
entry yet.

>>> plan = plan_preparation(storage, cache, items, workers=4)            # doctest: +SKIP
>>> print(plan.describe()); plan.check()                                   # doctest: +SKIP
>>> report = stream_prepare(storage, cache, plan.to_build, workers=4)     # doctest: +SKIP
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Literal, Sequence

from tqdm.auto import tqdm

from octft.data.cache import CacheReport, VolumeCache, _limit_torch_threads
from octft.data.readers import read_volume
from octft.data.storage import LocalStorage, StorageError
from octft.errors import OctftError

GB = 1e9
# "auto" decodes in processes only with at least this many volumes per process (see bench_prepare.py).
PROCESS_MIN_VOLUMES = 64


class PlanError(OctftError):
    """A preparation that would not fit on the disk; the message says what would."""


@dataclass(frozen=True)
class PrepareItem:
    """One source object to prepare: its key in the storage, its size from the listing, its cache identity."""

    key: str
    size: int
    source_id: str


def default_workers() -> int:
    """One download-and-decode slot per core."""
    return max(1, os.cpu_count() or 1)


def parse_share(text: str) -> tuple[int, int]:
    """``"2/8"`` -> (2, 8): this host prepares every 8th volume starting at the third."""
    index, _, count = text.partition("/")
    try:
        share = int(index), int(count)
    except ValueError:
        share = (-1, 0)
    if not (share[1] >= 1 and 0 <= share[0] < share[1]):
        raise PlanError(f"share {text!r} is not I/N with 0 <= I < N, e.g. --share 0/4 on the first of four hosts")
    return share


def take_share(items: Sequence[PrepareItem], share: tuple[int, int] | None) -> list[PrepareItem]:
    """The items host `share[0]` of `share[1]` prepares: disjoint across hosts, together all of them.

    Every host audits the same listing the same way, so the item order, and with it the shares, agree.
    """
    if share is None:
        return list(items)
    index, count = share
    return [item for position, item in enumerate(items) if position % count == index]


@dataclass
class PreparePlan:
    """What a preparation will fetch and the disk it needs, decided before anything is fetched."""

    volumes: int  # selected (this host's share)
    prepared: int  # already with an entry
    to_build: list[PrepareItem]
    fetch_bytes: int  # raw bytes to read or download, from the listing
    entry_bytes: int  # one prepared entry on disk
    downloads: bool  # sources are copied to local disk first (B2), not read in place
    download_budget_bytes: int  # kept raw files (0 unless keep)
    in_flight_bytes: int  # raw files being prepared at once, at most
    cache_free_bytes: int
    download_free_bytes: int
    same_disk: bool  # the cache and the downloads share a filesystem
    cache_dir: str
    settings: str  # the preprocessing and dtype, for messages
    suggestions: list[str] = field(default_factory=list)

    @property
    def cache_bytes(self) -> int:
        """The whole prepared cache of the selection at these settings."""
        return self.volumes * self.entry_bytes

    @property
    def new_cache_bytes(self) -> int:
        return len(self.to_build) * self.entry_bytes

    @property
    def download_peak_bytes(self) -> int:
        return (self.download_budget_bytes + self.in_flight_bytes) if self.downloads else 0

    @property
    def fits(self) -> bool:
        if self.same_disk:
            return self.new_cache_bytes + self.download_peak_bytes <= self.cache_free_bytes
        return self.new_cache_bytes <= self.cache_free_bytes and self.download_peak_bytes <= self.download_free_bytes

    def describe(self) -> str:
        lines = [
            f"plan: {self.volumes} volumes, {self.prepared} already prepared; "
            f"{'fetch' if self.downloads else 'read'} {len(self.to_build)} files, {self.fetch_bytes / GB:.2f} GB",
            f"  prepared cache {self.cache_dir} ({self.settings}): {self.cache_bytes / GB:.2f} GB in all, "
            f"{self.new_cache_bytes / GB:.2f} GB new ({self.entry_bytes / 1e6:.2f} MB per volume)",
        ]
        if self.downloads:
            lines.append(
                f"  downloads: at most {self.download_peak_bytes / GB:.2f} GB at once "
                f"(kept budget {self.download_budget_bytes / GB:.2f} GB + {self.in_flight_bytes / GB:.2f} GB in flight)"
            )
        free = f"{self.cache_free_bytes / GB:.2f} GB free"
        if not self.same_disk:
            free += f" for the cache, {self.download_free_bytes / GB:.2f} GB for downloads"
        lines.append(f"  disk: {free}; {'fits' if self.fits else 'does NOT fit'}")
        return "\n".join(lines)

    def check(self) -> None:
        """Raise PlanError, naming the settings that would fit, when the disk cannot hold the plan."""
        if self.fits:
            return
        need = self.new_cache_bytes + (self.download_peak_bytes if self.same_disk else 0)
        message = (
            f"preparing {len(self.to_build)} volumes into {self.cache_dir} needs {need / GB:.2f} GB "
            f"({self.settings}: {self.new_cache_bytes / GB:.2f} GB of prepared cache"
            + (f" + {self.download_peak_bytes / GB:.2f} GB of downloads" if self.downloads else "")
            + f") but {self.cache_free_bytes / GB:.2f} GB are free"
        )
        if not self.same_disk and self.download_peak_bytes > self.download_free_bytes:
            message = (
                f"downloads need up to {self.download_peak_bytes / GB:.2f} GB but their disk has "
                f"{self.download_free_bytes / GB:.2f} GB free"
            )
        hints = "; ".join(self.suggestions) or "free disk space or point data.cache_dir at a larger disk"
        raise PlanError(f"{message}. What would fit: {hints}")


def _free_bytes(path: Path) -> tuple[int, int]:
    """(free bytes, device) of the filesystem that holds `path` or would, once created."""
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free, path.stat().st_dev


def plan_preparation(
    storage,
    cache: VolumeCache,
    items: Sequence[PrepareItem],
    *,
    workers: int,
    keep: bool = False,
    budget_gb: float = 0.0,
    download_dir: str | Path | None = None,
) -> PreparePlan:
    """Count what `items` still need (an entry present counts as prepared) and the disk that takes.

    `download_dir` is where a B2 storage puts its downloads (its `cache_dir`).
    """
    to_build = [item for item in items if not cache.has(item.source_id)]
    downloads = not isinstance(storage, LocalStorage)
    largest = sorted((item.size for item in to_build), reverse=True)[:workers]
    cache_free, cache_device = _free_bytes(cache.root)
    if downloads:
        download_root = Path(download_dir) if download_dir is not None else Path(storage.cache_dir)
        download_free, download_device = _free_bytes(download_root)
    else:
        download_free, download_device = cache_free, cache_device
    spec = cache.spec
    plan = PreparePlan(
        volumes=len(items),
        prepared=len(items) - len(to_build),
        to_build=to_build,
        fetch_bytes=sum(item.size for item in to_build),
        entry_bytes=cache.entry_bytes(),
        downloads=downloads,
        download_budget_bytes=int(budget_gb * GB) if keep else 0,
        in_flight_bytes=sum(largest),
        cache_free_bytes=cache_free,
        download_free_bytes=download_free,
        same_disk=cache_device == download_device,
        cache_dir=str(cache.root),
        settings=f"{spec.frames} x {spec.height} x {spec.width} {cache.dtype}",
    )
    if not plan.fits:
        plan.suggestions = _what_would_fit(plan, cache)
    return plan


def _what_would_fit(plan: PreparePlan, cache: VolumeCache) -> list[str]:
    spec = cache.spec
    room = plan.cache_free_bytes - (plan.download_peak_bytes if plan.same_disk else 0)
    hints = []
    if plan.downloads and plan.download_budget_bytes:
        hints.append("data.download.keep=false (or a smaller data.download.budget_gb)")
    if room <= 0 or not plan.to_build:
        return hints
    per_volume = room // len(plan.to_build)
    itemsize = 2 if cache.dtype == "float16" else 4
    # Rounded to the encoder's usual tubelet (2 frames) and patch (16 pixels).
    frames = (per_volume - 4096 - 128) // (spec.height * spec.width * itemsize) // 2 * 2
    if 2 <= frames < spec.frames:
        hints.append(f"data.preprocess.frames={frames} (of {spec.frames})")
    if cache.dtype == "float32" and plan.new_cache_bytes // 2 <= room:
        hints.append("data.cache_dtype=float16 (half the size)")
    side = int(((per_volume - 4096 - 128) / (spec.frames * itemsize)) ** 0.5) // 16 * 16
    if 16 <= side < min(spec.height, spec.width):
        hints.append(f"data.preprocess.height={side} data.preprocess.width={side}")
    fitting = room // plan.entry_bytes
    hints.append(
        f"select at most {fitting} of the {len(plan.to_build)} volumes still to prepare "
        "(data.selection.regions, data.selection.devices, data.selection.per_participant=one_per_eye)"
    )
    return hints


class _Progress:
    """Volumes, bytes, throughput and ETA on one bar; thread-safe."""

    def __init__(self, total_volumes: int, total_bytes: int, enabled: bool):
        self.bar = tqdm(total=total_volumes, desc="prepare", unit="vol", disable=not enabled)
        self.total_bytes = total_bytes
        self.done_bytes = 0
        self.started = time.monotonic()
        self.lock = threading.Lock()

    def update(self, size: int) -> None:
        with self.lock:
            self.done_bytes += size
            elapsed = max(time.monotonic() - self.started, 1e-9)
            self.bar.set_postfix_str(
                f"{self.done_bytes / 1e6:.0f}/{self.total_bytes / 1e6:.0f} MB, {self.done_bytes / 1e6 / elapsed:.1f} MB/s",
                refresh=False,
            )
            self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def stream_prepare(
    storage,
    cache: VolumeCache,
    items: Sequence[PrepareItem],
    *,
    workers: int,
    keep: bool = False,
    budget_gb: float = 0.0,
    progress: bool = True,
    decode: Literal["auto", "threads", "processes"] = "auto",
) -> CacheReport:
    """Fetch, verify, preprocess into `cache` and release each of `items`, `workers` at a time.

    `decode`: where volumes are decoded and preprocessed. "threads": in the download threads (no start-up
    cost; uncompressed DICOM decodes in numpy and torch, which release the GIL). "processes": in worker
    processes (JPEG 2000 holds the GIL; each process costs a spawn and a torch import, seconds on a busy
    machine). "auto": processes only when there are several workers and enough volumes
    (PROCESS_MIN_VOLUMES each) to pay for their start.

    An item whose entry already exists is counted as reused and never fetched. A volume that cannot
    be decoded, or whose download keeps failing, is counted in `report.failed` with the reason; any
    other exception is a bug and stops the preparation (what was prepared stays prepared).
    """
    if workers < 1:
        raise ValueError(f"stream_prepare: workers must be >= 1, got {workers}")
    cache.remove_stale_temp_files()
    report = CacheReport()
    budget_bytes = int(budget_gb * GB)
    todo = [item for item in items if not cache.has(item.source_id)]
    report.reused = len(items) - len(todo)
    if not todo:
        return report
    bar = _Progress(len(todo), sum(item.size for item in todo), progress)
    decoders = min(workers, default_workers(), len(todo))
    if decode == "auto":
        decode = "processes" if decoders > 1 and len(todo) >= PROCESS_MIN_VOLUMES * decoders else "threads"
    pool = None
    if decode == "processes" and decoders > 1:
        pool = ProcessPoolExecutor(
            max_workers=decoders,
            mp_context=multiprocessing.get_context("spawn"),  # a forked child inherits torch's threads broken
            initializer=_limit_torch_threads,
            initargs=(max(1, default_workers() // decoders),),
        )

    def prepare_one(item: PrepareItem) -> tuple[str, str]:
        try:
            path = storage.local_path(item.key)
        except (StorageError, FileNotFoundError, PermissionError) as error:
            return "failed", f"download failed: {error}"
        try:
            load = partial(read_volume, path, name=item.source_id.partition("|")[0])
            if pool is None:
                return cache.build_one(item.source_id, load)
            return pool.submit(cache.build_one, item.source_id, load).result()
        finally:
            storage.release_download(item.key, keep=keep, budget_bytes=budget_bytes)

    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="octft-prepare") as threads:
            futures: dict[Future, PrepareItem] = {threads.submit(prepare_one, item): item for item in todo}
            try:
                for future in as_completed(futures):
                    item = futures[future]
                    status, reason = future.result()
                    if status == "failed":
                        report.failed.append((item.source_id, reason))
                    elif status == "reused":  # another builder (host or process) made it meanwhile
                        report.reused += 1
                    else:
                        report.built += 1
                    bar.update(item.size)
            except BaseException:
                for pending in futures:
                    pending.cancel()
                raise
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    order = {item.source_id: index for index, item in enumerate(items)}
    report.failed.sort(key=lambda failure: order.get(failure[0], len(order)))
    return report
