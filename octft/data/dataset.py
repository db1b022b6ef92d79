"""From an audit's volume table to training samples, through the preprocessing cache.

Every trial of a sweep reads prepared arrays from the cache instead of decoding DICOM again. A
volume that fails to decode is counted and reported by `prepare_volumes`, and the dataset is built only
from the volumes that have a cache entry.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch

from octft.data.cache import CacheReport, VolumeCache
from octft.data.preprocess import Preprocessing
from octft.data.readers import read_volume


def source_id(storage, key: str, size: int, sha1: str | None) -> str:
    """Identity of a source object, including what changes when it does (content hash or mtime)."""
    if sha1:
        return f"{storage.uri.rstrip('/')}/{key}|{size}|{sha1}"
    mtime_ns = storage.local_path(key).stat().st_mtime_ns
    return f"{storage.uri.rstrip('/')}/{key}|{size}|{mtime_ns}"


def _load(storage, key: str):
    return read_volume(storage.local_path(key), name=f"{storage.uri.rstrip('/')}/{key}")


@dataclass
class PreparedVolumes:
    """The volumes a run uses, each with its cache identity. `report` says what failed to build."""

    volumes: pd.DataFrame  # the audit's volume table plus a `source_id` column, failed ones removed
    cache: VolumeCache
    report: CacheReport
    storage: object = None  # where the sources live, so an entry lost after the build is rebuilt
    failed_volumes: pd.DataFrame | None = None  # the rows of the audit's table that failed to build

    def dataset(self, split: str) -> "VolumeDataset":
        """The samples of one split (`train`, `val` or `test`)."""
        load = partial(_load, self.storage) if self.storage is not None else None
        return VolumeDataset(self.volumes[self.volumes.split == split], self.cache, load=load)


def prepare_volumes(
    uri: str,
    volumes: pd.DataFrame,
    *,
    cache_dir: str,
    frames: int,
    height: int,
    width: int,
    intensity: str = "percentile",
    workers: int = 2,
    progress: bool = True,
    storage=None,
) -> PreparedVolumes:
    """Preprocess every volume of an audit into the cache (`octft data cache`; each training run too).

    Volumes that fail to decode are counted in `report.failed` with their reason and left out of
    `volumes`.
    """
    if storage is None:
        from octft.data.storage import open_storage

        storage = open_storage(uri)
    cache = VolumeCache(cache_dir, Preprocessing(frames=frames, height=height, width=width, intensity=intensity))
    ids = [source_id(storage, row.key, int(row.size), row.sha1) for row in volumes.itertuples(index=False)]
    items = [(sid, partial(_load, storage, key)) for sid, key in zip(ids, volumes.key)]
    report = cache.build(items, workers=workers, progress=progress)
    failed = {sid for sid, _ in report.failed}
    prepared = volumes.assign(source_id=ids)
    lost = prepared.source_id.isin(failed)
    return PreparedVolumes(prepared[~lost].reset_index(drop=True), cache, report, storage,
                           failed_volumes=prepared[lost].reset_index(drop=True))


class VolumeDataset(torch.utils.data.Dataset):
    """Samples `{"x": (1, T, H, W) float32, "y": class index, "index": row}` read from the cache.

    `index` points back into `volumes` (participant, key) so evaluation can aggregate by participant.
    `load(key)` reads a source volume again when its cache entry went missing or bad after the build.
    """

    def __init__(self, volumes: pd.DataFrame, cache: VolumeCache, *, load: Callable[[str], object] | None = None):
        self.volumes = volumes.reset_index(drop=True)
        self.cache = cache
        self.load = load
        self.labels = self.volumes.label.to_numpy(dtype=np.int64)

    def __len__(self) -> int:
        return len(self.volumes)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        sid = self.volumes.source_id.iloc[index]
        if self.load is not None:
            # An entry removed or corrupted since the build is detected by the cache and rebuilt here.
            clip = self.cache.get_or_build(sid, partial(self.load, self.volumes.key.iloc[index]))
        else:
            clip = self.cache.get(sid)
            if clip is None:
                raise FileNotFoundError(f"no valid cache entry for {sid}: run `octft data cache` again")
        return {
            "x": torch.from_numpy(np.ascontiguousarray(clip, dtype=np.float32)).unsqueeze(0),
            "y": torch.tensor(self.labels[index], dtype=torch.long),
            "index": torch.tensor(index, dtype=torch.long),
        }

    def participant_ids(self, indices: Sequence[int]) -> list[str]:
        return self.volumes.participant_id.iloc[list(indices)].tolist()
