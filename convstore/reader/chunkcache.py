"""``ChunkCache``: the plaintext chunks a process keeps in memory, shared by
every image it serves, under one byte budget (``--memory-budget``).

A layer store or snapshotter serves many images; with a cache per image its
memory grew with the images it served (256 MiB each).  One least recently
used cache per process, keyed by the chunk's identity (its id and key, what
decryption checked it against), bounds the plaintext held whatever the
number of images, and lets images that share chunks share their copy.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from ..crypto import ChunkIdentity

#: the default budget of a long-running process (mount, layer store, snapshotter)
DEFAULT_MEMORY_BUDGET = 128 << 20


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
            while self._items and self.bytes + len(data) > self.budget:
                _, old = self._items.popitem(last=False)
                self.bytes -= len(old)
                self.evictions += 1
            self._items[key] = data
            self.bytes += len(data)
            self.peak_bytes = max(self.peak_bytes, self.bytes)

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)
