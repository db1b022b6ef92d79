"""How much the preprocessing cache saves a trial: volumes/second with and without it.

Writes N OCT-like multi-frame DICOMs (half uncompressed, half JPEG 2000 lossless) to a
temporary folder, then times
  (a) read_volume + preprocess straight from the DICOMs: what every trial pays without a cache;
  (b) reads through a warm VolumeCache with the same preprocessing;
and prints both, the speed-up (goal: >= 20x) and the machine. To keep the setup short,
only --distinct pixel contents per kind are encoded; the other files copy one of them
under new UIDs (same decoding cost, different files and cache entries).
`--build-workers K` also times `VolumeCache.build(workers=K)` (K worker processes) into a
fresh cache, start-up of the processes included.

    .venv/bin/python benchmarks/bench_cache.py               # defaults: < 1 min on 2 cores
    .venv/bin/python benchmarks/bench_cache.py --volumes 128 --frames 97 --build-workers 2
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import pydicom
import torch
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid

from octft.data.cache import VolumeCache
from octft.data.preprocess import Preprocessing, preprocess
from octft.data.readers import read_volume
from octft.data.volume import OctReadError, Volume

GOAL_SPEEDUP = 20.0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--volumes", type=int, default=32, help="DICOM files to generate (default 32)")
    parser.add_argument("--distinct", type=int, default=4, help="pixel contents encoded per kind (default 4)")
    parser.add_argument("--frames", type=int, default=64, help="B-scans per volume (default 64)")
    parser.add_argument("--size", type=int, default=256, help="B-scan height and width in pixels (default 256)")
    parser.add_argument(
        "--compressed", type=float, default=0.5, help="fraction stored as JPEG 2000 lossless (default 0.5)"
    )
    parser.add_argument("--clip-frames", type=int, default=16, help="Preprocessing.frames (default 16)")
    parser.add_argument("--clip-size", type=int, default=224, help="Preprocessing height and width (default 224)")
    parser.add_argument(
        "--intensity", choices=("percentile", "zscore", "minmax"), default="percentile", help="default percentile"
    )
    parser.add_argument("--dtype", choices=("float16", "float32"), default="float16", help="cache storage dtype")
    parser.add_argument(
        "--build-workers", type=int, default=0, help="also time VolumeCache.build with this many worker processes (0: skip)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="passes over the warm cache; the median counts")
    parser.add_argument("--dir", type=Path, default=None, help="where to write the DICOMs and cache (default: a temp dir)")
    return parser.parse_args()


def oct_like_frames(seed: int, frames: int, size: int) -> np.ndarray:
    """Speckle over a layered band: compresses (and decodes) like a real B-scan, not like noise or flat fields."""
    rng = np.random.default_rng(seed)
    rows = np.arange(size)[:, None]
    band = 40 + 120 * np.exp(-(((rows - size * 0.45) / (size * 0.08)) ** 2))
    speckle = rng.gamma(2.0, 0.5, (frames, size, size))
    return np.clip(band * speckle, 0, 255).astype(np.uint8)


def write_dicom(path: Path, seed: int, frames: int, size: int, compressed: bool) -> Path:
    pixels = oct_like_frames(seed, frames, size)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.77.1.5.4"  # OPT image storage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "OPT"
    ds.PatientID = str(1001 + seed)
    ds.Laterality = "LR"[seed % 2]
    ds.NumberOfFrames = frames
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = pixels.tobytes()
    if compressed:
        ds.compress(JPEG2000Lossless)
    ds.save_as(path, enforce_file_format=True)
    return path


def copy_dicom(template: Path, path: Path, seed: int) -> None:
    ds = pydicom.dcmread(template)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.PatientID = str(1001 + seed)
    ds.save_as(path, enforce_file_format=True)


def generate(
    folder: Path, count: int, frames: int, size: int, compressed_fraction: float, distinct: int
) -> list[tuple[Path, bool]]:
    folder.mkdir(parents=True, exist_ok=True)
    compressed_count = round(count * compressed_fraction)
    # Interleave the two kinds so that any prefix of the list is a fair mix.
    kinds = [index * compressed_count // count != (index + 1) * compressed_count // count for index in range(count)]
    paths = [folder / f"vol{index:04d}.dcm" for index in range(count)]
    templates: dict[bool, list[int]] = {True: [], False: []}
    copies: list[tuple[int, int]] = []  # (index, template index)
    for index, compressed in enumerate(kinds):
        same_kind = templates[compressed]
        if len(same_kind) < distinct:
            same_kind.append(index)
        else:
            copies.append((index, same_kind[index % distinct]))
    encoded = templates[True] + templates[False]
    with ProcessPoolExecutor() as pool:  # JPEG 2000 encoding is the slow part of the setup
        list(
            pool.map(
                write_dicom,
                [paths[index] for index in encoded],
                encoded,
                [frames] * len(encoded),
                [size] * len(encoded),
                [kinds[index] for index in encoded],
            )
        )
    for index, template in copies:
        copy_dicom(paths[template], paths[index], index)
    return list(zip(paths, kinds))


def pick_decoder(sample: Path) -> tuple[Callable[[Path], Volume], str]:
    """read_volume, or pydicom directly (clearly labelled) while the project reader cannot read DICOM."""
    try:
        read_volume(sample)
        return read_volume, "octft.data.readers.read_volume"
    except OctReadError as exc:

        def pydicom_fallback(path: Path) -> Volume:
            return Volume(array=pydicom.dcmread(path).pixel_array)

        return pydicom_fallback, f"FALLBACK pydicom.dcmread().pixel_array (read_volume failed: {exc.reason})"


def source_id(path: Path) -> str:
    stat = path.stat()
    return f"file://{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"


def rate(count: int, seconds: float) -> str:
    return f"{count / seconds:10.1f}  {1000 * seconds / count:11.2f}"


def main() -> None:
    args = parse_args()
    spec = Preprocessing(args.clip_frames, args.clip_size, args.clip_size, args.intensity)
    with tempfile.TemporaryDirectory(prefix="octft-bench-cache-") as temp:
        folder = args.dir or Path(temp)
        started = time.perf_counter()
        files = generate(folder / "dicom", args.volumes, args.frames, args.size, args.compressed, args.distinct)
        setup_s = time.perf_counter() - started
        decode, decoder_name = pick_decoder(files[0][0])

        # (a) what a trial pays per volume without a cache (the files sit in the page cache).
        # Each clip is put in the cache outside the timed part, which warms it for (b).
        cache = VolumeCache(folder / "cache", spec, dtype=args.dtype)
        items = [(source_id(path), partial(decode, path)) for path, _ in files]
        seconds = {True: 0.0, False: 0.0}
        for (path, compressed), (item_id, _) in zip(files, items):
            tick = time.perf_counter()
            clip = preprocess(decode(path).array, spec)
            seconds[compressed] += time.perf_counter() - tick
            cache.put(item_id, clip)
        cold_s = seconds[True] + seconds[False]

        build_s = None
        if args.build_workers > 0:
            fresh = VolumeCache(folder / "cache-build", spec, dtype=args.dtype)
            tick = time.perf_counter()
            report = fresh.build(items, workers=args.build_workers, progress=False)
            build_s = time.perf_counter() - tick
            if report.built != len(files) or report.failed:
                raise SystemExit(f"the timed cache build did not build every file: {report}")

        # (b) a trial with a warm cache.
        passes = []
        for _ in range(args.repeats):
            tick = time.perf_counter()
            for item_id, _ in items:
                if cache.get(item_id) is None:
                    raise SystemExit(f"cache miss on a warm cache for {item_id}: the benchmark is broken")
            passes.append(time.perf_counter() - tick)
        warm_s = statistics.median(passes)
        entry_bytes = sum(p.stat().st_size for p in (folder / "cache").rglob("*.npy")) / len(files)

    count = len(files)
    compressed_count = sum(kind for _, kind in files)
    speedup = cold_s / warm_s
    print(
        f"octft cache benchmark: {count} DICOMs ({count - compressed_count} uncompressed, "
        f"{compressed_count} JPEG 2000 lossless), {args.frames}x{args.size}x{args.size} uint8 "
        f"-> {spec.key()}, cache {args.dtype} ({entry_bytes / 2**20:.2f} MiB/entry)"
    )
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(
        f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs ({usable} usable), torch {torch.__version__} with {torch.get_num_threads()} threads"
    )
    print(f"decoder: {decoder_name}   (setup: wrote the DICOMs in {setup_s:.1f} s)")
    print()
    print(f"{'path':<52} {'volumes/s':>10}  {'ms/volume':>11}")
    print(f"{'(a) read_volume + preprocess, all':<52} {rate(count, cold_s)}")
    if count - compressed_count:
        print(f"{'    uncompressed only':<52} {rate(count - compressed_count, seconds[False])}")
    if compressed_count:
        print(f"{'    JPEG 2000 lossless only':<52} {rate(compressed_count, seconds[True])}")
    if build_s is not None:
        print(f"{f'VolumeCache.build (a + write), {args.build_workers} process(es)':<52} {rate(count, build_s)}")
    print(f"{f'(b) warm VolumeCache.get, median of {args.repeats}':<52} {rate(count, warm_s)}")
    print()
    verdict = "met" if speedup >= GOAL_SPEEDUP else "NOT met"
    print(f"speed-up (b) over (a): {speedup:.0f}x   (goal >= {GOAL_SPEEDUP:.0f}x: {verdict})")
    if build_s is not None:
        print(f"build with {args.build_workers} process(es): {cold_s / build_s:.2f}x the rate of serial (a)")


if __name__ == "__main__":
    main()
