"""FeatureStore: built once, reused, never read under a different key, damage rebuilt, concurrent builders safe."""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
from pathlib import Path

import numpy as np
import pytest

from octft.features.store import (
    RECORD_NAME,
    TEMP_PREFIX,
    FeatureKey,
    FeaturePlan,
    FeatureStore,
    checkpoint_identity,
    feature_code_version,
)
from octft.config import load_experiment
from octft.data.audit import audit_dataset
from octft.data.dataset import prepare_volumes
from octft.data.synth import synthesize
from octft.train.setup import feature_key

DEMO = Path(__file__).resolve().parents[2] / "experiments" / "demo.yaml"


def make_key(**changes) -> FeatureKey:
    key = FeatureKey(
        encoder="scratch:seed=0",
        model={"size": "vit_micro", "patch_size": 16, "tubelet_size": 2, "rope_layout": "vjepa2"},
        precision="fp32",
        preprocessing={"frames": 4, "height": 32, "width": 32, "intensity": "percentile"},
        kind="pooled",
        sources={"train": ["file:///a.dcm|10|1", "file:///b.dcm|10|2", "file:///c.dcm|10|3"], "val": ["file:///d.dcm|10|4"]},
    )
    return dataclasses.replace(key, **changes)


def features_for(key: FeatureKey, split: str) -> np.ndarray:
    """Deterministic fake features: a function of the key digest and the split, so a wrong read shows."""
    seed = int(key.digest()[:8], 16) + (split == "val")
    return np.random.default_rng(seed).standard_normal((len(key.sources[split]), 6)).astype(np.float32)


class Counting:
    def __init__(self, key: FeatureKey):
        self.key, self.calls = key, []

    def __call__(self, split: str) -> np.ndarray:
        self.calls.append(split)
        return features_for(self.key, split)


def test_built_once_then_reused_memory_mapped(tmp_path):
    store, key = FeatureStore(tmp_path), make_key()
    compute = Counting(key)
    entry, built = store.get_or_build(key, compute)
    assert built and compute.calls == ["train", "val"]
    again, built_again = store.get_or_build(key, compute)
    assert not built_again and compute.calls == ["train", "val"]  # not computed a second time
    assert isinstance(again.arrays["train"], np.memmap)
    for split in ("train", "val"):
        np.testing.assert_array_equal(again.arrays[split], features_for(key, split))
    assert again.nbytes == 4 * 6 * 4


KEY_CHANGES = {
    "checkpoint": {"encoder": "sha256:" + "0" * 64},
    "seed": {"encoder": "scratch:seed=1"},
    "model": {"model": {"size": "vit_micro", "patch_size": 16, "tubelet_size": 2, "rope_layout": "interleaved"}},
    "precision": {"precision": "bf16"},
    "preprocessing": {"preprocessing": {"frames": 4, "height": 32, "width": 32, "intensity": "zscore"}},
    "kind": {"kind": "tokens"},
    "pack dtype": {"preprocessing": {"frames": 4, "height": 32, "width": 32, "intensity": "percentile",
                                     "pack_dtype": "float16"}},
    "feature code": {"code": "another version of octft/features/frozen.py"},
    "a source changed": {"sources": {"train": ["file:///a.dcm|10|1", "file:///b.dcm|10|2", "file:///c.dcm|11|9"],
                                     "val": ["file:///d.dcm|10|4"]}},
    "sources reordered": {"sources": {"train": ["file:///b.dcm|10|2", "file:///a.dcm|10|1", "file:///c.dcm|10|3"],
                                      "val": ["file:///d.dcm|10|4"]}},
}


@pytest.mark.parametrize("change", KEY_CHANGES, ids=list(KEY_CHANGES))
def test_never_read_when_any_part_of_the_key_differs(tmp_path, change):
    store = FeatureStore(tmp_path)
    store.get_or_build(make_key(), Counting(make_key()))
    other = make_key(**KEY_CHANGES[change])
    assert other.digest() != make_key().digest()
    assert store.open(other) is None


def test_the_key_follows_the_feature_code_and_the_pack_dtype_of_a_run(tmp_path):
    """A run's key names the dtype its packs store clips in (data.pack_dtype resolved: auto is uint8 for 8-bit
    sources) and the code that computes features (a hash of that code)."""
    synthesize(tmp_path / "data", participants=24, seed=0, frames=4, height=32, width=32)
    report = audit_dataset(str(tmp_path / "data"))
    keys = {}
    for dtype in ("auto", "float16"):
        prepared = prepare_volumes(str(tmp_path / "data"), report.volumes, cache_dir=str(tmp_path / "cache"),
                                   progress=False, frames=4, height=32, width=32, pack_dtype=dtype)
        cfg = load_experiment(DEMO, ["data.preprocess.frames=4", "data.preprocess.height=32", "data.preprocess.width=32",
                                     f"data.pack_dtype={dtype}"])
        keys[dtype] = feature_key(cfg, "scratch:seed=0", "fp32", prepared.dataset("train"), prepared.dataset("val"),
                                  "pooled")
    assert keys["auto"].preprocessing["pack_dtype"] == {"train": "uint8", "val": "uint8"}
    assert keys["float16"].preprocessing["pack_dtype"] == {"train": "float16", "val": "float16"}
    assert keys["auto"].digest() != keys["float16"].digest()
    assert keys["auto"].code == feature_code_version() == feature_code_version.__wrapped__()


def test_an_entry_whose_record_names_another_key_is_not_read(tmp_path):
    # A folder that somehow sits under the wrong digest (copied by hand, hash collision): the record decides.
    store, key, other = FeatureStore(tmp_path), make_key(), make_key(precision="bf16")
    store.get_or_build(other, Counting(other))
    os.rename(store.entry_path(other), store.entry_path(key))
    assert store.open(key) is None
    assert not store.entry_path(key).exists()  # moved aside, so the next build replaces it


@pytest.mark.parametrize("damage", ["flipped byte", "truncated", "no record", "bad record", "missing split"])
def test_damaged_entry_is_rebuilt_not_read(tmp_path, damage):
    store, key = FeatureStore(tmp_path), make_key()
    store.get_or_build(key, Counting(key))
    folder = store.entry_path(key)
    data = folder / "train.npy"
    if damage == "flipped byte":
        raw = bytearray(data.read_bytes())
        raw[-3] ^= 0xFF
        data.write_bytes(bytes(raw))
    elif damage == "truncated":
        data.write_bytes(data.read_bytes()[:-8])
    elif damage == "no record":
        (folder / RECORD_NAME).unlink()
    elif damage == "bad record":
        (folder / RECORD_NAME).write_text("{not json")
    else:
        data.unlink()
    assert store.open(key) is None
    compute = Counting(key)
    entry, built = store.get_or_build(key, compute)
    assert built and compute.calls == ["train", "val"]
    np.testing.assert_array_equal(entry.arrays["train"], features_for(key, "train"))


def test_a_builder_that_dies_leaves_nothing_readable(tmp_path):
    store, key = FeatureStore(tmp_path), make_key()

    def dies(split: str) -> np.ndarray:
        if split == "val":
            raise KeyboardInterrupt
        return features_for(key, split)

    with pytest.raises(KeyboardInterrupt):
        store.get_or_build(key, dies)
    assert store.open(key) is None
    assert not list(tmp_path.glob(f"{TEMP_PREFIX}*"))


def test_second_commit_of_the_same_key_keeps_the_first(tmp_path):
    store, key = FeatureStore(tmp_path), make_key()
    arrays = {split: features_for(key, split) for split in key.sources}
    first = store.put(key, arrays)
    record = (first / RECORD_NAME).read_text()
    assert store.put(key, arrays) == first
    assert (first / RECORD_NAME).read_text() == record
    assert store.open(key) is not None and not list(tmp_path.glob(f"{TEMP_PREFIX}*"))


def test_put_refuses_nan_and_wrong_row_counts(tmp_path):
    store, key = FeatureStore(tmp_path), make_key()
    arrays = {split: features_for(key, split) for split in key.sources}
    with pytest.raises(ValueError, match="2 feature rows for 3 sources"):
        store.put(key, {**arrays, "train": arrays["train"][:2]})
    arrays["val"][0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        store.put(key, arrays)
    assert store.open(key) is None


def _build_in_process(root: str, barrier, results) -> None:
    key = make_key()
    barrier.wait()
    entry, built = FeatureStore(root).get_or_build(key, lambda split: features_for(key, split))
    results.put((built, {split: array.tolist() for split, array in entry.arrays.items()}))


def test_concurrent_builders_build_once_and_all_read_one_entry(tmp_path):
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(4), context.Queue()
    processes = [context.Process(target=_build_in_process, args=(str(tmp_path), barrier, results)) for _ in range(4)]
    for process in processes:
        process.start()
    outcomes = [results.get(timeout=120) for _ in processes]
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    assert sum(built for built, _ in outcomes) == 1  # the lock made the others wait, then read
    expected = {split: features_for(make_key(), split).tolist() for split in ("train", "val")}
    assert all(arrays == expected for _, arrays in outcomes)
    assert len([p for p in tmp_path.iterdir() if not p.name.startswith(".")]) == 1


def test_checkpoint_identity_is_the_content(tmp_path):
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    a.write_bytes(b"weights")
    b.write_bytes(b"weights")
    assert checkpoint_identity(a, seed=0) == checkpoint_identity(b, seed=5)  # name and seed do not matter
    b.write_bytes(b"weightz")
    assert checkpoint_identity(a, seed=0) != checkpoint_identity(b, seed=0)
    assert checkpoint_identity(None, seed=3) == "scratch:seed=3"


def test_plan_sizes_token_sequences():
    # ViT-B on 16 x 224 x 224: 8 x 14 x 14 tokens of 768 in float16, about 2.4 MB per volume.
    plan = FeaturePlan("tokens", {"train": 1000}, (1568, 768), "float16")
    assert plan.nbytes == 1000 * 1568 * 768 * 2
    assert "2296.9 MiB" in plan.describe()
