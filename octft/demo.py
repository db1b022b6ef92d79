"""`octft demo` / `make demo`: the whole job on embedded defaults.

Synthetic AI-READI -> audit -> preprocessing cache -> (when the engine and sweep are present) a study
of a few fine-tunes on XLA:CPU devices -> promotion -> report. Everything lands under one folder.
"""

from __future__ import annotations

import json
import time
from pathlib import Path


def _step(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.perf_counter()


def run_demo(root: Path, *, participants: int = 96, trials: int = 6, workers: int = 2) -> int:
    from octft.data.audit import audit_dataset, format_report
    from octft.data.dataset import build_cache
    from octft.data.synth import synthesize

    root.mkdir(parents=True, exist_ok=True)
    data_dir = root / "data"
    started = _step(f"1. synthetic AI-READI release -> {data_dir}")
    if (data_dir / "synth_report.json").is_file():
        print(f"reusing {data_dir} (delete it to regenerate)")
    else:
        synthesize(data_dir, participants=participants, seed=0, frames=8, height=64, width=64, progress=True)
    truth = json.loads((data_dir / "synth_report.json").read_text())
    print(f"{truth['participants']} participants, {truth['files']} files ({time.perf_counter() - started:.1f} s)")

    started = _step("2. data audit")
    report = audit_dataset(str(data_dir), verify=True, progress=True)
    print(format_report(report))
    (root / "audit.json").write_text(json.dumps(report.to_dict(), indent=2, default=str) + "\n")
    if not report.passed:
        print("the audit failed: see the guards above")
        return 1

    started = _step("3. preprocessing cache")
    cache_dir = root / "cache"
    result = build_cache(str(data_dir), report.volumes, cache_dir=str(cache_dir), frames=8, height=64, width=64, workers=2)
    print(f"{cache_dir}: built {result.built}, reused {result.reused}, failed {len(result.failed)} "
          f"({time.perf_counter() - started:.1f} s)")

    print(f"\naudit report: {root / 'audit.json'}")
    return 0
