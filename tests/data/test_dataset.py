"""Training samples through the cache: an entry damaged after the build is rebuilt, never read as valid."""

import re

import numpy as np
import pytest
import torch

from octft.data.audit import audit_dataset
from octft.data.dataset import VolumeDataset, prepare_volumes
from octft.data.synth import synthesize


def test_a_cache_entry_damaged_after_the_build_is_rebuilt_from_the_source(tmp_path):
    synthesize(tmp_path / "data", participants=24, seed=1, frames=4, height=32, width=32)
    report = audit_dataset(str(tmp_path / "data"))
    prepared = prepare_volumes(str(tmp_path / "data"), report.volumes, cache_dir=str(tmp_path / "cache"),
                               frames=4, height=16, width=16, workers=1, progress=False)
    sid = prepared.volumes[prepared.volumes.split == "train"].source_id.iloc[0]
    before = prepared.cache.get(sid).copy()

    data_path, _ = prepared.cache.entry_paths(sid)
    raw = bytearray(data_path.read_bytes())
    raw[-8:] = b"\xff" * 8  # flip the tail of the stored array
    data_path.write_bytes(bytes(raw))

    # The split's pack is written from the entries: the damaged one is rebuilt from the DICOM on the way.
    train = prepared.dataset("train")
    assert len(train) == int((prepared.volumes.split == "train").sum()) > 0
    assert train.volumes.source_id.iloc[0] == sid
    assert train[0]["x"].shape == (1, 4, 16, 16)
    np.testing.assert_array_equal(train[0]["x"].numpy()[0], before)
    assert prepared.cache.get(sid) is not None

    # Without a way back to the source, a damaged entry is an error naming it, not silently wrong data.
    data_path.write_bytes(bytes(raw))
    bare = VolumeDataset(train.volumes, prepared.cache)
    with pytest.raises(FileNotFoundError, match=re.escape(sid)):
        bare[0]


def test_a_split_reads_from_its_pack_and_a_damaged_pack_is_rewritten(tmp_path):
    synthesize(tmp_path / "data", participants=24, seed=1, frames=4, height=32, width=32)
    report = audit_dataset(str(tmp_path / "data"))
    prepared = prepare_volumes(str(tmp_path / "data"), report.volumes, cache_dir=str(tmp_path / "cache"),
                               frames=4, height=16, width=16, workers=1, progress=False)
    val = prepared.dataset("val")
    per_entry = np.stack([prepared.cache.get(sid) for sid in val.volumes.source_id])
    x, y = val.gather(list(range(len(val)))[::-1])
    assert x.shape == (len(val), 1, 4, 16, 16) and x.dtype == torch.float32
    np.testing.assert_array_equal(x.numpy()[::-1, 0], per_entry)
    np.testing.assert_array_equal(y.numpy()[::-1], val.labels)

    # One byte of the pack flipped: detected when the pack is opened, and the pack written again.
    data_path = val.pack.path / "data.npy"
    del val
    raw = bytearray(data_path.read_bytes())
    raw[-3] ^= 0xFF
    data_path.write_bytes(bytes(raw))
    prepared.packs.clear()  # as a new process opening the cache
    again = prepared.dataset("val")
    np.testing.assert_array_equal(again.gather(range(len(again)))[0].numpy()[:, 0], per_entry)
