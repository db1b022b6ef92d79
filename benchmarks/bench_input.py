"""Input speed: samples/s and GB/s of 16 x 224 x 224 delivered ready for the device from a warm pack.

Writes N synthetic clips (float16 cache entries of 8-bit sources, as the demo's DICOMs make) into a pack
of each dtype, then times one epoch of the training loop's batches (`padded_batches`, batches in a random
order) per setting: pack dtype uint8 and float16, with 0, 1 and 2 loader threads (`train.num_workers`).
A batch is "ready for the device" when its rows sit in one host array in the pack's dtype; the device's
float32 conversion (`input_as_float`) is not counted. One row per dtype also converts each batch to
float32 on the host, as the input side did before, for comparison. Beside the table: this machine's
memory copy bandwidth (one thread, 256 MB arrays) and what a TPU host needs (ViT-B at 50% utilisation);
then the same epochs paced by a v5p-8 step per batch, to show what the loader threads overlap.

    .venv/bin/python benchmarks/bench_input.py                  # about 1 min
    .venv/bin/python benchmarks/bench_input.py --volumes 512 --batch-size 16
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from octft.data.cache import VolumeCache
from octft.data.dataset import volume_pack
from octft.data.samples import VolumeDataset
from octft.data.preprocess import Preprocessing
from octft.models.encoder import input_as_float
from octft.train.devices import TPU_CHIPS
from octft.train.loop import padded_batches

# ViT-B on 16 x 224 x 224: 358.2 GFLOP forward per sample (benchmarks/bench_train.py counts it), x3 to train.
VIT_B_TRAINING_FLOPS = 3 * 358.2e9
# TPU hosts a user rents: name -> (chip, chips per host), as in benchmarks/bench_train.py.
TPU_HOSTS = {"v4-8": ("v4", 4), "v5e-8": ("v5e", 8), "v5p-8": ("v5p", 4)}


class HostFloat32:
    """A dataset whose batches are converted to float32 on the host (the path before device conversion)."""

    def __init__(self, dataset: VolumeDataset):
        self.dataset = dataset

    def gather(self, indices):
        x, y = self.dataset.gather(indices)
        return input_as_float(x), y


def best_seconds(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def copy_bandwidth() -> float:
    """GB/s one thread copies between two 256 MB arrays (bytes copied, not read + written)."""
    source, target = np.ones(2**28, dtype=np.uint8), np.zeros(2**28, dtype=np.uint8)
    return source.nbytes / best_seconds(lambda: np.copyto(target, source), 5) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--volumes", type=int, default=256)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--side", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="epochs per setting; the best is reported")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="octft-bench-input-") as tmp:
        cache = VolumeCache(Path(tmp) / "cache", Preprocessing(args.frames, args.side, args.side))
        generator = np.random.default_rng(0)
        ids = [f"file:///bench/{index}.dcm|1|{index}" for index in range(args.volumes)]
        for sid in ids:
            clip = generator.integers(0, 256, (args.frames, args.side, args.side), dtype=np.uint8)
            cache.put(sid, clip / np.float32(255), source_dtype="uint8")
        volumes = pd.DataFrame({"source_id": ids, "key": ids, "label": [index % 4 for index in range(args.volumes)],
                                "participant_id": [str(index) for index in range(args.volumes)]})
        order = generator.permutation(args.volumes).tolist()
        packs, write_seconds = {}, {}
        for dtype in ("uint8", "float16"):
            started = time.perf_counter()
            packs[dtype] = VolumeDataset(volumes, cache, pack=volume_pack(cache, volumes, None, pack_dtype=dtype))
            write_seconds[dtype] = time.perf_counter() - started
        auto = volume_pack(cache, volumes, None).rows.dtype

        def epoch(dataset, workers, step_seconds=0.0):
            for _ in padded_batches(dataset, args.batch_size, order=order, workers=workers):
                time.sleep(step_seconds)  # an asynchronous device step leaves the host's threads free, as sleep does

        settings = [(dtype, "", workers, packs[dtype]) for dtype in ("uint8", "float16") for workers in (0, 1, 2)]
        settings += [(dtype, " + float32 on the host", 1, HostFloat32(packs[dtype])) for dtype in ("uint8", "float16")]
        copy_gbs = copy_bandwidth()
        pixels = args.frames * args.side * args.side

        print(f"# bench_input: {args.volumes} clips of {args.frames} x {args.side} x {args.side}, batches of "
              f"{args.batch_size} in a random order, best of {args.repeats} epochs; pack written in "
              + ", ".join(f"{dtype} {seconds:.1f} s" for dtype, seconds in write_seconds.items())
              + f"; data.pack_dtype=auto chose {auto} for these 8-bit sources")
        print(f"# machine: {platform.platform()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; "
              f"memory copy {copy_gbs:.1f} GB/s (one thread)")
        print()
        print("| pack dtype | loader threads | samples/s | GB/s delivered | share of memory copy |")
        print("| --- | --- | --- | --- | --- |")
        for dtype, extra, workers, dataset in settings:
            seconds = best_seconds(lambda: epoch(dataset, workers), args.repeats)
            itemsize = 4 if extra else np.dtype(dtype).itemsize
            gbs = args.volumes * pixels * itemsize / seconds / 1e9
            print(f"| {dtype}{extra} | {workers} | {args.volumes / seconds:,.0f} | {gbs:.2f} | {gbs / copy_gbs:.0%} |",
                  flush=True)
        print()
        print("What a TPU host needs at 50% utilisation on ViT-B 16 x 224 x 224, and the bytes that are:")
        print()
        print("| host | samples/s needed | GB/s as uint8 | GB/s as float16 | GB/s as float32 |")
        print("| --- | --- | --- | --- | --- |")
        needs = {}
        for host, (kind, chips) in TPU_HOSTS.items():
            chip = next(chip for chip in TPU_CHIPS.values() if chip.kind == kind)
            needs[host] = needed = chips * 0.5 * chip.peak_bf16_tflops * 1e12 / VIT_B_TRAINING_FLOPS
            print(f"| {host} | {needed:,.0f} | " + " | ".join(f"{needed * pixels * size / 1e9:.2f}" for size in (1, 2, 4))
                  + " |")

        # The same epochs with the consumer busy for one v5p-8 step per batch: whether gathering overlaps it.
        step_seconds = args.batch_size / needs["v5p-8"]
        batches = -(-args.volumes // args.batch_size)
        pacing_alone = args.volumes / best_seconds(lambda: [time.sleep(step_seconds) for _ in range(batches)],
                                                   args.repeats)
        print()
        print(f"Paced by a v5p-8 step ({step_seconds * 1e3:.1f} ms per batch of {args.batch_size}, the host idle "
              f"meanwhile; the pacing alone, without input, reaches {pacing_alone:,.0f} samples/s here): the host "
              "keeps up when samples/s reaches the need.")
        print()
        print("| pack dtype | loader threads | samples/s | share of the v5p-8 need |")
        print("| --- | --- | --- | --- |")
        for dtype, extra, workers, dataset in settings:
            seconds = best_seconds(lambda: epoch(dataset, workers, step_seconds), args.repeats)
            print(f"| {dtype}{extra} | {workers} | {args.volumes / seconds:,.0f} | "
                  f"{args.volumes / seconds / needs['v5p-8']:.0%} |", flush=True)


if __name__ == "__main__":
    main()
