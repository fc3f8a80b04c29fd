"""Where a long-running convstore process's log lines go: its standard
error, always.  Under systemd that is the journal (``$JOURNAL_STREAM`` names
the stream: each line then carries its syslog priority as ``<N>`` and no
timestamp, the journal adds one); in a ``--background`` process it is the
log file its parent opened (:mod:`.background`); in a terminal, the
terminal.  Never a pipe nobody reads."""

from __future__ import annotations

import logging
import os
import sys
from typing import TextIO

_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


class _JournalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"<{_PRIORITY.get(record.levelno, 6)}>" + super().format(record)


def to_journal(stream: TextIO) -> bool:
    """Whether ``stream`` is the journal's stream systemd connected
    (``$JOURNAL_STREAM`` is ``DEVICE:INODE`` of it)."""
    want = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError):
        return False
    return want == f"{st.st_dev}:{st.st_ino}"


def setup_service_logging(level: int = logging.INFO, stream: TextIO | None = None) -> None:
    """Send convstore's log records of ``level`` and above to ``stream``
    (standard error), once; a service calls it before it starts serving."""
    stream = stream or sys.stderr
    root = logging.getLogger("convstore")
    if any(getattr(h, "_convstore_service", False) for h in root.handlers):
        return
    handler = logging.StreamHandler(stream)
    if to_journal(stream):
        handler.setFormatter(_JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s",
                                               "%Y-%m-%dT%H:%M:%S%z"))
    handler._convstore_service = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
