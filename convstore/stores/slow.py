"""A wrapper that makes any store behave like a remote one, for measurement.

Each read waits a fixed per-request latency plus its transfer time over one
shared link of the given bandwidth (requests in parallel overlap their
latencies but share the bandwidth), like a worker fetching from an object
store.  Lambda reports ~0.55 ms median from its AZ cache and ~36 ms from S3.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

from .base import ObjectStore


class SlowStore(ObjectStore):
    def __init__(self, inner: ObjectStore, latency_s: float, bandwidth_bps: float):
        self.inner = inner
        self.latency = latency_s
        self.bandwidth = bandwidth_bps
        self._link_free = 0.0
        self._lock = threading.Lock()
        self.requests = 0
        self.bytes = 0
        self.supports_ranges = inner.supports_ranges
        self.supports_deletes = inner.supports_deletes

    def __repr__(self) -> str:
        return f"SlowStore({self.inner!r}, {self.latency * 1e3:g} ms, {self.bandwidth / 1e6:g} MB/s)"

    def _delay(self, n: int) -> None:
        now = time.monotonic()
        with self._lock:
            self.requests += 1
            self.bytes += n
            start = max(now + self.latency, self._link_free)
            self._link_free = start + n / self.bandwidth
            done = self._link_free
        time.sleep(max(0.0, done - time.monotonic()))

    def get(self, key: str) -> bytes:
        data = self.inner.get(key)
        self._delay(len(data))
        return data

    def get_range(self, key: str, start: int, end: int) -> bytes:
        data = self.inner.get_range(key, start, end)
        self._delay(len(data))
        return data

    def has(self, key: str) -> bool:
        self._delay(0)
        return self.inner.has(key)

    def put(self, key: str, data: bytes, *, durable: bool = True, exclusive: bool = False) -> bool:
        self._delay(len(data))
        return self.inner.put(key, data, durable=durable, exclusive=exclusive)

    def delete(self, key: str) -> None:
        self.inner.delete(key)

    def evict(self, key: str) -> None:
        self.inner.evict(key)

    def list(self, prefix: str) -> Iterator[str]:
        return self.inner.list(prefix)

    def size(self, key: str) -> int:
        return self.inner.size(key)

    def flush(self) -> None:
        self.inner.flush()

    def abort(self) -> None:
        self.inner.abort()

    def append_line(self, key: str, line: str) -> None:
        self.inner.append_line(key, line)

    def lock(self, name: str, shared: bool = False):
        return self.inner.lock(name, shared)

    def usage(self, prefix: str) -> int:
        return self.inner.usage(prefix)
