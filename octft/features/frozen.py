"""A frozen encoder's features as training data: computing them once, and the splits `fit()` trains heads on.

    >>> features = frozen_features(FeatureStore("demo/features"), key, model.encoder, train_set, val_set,
    ...                            runtime=runtime, batch_size=8)                      # doctest: +SKIP
    >>> fit(model, train_set, val_set, frozen_features=features, ...)                  # doctest: +SKIP

A pooled row is served as a (1, D) "sequence": the linear and MLP heads mean-pool their input over the
token dimension, and the mean of one token is that token, so the head computes exactly what it computes
on the encoder's full token sequence.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from octft.data.batches import Batches, place_rows
from octft.features.store import FeatureEntry, FeatureKey, FeatureKind, FeatureStore


class FeatureSplit(torch.utils.data.Dataset):
    """One split's stored features with its labels and participants, shaped like a `VolumeDataset`.

    Samples are `{"x": (1, D) or (N, D) float32, "y": class index}`; labels and participant ids come from
    the run's current volume table, never from the store (a relabelled volume keeps its features).
    """

    def __init__(self, features: np.ndarray, labels: np.ndarray, participant_ids: Sequence[str], kind: FeatureKind):
        if len(features) != len(labels) or len(labels) != len(participant_ids):
            raise ValueError(f"{len(features)} feature rows, {len(labels)} labels, {len(participant_ids)} participants")
        self.features = features
        self.labels = np.asarray(labels, dtype=np.int64)
        self._participants = list(participant_ids)
        self.kind = kind

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = torch.from_numpy(np.array(self.features[index], dtype=np.float32))
        return {"x": row[None] if self.kind == "pooled" else row, "y": torch.tensor(self.labels[index], dtype=torch.long)}

    def gather(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) of the rows at `indices`, in that order: one read of the memory-mapped array per batch."""
        rows = list(indices)
        x = torch.from_numpy(np.asarray(self.features[rows], dtype=np.float32))
        return (x[:, None] if self.kind == "pooled" else x), torch.from_numpy(self.labels[rows])

    def participant_ids(self, indices: Sequence[int]) -> list[str]:
        return [self._participants[i] for i in indices]

    @property
    def cheap_to_gather(self) -> bool:
        """Pooled rows are a few kilobytes a batch: `fit()` gathers them in line, not on a prefetch thread."""
        return self.kind == "pooled"


@dataclass
class FrozenFeatures:
    """The train and val features of a run, and how the store provided them (for `features/*` in MLflow)."""

    train: FeatureSplit
    val: FeatureSplit
    digest: str
    built: bool
    seconds: float  # building them (when built now) or opening and checking them (when reused)
    nbytes: int

    def metrics(self) -> dict[str, float]:
        return {"features/built": float(self.built), "features/reused": float(not self.built),
                "features/seconds": self.seconds, "features/megabytes": self.nbytes / 2**20}

    def tags(self) -> dict[str, str]:
        return {"octft.features": self.digest, "octft.features_kind": self.train.kind}

    def reused(self) -> "FrozenFeatures":
        """These features as a later run that finds them already open sees them: reused, at no cost."""
        return dataclasses.replace(self, built=False, seconds=0.0)


@torch.no_grad()
def encode_split(encoder: torch.nn.Module, dataset, *, runtime, batch_size: int, kind: FeatureKind) -> np.ndarray:
    """The encoder's eval-mode outputs for every sample of `dataset`, in order: (rows, D) or (rows, N, D)."""
    encoder = runtime.to_device(encoder)  # in place: the run's model is on the device from here on, as in fit()
    was_training = encoder.training
    encoder.eval()  # a frozen encoder runs in eval mode in fit() too: no dropout or drop-path
    rows = len(dataset)
    pooled = None
    token_rows: list[np.ndarray] = []
    try:
        for batch in runtime.device_loader(Batches(dataset, batch_size, range(rows), (runtime.process_index, runtime.process_count))):
            with runtime.autocast():
                tokens = encoder.forward_features(batch["x"])
            if kind == "pooled":
                # The heads pool in float32 what the encoder returns; pooled rows are gathered on device and
                # fetched once (a reduction over the sharded batch dim comes back replicated, from one graph).
                placed = place_rows(tokens.float().mean(dim=1), batch["row"], batch["w"], rows)
                pooled = placed if pooled is None else pooled + placed
            else:
                real = runtime.to_host(batch["w"]) > 0
                token_rows.append(runtime.to_host(tokens)[real])
    finally:
        encoder.train(was_training)
    if kind == "pooled":
        return runtime.to_host(pooled) if pooled is not None else np.zeros((0, encoder.num_features), np.float32)
    return np.concatenate(token_rows) if token_rows else np.zeros((0, 0, encoder.num_features), np.float16)


def frozen_features(
    store: FeatureStore,
    key: FeatureKey,
    encoder: torch.nn.Module,
    train_set,
    val_set,
    *,
    runtime,
    batch_size: int,
) -> FrozenFeatures:
    """The train / val features of `key` from `store`, computed with `encoder` (on `runtime`) on a miss.

    `encoder` must hold the weights `key.encoder` names: the run's encoder before any training.
    """
    started = time.perf_counter()
    datasets = {"train": train_set, "val": val_set}
    entry, built = store.get_or_build(
        key, lambda split: encode_split(encoder, datasets[split], runtime=runtime, batch_size=batch_size, kind=key.kind)
    )
    return _as_frozen(entry, built, datasets, time.perf_counter() - started)


def _as_frozen(entry: FeatureEntry, built: bool, datasets: dict, seconds: float) -> FrozenFeatures:
    splits = {
        split: FeatureSplit(entry.arrays[split], dataset.labels, dataset.participant_ids(range(len(dataset))), entry.kind)
        for split, dataset in datasets.items()
    }
    return FrozenFeatures(train=splits["train"], val=splits["val"], digest=entry.digest, built=built,
                          seconds=seconds, nbytes=entry.nbytes)
