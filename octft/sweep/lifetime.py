"""A process that never outlives the one that started it: a runner its worker, a worker the launch that started it.

    >>> watch_parent(lambda: os._exit(3))     # doctest: +SKIP
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

PARENT_POLL_S = 0.5  # how soon a runner or worker notices that its parent ended


def watch_parent(on_death: Callable[[], None], interval: float = PARENT_POLL_S) -> threading.Thread:
    """Call `on_death` (in a daemon thread) when this process's parent ends, however it ends (SIGKILL included):
    an orphan is adopted by another process, so its parent's pid changes. A runner and a worker started by a launch
    never outlive the process that started them."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        on_death()

    thread = threading.Thread(target=watch, name="parent-watch", daemon=True)
    thread.start()
    return thread
