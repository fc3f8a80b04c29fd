"""Chunk fetching for lazy reads: plaintext chunks kept in a ChunkCache (one
fetch per chunk however many readers want it, sequential readahead, a thread
pool, counters, and start-up profile recording."""

from __future__ import annotations

import bisect
import functools
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from ..core.chunks import Chunks
from ..errors import ChunkMissing, error_cause
from ..manifest import Manifest
from .chunkcache import ChunkCache

log = logging.getLogger(__name__)


@dataclass
class FetchStats:
    chunks_fetched: int = 0
    bytes_fetched: int = 0  # stored (encrypted, compressed) bytes read from the store
    plain_bytes_fetched: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    wait_seconds: float = 0.0  # time readers spent blocked on the store
    bytes_read: int = 0  # bytes returned to readers
    prefetched_chunks: int = 0
    cache_hit_bytes: int = 0  # plaintext bytes served from the memory cache
    disk_chunks: int = 0  # of chunks_fetched, those the node's disk cache served (the rest: the origin)
    disk_bytes: int = 0  # of bytes_fetched, likewise
    read_errors: dict[str, int] = field(default_factory=dict)  # failed reads by cause (errors.error_cause)
    fetch_errors: dict[str, int] = field(default_factory=dict)  # failed fetches (prefetches too) by cause
    # fetch latency per tier ("disk", "origin"): counts per LATENCY_BUCKETS bound (+Inf last), and the sum
    fetch_seconds: dict[str, list[int]] = field(default_factory=dict)
    fetch_seconds_sum: dict[str, float] = field(default_factory=dict)

    def observe_fetch(self, tier: str, seconds: float) -> None:
        counts = self.fetch_seconds.setdefault(tier, [0] * (len(LATENCY_BUCKETS) + 1))
        counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.fetch_seconds_sum[tier] = self.fetch_seconds_sum.get(tier, 0.0) + seconds

    @staticmethod
    def count_error(counts: dict[str, int], e: BaseException) -> None:
        cause = error_cause(e)
        counts[cause] = counts.get(cause, 0) + 1

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


#: upper bounds (seconds) of the fetch latency histogram's buckets
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ChunkFetcher:
    """Serves byte ranges of layer content streams from the store."""

    def __init__(self, chunks: Chunks, manifest: Manifest, *, cache_bytes: int = 256 << 20,
                 workers: int = 8, readahead: int = 4, cache: ChunkCache | None = None):
        """``cache``: the process's shared plaintext cache (its budget bounds
        every image's); without one, a cache of ``cache_bytes`` of its own."""
        self.chunks = chunks
        self.manifest = manifest
        self.cache = cache if cache is not None else ChunkCache(cache_bytes)
        self.cache_bytes = self.cache.budget
        self.readahead = readahead
        self.stats = FetchStats()
        self._keys = [ChunkCache.key(c) for c in manifest.chunks]  # chunk-table index -> cache key
        # the node's disk cache in front of a remote store, if any: which tier served a fetch
        self._disk_cached = getattr(chunks.store, "is_cached", None)
        self._inflight: dict[int, Future[bytes]] = {}
        # re-entrant: a future that is already done runs its callback in the submitting thread
        self._lock = threading.RLock()
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="convstore-fetch")
        self._last: dict[int, int] = {}  # layer -> last chunk position read (sequential detection)
        self.recording: list[tuple[int, int]] | None = None
        self._recorded: set[tuple[int, int]] = set()
        # starts[layer][k] = offset of the k-th chunk in that layer's content stream
        self._starts: list[list[int]] = []
        for layer in manifest.layers:
            pos, starts = 0, []
            for i in layer.chunks:
                starts.append(pos)
                pos += manifest.chunks[i].size
            starts.append(pos)
            self._starts.append(starts)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def snapshot(self) -> dict[str, Any]:
        """The counters as they are now (a copy, taken under the lock: for reports)."""
        with self._lock:
            return self.stats.to_json()

    # -- chunk level --------------------------------------------------------
    def _load(self, idx: int) -> bytes:
        ident = self.manifest.chunks[idx]
        tier = "disk" if self._disk_cached is not None and self._disk_cached(ident.cid) else "origin"
        t = time.perf_counter()
        try:
            plain, stored = self.chunks.read(ident, hint=self.manifest.hint(idx))
        except Exception as e:
            if isinstance(e, ChunkMissing):  # its message names the chunk
                log.error("%s", e)
            else:
                log.error("chunk %s: %s", ident.cid.hex(), e)
            with self._lock:
                self.stats.count_error(self.stats.fetch_errors, e)
            raise
        with self._lock:
            self.stats.chunks_fetched += 1
            self.stats.bytes_fetched += stored
            self.stats.plain_bytes_fetched += len(plain)
            self.stats.observe_fetch(tier, time.perf_counter() - t)
            if tier == "disk":
                self.stats.disk_chunks += 1
                self.stats.disk_bytes += stored
        return plain

    def _done(self, idx: int, fut: Future[bytes]) -> None:
        with self._lock:
            self._inflight.pop(idx, None)
            if fut.cancelled() or fut.exception() is not None:
                return
            self.cache.put(self._keys[idx], fut.result())

    def _future(self, idx: int) -> Future[bytes] | bytes:
        """The chunk if cached, else the (possibly shared) fetch in flight.  Caller holds the lock."""
        data = self.cache.get(self._keys[idx])
        if data is not None:
            return data
        fut = self._inflight.get(idx)
        if fut is None:
            fut = self._pool.submit(self._load, idx)
            self._inflight[idx] = fut
            fut.add_done_callback(functools.partial(self._done, idx))
        return fut

    def prefetch(self, idx: int) -> None:
        with self._lock:
            if idx not in self._inflight and self._keys[idx] not in self.cache:
                self.stats.prefetched_chunks += 1
                self._future(idx)

    def chunk(self, layer: int, k: int) -> bytes:
        idx = self.manifest.layers[layer].chunks[k]
        with self._lock:
            if self.recording is not None and (layer, k) not in self._recorded:
                self._recorded.add((layer, k))
                self.recording.append((layer, k))
            got = self._future(idx)
            if isinstance(got, bytes):
                self.stats.cache_hits += 1
                self.stats.cache_hit_bytes += len(got)
                return got
            self.stats.cache_misses += 1
        t = time.perf_counter()
        try:
            return got.result()
        except Exception as e:
            with self._lock:
                self.stats.count_error(self.stats.read_errors, e)
            raise
        finally:
            with self._lock:
                self.stats.wait_seconds += time.perf_counter() - t

    # -- byte ranges --------------------------------------------------------
    def read(self, layer: int, offset: int, size: int) -> bytes:
        """``size`` bytes at ``offset`` of layer ``layer``'s content stream."""
        starts = self._starts[layer]
        end = min(offset + size, starts[-1])
        if offset >= end:
            return b""
        k = bisect.bisect_right(starts, offset) - 1
        chunks = self.manifest.layers[layer].chunks
        out = []
        pos = offset
        first = k
        while pos < end:
            data = self.chunk(layer, k)
            lo = pos - starts[k]
            hi = min(end, starts[k + 1]) - starts[k]
            out.append(data[lo:hi] if (lo, hi) != (0, len(data)) else data)
            pos = starts[k + 1]
            k += 1
        # readahead when this read continues the previous one in this layer
        if self.readahead and self._last.get(layer) in (first - 1, first):
            for j in range(k, min(k + self.readahead, len(chunks))):
                self.prefetch(chunks[j])
        self._last[layer] = k - 1
        with self._lock:
            self.stats.bytes_read += end - offset
        return out[0] if len(out) == 1 else b"".join(out)

    def prefetch_range(self, layer: int, offset: int, size: int) -> None:
        """Start fetching every chunk that covers a byte range (e.g. a file
        being opened), so a reader that walks it waits one round trip."""
        starts = self._starts[layer]
        end = min(offset + size, starts[-1])
        k = bisect.bisect_right(starts, offset) - 1
        chunks = self.manifest.layers[layer].chunks
        while k < len(chunks) and starts[k] < end:
            self.prefetch(chunks[k])
            k += 1

    def start_recording(self) -> None:
        self.recording = []
        self._recorded = set()

    def stop_recording(self) -> list[tuple[int, int]]:
        """What was recorded; recording stops."""
        with self._lock:
            rec, self.recording = self.recording, None
        return rec or []

    def prefetch_profile(self, profile: list[tuple[int, int]]) -> int:
        """Start fetching a recorded start-up profile, in order; returns how many."""
        n = 0
        for layer, k in profile:
            if 0 <= layer < len(self.manifest.layers) and 0 <= k < len(self.manifest.layers[layer].chunks):
                self.prefetch(self.manifest.layers[layer].chunks[k])
                n += 1
        return n
