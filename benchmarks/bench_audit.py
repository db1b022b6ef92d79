"""Audit time against the number of object keys (goal: 100,000 keys in under 5 s, growing linearly).

Builds AI-READI-shaped local trees of sparse files (real sizes, no disk cost), with a manifest and
labels, and times `audit_dataset` (listing + manifest + locate + duplicate check + accounting).

    python benchmarks/bench_audit.py                 # 10k, 30k, 100k keys
    python benchmarks/bench_audit.py --keys 100000
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

from octft.data.audit import audit_dataset
from octft.data.layout import CLASSES, DEVICES, OCT_PREFIX


def build_tree(root: Path, n_keys: int, files_per_participant: int = 8) -> None:
    n_participants = n_keys // files_per_participant
    labels = ["participant_id\tstudy_group\trecommended_split"]
    manifest = ["participant_id\tlaterality\tanatomic_region\tnumber_of_frames\theight\twidth\tfilepath"]
    for i in range(n_participants):
        pid = f"{'147'[i % 3]}{i:05d}"
        labels.append(f"{pid}\t{CLASSES[i % 4]}\t{('train', 'train', 'val', 'test')[(i // 4) % 4]}")
        device = DEVICES[i % 4]
        folder = root / OCT_PREFIX / device / pid
        folder.mkdir(parents=True)
        for j in range(files_per_participant):
            eye = "lr"[j % 2]
            region = "macula" if j < 6 else "optic_disc"
            name = f"{pid}_{device.split('_')[-1]}_{region}_oct_{eye}_{j}.dcm"
            with open(folder / name, "wb") as f:
                f.truncate(1_000_000 + i * files_per_participant + j)  # sparse: distinct sizes, no blocks
            manifest.append(f"{pid}\t{eye.upper()}\t{region}\t128\t496\t768\t/{OCT_PREFIX}/{device}/{pid}/{name}")
    (root / "participants.tsv").write_text("\n".join(labels) + "\n")
    (root / "retinal_oct" / "manifest.tsv").write_text("\n".join(manifest) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keys", type=int, nargs="+", default=[10_000, 30_000, 100_000])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, python {platform.python_version()}")
    print(f"{'keys':>8} {'manifest':>9} {'seconds':>9} {'keys/s':>10} {'us/key':>8} {'matched':>8} {'excluded':>9}")
    for n_keys in args.keys:
        with tempfile.TemporaryDirectory() as tmp:
            build_tree(Path(tmp), n_keys)
            for use_manifest in (True, False):
                best = float("inf")
                for _ in range(args.repeats):
                    started = time.perf_counter()
                    report = audit_dataset(tmp, use_manifest=use_manifest, min_per_class=0)
                    best = min(best, time.perf_counter() - started)
                files = report.to_dict()["files"]
                assert files["found"] == n_keys, files
                print(f"{n_keys:>8} {str(use_manifest):>9} {best:>9.2f} {n_keys / best:>10,.0f} "
                      f"{best / n_keys * 1e6:>8.1f} {files['matched']:>8} {files['excluded']:>9}")


if __name__ == "__main__":
    main()
