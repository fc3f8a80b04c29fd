"""Chunk fetching for lazy reads: plaintext chunks kept in a ChunkCache (one
fetch per chunk however many readers want it, sequential readahead, a thread
pool, counters, and start-up profile recording and prefetching.

A recorded profile is prefetched in COALESCED batches: its chunks, in file
order, sorted by where they are stored and cut into ``PROFILE_PARALLEL``
slices of about equal bytes, each read with one
:meth:`~convstore.core.chunks.Chunks.blobs` call (the registry store reads
neighbours in a pack blob with one ranged GET), the slices in parallel.  A
reader that wants one of those chunks meanwhile waits on the same fetch.

A file opened (``prefetch_range``) and a sequential readahead are fetched
as one batch each too.  While a start is being recorded, what it made the
fetcher fetch -- reads, files opened, readahead -- is recorded: the next
start prefetches all of it up front.

The fetcher counts the reads it is waiting on for a reader (``demand``) and
notes when readers last asked for anything (``last_activity``); the
background fetch (:mod:`.background`) runs only when there is no demand and
readers have been quiet for a moment.
"""

from __future__ import annotations

import bisect
import functools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from ..core.chunks import Chunks
from ..errors import ChunkMissing, error_cause
from ..manifest import Manifest
from .chunkcache import ChunkCache

log = logging.getLogger(__name__)

#: a profile is prefetched as this many coalesced reads in parallel
PROFILE_PARALLEL = 4


def store_requests(store: object) -> int:
    """Requests a chunk store (or the backend under its forwarding wrappers)
    has sent to its remote so far: 0 for a store that counts none (a local one)."""
    while store is not None:
        n = getattr(store, "requests", None)
        if isinstance(n, int):
            return n
        store = getattr(store, "inner", None)
    return 0


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
    profile_chunks: int = 0  # chunks of the start-up profile prefetched
    profile_batches: int = 0  # coalesced reads they took (each one or a few requests)
    # requests the chunk store sent to its remote since this fetcher opened (refresh_requests): this image's,
    # and those of other images and background fetches over the same store meanwhile
    requests: int = 0

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


LOG_EVERY = 5.0  # seconds: one log line per cause of failed fetches (a dead registry fails every chunk)


class _LogGate:
    """At most one line per key every LOG_EVERY seconds; how many were held back meanwhile."""

    def __init__(self) -> None:
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def suppress(self, key: str) -> int | None:
        """None: hold this line back; else log it, saying how many were held back before it."""
        now = time.monotonic()
        if now - self._last.get(key, -LOG_EVERY) < LOG_EVERY:
            self._held[key] = self._held.get(key, 0) + 1
            return None
        self._last[key] = now
        return self._held.pop(key, 0)


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
        self._log_gate = _LogGate()
        # re-entrant: a future that is already done runs its callback in the submitting thread
        self._lock = threading.RLock()
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="convstore-fetch")
        self._last: dict[int, int] = {}  # layer -> last chunk position read (sequential detection)
        self.recording: list[tuple[int, int]] | None = None
        self._recorded: set[tuple[int, int]] = set()
        # starts[layer][k] = offset of the k-th chunk in that layer's content stream
        self._starts: list[list[int]] = []
        self._demand = 0  # reads a reader is waiting on now
        self.last_activity = 0.0  # monotonic time of the last read or prefetch a reader caused
        self._idle = threading.Condition(self._lock)
        self._closers: list[Callable[[], None]] = []
        self._requests_base = store_requests(chunks.store)
        #: the background fetch over this fetcher, once a start began one (reader.background.start_fetching)
        self.background: Any = None
        #: set once a start-up profile's prefetch is over (at once when there is none to prefetch)
        self.profile_done = threading.Event()
        for layer in manifest.layers:
            pos, starts = 0, []
            for i in layer.chunks:
                starts.append(pos)
                pos += manifest.chunks[i].size
            starts.append(pos)
            self._starts.append(starts)

    def close(self) -> None:
        for stop in self._closers:
            stop()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def snapshot(self) -> dict[str, Any]:
        """The counters as they are now (a copy, taken under the lock: for reports)."""
        with self._lock:
            self.stats.requests = store_requests(self.chunks.store) - self._requests_base
            return self.stats.to_json()
    def on_close(self, stop: Callable[[], None]) -> None:
        """Call ``stop`` first when the fetcher closes (a background fetch over it)."""
        self._closers.append(stop)

    def refresh_requests(self) -> FetchStats:
        """The counters, with ``requests`` brought up to date."""
        with self._lock:
            self.stats.requests = store_requests(self.chunks.store) - self._requests_base
            return self.stats

    # -- priority: what the background fetch waits for ------------------------
    @property
    def demand(self) -> int:
        """How many chunk reads readers are waiting on right now."""
        return self._demand

    @property
    def inflight(self) -> int:
        """How many chunk fetches are under way (readers', readahead's, a profile's)."""
        return len(self._inflight)

    def wait_idle(self, timeout: float) -> bool:
        """Wait up to ``timeout`` until no reader waits on a chunk; whether none does."""
        with self._idle:
            return self._idle.wait_for(lambda: self._demand == 0, timeout)

    # -- chunk level --------------------------------------------------------
    def _load(self, idx: int) -> bytes:
        ident = self.manifest.chunks[idx]
        tier = "disk" if self._disk_cached is not None and self._disk_cached(ident.cid) else "origin"
        t = time.perf_counter()
        try:
            plain, stored = self.chunks.read(ident, hint=self.manifest.hint(idx))
        except Exception as e:
            with self._lock:
                self.stats.count_error(self.stats.fetch_errors, e)
                quiet = self._log_gate.suppress(error_cause(e))
            if quiet is not None:
                msg = str(e) if isinstance(e, ChunkMissing) else f"chunk {ident.cid.hex()}: {e}"  # it names the chunk
                log.error("%s%s", msg, f" ({quiet} more like it in the last {LOG_EVERY:.0f} s)" if quiet else "")
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

    def _record(self, layer: int, k: int) -> None:
        """Note a chunk this start reads or makes the fetcher fetch (caller holds the lock)."""
        if self.recording is not None and (layer, k) not in self._recorded:
            self._recorded.add((layer, k))
            self.recording.append((layer, k))

    def chunk(self, layer: int, k: int) -> bytes:
        idx = self.manifest.layers[layer].chunks[k]
        with self._lock:
            self._record(layer, k)
            self.last_activity = time.monotonic()
            got = self._future(idx)
            if isinstance(got, bytes):
                self.stats.cache_hits += 1
                self.stats.cache_hit_bytes += len(got)
                return got
            self.stats.cache_misses += 1
            self._demand += 1
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
                self._demand -= 1
                if self._demand == 0:
                    self._idle.notify_all()

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
        # readahead when this read continues the previous one in this layer: one coalesced fetch
        if self.readahead and self._last.get(layer) in (first - 1, first):
            self._prefetch_positions(layer, range(k, min(k + self.readahead, len(chunks))))
        self._last[layer] = k - 1
        with self._lock:
            self.stats.bytes_read += end - offset
        return out[0] if len(out) == 1 else b"".join(out)

    def prefetch_range(self, layer: int, offset: int, size: int) -> None:
        """Start fetching every chunk that covers a byte range (e.g. a file
        being opened) with one coalesced read, so a reader that walks it
        waits one round trip."""
        starts = self._starts[layer]
        end = min(offset + size, starts[-1])
        k = bisect.bisect_right(starts, offset) - 1
        first = k
        while k < len(self.manifest.layers[layer].chunks) and starts[k] < end:
            k += 1
        self._prefetch_positions(layer, range(first, k))

    def _prefetch_positions(self, layer: int, positions: range) -> None:
        """Fetch chunks ``positions`` of a layer ahead of the readers, as one
        batch; they are part of what a start being recorded fetched."""
        chunks = self.manifest.layers[layer].chunks
        with self._lock:
            for k in positions:
                self._record(layer, k)
            self.last_activity = time.monotonic()
            futs = self._claim([chunks[k] for k in positions])
            self.stats.prefetched_chunks += len(futs)
        if futs:
            self._pool.submit(self._load_batch, sorted(futs, key=self._where), futs)

    def _claim(self, idxs: list[int]) -> dict[int, Future[bytes]]:
        """A future in flight for each chunk that is neither cached nor being
        fetched; the caller fetches them (:meth:`_load_batch`).  Caller holds the lock."""
        futs: dict[int, Future[bytes]] = {}
        for idx in idxs:
            if idx in self._inflight or idx in futs or self._keys[idx] in self.cache:
                continue
            fut: Future[bytes] = Future()
            fut.set_running_or_notify_cancel()
            self._inflight[idx] = fut
            fut.add_done_callback(functools.partial(self._done, idx))
            futs[idx] = fut
        return futs

    def start_recording(self) -> None:
        self.recording = []
        self._recorded = set()

    def stop_recording(self) -> list[tuple[int, int]]:
        """What was recorded; recording stops."""
        with self._lock:
            rec, self.recording = self.recording, None
        return rec or []

    def prefetch_profile(self, profile: list[tuple[int, int]], parallel: int = PROFILE_PARALLEL,
                         wait: bool = False) -> int:
        """Start fetching a recorded start-up profile: its chunks in file
        order, in ``parallel`` coalesced batches; returns how many chunks it
        names.  ``wait``: return once they are fetched.  Sets
        :attr:`profile_done` when they are."""
        seen: set[int] = set()
        idxs: list[int] = []
        for layer, k in sorted(set(profile)):  # (layer, position) is file order
            if 0 <= layer < len(self.manifest.layers) and 0 <= k < len(self.manifest.layers[layer].chunks):
                idx = self.manifest.layers[layer].chunks[k]
                if idx not in seen:
                    seen.add(idx)
                    idxs.append(idx)
        with self._lock:
            futs = self._claim(idxs)
            self.stats.prefetched_chunks += len(futs)
            self.stats.profile_chunks += len(futs)
        todo = sorted(futs, key=self._where)  # neighbours in a pack blob next to each other
        slices = _split_by_bytes(todo, [self._stored_size(i) for i in todo], max(1, parallel))
        with self._lock:
            self.stats.profile_batches += len(slices)
        submitted = [self._pool.submit(self._load_batch, part, futs) for part in slices]
        if not submitted:
            self.profile_done.set()
        else:
            left = [len(submitted)]

            def one_done(_f: object) -> None:
                with self._lock:
                    left[0] -= 1
                    last = left[0] == 0
                if last:
                    self.profile_done.set()
            for f in submitted:
                f.add_done_callback(one_done)
        if wait:
            for fut in futs.values():
                try:
                    fut.result()
                except Exception:  # noqa: BLE001  a reader that wants the chunk meets the error
                    pass
        return len(idxs)

    def _where(self, idx: int) -> tuple[bytes, int]:
        h = self.manifest.hint(idx)
        return (h[0], h[1]) if h is not None else (b"", idx)

    def _stored_size(self, idx: int) -> int:
        h = self.manifest.hint(idx)
        return h[2] if h is not None else self.manifest.chunks[idx].size

    def _load_batch(self, idxs: list[int], futs: dict[int, Future[bytes]]) -> None:
        """Fetch chunks with one coalesced call; each one that it did not bring
        is read alone (its error goes to whoever waits for it)."""
        idents = [self.manifest.chunks[i] for i in idxs]
        hints = {c.cid: h for c, h in ((c, self.manifest.hint(i)) for c, i in zip(idents, idxs)) if h is not None}
        # which tier serves each chunk (the node's disk cache, else the origin), asked before the fetch
        disk = {c.cid for c in idents if self._disk_cached is not None and self._disk_cached(c.cid)}
        t = time.perf_counter()
        try:
            blobs = self.chunks.blobs([c.cid for c in idents], hints)
        except Exception as e:  # noqa: BLE001  each chunk is tried again alone below
            log.debug("profile batch of %d chunks: %s; reading them one by one", len(idxs), e)
            blobs = {}
        took = time.perf_counter() - t  # each chunk of the batch waited that long
        for idx, ident in zip(idxs, idents):
            fut = futs[idx]
            blob = blobs.get(ident.cid)
            try:
                if blob is None:
                    plain = self._load(idx)
                else:
                    plain = self.chunks.open(blob, ident)
                    tier = "disk" if ident.cid in disk else "origin"
                    with self._lock:
                        self.stats.chunks_fetched += 1
                        self.stats.bytes_fetched += len(blob)
                        self.stats.plain_bytes_fetched += len(plain)
                        self.stats.observe_fetch(tier, took)
                        if tier == "disk":
                            self.stats.disk_chunks += 1
                            self.stats.disk_bytes += len(blob)
            except BaseException as e:  # noqa: BLE001  handed to the readers
                if blob is not None and isinstance(e, Exception):  # _load counted its own
                    with self._lock:
                        self.stats.count_error(self.stats.fetch_errors, e)
                fut.set_exception(e)
            else:
                fut.set_result(plain)


def _split_by_bytes(items: list[int], sizes: list[int], parts: int) -> list[list[int]]:
    """``items`` cut, in order, into at most ``parts`` runs of about equal total size."""
    if not items:
        return []
    total = sum(sizes)
    target = total / parts
    out: list[list[int]] = [[]]
    acc = 0
    for item, size in zip(items, sizes):
        if out[-1] and acc >= target * len(out) and len(out) < parts:
            out.append([])
        out[-1].append(item)
        acc += size
    return out
