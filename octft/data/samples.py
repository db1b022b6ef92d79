"""A split's training samples, read from its pack (else the cache): what `torch.utils.data` and the batches take.

Kept apart from the preparation (`octft.data.dataset`), which needs no torch: a sweep's launch audits and
prepares the data without importing it while its trial runners do.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch

from octft.data.cache import VolumeCache
from octft.data.pack import Pack


class VolumeDataset:
    """A map-style dataset (what `torch.utils.data` takes): samples `{"x": (1, T, H, W), "y": class index, "index": row}` read from a pack, else the cache.

    `x` comes in the pack's dtype (uint8 holding round(x * 255), float16 or float32; float32 without a
    pack) and is converted to float32 on the device, by the model (`octft.models.encoder.input_as_float`),
    so a uint8 batch crosses to the device in a quarter of float32's bytes.
    `index` points back into `volumes` (participant, key) so evaluation can aggregate by participant.
    `load(key)` reads a source volume again when its cache entry went missing or bad after the build.
    `gather(indices)` reads a whole batch from the pack at once.
    """

    def __init__(self, volumes: pd.DataFrame, cache: VolumeCache, *, load: Callable[[str], object] | None = None,
                 pack: Pack | None = None):
        self.volumes = volumes.reset_index(drop=True)
        self.cache = cache
        self.load = load
        self.pack = pack
        self.labels = self.volumes.label.to_numpy(dtype=np.int64)

    def __len__(self) -> int:
        return len(self.volumes)

    def gather(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(x (B, 1, T, H, W) in the pack's dtype, y (B,) long) of the rows at `indices`, in that order."""
        if self.pack is not None:
            clips = torch.from_numpy(self.pack.gather(indices))
        else:
            clips = torch.stack([self[index]["x"][0] for index in indices])
        return clips.unsqueeze(1), torch.from_numpy(self.labels[list(indices)])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if self.pack is not None:
            x, y = self.gather([index])
            return {"x": x[0], "y": y[0], "index": torch.tensor(index, dtype=torch.long)}
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
