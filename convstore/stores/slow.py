"""Wrappers that make any backend behave like a remote one, for measurement.

Each read waits a fixed per-request latency plus its transfer time over one
shared link of the given bandwidth (requests in parallel overlap their
latencies but share the bandwidth), like a worker fetching from an object
store.  Lambda reports ~0.55 ms median from its AZ cache and ~36 ms from S3.
The chunk store and the metadata store of one backend share one :class:`Link`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Collection

from .base import ChunkStore, ForwardingChunkStore, ForwardingObjectStore, Location, ObjectStore


class Link:
    """One simulated network link: latency per request, shared bandwidth, counters."""

    def __init__(self, latency_s: float, bandwidth_bps: float):
        self.latency = latency_s
        self.bandwidth = bandwidth_bps
        self._free = 0.0
        self._lock = threading.Lock()
        self.requests = 0
        self.bytes = 0

    def __repr__(self) -> str:
        return f"Link({self.latency * 1e3:g} ms, {self.bandwidth / 1e6:g} MB/s)"

    def delay(self, n: int) -> None:
        now = time.monotonic()
        with self._lock:
            self.requests += 1
            self.bytes += n
            start = max(now + self.latency, self._free)
            self._free = start + n / self.bandwidth
            done = self._free
        time.sleep(max(0.0, done - time.monotonic()))


class SlowStore(ForwardingObjectStore):
    def __init__(self, inner: ObjectStore, link: Link):
        super().__init__(inner)
        self.link = link

    def __repr__(self) -> str:
        return f"SlowStore({self.inner!r}, {self.link!r})"

    def get(self, key: str) -> bytes:
        data = self.inner.get(key)
        self.link.delay(len(data))
        return data

    def has(self, key: str) -> bool:
        self.link.delay(0)
        return self.inner.has(key)

    def put(self, key: str, data: bytes, *, durable: bool = True, exclusive: bool = False,
            refs: Collection[bytes] = ()) -> bool:
        self.link.delay(len(data))
        return self.inner.put(key, data, durable=durable, exclusive=exclusive, refs=refs)


class SlowChunkStore(ForwardingChunkStore):
    def __init__(self, inner: ChunkStore, link: Link):
        super().__init__(inner)
        self.link = link

    def __repr__(self) -> str:
        return f"SlowChunkStore({self.inner!r}, {self.link!r})"

    def has(self, cid: bytes) -> bool:
        self.link.delay(0)
        return self.inner.has(cid)

    def get(self, cid: bytes, hint: Location | None = None) -> bytes:
        data = self.inner.get(cid, hint)
        self.link.delay(len(data))
        return data

    def put(self, cid: bytes, blob: bytes) -> None:
        self.link.delay(len(blob))
        self.inner.put(cid, blob)
