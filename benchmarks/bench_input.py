"""Input speed: samples/s delivered ready for the device (float32 batches) from a warm cache.

Prepares N synthetic clips of 16 x 224 x 224 (float16 entries, as the cache stores them), then times
  (a) per-sample reads of cache entries (one file, a CRC and a float32 copy per sample: the old path);
  (b) batches gathered from the split's pack (one memory-mapped array), without and with the
      background prefetch thread the training loop uses;
next to this machine's memory copy bandwidth.

    .venv/bin/python benchmarks/bench_input.py              # about 1 min
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
from octft.data.dataset import VolumeDataset, volume_pack
from octft.data.pack import prefetch
from octft.data.preprocess import Preprocessing
from octft.train.loop import padded_batches


def timed(fn, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--volumes", type=int, default=256)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--side", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="octft-bench-input-") as tmp:
        cache = VolumeCache(Path(tmp) / "cache", Preprocessing(args.frames, args.side, args.side))
        generator = np.random.default_rng(0)
        ids = [f"file:///bench/{index}.dcm|1|{index}" for index in range(args.volumes)]
        clip = generator.random((args.frames, args.side, args.side), dtype=np.float32)
        for sid in ids:
            cache.put(sid, clip)
        volumes = pd.DataFrame({"source_id": ids, "key": ids, "label": [index % 4 for index in range(args.volumes)],
                                "participant_id": [str(index) for index in range(args.volumes)]})
        started = time.perf_counter()
        pack = volume_pack(cache, volumes, None)
        pack_seconds = time.perf_counter() - started
        entries = VolumeDataset(volumes, cache)
        packed = VolumeDataset(volumes, cache, pack=pack)
        order = generator.permutation(args.volumes).tolist()
        sample_bytes = args.frames * args.side * args.side * 4  # float32, as delivered

        def epoch(dataset, depth):
            for batch in prefetch(padded_batches(dataset, args.batch_size, order=order), depth=depth):
                batch["x"].sum()  # touch it, as the device transfer would

        rows = [("per-sample cache entries (before)", lambda: epoch(entries, 0)),
                ("pack, gathered per batch", lambda: epoch(packed, 0)),
                ("pack, gathered per batch + prefetch thread", lambda: epoch(packed, 2))]
        source = np.ones(64 * 2**20 // 4, dtype=np.float32)
        copy_s = timed(lambda: source.copy(), 5)

        print(f"# bench_input: {args.volumes} clips of {args.frames} x {args.side} x {args.side}, batch {args.batch_size}, "
              f"random order; pack written in {pack_seconds:.1f} s")
        print(f"# machine: {platform.platform()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; "
              f"memory copy {source.nbytes / copy_s / 1e9:.1f} GB/s")
        print()
        print("| path | samples/s | GB/s delivered (float32) |")
        print("| --- | --- | --- |")
        for name, run in rows:
            seconds = timed(run)
            print(f"| {name} | {args.volumes / seconds:,.0f} | {args.volumes * sample_bytes / seconds / 1e9:.2f} |",
                  flush=True)


if __name__ == "__main__":
    main()
