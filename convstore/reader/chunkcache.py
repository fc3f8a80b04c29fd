"""``ChunkCache``: the plaintext chunks a process keeps in memory, shared by
every image it serves, under one byte budget (``--memory-budget``).

A layer store or snapshotter serves many images; with a cache per image its
memory grew with the images it served (256 MiB each).  One least recently
used cache per process, keyed by the chunk's identity (its id and key, what
decryption checked it against), bounds the plaintext held whatever the
number of images, and lets images that share chunks share their copy.
"""

from __future__ import annotations

import ctypes
import sys
import threading
import time
from collections import OrderedDict

from ..crypto import ChunkIdentity

#: the default budget of a long-running process (mount, layer store, snapshotter)
DEFAULT_MEMORY_BUDGET = 128 << 20
#: evicted bytes (a fraction of the budget) after which freed memory is handed back to the system
TRIM_FRACTION = 0.25
TRIM_INTERVAL = 1.0  # seconds, at most once per


def _malloc_trim() -> None:
    """glibc's ``malloc_trim(0)`` (nothing elsewhere): chunks are freed by the fetch pools' threads, each
    allocating from its own malloc arena; without a trim, evicted plaintext stays in the process's RSS."""
    try:
        ctypes.CDLL(None).malloc_trim(0)  # the process's own symbols: no library search, no subprocess
    except (OSError, AttributeError):
        pass


#: whether freed memory can be handed back (glibc on Linux)
CAN_TRIM = sys.platform.startswith("linux")


class ChunkCache:
    """Plaintext chunks by identity, least recently used dropped first; the
    bytes held never exceed ``budget`` (a chunk larger than the budget is
    not kept)."""

    def __init__(self, budget: int = DEFAULT_MEMORY_BUDGET) -> None:
        if budget < 0:
            raise ValueError("a memory budget cannot be negative")
        self.budget = budget
        self._lock = threading.Lock()
        self._items: OrderedDict[bytes, bytes] = OrderedDict()
        self.bytes = 0  # plaintext bytes held now
        self.peak_bytes = 0  # the most ever held at once
        self.evictions = 0
        self._evicted = 0  # bytes evicted since the last trim
        self._trim = threading.Event()
        self._trimmer: threading.Thread | None = None

    @staticmethod
    def key(ident: ChunkIdentity) -> bytes:
        return ident.cid + ident.ckey

    def get(self, key: bytes) -> bytes | None:
        with self._lock:
            data = self._items.get(key)
            if data is not None:
                self._items.move_to_end(key)
            return data

    def __contains__(self, key: bytes) -> bool:
        with self._lock:
            return key in self._items

    def put(self, key: bytes, data: bytes) -> None:
        if len(data) > self.budget:
            return
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return
            dropped = []
            while self._items and self.bytes + len(data) > self.budget:
                _, old = self._items.popitem(last=False)
                self.bytes -= len(old)
                self.evictions += 1
                self._evicted += len(old)
                dropped.append(old)
            self._items[key] = data
            self.bytes += len(data)
            self.peak_bytes = max(self.peak_bytes, self.bytes)
            if self._evicted > self.budget * TRIM_FRACTION and CAN_TRIM:
                self._evicted = 0
                if self._trimmer is None:
                    self._trimmer = threading.Thread(target=self._trim_loop, name="convstore-trim", daemon=True)
                    self._trimmer.start()
                self._trim.set()
        del dropped  # freed here, outside the lock

    def _trim_loop(self) -> None:
        """Hand freed memory back to the system when asked, at most once per TRIM_INTERVAL (no reader waits)."""
        while True:
            self._trim.wait()
            self._trim.clear()
            _malloc_trim()
            time.sleep(TRIM_INTERVAL)  # a rate limit, not an ordering

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)
