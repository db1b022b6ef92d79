"""Training samples through the cache: an entry damaged after the build is rebuilt, never read as valid."""

import re

import numpy as np
import pytest

from octft.data.audit import audit_dataset
from octft.data.dataset import VolumeDataset, prepare_volumes
from octft.data.synth import synthesize


def test_a_cache_entry_damaged_after_the_build_is_rebuilt_from_the_source(tmp_path):
    synthesize(tmp_path / "data", participants=24, seed=1, frames=4, height=32, width=32)
    report = audit_dataset(str(tmp_path / "data"))
    prepared = prepare_volumes(str(tmp_path / "data"), report.volumes, cache_dir=str(tmp_path / "cache"),
                               frames=4, height=16, width=16, progress=False)
    train = prepared.dataset("train")
    assert len(train) == int((prepared.volumes.split == "train").sum()) > 0
    before = train[0]["x"].numpy().copy()
    assert before.shape == (1, 4, 16, 16)

    data_path, _ = prepared.cache.entry_paths(train.volumes.source_id.iloc[0])
    raw = bytearray(data_path.read_bytes())
    raw[-8:] = b"\xff" * 8  # flip the tail of the stored array
    data_path.write_bytes(bytes(raw))

    np.testing.assert_array_equal(train[0]["x"].numpy(), before)  # rebuilt from the DICOM, same values
    assert prepared.cache.get(train.volumes.source_id.iloc[0]) is not None

    # Without a way back to the source, a damaged entry is an error naming it, not silently wrong data.
    data_path.write_bytes(bytes(raw))
    bare = VolumeDataset(train.volumes, prepared.cache)
    with pytest.raises(FileNotFoundError, match=re.escape(train.volumes.source_id.iloc[0])):
        bare[0]
