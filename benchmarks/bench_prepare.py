"""Streaming preparation: volumes/s, MB/s and the disk high-water mark, from B2 and from a local folder.

Writes a synthetic release (`octft.data.synth`), serves it from a local folder and, in this process,
from b2sdk's simulator (downloads on threads, as from a real bucket: network time is not part of it),
and prepares it with 1, 2 and 4 workers into a fresh cache each time. The disk high-water mark is
sampled every few milliseconds over the download folder: without a budget (every download kept, what
octft did before), with a budget, and with downloads released as soon as prepared (the default).
Ends with the time a full AI-READI-sized preparation (80,000 files by default) would take at the
measured rate per worker, ignoring the network.

    .venv/bin/python benchmarks/bench_prepare.py                    # about 3 min on 2 busy cores
    .venv/bin/python benchmarks/bench_prepare.py --participants 64 --frames 64 --workers 1 2 4
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import threading
import time
from pathlib import Path

from b2sdk.v2 import B2Api, B2HttpApiConfig, InMemoryAccountInfo, RawSimulator

from octft.data.audit import audit_dataset
from octft.data.dataset import prepare_volumes
from octft.data.storage import B2Storage, LocalStorage
from octft.data.synth import synthesize

MB = 1e6


class DiskWatch:
    """The largest number of bytes seen under `root` (verification stamps excluded) while running."""

    def __init__(self, root: Path, interval_s: float = 0.005):
        self.root, self.interval_s = root, interval_s
        self.high_water = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _used(self) -> int:
        total = 0
        for folder, _, names in os.walk(self.root):
            if ".verified" in Path(folder).parts:
                continue
            for name in names:
                try:
                    total += os.stat(os.path.join(folder, name)).st_size
                except FileNotFoundError:
                    pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.high_water = max(self.high_water, self._used())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "DiskWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.high_water = max(self.high_water, self._used())


def simulated_bucket(release: Path) -> B2Api:
    api = B2Api(InMemoryAccountInfo(), api_config=B2HttpApiConfig(_raw_api_class=RawSimulator))
    key_id, key = api.session.raw_api.create_account()
    api.authorize_account("production", key_id, key)
    bucket = api.create_bucket("bench", "allPrivate")
    for path in sorted(release.rglob("*")):
        if path.is_file():
            bucket.upload_bytes(path.read_bytes(), f"release/{path.relative_to(release).as_posix()}")
    return api


def run(storage, volumes, work: Path, *, workers: int, keep: bool, budget_gb: float, frames: int, size: int,
        decode: str) -> dict:
    cache_dir, downloads = work / "cache", work / "downloads"
    if isinstance(storage, B2Storage):
        storage = B2Storage(storage._api, storage.bucket_name, "release", cache_dir=downloads)
    downloads.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with DiskWatch(downloads) as watch:
        prepared = prepare_volumes(storage.uri, volumes, storage=storage, cache_dir=str(cache_dir), frames=frames,
                                   height=size, width=size, workers=workers, keep=keep, budget_gb=budget_gb,
                                   download_dir=str(downloads), progress=False, decode=decode)
    seconds = time.perf_counter() - started
    assert not prepared.report.failed and prepared.report.built == len(volumes), prepared.report
    raw = int(volumes["size"].sum())
    return {"seconds": seconds, "volumes_s": len(volumes) / seconds, "mb_s": raw / MB / seconds,
            "high_water_mb": watch.high_water / MB}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--participants", type=int, default=24)
    parser.add_argument("--frames", type=int, default=32, help="B-scans per synthetic source volume")
    parser.add_argument("--side", type=int, default=256, help="B-scan height and width of the sources")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--prepared-frames", type=int, default=16)
    parser.add_argument("--prepared-side", type=int, default=224)
    parser.add_argument("--full-files", type=int, default=80_000, help="files in a full release (AI-READI v3: ~80,000)")
    parser.add_argument("--full-mb-per-file", type=float, default=40.0,
                        help="mean source size in a full release (a Cirrus macula cube is 64 MB uncompressed)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="octft-bench-prepare-") as tmp:
        tmp = Path(tmp)
        synthesize(tmp / "release", participants=args.participants, seed=0, frames=args.frames,
                   height=args.side, width=args.side)
        local = LocalStorage(tmp / "release")
        volumes = audit_dataset(str(tmp / "release"), storage=local).volumes
        api = simulated_bucket(tmp / "release")
        b2 = B2Storage(api, "bench", "release", cache_dir=tmp / "unused")
        b2_volumes = audit_dataset(b2.uri, storage=b2).volumes
        raw_mb = volumes["size"].sum() / MB
        print(f"# bench_prepare: {len(volumes)} volumes, {raw_mb:.1f} MB raw "
              f"({args.frames} x {args.side} x {args.side} sources) -> {args.prepared_frames} x "
              f"{args.prepared_side} x {args.prepared_side} float16")
        print(f"# machine: {platform.platform()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")
        print()
        print("| source | workers | decode in | downloads | seconds | volumes/s | MB/s | download disk high-water MB |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        per_worker = []
        index = 0

        def row(name, storage, table, workers, keep, budget_gb, label, decode="threads"):
            nonlocal index
            index += 1
            result = run(storage, table, tmp / f"run{index}", workers=workers, keep=keep, budget_gb=budget_gb,
                         frames=args.prepared_frames, size=args.prepared_side, decode=decode)
            print(f"| {name} | {workers} | {decode} | {label} | {result['seconds']:.1f} | {result['volumes_s']:.2f} | "
                  f"{result['mb_s']:.1f} | {result['high_water_mb']:.1f} |", flush=True)
            return result

        for workers in args.workers:
            row("local", local, volumes, workers, False, 0.0, "read in place")
        for workers in args.workers:
            result = row("B2 (simulator)", b2, b2_volumes, workers, False, 0.0, "released when prepared")
            per_worker.append((workers, result))
        row("B2 (simulator)", b2, b2_volumes, 2, False, 0.0, "released when prepared", decode="processes")
        budget_gb = raw_mb / 4 / 1000
        row("B2 (simulator)", b2, b2_volumes, 2, True, budget_gb, f"kept, budget {budget_gb * 1000:.0f} MB")
        # A budget above the raw size keeps every download, as octft did before streaming.
        row("B2 (simulator)", b2, b2_volumes, 2, True, 2 * raw_mb / 1000, "kept, no budget (as before)")

        print()
        full_mb = args.full_files * args.full_mb_per_file
        print(f"Full release at the measured rates ({args.full_files:,} files x {args.full_mb_per_file:.0f} MB = "
              f"{full_mb / 1e6:.1f} TB; network not included):")
        print()
        print("| workers | MB/s per worker | hours at this rate (by bytes) | hours (by volumes) |")
        print("| --- | --- | --- | --- |")
        for workers, result in per_worker:
            hours_bytes = full_mb / result["mb_s"] / 3600
            hours_volumes = args.full_files / result["volumes_s"] / 3600
            print(f"| {workers} | {result['mb_s'] / workers:.1f} | {hours_bytes:.1f} | {hours_volumes:.1f} |")


if __name__ == "__main__":
    main()
