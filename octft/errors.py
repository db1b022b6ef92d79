"""The errors a user can act on. The CLI prints these as one line instead of a traceback."""

from __future__ import annotations

from octft.config import ConfigError
from octft.data.labels import LabelsError
from octft.data.volume import OctReadError

USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, LabelsError, OctReadError, FileNotFoundError, ValueError, PermissionError)
