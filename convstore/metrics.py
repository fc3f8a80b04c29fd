"""What a long-running process (``convstore mount``, ``layerstore``,
``snapshotter``) says about its work: a Prometheus endpoint, the stats file,
and one record per image start.  Every metric name is here.

Nothing is counted on the read path for this module: the readers keep plain
counters (:class:`~convstore.reader.fetcher.FetchStats`, the
:class:`~convstore.reader.chunkcache.ChunkCache`'s, the node
:class:`~convstore.stores.cache.DiskCache`'s) and a custom collector reads
them when the endpoint is scraped, or when the stats file is written.

Tiers: ``memory`` (the process's plaintext :class:`ChunkCache`), ``disk``
(the node's disk cache in front of a registry store) and ``origin`` (the
store itself: the registry, or a local store's pack files).

Label cardinality is bounded: ``image`` is the image's ``NAME:TAG``, for the
first :data:`MAX_IMAGES` images a process serves; later ones are summed
under ``image="other"``.  ``cause`` is one of
:data:`convstore.errors.READ_ERROR_CAUSES`' values or ``other``; ``tier`` one
of the three above.  The latency histogram has no image label.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, ProcessCollector, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from .core.repository import Repository
from .errors import ConvstoreError
from .manifest import Manifest
from .reader.chunkcache import ChunkCache
from .reader.fetcher import LATENCY_BUCKETS, ChunkFetcher, FetchStats
from .reader.imagefs import ImageFS
from .stores.cache import CachedChunkStore, DiskCache

log = logging.getLogger(__name__)

#: images with a label of their own; the rest are summed under "other"
MAX_IMAGES = 64
OTHER = "other"
#: an image's start is the START_WINDOW seconds from the first read of its content in this process (the
#: window a start-up profile is recorded over): what was fetched by then is what the start needed
START_WINDOW = 10.0
#: how often the start watcher looks for images whose content was first read
START_POLL = 0.1
#: start records kept in the stats file (the newest)
MAX_START_RECORDS = 100
STATS_FORMAT = 2


def parse_address(spec: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[V6]:PORT``; a bare ``PORT`` means 127.0.0.1) -> (host, port); ValueError if malformed."""
    host, sep, port = spec.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", spec
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{spec!r} is not HOST:PORT (e.g. 127.0.0.1:9101)")
    if ":" in host:
        ipaddress.IPv6Address(host)  # ValueError if not one
    return host, int(port)


@dataclass
class StartRecord:
    """One image start: what it fetched and waited for before it was ready (START_WINDOW)."""

    image: str
    started: float  # epoch seconds
    window: float
    fetched_bytes: int  # stored bytes fetched (disk cache and origin)
    origin_bytes: int  # of which from the origin (the network, for a registry store)
    fraction: float  # plaintext bytes fetched / the image's plaintext bytes
    wait_seconds: float  # time readers spent blocked on fetches


@dataclass
class _Image:
    name: str
    fetcher: ChunkFetcher
    plain_bytes: int
    chunks: int
    first_read: float | None = None  # monotonic time its content was first read (None: not yet)
    first_read_epoch: float = 0.0
    recorded: bool = False


def _merge(a: Any, b: Any) -> Any:
    """Counters added: numbers, lists elementwise, dicts key by key."""
    if isinstance(a, dict) and isinstance(b, dict):
        return {k: _merge(a[k], b[k]) if k in a and k in b else a.get(k, b.get(k)) for k in {**a, **b}}
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [_merge(x, y) for x, y in zip(a, b)]
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a + b
    return b


class ProcessMetrics:
    """The images a process serves, its memory budget and node cache; the
    collector, the endpoint and the stats file read them."""

    def __init__(self, cache: ChunkCache, node_cache: DiskCache | None = None, *,
                 start_window: float = START_WINDOW,
                 origin_counters: Callable[[], dict[str, int]] | None = None) -> None:
        self.cache = cache
        self.node_cache = node_cache
        #: the store's own counters (a registry store: requests, retries, unreachable, timeouts,
        #: fast_failures, recoveries, offline_reads -- stores/cache.py CachedStore.counters)
        self.origin_counters = origin_counters
        self.start_window = start_window
        self.pid = os.getpid()
        self.started = time.time()
        self._lock = threading.Lock()
        self._images: list[_Image] = []
        self._labels: dict[str, str] = {}
        self.starts: list[StartRecord] = []
        self._closed = threading.Event()
        self._watcher: threading.Thread | None = None
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes, CPU, open fds
        self.registry.register(_Collector(self))
        self._start_fetched = Histogram(
            "convstore_start_fetched_bytes", "Stored bytes an image start fetched before it was ready",
            buckets=(1 << 20, 4 << 20, 16 << 20, 64 << 20, 256 << 20, 1 << 30), registry=self.registry)
        self._start_fraction = Histogram(
            "convstore_start_image_fraction", "Fraction of the image's bytes an image start read before it was ready",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0), registry=self.registry)
        self._start_wait = Histogram(
            "convstore_start_network_wait_seconds", "Time an image start's readers waited on fetches before it "
            "was ready", buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=self.registry)

    # -- images -------------------------------------------------------------
    def add_image(self, name: str, fetcher: ChunkFetcher, manifest: Manifest) -> None:
        """Count ``fetcher``'s work under image ``name`` from now on; its start
        is recorded at the end of the start window."""
        with self._lock:
            if name not in self._labels:
                self._labels[name] = name if len(self._labels) < MAX_IMAGES else OTHER
            self._images.append(_Image(name, fetcher, sum(c.size for c in manifest.chunks), len(manifest.chunks)))
            if self._watcher is None:
                self._watcher = threading.Thread(target=self._watch_starts, name="convstore-starts", daemon=True)
                self._watcher.start()

    def _watch_starts(self) -> None:
        """Open an image's start window at the first read of its content (a pull only looks at the tree;
        a container's first process reads), and record the start when it closes.  Reads the counters only."""
        while not self._closed.wait(START_POLL):
            now = time.monotonic()
            with self._lock:
                pending = [i for i in self._images if not i.recorded]
            for img in pending:
                s = img.fetcher.stats
                if img.first_read is None:
                    if s.cache_hits or s.cache_misses:  # a reader asked for a chunk (prefetches do not count)
                        img.first_read, img.first_read_epoch = now, time.time()
                elif now - img.first_read >= self.start_window:
                    img.recorded = True
                    self._record_start(img)

    def _record_start(self, img: _Image) -> None:
        s = FetchStats(**img.fetcher.snapshot())
        rec = StartRecord(img.name, img.first_read_epoch, self.start_window, s.bytes_fetched,
                          s.bytes_fetched - s.disk_bytes,
                          min(1.0, s.plain_bytes_fetched / img.plain_bytes) if img.plain_bytes else 1.0,
                          s.wait_seconds)
        with self._lock:
            self.starts = (self.starts + [rec])[-MAX_START_RECORDS:]
        self._start_fetched.observe(rec.fetched_bytes)
        self._start_fraction.observe(rec.fraction)
        self._start_wait.observe(rec.wait_seconds)
        log.info("start of %s: in its first %.0f s it fetched %d bytes (%d from the origin), %.1f%% of the image, "
                 "and its readers waited %.2f s on fetches", img.name, rec.window, rec.fetched_bytes,
                 rec.origin_bytes, 100 * rec.fraction, rec.wait_seconds)

    def per_image(self) -> dict[str, tuple[FetchStats, int, int]]:
        """Each label's counters summed (stats, plaintext bytes, chunks)."""
        with self._lock:
            images = [(self._labels.get(i.name, OTHER), i) for i in self._images]
        out: dict[str, tuple[FetchStats, int, int]] = {}
        for label, i in images:
            doc = i.fetcher.snapshot()
            if label in out:
                prev, pb, pc = out[label]
                out[label] = (FetchStats(**_merge(prev.to_json(), doc)), pb + i.plain_bytes, pc + i.chunks)
            else:
                out[label] = (FetchStats(**doc), i.plain_bytes, i.chunks)
        return out

    def per_image_background(self) -> dict[str, tuple[int, int, int, int, int]]:
        """Each label's background fetch (convstore.reader.background), summed: chunks total, chunks
        local, stored bytes total, bytes fetched, fetches finished (done or nothing left to fetch)."""
        with self._lock:
            images = [(self._labels.get(i.name, OTHER), i) for i in self._images]
        out: dict[str, tuple[int, int, int, int, int]] = {}
        for label, i in images:
            bg = getattr(i.fetcher, "background", None)
            if bg is None:
                continue
            p = bg.progress()
            row = (p.chunks_total, p.chunks_local, p.bytes_total, p.bytes_fetched, int(p.state in ("done", "local")))
            prev = out.get(label)
            out[label] = row if prev is None else (prev[0] + row[0], prev[1] + row[1], prev[2] + row[2],
                                                   prev[3] + row[3], prev[4] + row[4])
        return out

    def close(self) -> None:
        self._closed.set()

    # -- the endpoint -------------------------------------------------------
    def serve(self, address: str) -> MetricsServer:
        """Serve ``/metrics`` on ``address`` (HOST:PORT) in a thread until closed."""
        host, port = parse_address(address)
        try:
            server, thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as e:
            raise ConvstoreError(f"cannot serve metrics on {address}: {e.strerror or e}") from None
        log.info("metrics on http://%s:%d/metrics", host, server.server_port)
        return MetricsServer(server, thread)

    # -- the stats file -----------------------------------------------------
    def stats_doc(self) -> dict[str, Any]:
        """This process's part of the stats file (``accumulate`` adds earlier processes')."""
        images: dict[str, Any] = {}
        with self._lock:
            for i in self._images:
                doc = i.fetcher.snapshot()
                images[i.name] = _merge(images[i.name], doc) if i.name in images else doc
            starts = [r.__dict__ for r in self.starts]
            # this process's background fetches (reader/background.py): where each image stands, not summed
            background = {i.name: i.fetcher.background.progress().to_json() for i in self._images
                          if getattr(i.fetcher, "background", None) is not None}
        errors: dict[str, int] = {}
        for doc in images.values():
            errors = _merge(errors, doc["read_errors"])  # what readers saw (EIO)
        doc = {"version": STATS_FORMAT, "pid": self.pid, "started": self.started, "updated": time.time(),
               "images": images, "read_errors": errors, "starts": starts, "background": background,
               "memory_cache": {"bytes": self.cache.bytes, "budget": self.cache.budget,
                                "peak_bytes": self.cache.peak_bytes, "evictions": self.cache.evictions}}
        if self.node_cache is not None:
            doc["node_cache"] = {"bytes": self.node_cache.cached_bytes(), "limit": self.node_cache.max_bytes,
                                 "hits": self.node_cache.hits, "misses": self.node_cache.misses}
        return doc


def origin_counters_of(repo: Repository) -> Callable[[], dict[str, int]] | None:
    """The counters of ``repo``'s metadata store and its registry client, where it has them."""
    return getattr(repo.objects, "counters", None)


def node_cache_of(repo: Repository) -> DiskCache | None:
    """The node's disk cache in front of ``repo``'s chunks (a registry store), if any."""
    store = repo.chunks.store
    return store.cache if isinstance(store, CachedChunkStore) else None


@contextlib.contextmanager
def reporting(metrics: ProcessMetrics, address: str | None, stats_file: str | None) -> Iterator[None]:
    """The endpoint (``--metrics-address``) and the stats file (``--stats-file``), while in the ``with``."""
    server = metrics.serve(address) if address else None
    try:
        with StatsFile(stats_file, metrics) if stats_file else contextlib.nullcontext():
            yield
    finally:
        metrics.close()
        if server is not None:
            server.close()


def mount_reporting(repo: Repository, cache: ChunkCache, address: str | None,
                    stats_file: str | None) -> Callable[[ImageFS], AbstractContextManager[None]]:
    """What ``convstore mount`` reports about the image it serves (for :func:`convstore.reader.fuse.mount_image`)."""
    metrics = ProcessMetrics(cache, node_cache_of(repo), origin_counters=origin_counters_of(repo))

    def report(fs: ImageFS) -> AbstractContextManager[None]:
        metrics.add_image(str(fs.entry.ref) if fs.entry else "image", fs.fetcher, fs.manifest)
        return reporting(metrics, address, stats_file)

    return report


class MetricsServer:
    def __init__(self, server: Any, thread: threading.Thread) -> None:
        self.server, self.thread = server, thread
        self.port: int = server.server_port

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class StatsFile:
    """``--stats-file``: a JSON document kept current (every half second while
    it changes, and at the end), 0600 (it names the images a node runs).  It
    is not reset by a restart: a new process adds its counters to those the
    file held (``images``, ``read_errors``) and keeps ``since`` (the first
    process's start) and the newest start records; ``pid``, ``started`` and
    ``updated`` are the current process's."""

    def __init__(self, path: str, metrics: ProcessMetrics) -> None:
        self.path = os.path.abspath(path)
        self.metrics = metrics
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="convstore-stats", daemon=True)
        self.base: dict[str, Any] = {}
        try:
            with open(self.path) as f:
                old = json.load(f)
            if isinstance(old, dict) and old.get("version") == STATS_FORMAT:
                self.base = old
        except (OSError, ValueError):
            pass

    def document(self) -> dict[str, Any]:
        doc = self.metrics.stats_doc()
        base = self.base
        doc["since"] = base.get("since", doc["started"])
        doc["processes"] = base.get("processes", 0) + 1
        doc["images"] = _merge(base.get("images", {}), doc["images"])
        doc["read_errors"] = _merge(base.get("read_errors", {}), doc["read_errors"])
        doc["starts"] = (base.get("starts", []) + doc["starts"])[-MAX_START_RECORDS:]
        return doc

    def __enter__(self) -> StatsFile:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        last = None
        while True:
            stopping = self._done.wait(0.5)
            doc = self.document()
            body = json.dumps({k: v for k, v in doc.items() if k != "updated"}, sort_keys=True)
            if body != last:
                try:
                    fd, tmp = tempfile.mkstemp(prefix=".stats-", dir=os.path.dirname(self.path))
                    with os.fdopen(fd, "w") as f:
                        f.write(json.dumps(doc, indent=1, sort_keys=True) + "\n")
                    os.replace(tmp, self.path)  # mkstemp's 0600
                    last = body
                except OSError as e:
                    log.warning("cannot write the stats file %s: %s", self.path, e.strerror)
            if stopping:
                return


#: a metric family's row: (extra label values after ``image``, value)
_Rows = list[tuple[tuple[str, ...], float]]
_TIERS = ("memory", "disk", "origin")


def _tiers(s: FetchStats, chunks: bool) -> _Rows:
    """Chunks (or bytes) served by each tier (memory: plaintext bytes; disk and origin: stored bytes)."""
    if chunks:
        return list(zip([(t,) for t in _TIERS], (s.cache_hits, s.disk_chunks, s.chunks_fetched - s.disk_chunks)))
    return list(zip([(t,) for t in _TIERS], (s.cache_hit_bytes, s.disk_bytes, s.bytes_fetched - s.disk_bytes)))


#: the per-image metrics, in the order they are exposed: (family, name, help, labels after ``image``,
#: rows of (the image's counters, its plaintext bytes, its chunks))
_IMAGE_METRICS: tuple[tuple[type[CounterMetricFamily | GaugeMetricFamily], str, str, tuple[str, ...],
                            Callable[[FetchStats, int, int], _Rows]], ...] = (
    (CounterMetricFamily, "convstore_fetched_chunks", "Chunks served to readers, by tier (memory: the process's "
     "cache; disk: the node's disk cache; origin: the store)", ("tier",), lambda s, pb, pc: _tiers(s, True)),
    (CounterMetricFamily, "convstore_fetched_bytes", "Bytes served to readers by tier (memory: plaintext; disk "
     "and origin: stored, encrypted bytes)", ("tier",), lambda s, pb, pc: _tiers(s, False)),
    (CounterMetricFamily, "convstore_fetched_plain_bytes", "Plaintext bytes of the chunks fetched from below "
     "memory", (), lambda s, pb, pc: [((), s.plain_bytes_fetched)]),
    (CounterMetricFamily, "convstore_memory_cache_hits", "Chunk reads the memory cache served", (),
     lambda s, pb, pc: [((), s.cache_hits)]),
    (CounterMetricFamily, "convstore_memory_cache_misses", "Chunk reads that waited on a fetch", (),
     lambda s, pb, pc: [((), s.cache_misses)]),
    (CounterMetricFamily, "convstore_read_bytes", "Bytes returned to readers", (),
     lambda s, pb, pc: [((), s.bytes_read)]),
    (CounterMetricFamily, "convstore_read_wait_seconds", "Time readers spent blocked on fetches", (),
     lambda s, pb, pc: [((), s.wait_seconds)]),
    (CounterMetricFamily, "convstore_read_errors", "Reads that failed (EIO), by cause", ("cause",),
     lambda s, pb, pc: [((c,), n) for c, n in sorted(s.read_errors.items())]),
    (CounterMetricFamily, "convstore_fetch_errors", "Chunk fetches (prefetches too) that failed, by cause",
     ("cause",), lambda s, pb, pc: [((c,), n) for c, n in sorted(s.fetch_errors.items())]),
    (CounterMetricFamily, "convstore_prefetched_chunks", "Chunks fetched ahead of readers (readahead, start-up "
     "profile, background fetch)", (), lambda s, pb, pc: [((), s.prefetched_chunks)]),
    (GaugeMetricFamily, "convstore_image_chunks", "Chunks in the image", (), lambda s, pb, pc: [((), pc)]),
    (GaugeMetricFamily, "convstore_image_plain_bytes", "Plaintext bytes of the image's chunks", (),
     lambda s, pb, pc: [((), pb)]),
)

#: the background fetch's metrics by image: (family, name, help, its field in
#: :meth:`ProcessMetrics.per_image_background`'s rows)
_BACKGROUND_METRICS: tuple[tuple[type[CounterMetricFamily | GaugeMetricFamily], str, str, int], ...] = (
    (GaugeMetricFamily, "convstore_background_chunks", "Chunks of the image the background fetch covers", 0),
    (GaugeMetricFamily, "convstore_background_local_chunks", "Of them, chunks in the node cache", 1),
    (CounterMetricFamily, "convstore_background_fetched_bytes", "Stored bytes the background fetch read", 3),
    (GaugeMetricFamily, "convstore_background_done", "1 once the image is local (its background fetch is over)", 4),
)

#: the process's memory cache: (family, name, help, its value)
_MEMORY_METRICS: tuple[tuple[type[CounterMetricFamily | GaugeMetricFamily], str, str,
                             Callable[[ChunkCache], float]], ...] = (
    (GaugeMetricFamily, "convstore_memory_cache_bytes", "Plaintext bytes in the process's chunk cache",
     lambda c: c.bytes),
    (GaugeMetricFamily, "convstore_memory_budget_bytes", "The process's memory budget (--memory-budget)",
     lambda c: c.budget),
    (GaugeMetricFamily, "convstore_memory_cache_peak_bytes", "The most plaintext bytes ever cached at once",
     lambda c: c.peak_bytes),
    (CounterMetricFamily, "convstore_memory_cache_evictions", "Chunks dropped to stay within the budget",
     lambda c: c.evictions),
)

#: the node's disk cache: (family, name, help, its value)
_NODE_CACHE_METRICS: tuple[tuple[type[CounterMetricFamily | GaugeMetricFamily], str, str,
                                 Callable[[DiskCache], float]], ...] = (
    (GaugeMetricFamily, "convstore_node_cache_bytes", "Bytes in the node's disk cache", lambda d: d.cached_bytes()),
    (GaugeMetricFamily, "convstore_node_cache_limit_bytes", "The node disk cache's bound (--cache-size)",
     lambda d: d.max_bytes),
    (CounterMetricFamily, "convstore_node_cache_hits", "Objects the node's disk cache served", lambda d: d.hits),
    (CounterMetricFamily, "convstore_node_cache_misses", "Objects the node's disk cache did not hold",
     lambda d: d.misses),
)


class _Collector(Collector):
    """The metrics, read from the counters at each scrape."""

    def __init__(self, m: ProcessMetrics) -> None:
        self.m = m

    def collect(self) -> Iterator[Metric]:
        m = self.m
        families = [fam(name, doc, labels=["image", *extra]) for fam, name, doc, extra, _rows in _IMAGE_METRICS]
        latency: dict[str, list[int]] = {}
        latency_sum: dict[str, float] = {}
        for label, (s, pb, pc) in sorted(m.per_image().items()):
            for family, (*_, rows) in zip(families, _IMAGE_METRICS):
                for extra_values, value in rows(s, pb, pc):
                    family.add_metric([label, *extra_values], value)
            for tier, counts in s.fetch_seconds.items():
                latency[tier] = _merge(latency.get(tier, [0] * len(counts)), counts)
                latency_sum[tier] = latency_sum.get(tier, 0.0) + s.fetch_seconds_sum.get(tier, 0.0)
        yield from families
        background = [fam(name, doc, labels=["image"]) for fam, name, doc, _field in _BACKGROUND_METRICS]
        for label, row in sorted(m.per_image_background().items()):
            for family, (*_, field) in zip(background, _BACKGROUND_METRICS):
                family.add_metric([label], row[field])
        yield from background
        hist = HistogramMetricFamily("convstore_fetch_seconds", "Time one chunk fetch below memory took, by tier",
                                     labels=["tier"])
        for tier, counts in sorted(latency.items()):
            cum, buckets = 0, []
            for bound, n in zip([*map(str, LATENCY_BUCKETS), "+Inf"], counts):
                cum += n
                buckets.append((bound, cum))
            hist.add_metric([tier], buckets, latency_sum[tier])
        yield hist
        yield from (fam(name, doc, value=value(m.cache)) for fam, name, doc, value in _MEMORY_METRICS)
        if m.origin_counters is not None:
            events = m.origin_counters()
            origin_events = CounterMetricFamily("convstore_origin_events", "The store's client, by event: requests "
                                         "sent, retries, unreachable, timeouts, fast_failures (reads refused at "
                                         "once while the registry is marked down), recoveries, offline_reads "
                                         "(metadata served from the node cache while the registry is "
                                         "unavailable)", labels=["event"])
            for event, n in sorted(events.items()):
                origin_events.add_metric([event], n)
            yield origin_events
        if m.node_cache is not None:
            d = m.node_cache
            yield from (fam(name, doc, value=value(d)) for fam, name, doc, value in _NODE_CACHE_METRICS)
