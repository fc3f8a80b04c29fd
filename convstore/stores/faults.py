"""Fault injection for the crash-safety tests.

``CONVSTORE_CRASH_AT=N`` makes the process kill itself with SIGKILL at the
N-th store write step (every file write, rename, fsync and unlink of the
local store counts).  Unset, a crash point costs one integer compare.
"""

from __future__ import annotations

import os
import signal
import threading

_AT = 0
_count = 0
_lock = threading.Lock()


def configure() -> None:
    """Read ``CONVSTORE_CRASH_AT`` (at import, and again in a daemon's forked child)."""
    global _AT, _count
    _AT, _count = int(os.environ.get("CONVSTORE_CRASH_AT", "0") or 0), 0


configure()


def crash_point() -> None:
    global _count
    if not _AT:
        return
    with _lock:
        _count += 1
        if _count >= _AT:
            os.kill(os.getpid(), signal.SIGKILL)
