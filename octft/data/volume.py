"""The unit every reader returns, and the one error type a reader may raise."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from octft.errors import OctftError


class OctReadError(OctftError):
    """A file that cannot be read as an OCT volume.

    Carries the file (`source`) and the `reason` so that a scan can count and report it
    instead of stopping.
    """

    def __init__(self, source: str, reason: str):
        self.source = str(source)
        self.reason = reason
        super().__init__(f"{self.source}: {reason}")


@dataclass
class Volume:
    """One OCT volume.

    `array` is shaped (frames, height, width): frames are the B-scans. `meta` holds what the
    file says about itself: `participant_id`, `device`, `laterality`, `region`, `spacing`
    (mm per frame, row, column) where known, plus reader specifics (`format`,
    `transfer_syntax`, ...).
    """

    array: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.array.shape)  # type: ignore[return-value]
