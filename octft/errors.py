"""The errors a user can act on.

Every problem that comes from the user's input (a path, a file, a config value, a store) is raised as a
subclass of `OctftError` where that input is read, with a message naming the file, key or value and what to
do. The CLI prints these as one line and exits 2; any other exception is a bug and keeps its traceback.
This module imports nothing, so the CLI can catch these errors without importing torch.
"""

from __future__ import annotations


class OctftError(Exception):
    """A problem the user can fix; its message says which input and what to do."""


class UsageError(OctftError, ValueError):
    """A command-line argument or value that cannot be used (a trial that does not exist, a count below 1)."""


class MissingInputError(OctftError, FileNotFoundError):
    """A file, folder, database or run the command was pointed at does not exist."""
