"""What produced a run's weights, recorded as tags on its MLflow run, and the one check of it.

A head (`init.head_from`) or a warm-started study's parameter sets may come from another run only when that run
saw the same data release and split, encoder checkpoint, class order and preprocessing: a head trained on
another split may have seen this run's validation or test participants, and parameters chosen on other data
were chosen for that data.

    >>> provenance_mismatch({"octft.classes": "a,b"}, {"octft.classes": "b,a"}, tags=("octft.classes",))
    'was trained with another class order: octft.classes is a,b there and b,a here'

This module imports no torch: a launch checks a warm start with it before any trial starts.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Iterable

from octft.config import ExperimentConfig
from octft.data.dataset import data_manifest_hash
from octft.data.layout import CLASS_SHORT_NAMES
from octft.features.store import checkpoint_identity

# Tag -> what it records, in the words a refusal uses.
PROVENANCE_TAGS = {
    "octft.data_manifest_hash": "data release and split (the data manifest hash)",
    "octft.encoder": "encoder checkpoint",
    "octft.classes": "class order",
    "octft.preprocessing": "preprocessing",
}


def run_provenance(cfg: ExperimentConfig, volumes) -> dict[str, str]:
    """The `PROVENANCE_TAGS` of a run of `cfg` on `volumes` (its prepared volumes): the data manifest hash (every
    volume, label and split), the encoder checkpoint's content hash (or its seed), the class order and a hash of
    the preprocessing."""
    preprocessing = json.dumps({**cfg.data.preprocess.model_dump(mode="json"), "cache_dtype": cfg.data.cache_dtype},
                               sort_keys=True)
    return {"octft.data_manifest_hash": data_manifest_hash(volumes), "octft.encoder": encoder_identity(cfg),
            "octft.classes": ",".join(CLASS_SHORT_NAMES),
            "octft.preprocessing": hashlib.sha256(preprocessing.encode()).hexdigest()[:16]}


def provenance_mismatch(found: dict[str, str], expected: dict[str, str],
                        tags: Iterable[str] = PROVENANCE_TAGS) -> str | None:
    """The first way a run's tags `found` differ from `expected`, in words naming the field and both values, or
    None when they agree."""
    for tag in tags:
        what = PROVENANCE_TAGS[tag]
        if found.get(tag) is None:
            return f"records no {what} ({tag}), so nothing shows it was trained on this data"
        if found[tag] != expected[tag]:
            return f"was trained with another {what}: {tag} is {found[tag]} there and {expected[tag]} here"
    return None


@functools.cache
def _checkpoint_identity(path: str | None, seed: int, size: int, mtime_ns: int) -> str:
    return checkpoint_identity(path, seed)  # a content hash: read once per file version, not once per run


def encoder_identity(cfg: ExperimentConfig) -> str:
    """`sha256:<hex>` of the checkpoint's content (hashed once per file version in a process), or the seed."""
    path = cfg.model.pretrained
    stat = os.stat(path) if path else None
    return _checkpoint_identity(path, cfg.train.seed, stat.st_size if stat else 0, stat.st_mtime_ns if stat else 0)
