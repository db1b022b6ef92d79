"""Turn a raw OCT volume into the fixed-size float32 clip the encoder sees.

Three steps, always in this order: pick `frames` B-scans evenly, resize each to
`height` x `width`, normalise intensity over the whole volume. The settings live in a
frozen `Preprocessing`, whose `key()` is part of every cache key, so changing a setting
never reuses an array made with another.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np

Intensity = Literal["zscore", "minmax", "percentile"]

# Percentile normalisation clips to this range first, so a few saturated or dead pixels
# do not squash the contrast of the whole volume.
PERCENTILE_RANGE = (1.0, 99.0)


@dataclass(frozen=True)
class Preprocessing:
    """What `preprocess` makes of a volume: `frames` B-scans of `height` x `width`.

    `intensity` is the per-volume normalisation: "percentile" (clip to the 1st..99th
    percentile, then scale to [0, 1]), "minmax" (scale to [0, 1]) or "zscore" (zero mean,
    unit variance).

    >>> Preprocessing(frames=8, height=64, width=64, intensity="minmax").key()
    'f8-h64-w64-minmax'
    """

    frames: int = 16
    height: int = 224
    width: int = 224
    intensity: Intensity = "percentile"

    def __post_init__(self) -> None:
        for name in ("frames", "height", "width"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Preprocessing.{name} must be a positive integer, got {value!r}")
        if self.intensity not in get_args(Intensity):
            raise ValueError(
                f"Preprocessing.intensity must be one of {get_args(Intensity)}, got {self.intensity!r}"
            )

    def key(self) -> str:
        """A short, stable string of every setting; part of the cache key."""
        return f"f{self.frames}-h{self.height}-w{self.width}-{self.intensity}"


def frame_indices(available: int, frames: int) -> np.ndarray:
    """Which of `available` B-scans to keep: `frames` of them, evenly spread, first and last included.

    With fewer B-scans than asked for, each is repeated evenly (nearest neighbour in depth).

    >>> frame_indices(10, 4).tolist()
    [0, 3, 6, 9]
    >>> frame_indices(2, 4).tolist()
    [0, 0, 1, 1]
    """
    if available < 1:
        raise ValueError("a volume needs at least one frame")
    # Round half to even (np.round) is deterministic, which is all that matters here.
    return np.linspace(0, available - 1, frames).round().astype(np.int64)


def preprocess(array: np.ndarray, spec: Preprocessing) -> np.ndarray:
    """`array` (frames, height, width) of any real dtype -> float32 (spec.frames, spec.height, spec.width).

    Deterministic: the same input and spec give the same bytes. A constant volume becomes
    zeros, never NaN. Raises ValueError for an array that is not 3-D, is empty or holds
    NaN / inf.

    >>> volume = np.random.default_rng(0).integers(0, 4096, (97, 496, 512), dtype=np.uint16)
    >>> clip = preprocess(volume, Preprocessing(frames=16, height=224, width=224))
    >>> clip.shape, clip.dtype, float(clip.min()), float(clip.max())
    ((16, 224, 224), dtype('float32'), 0.0, 1.0)
    """
    array = np.asarray(array)
    if array.ndim != 3:
        raise ValueError(f"expected a volume shaped (frames, height, width), got shape {array.shape}")
    if 0 in array.shape:
        raise ValueError(f"the volume is empty (shape {array.shape})")
    if array.dtype.kind not in "biuf":
        raise ValueError(f"expected a numeric volume, got dtype {array.dtype}")

    # Pick frames before converting: decoding gave us all B-scans, we keep only a few.
    picked = array[frame_indices(array.shape[0], spec.frames)]
    # float32 holds uint8/uint16/int16 exactly; the copy is also native-endian and contiguous.
    clip = np.ascontiguousarray(picked, dtype=np.float32)
    if not np.isfinite(clip).all():
        raise ValueError("the volume holds NaN or infinite values")

    if clip.min() == clip.max():
        # Decided before resizing: the resize's float rounding would turn a constant volume
        # into noise that normalisation then stretches to [0, 1].
        return np.zeros((spec.frames, spec.height, spec.width), np.float32)
    if clip.shape[1:] != (spec.height, spec.width):
        # torch only here, where a volume is resized: a launch that finds its cache complete prepares without it.
        import torch
        import torch.nn.functional as F

        with torch.no_grad():
            resized = F.interpolate(
                torch.from_numpy(clip).unsqueeze(1),  # B-scans as a batch of 1-channel images
                size=(spec.height, spec.width),
                mode="bilinear",
                align_corners=False,
                antialias=True,  # OCT speckle aliases badly when downsampled without it
            )
        clip = resized.squeeze(1).numpy()
    return _normalise(clip, spec.intensity)


def _normalise(clip: np.ndarray, intensity: Intensity) -> np.ndarray:
    if intensity == "zscore":
        mean = float(clip.mean(dtype=np.float64))
        std = float(clip.std(dtype=np.float64))
        if std == 0.0:
            return np.zeros_like(clip)
        return ((clip - mean) / std).astype(np.float32, copy=False)

    low, high = clip.min(), clip.max()
    if intensity == "percentile":
        p_low, p_high = np.percentile(clip, PERCENTILE_RANGE).astype(np.float32)
        # A mostly-constant volume (e.g. 99% background) has equal percentiles but is not
        # constant: fall back to its full range rather than erasing the few bright pixels.
        if p_high > p_low:
            low, high = p_low, p_high
            clip = np.clip(clip, low, high)
    if high == low:
        return np.zeros_like(clip)
    # Bounds stay float32 so that the top value maps to exactly 1.0.
    return ((clip - low) / (high - low)).astype(np.float32, copy=False)
