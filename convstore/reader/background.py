"""Background fetch: after a start, the rest of an image's chunks are made
local (put in the node's chunk cache), so the image keeps working when the
registry goes away and later reads never wait on the network.

Order and priority:

* it begins after the start-up profile's prefetch (:attr:`ChunkFetcher.profile_done`);
* it reads the image's chunks in file order, those not already in the node
  cache, in batches of about ``batch_bytes`` -- neighbours in a pack blob,
  so the registry store reads a batch with one ranged GET (coalesced by
  :meth:`~convstore.stores.base.ChunkStore.get_many`);
* before each batch it waits until no reader is waiting on a chunk
  (:meth:`ChunkFetcher.wait_idle`) and readers have asked for nothing for
  ``quiet`` seconds (the burst of a start is left alone): on-demand reads
  always go first, and a batch is never in the fetcher's own pool, which
  serves readers;
* at most ``concurrency`` batches are in flight, and ``rate`` (bytes per
  second, 0: unbounded) paces them.

It stores the blobs as fetched (the cache holds encrypted blobs, checked
when read, as every cached chunk is) and keeps no plaintext.  A store with no
node cache (a local directory) is already local: nothing to do.  An image
larger than half the node cache is not fetched (it would evict itself).

Configured per node with :class:`BackgroundConfig` (the keyword arguments and
CLI options ``--background-fetch/--no-background-fetch`` and
``--background-rate``) or the environment (:data:`ENV_FETCH`, :data:`ENV_RATE`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import asdict, dataclass, field, replace

from ..errors import BackgroundConfigError
from ..stores.base import ChunkStore
from ..stores.cache import CachedChunkStore
from .fetcher import ChunkFetcher, store_requests

log = logging.getLogger(__name__)

#: ``off`` (or 0/no/false) turns the background fetch off on this node; ``on`` turns it on
ENV_FETCH = "CONVSTORE_BACKGROUND_FETCH"
#: its bandwidth bound, bytes per second with an optional K/M/G suffix (``0``: unbounded)
ENV_RATE = "CONVSTORE_BACKGROUND_RATE"


def parse_rate(text: str) -> int:
    """``50M`` -> 50 * 2**20 bytes per second (``0``: unbounded)."""
    t = text.strip().upper().removesuffix("/S").removesuffix("B")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(t[-1:], 1)
    digits = t[:-1] if t[-1:] in "KMG" and t else t
    try:
        value = float(digits)
    except ValueError:
        raise BackgroundConfigError(f"background fetch rate {text!r}: not a number of bytes per second "
                                    f"(like 50M)") from None
    if value < 0 or value != value or value == float("inf"):
        raise BackgroundConfigError(f"background fetch rate {text!r}: must be 0 (unbounded) or more")
    return int(value * mult)


@dataclass(frozen=True)
class BackgroundConfig:
    enabled: bool = True
    rate: int = 0  # bytes per second, 0: unbounded
    concurrency: int = 1  # batches in flight
    batch_bytes: int = 4 << 20  # stored bytes per batch (one ranged GET when they are neighbours)
    quiet: float = 1.0  # seconds readers must have asked for nothing before a batch starts

    def to_json(self) -> dict[str, int | bool | float]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: dict[str, int | bool | float] | None) -> BackgroundConfig:
        """What :meth:`to_json` wrote (a background worker's task); None: the environment's."""
        if doc is None:
            return cls.from_env()
        return cls(enabled=bool(doc.get("enabled", True)), rate=int(doc.get("rate", 0)),
                   concurrency=int(doc.get("concurrency", 1)), batch_bytes=int(doc.get("batch_bytes", 4 << 20)),
                   quiet=float(doc.get("quiet", 1.0)))

    @classmethod
    def from_env(cls, enabled: bool | None = None, rate: str | int | None = None) -> BackgroundConfig:
        """The node's setting: an explicit argument (a CLI option) wins over the
        environment, which wins over the default (on, unbounded)."""
        cfg = cls()
        env = os.environ.get(ENV_FETCH, "").strip().lower()
        if env:
            if env in ("0", "off", "no", "false"):
                cfg = replace(cfg, enabled=False)
            elif env in ("1", "on", "yes", "true"):
                cfg = replace(cfg, enabled=True)
            else:
                raise BackgroundConfigError(f"{ENV_FETCH}={env!r}: use on or off")
        env_rate = os.environ.get(ENV_RATE, "").strip()
        if env_rate:
            cfg = replace(cfg, rate=parse_rate(env_rate))
        if enabled is not None:
            cfg = replace(cfg, enabled=enabled)
        if rate is not None:
            cfg = replace(cfg, rate=rate if isinstance(rate, int) else parse_rate(rate))
        return cfg


@dataclass
class BackgroundProgress:
    """What a background fetch has done (plain counters: the metrics exporter reads them)."""

    image: str = ""
    state: str = "pending"  # pending, running, done, off, local (nothing to fetch), too-large, stopped, failed
    chunks_total: int = 0  # distinct chunks of the image
    chunks_local: int = 0  # of them, in the node cache (at the start, plus fetched since)
    bytes_total: int = 0  # stored bytes of the image's chunks
    bytes_fetched: int = 0  # stored bytes this fetch read
    batches: int = 0  # coalesced reads
    requests: int = 0  # requests the store sent meanwhile (with on-demand reads' own)
    yields: int = 0  # times it waited for readers
    started: float = 0.0  # unix time
    finished: float = 0.0
    error: str = ""
    _t0: float = field(default=0.0, repr=False)

    def to_json(self) -> dict[str, object]:
        d = asdict(self)
        d.pop("_t0")
        return d


class BackgroundFetch:
    """Makes one image's chunks local behind its readers (see the module doc)."""

    def __init__(self, fetcher: ChunkFetcher, config: BackgroundConfig | None = None, image: str = "") -> None:
        self.fetcher = fetcher
        self.config = config or BackgroundConfig()
        self._progress = BackgroundProgress(image=image or fetcher.manifest.name)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._next = 0.0  # monotonic time the next batch may start (rate)
        self._base = 0  # the store's request count when it began
        self._thread: threading.Thread | None = None
        self.finished = threading.Event()
        fetcher.on_close(self.stop)

    def progress(self) -> BackgroundProgress:
        with self._lock:
            return replace(self._progress)

    def start(self) -> BackgroundFetch:
        if not self.config.enabled:
            self._end("off")
            return self
        self._thread = threading.Thread(target=self._run, name="convstore-background", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout=30)
        with self._lock:
            if self._progress.state in ("pending", "running"):
                self._progress.state = "stopped"
        self.finished.set()

    def wait(self, timeout: float) -> bool:
        """Whether it finished (any end state) within ``timeout`` seconds."""
        return self.finished.wait(timeout)

    def _end(self, state: str, error: str = "") -> None:
        with self._lock:
            p = self._progress
            p.state, p.error, p.finished = state, error, time.time()
        self.finished.set()

    # -- the work -----------------------------------------------------------
    def _todo(self, store: CachedChunkStore) -> list[list[int]]:
        """Batches of chunk-table indices not yet local, in file order."""
        m = self.fetcher.manifest
        seen: set[int] = set()
        order: list[int] = []
        for layer in m.layers:
            for idx in layer.chunks:
                if idx not in seen:
                    seen.add(idx)
                    order.append(idx)
        sizes = {i: (h[2] if (h := m.hint(i)) is not None else m.chunks[i].size) for i in order}
        missing = [i for i in order if not store.cached(m.chunks[i].cid)]
        with self._lock:
            p = self._progress
            p.chunks_total, p.bytes_total = len(order), sum(sizes.values())
            p.chunks_local = len(order) - len(missing)
        batches: list[list[int]] = []
        acc = 0
        for i in missing:
            if not batches or acc + sizes[i] > self.config.batch_bytes:
                batches.append([])
                acc = 0
            batches[-1].append(i)
            acc += sizes[i]
        return batches

    def _run(self) -> None:
        with self._lock:
            self._progress.started = time.time()
            self._progress._t0 = time.monotonic()
        store = self.fetcher.chunks.store
        cached = _node_cache(store)
        if cached is None:
            self._end("local")  # no node cache: the store itself is local
            return
        while not self.fetcher.profile_done.wait(0.1):  # the start-up profile first
            if self._stop.is_set():
                return
        batches = self._todo(cached)
        p = self.progress()
        if p.bytes_total > cached.cache.max_bytes // 2:
            log.warning("background fetch of %s: off, the image (%.1f MB) is over half the node cache (%.1f MB)",
                        p.image, p.bytes_total / 1e6, cached.cache.max_bytes / 1e6)
            self._end("too-large")
            return
        with self._lock:
            self._progress.state = "running"
        log.info("background fetch of %s: %d of %d chunks to fetch (%.1f of %.1f MB), %d batches",
                 p.image, p.chunks_total - p.chunks_local, p.chunks_total,
                 sum(self._size(i) for b in batches for i in b) / 1e6, p.bytes_total / 1e6, len(batches))
        self._base = base = store_requests(store)
        lock = threading.Lock()
        errors: list[str] = []

        def worker() -> None:
            while not self._stop.is_set() and not errors:
                with lock:
                    if not batches:
                        return
                    batch = batches.pop(0)
                try:
                    self._one(store, batch)
                except Exception as e:  # noqa: BLE001  reported once, the rest stays on demand
                    errors.append(f"{type(e).__name__}: {e}")

        workers = [threading.Thread(target=worker, name="convstore-background-w", daemon=True)
                   for _ in range(max(1, self.config.concurrency))]
        for t in workers:
            t.start()
        for t in workers:
            t.join()
        with self._lock:
            self._progress.requests = store_requests(store) - base
        p = self.progress()
        took = time.monotonic() - p._t0
        if errors:
            log.warning("background fetch of %s: stopped after %d of %d chunks local: %s", p.image,
                        p.chunks_local, p.chunks_total, errors[0])
            self._end("failed", errors[0])
        elif self._stop.is_set():
            self._end("stopped")
        else:
            log.info("background fetch of %s: done, %d of %d chunks local, %.1f MB in %d batches "
                     "(%d requests with the readers'), %.1f s", p.image, p.chunks_local, p.chunks_total,
                     p.bytes_fetched / 1e6, p.batches, p.requests, took)
            self._end("done")

    def _size(self, idx: int) -> int:
        m = self.fetcher.manifest
        h = m.hint(idx)
        return h[2] if h is not None else m.chunks[idx].size

    def _one(self, store: ChunkStore, batch: list[int]) -> None:
        m = self.fetcher.manifest
        while True:  # readers first: none waiting, and none asking for a moment
            quiet_for = time.monotonic() - self.fetcher.last_activity
            if quiet_for >= self.config.quiet and self.fetcher.wait_idle(0.1):
                break
            with self._lock:
                self._progress.yields += 1
            if self._stop.wait(max(0.02, min(0.1, self.config.quiet - quiet_for))):
                return
        size = sum(self._size(i) for i in batch)
        if self.config.rate:
            with self._lock:
                now = time.monotonic()
                start = max(now, self._next)
                self._next = start + size / self.config.rate
            if self._stop.wait(max(0.0, start - now)):
                return
        cids = [m.chunks[i].cid for i in batch]
        hints = {m.chunks[i].cid: h for i in batch if (h := m.hint(i)) is not None}
        got = store.get_many(cids, hints)  # into the node cache
        with self._lock:
            p = self._progress
            p.batches += 1
            p.chunks_local += len(got)
            p.bytes_fetched += sum(len(b) for b in got.values())
            p.requests = store_requests(store) - self._base


def _node_cache(store: object) -> CachedChunkStore | None:
    """The node cache among a chunk store's forwarding wrappers, if any."""
    while store is not None:
        if isinstance(store, CachedChunkStore):
            return store
        store = getattr(store, "inner", None)
    return None


def start_fetching(fetcher: ChunkFetcher, profile: list[tuple[int, int]] | None, config: BackgroundConfig,
                   image: str, *, threaded: bool = False) -> BackgroundFetch:
    """The one fetch order of a start: the start-up profile in coalesced
    batches (queued from a thread with ``threaded``: submitting costs the
    caller tens of ms it may rather spend mounting), then the rest of the
    image in the background."""
    if profile:
        if threaded:
            threading.Thread(target=fetcher.prefetch_profile, args=(profile,), name="convstore-prefetch",
                             daemon=True).start()
        else:
            fetcher.prefetch_profile(profile)
    else:
        fetcher.profile_done.set()
    fetcher.background = BackgroundFetch(fetcher, config, image).start()  # its progress: the metrics read it
    return fetcher.background
