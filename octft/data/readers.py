"""Interim reader: `.npy` only. Replaced by the full DICOM / NIfTI / NumPy reader."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from octft.data.volume import OctReadError, Volume


def read_volume(source: str | Path | bytes, *, name: str | None = None) -> Volume:
    label = name or (str(source) if not isinstance(source, bytes) else "<bytes>")
    try:
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - every failure becomes one error type
        raise OctReadError(label, f"not a readable .npy volume ({exc})") from exc
    return Volume(array=array, meta={"format": "npy"})
