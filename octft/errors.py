"""The errors a user can act on. The CLI prints these as one line instead of a traceback."""

from __future__ import annotations

from octft.config import ConfigError
from octft.data.labels import LabelsError
from octft.data.storage import StorageError
from octft.data.volume import OctReadError
from octft.models.checkpoint import CheckpointError
from octft.train.loop import TrainingError
from octft.train.recipe import AuditFailedError

USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError, LabelsError, OctReadError, StorageError, CheckpointError, TrainingError, AuditFailedError,
    FileNotFoundError, ValueError, PermissionError,
)
