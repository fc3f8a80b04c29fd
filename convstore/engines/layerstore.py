"""An additional layer store for podman and CRI-O (containers/storage).

containers/storage's overlay driver, given
``additionallayerstores = ["MOUNTPOINT:ref"]`` in storage.conf, looks each
layer of an image being pulled up at::

    MOUNTPOINT/<base64 of the image reference>/<layer blob digest>/
        diff/   the layer's files, as an overlayfs lower directory
        info    JSON: compressed-diff-digest, compressed-size, diff-digest, diff-size, compression
        blob    the layer blob (stat'ed; read only by a push or a save)

and when all three are there it uses ``diff/`` as the layer instead of
pulling the blob.  This module serves that tree over FUSE from a convstore
store: a layer is found by its original blob digest in any ACTIVE image of
the store (a blob digest names its content, so the image reference is only
where the engine met it), and ``diff/`` is that one layer's tree from the
manifest's file index, its files read lazily through the image's chunk
fetcher, whiteouts in overlay form (:func:`convstore.merge.layer_tree`).

The engine tells a store when it starts and stops using a layer by creating
``use`` and removing the layer directory; both answer ENOENT, which
containers/storage takes as "notification understood".  ``blob`` has the
blob's size but refuses reads (EIO): convstore keeps the layer's tar, not the
original compressed bytes.  Like ``convstore run``, the store prefetches an
image's recorded start-up profile (coalesced) when it first serves one of
its layers, then fetches the rest of the image in the background
(convstore.reader.background; ``background``), and records the chunks read
in its first 10 s, merged into the image's profile (convstore.reader.profile).
All images share one memory budget (``--memory-budget``, a
:class:`ChunkCache`); what was fetched is reported by the process's
:class:`~convstore.metrics.ProcessMetrics` (``--metrics-address``,
``--stats-file``).
"""

from __future__ import annotations

import base64
import binascii
import errno
import json
import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

import mfusepy

from ..core.catalog import CatalogEntry
from ..errors import ConvstoreError, ErofsUnsupported, ImageNotFound, StoreError
from ..hardening import private_tempdir
from ..core.lifecycle import ACTIVE
from ..manifest import Manifest
from ..merge import MergedTree, Node, layer_tree
from ..metrics import ProcessMetrics, node_cache_of, origin_counters_of, reporting
from ..oci.media import chain_ids, check_digest
from ..oci.policy import Policy
from ..oci.policy import require as require_policy
from ..paths import components
from ..core.repository import Repository
from ..reader.background import BackgroundConfig, BackgroundFetch, BackgroundProgress, start_fetching
from ..reader.chunkcache import ChunkCache
from ..reader.fetcher import ChunkFetcher
from ..reader.fuse import BackgroundMount, ImageOperations, mount_answers, serve
from ..reader.profile import save_start
from ..service import sdnotify
from ..reader.erofs import ErofsLayout
from ..reader.erofs import build as erofs_build
from ..reader.erofsmount import ErofsMount, mount_erofs
from ..reader.imagefs import PREFETCH_ON_OPEN, ImageFS, Stat

log = logging.getLogger(__name__)
T = TypeVar("T")

#: how often a lookup of an unknown digest may re-read the catalog (new packs appear)
RESCAN_SECONDS = 2.0
#: how often a serving layer store looks for removed or added images: one tag listing (a removed
#: image stops being served); a change in it re-reads the catalog
REVALIDATE_SECONDS = 10.0
#: how often it re-reads the whole catalog anyway (an image packed again or FAILED under the same
#: name): 1 + one request per image on a registry, so not every 10 s on every node of a fleet
FULL_REVALIDATE_SECONDS = 300.0
#: an image with no start-up profile has the chunks read in its first seconds recorded as one
RECORD_SECONDS = 10.0
#: a file of an image opened while its start-up profile is being read waits at most this long for it
PROFILE_WAIT = 5.0
#: the layer trees of this many images (the most recently read first) are built after each scan, in a
#: thread, so an engine's first lookup of a layer (podman's pull) does not wait for it; others on first use
PREBUILD_IMAGES = 16
#: ``1``: each layer's ``diff`` is a symlink to a kernel EROFS mount of it (reader/erofsmount.py; a prototype)
EROFS_ENV = "CONVSTORE_LAYERSTORE_EROFS"
#: of those, the decoded manifests of this many (not open yet) are kept from the scan: opening one then reads its
#: catalog entry only (20-30 ms less for a 5,729-entry image, whose manifest holds ~4 MB of Python objects)
DECODED_IMAGES = 4
_GZIP = 2  # containers/storage's archive.Gzip (compression of the original blob)
_COMPRESSION = {"gzip": _GZIP, "zstd": 4, "none": 0}


@dataclass
class _Layer:
    entry: CatalogEntry
    info: bytes  # the `info` file
    size: int  # the original blob's size


class LayerStore:
    """Layers by blob digest over a store's ACTIVE images, each served once
    as an :class:`ImageFS` of that layer alone (one chunk fetcher per image)."""

    def __init__(self, store: Repository, *, cache: ChunkCache | None = None, policy: Policy | None = None,
                 background: BackgroundConfig | None = None, revalidate: float = REVALIDATE_SECONDS,
                 full_revalidate: float = FULL_REVALIDATE_SECONDS) -> None:
        self.store = store
        self.revalidate, self.full_revalidate = revalidate, full_revalidate  # see watch()
        #: the background fetch of each image served (on by default; BackgroundConfig(enabled=False): off)
        self.background = background or BackgroundConfig.from_env()
        self._background: dict[str, BackgroundFetch] = {}
        self.policy = policy  # the node's trust policy: images it refuses are not served
        self.cache = cache if cache is not None else ChunkCache()  # one memory budget for every image served
        self.metrics = ProcessMetrics(self.cache, node_cache_of(store), origin_counters=origin_counters_of(store))
        self._lock = threading.Lock()
        self._layers: dict[str, _Layer] = {}
        self._chains: dict[str, tuple[str, str]] = {}  # chain ID -> (blob digest, parent chain ID or "")
        self._scanned = 0.0
        self._scanning = threading.Lock()  # one scan at a time; a lookup that misses waits for the running one
        self._manifests: dict[str, tuple[CatalogEntry, Manifest, ChunkFetcher]] = {}
        self._trees: dict[str, ImageFS] = {}
        self._recording: dict[str, threading.Timer] = {}
        self._opening = threading.Lock()  # one image opened at a time (outside _lock: it makes requests)
        self._warming: set[str] = set()  # layers whose image is being opened ahead (warm)
        self._queued: dict[str, threading.Event] = {}  # manifest digest -> set once its profile is queued
        self._closed = False
        #: (manifest digest, layer index) -> that layer's tree, built ahead from the scan's manifests (prebuild)
        self._built: dict[tuple[str, int], Future[MergedTree]] = {}
        #: manifest digest -> the manifest the last scan decoded (and authenticated), for the most recent
        #: images not open yet (DECODED_IMAGES): opening one re-reads its catalog entry, not its manifest
        self._decoded: dict[str, Manifest] = {}
        self._seen_refs: frozenset[str] | None = None  # the catalog's keys at the last look (watch)
        #: where each layer's EROFS mount goes (EROFS_ENV), else None: ``diff`` is the FUSE tree
        self.erofs_dir = private_tempdir("convstore-erofs-") if os.environ.get(EROFS_ENV) == "1" else None
        self._erofs: dict[str, ErofsMount] = {}
        #: (manifest digest, layer index) -> (tree root, its EROFS layout), built ahead after a scan
        self._layouts: dict[tuple[str, int], Future[tuple[Node, ErofsLayout]]] = {}
        self._erofs_lock = threading.Lock()  # one layer mounted at a time
        #: layers EROFS cannot hold (ErofsUnsupported): their ``diff`` stays the FUSE tree
        self.erofs_refused: set[str] = set()

    def scan(self) -> None:
        """Index the blob digests and chain IDs of every ACTIVE image (manifests
        are authenticated as they load; a digest that is not sha256 hex is
        never used, as it becomes part of paths and mount options)."""
        with self._scanning:
            self._scan()

    def _scan(self) -> None:
        with self._lock:
            self._scanned = time.monotonic()  # one rescan at a time, however many lookups miss
        found: dict[str, _Layer] = {}
        chains: dict[str, tuple[str, str]] = {}
        loaded: list[Manifest] = []
        served: list[tuple[CatalogEntry, Manifest]] = []
        for e in self.store.catalog.complete():
            if e.state != ACTIVE:
                continue
            try:
                m = self.store.manifests.load(e)
                require_policy(self.policy, m, str(e.ref))
                digests = [(check_digest(lr.digest), check_digest(lr.diff_id)) for lr in m.layers]
            except ConvstoreError as err:
                log.warning("layer store: skipping %s: %s", e.ref, err)
                continue
            loaded.append(m)
            served.append((e, m))
            for lr, (digest, _), (chain, parent) in zip(m.layers, digests, chain_ids([d for _, d in digests])):
                info = {"compressed-diff-digest": digest, "compressed-size": lr.size, "diff-digest": lr.diff_id,
                        "diff-size": lr.uncompressed_size, "compression": _COMPRESSION.get(lr.compression, 0)}
                found.setdefault(digest, _Layer(e, json.dumps(info).encode() + b"\n", lr.size or 0))
                chains.setdefault(chain, (digest, parent))
        with self._lock:
            doomed = set(self._manifests) - {lay.entry.manifest_digest for lay in found.values()}
        if doomed:
            self._check_store()  # a registry that lost the repository is unreachable, not empty
        with self._lock:
            self._layers = found
            self._chains = chains
            self._scanned = time.monotonic()
            dropped = self._drop_removed()
            todo = self._plan_prebuild(served)
        if todo:
            threading.Thread(target=self._prebuild, args=(todo,), daemon=True, name="convstore-layers-prebuild").start()
            if self.erofs_dir is not None:
                with self._lock:
                    jobs = [(self._layouts.setdefault(k, Future()), f, m.layers[i].digest)
                            for k, f in self._built.items() for m, i, t in todo if f is t]
                    for gone in [k for k in self._layouts if k not in self._built]:
                        del self._layouts[gone]
                threading.Thread(target=self._prebuild_erofs, args=(jobs,), daemon=True,
                                 name="convstore-layers-erofs").start()
        if dropped:
            live = {c.cid for m in loaded for c in m.chunks}
            for manifest, f in dropped:
                f.close()
                for c in manifest.chunks:  # the node cache keeps only what a served image still uses
                    if c.cid not in live:
                        self.store.chunk_store.evict(c.cid)

    def _plan_prebuild(self, served: list[tuple[CatalogEntry, Manifest]]
                       ) -> list[tuple[Manifest, int, Future[MergedTree]]]:
        """The layer trees to build ahead (under the lock): those of the ``PREBUILD_IMAGES`` images read
        most recently; trees of images no longer served are forgotten."""
        keep = sorted(served, key=lambda em: -em[0].last_read)[:PREBUILD_IMAGES]
        # the decoded manifests of the DECODED_IMAGES most recent not open yet (an open one keeps its own)
        self._decoded = {e.manifest_digest: m for e, m in keep
                         if e.manifest_digest and e.manifest_digest not in self._manifests}
        self._decoded = dict(list(self._decoded.items())[:DECODED_IMAGES])
        want = {(e.manifest_digest or "", i): (m, i) for e, m in keep for i in range(len(m.layers))}
        for key in [k for k in self._built if k not in want]:
            del self._built[key]
        todo = []
        for key, (m, i) in want.items():
            if key not in self._built:
                fut: Future[MergedTree] = Future()
                self._built[key] = fut
                todo.append((m, i, fut))
        return todo

    @staticmethod
    def _prebuild(todo: list[tuple[Manifest, int, Future[MergedTree]]]) -> None:
        for m, i, fut in todo:
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(layer_tree(m.layers[i].entries, i))
                except BaseException as e:  # noqa: BLE001  tree() meets it (a hostile tree is refused there)
                    fut.set_exception(e)

    def _drop_removed(self) -> list[tuple[Manifest, ChunkFetcher]]:
        """Forget the trees and fetchers of images no longer ACTIVE here (removed, packed again, FAILED):
        their layers stop being served (a layer another image also has is served from that one); the
        rest are untouched.  Under the lock; the (manifest, fetcher) of each image dropped."""
        for d, fs in list(self._trees.items()):
            lay = self._layers.get(d)
            if lay is None or lay.entry.manifest_digest != getattr(fs.entry, "manifest_digest", None):
                del self._trees[d]
        live = {lay.entry.manifest_digest for lay in self._layers.values()}
        dropped = []
        for key in [k for k in self._manifests if k not in live]:
            timer = self._recording.pop(key, None)
            if timer is not None:
                timer.cancel()
            _entry, manifest, fetcher = self._manifests.pop(key)
            self._queued.pop(key, None)
            dropped.append((manifest, fetcher))
            log.info("layer store: no longer serving %s (removed or replaced)", key)
        return dropped

    def _check_store(self) -> None:
        """Before images stop being served: the store is still the one opened (``store.json`` there,
        same id).  A registry that answers 404 for everything (restarted on empty storage, a wrong
        route) lists an empty catalog: that is an unreachable store, not a removal of every image."""
        try:
            doc = json.loads(self.store.objects.get("store.json"))
        except (KeyError, ValueError) as e:
            raise StoreError(f"the store no longer holds its store.json ({type(e).__name__}): treated as "
                             f"unreachable, nothing stops being served") from None
        if not isinstance(doc, dict) or doc.get("id") != self.store.id:
            raise StoreError(f"the store is no longer store {self.store.id}: treated as unreachable, nothing "
                             f"stops being served")

    def _refs_changed(self) -> bool:
        """Whether the catalog's names changed since the last look (one tag listing on a registry)."""
        refs = frozenset(self.store.objects.list("refs"))
        changed, self._seen_refs = refs != self._seen_refs, refs
        return changed

    def watch(self, done: threading.Event, every: float | None = None, full_every: float | None = None) -> None:
        """Until ``done``: every ``every`` seconds look whether images were removed or added (one tag
        listing), re-reading the catalog if so, and every ``full_every`` seconds anyway: a removed
        image stops being served within ``every`` even if no lookup misses (a service's background
        thread)."""
        every = self.revalidate if every is None else every
        full_every = self.full_revalidate if full_every is None else full_every
        last_full = time.monotonic()
        while not done.wait(every):
            try:
                if self._refs_changed() or time.monotonic() - last_full >= full_every:
                    self.scan()
                    last_full = time.monotonic()
            except ConvstoreError as e:  # the store is unreachable: keep serving what was known
                log.warning("layer store: cannot re-read the catalog: %s", e)

    def _find(self, pick: Callable[[], T | None]) -> T | None:
        """``pick()`` under the lock; on a miss, once the index is old enough, again after a rescan."""
        with self._lock:
            hit = pick()
        if hit is not None:
            return hit
        # a miss waits for a scan under way (its index may hold the name: concurrent first lookups after a
        # start or a failover otherwise answered ENOENT while one of them scanned), then rescans if stale
        with self._scanning:
            with self._lock:
                hit = pick()
                stale = time.monotonic() - self._scanned > RESCAN_SECONDS
            if hit is None and stale:
                self._scan()
                with self._lock:
                    hit = pick()
        return hit

    def layer(self, digest: str) -> _Layer | None:
        return self._find(lambda: self._layers.get(digest))

    def chain(self, chain_id: str) -> tuple[str, str] | None:
        """(blob digest, parent chain ID) of the layer a chain ID ends with, if stored."""
        return self._find(lambda: self._chains.get(chain_id))

    def served(self, digest: str) -> ImageFS | None:
        """The tree serving layer ``digest`` now, if it was built (no scan, no open)."""
        with self._lock:
            return self._trees.get(digest)

    def known(self) -> list[str]:
        with self._lock:
            return list(self._layers)

    def tree(self, digest: str) -> ImageFS:
        """The layer's ``diff/`` tree (built on first use; the image's read is recorded then).  The image
        is opened (catalog entry, manifest, start-up profile: requests to the store) outside the index's
        lock, so lookups of other layers and the snapshotter's calls do not wait for it."""
        with self._lock:
            fs = self._trees.get(digest)
            if fs is not None:
                return fs
            lay = self._layers.get(digest)
            if lay is None:
                raise ImageNotFound(f"layer {digest} is no longer in the store")
            got = self._manifests.get(lay.entry.manifest_digest or "")
        if got is None:
            got = self._open(lay.entry)
        index = next((i for i, lr in enumerate(got[1].layers) if lr.digest == digest), None)
        if index is None:
            raise ImageNotFound(f"layer {digest} is no longer in {got[0].ref}")
        with self._lock:
            built = self._built.get((got[0].manifest_digest or "", index))
        fs = ImageFS(got[1], got[2], PREFETCH_ON_OPEN, layer=index, tree=built.result() if built else None)
        fs.entry = got[0]
        with self._lock:
            return self._trees.setdefault(digest, fs)

    def erofs_path(self, digest: str) -> str:
        assert self.erofs_dir is not None
        return os.path.join(self.erofs_dir, digest.replace(":", "-"))

    def erofs(self, digest: str) -> str:
        """The EROFS mount of the layer's tree (mounted on first use, with its layout built ahead if it was)."""
        with self._erofs_lock:
            if digest not in self._erofs:
                where = self.erofs_path(digest)
                os.makedirs(where, exist_ok=True)
                fs = self.tree(digest)
                index = next(i for i, lr in enumerate(fs.manifest.layers) if lr.digest == digest)
                with self._lock:
                    ahead = self._layouts.get((fs.entry.manifest_digest or "" if fs.entry else "", index))
                layout = None
                if ahead is not None:
                    try:
                        root, built = ahead.result()  # being built: wait, rather than build it twice
                        layout = built if root is fs.root else None
                    except BaseException:  # noqa: BLE001  built here (and refused, if so)
                        layout = None
                try:
                    self._erofs[digest] = mount_erofs(fs, where, layout=layout)
                except ErofsUnsupported:
                    self.erofs_refused.add(digest)  # the next look at diff gets the FUSE tree
                    raise
        return self.erofs_path(digest)

    def _prebuild_erofs(self, jobs: list[tuple[Future[tuple[Node, ErofsLayout]], Future[MergedTree], str]]) -> None:
        """The EROFS layouts of the trees built ahead, so an engine's first look at ``diff`` only mounts;
        a layer EROFS cannot hold is known before the engine looks (its ``diff`` stays the FUSE tree)."""
        for out, tree_fut, digest in jobs:
            if out.set_running_or_notify_cancel():
                try:
                    tree = tree_fut.result()
                    out.set_result((tree.root, erofs_build(tree.root)))
                except BaseException as e:  # noqa: BLE001  erofs() builds it again (and meets the refusal)
                    if isinstance(e, ErofsUnsupported):
                        log.warning("layer store: %s stays a FUSE tree: %s", digest, e)
                        self.erofs_refused.add(digest)
                    out.set_exception(e)

    def _open(self, scanned: CatalogEntry) -> tuple[CatalogEntry, Manifest, ChunkFetcher]:
        """The image ``scanned`` names, opened once (one open at a time: two first lookups of its layers
        share it), its start-up profile's prefetch started."""
        with self._opening:
            with self._lock:
                got = self._manifests.get(scanned.manifest_digest or "")
            if got is not None:
                return got
            # the profile (one request) is read while the read gate reads the catalog entry (another)
            profile: Future[list[tuple[int, int]] | None] = Future()
            threading.Thread(target=self._read_profile, args=(scanned, profile), daemon=True,
                             name="convstore-layers-profile").start()
            entry = self.store.open_entry(scanned.ref)  # the read gate: a read is recorded
            with self._lock:  # the manifest the scan decoded, when the entry still names it (same digest)
                manifest = self._decoded.get(entry.manifest_digest) if entry.manifest_digest else None
            if manifest is None:
                manifest = self.store.manifests.load(entry)
            require_policy(self.policy, manifest, str(entry.ref))  # packed again since the scan: check again
            key = entry.manifest_digest or ""  # the image may have been packed again since the scan
            with self._lock:
                got = self._manifests.get(key)
            if got is None:
                fetcher = ChunkFetcher(self.store.chunks, manifest, cache=self.cache)
                got = (entry, manifest, fetcher)
                queued = threading.Event()
                with self._lock:
                    self._manifests[key] = got
                    self._queued[key] = queued
                    self.metrics.add_image(str(entry.ref), fetcher, manifest)
                    self._start_recording(key, fetcher)
                # the profile (a request) is read and queued in a thread: the engine's lookup returns
                # now; a file of the image is opened only once it is queued (wait_profile)
                if entry.manifest_digest != scanned.manifest_digest:
                    profile = Future()  # packed again since the scan: the new version's profile
                    threading.Thread(target=self._read_profile, args=(entry, profile), daemon=True,
                                     name="convstore-layers-profile").start()
                threading.Thread(target=self._start_profile, args=(key, entry, fetcher, profile, queued),
                                 daemon=True, name="convstore-layers-prefetch").start()
            return got

    def wait_profile(self, fs: ImageFS, timeout: float = PROFILE_WAIT) -> None:
        """Until the start-up profile of ``fs``'s image is queued (its chunks claimed by coalesced
        fetches), so a file read does not fetch a profile chunk alone first."""
        with self._lock:
            queued = self._queued.get(getattr(fs.entry, "manifest_digest", None) or "")
        if queued is not None and not queued.wait(timeout):
            log.warning("layer store: the start-up profile of %s is not queued after %g s; reading on", fs.entry,
                        timeout)

    def warm(self, digest: str) -> None:
        """Open the image that serves layer ``digest`` now, in a thread, unless it is open: its start-up
        profile's prefetch then overlaps the engine's own set-up (a containerd Prepare of the layer, podman
        looking the layer up while it pulls) instead of starting at the first file the container reads."""
        with self._lock:
            if digest in self._trees or digest in self._warming or digest not in self._layers:
                return
            self._warming.add(digest)

        def go() -> None:
            try:
                self.tree(digest)
            except ConvstoreError as e:  # a lookup of the layer meets it again, and says so
                log.warning("layer store: cannot open the image of layer %s ahead: %s", digest, e)
            finally:
                with self._lock:
                    self._warming.discard(digest)

        threading.Thread(target=go, daemon=True, name="convstore-layers-warm").start()

    def _start_recording(self, key: str, fetcher: ChunkFetcher) -> None:
        """What this start reads in its first seconds is recorded and merged
        into the image's profile.  Under the lock."""
        fetcher.start_recording()
        timer = threading.Timer(RECORD_SECONDS, self._save_profile, args=(key,))
        timer.daemon = True
        self._recording[key] = timer
        timer.start()

    def _read_profile(self, entry: CatalogEntry, out: Future[list[tuple[int, int]] | None]) -> None:
        """``entry``'s start-up profile into ``out`` (None: none, or unreadable: it is a hint)."""
        try:
            out.set_result(self.store.manifests.load_profile(entry))
        except Exception as e:  # noqa: BLE001  the start goes on without it
            log.warning("layer store: cannot read the start-up profile of %s: %s", entry.ref, e)
            out.set_result(None)

    def _start_profile(self, key: str, entry: CatalogEntry, fetcher: ChunkFetcher,
                       read: Future[list[tuple[int, int]] | None], queued: threading.Event) -> None:
        """The image's start-up profile (as ``convstore run`` records and uses
        it) prefetched in coalesced batches when there is one, then the rest of
        the image in the background; ``queued`` is set once its fetches are."""
        try:
            profile = read.result()
            # queueing takes ~10 ms (claims, sorting, the pool's threads): not under the index's lock, which
            # the engine's lookups of the image's layers (tree()) take meanwhile
            if not self._serving(key, fetcher):
                return
            try:
                bg = start_fetching(fetcher, profile, self.background, str(entry.ref))
            except RuntimeError:  # the fetcher closed meanwhile (its pool takes nothing more)
                return
            with self._lock:
                live = not self._closed and self._manifests.get(key, (None, None, None))[2] is fetcher
                if live:
                    self._background[key] = bg
            if not live:  # dropped or closed while it was queued: the rest of the image is not fetched
                bg.stop()
        finally:
            queued.set()

    def _serving(self, key: str, fetcher: ChunkFetcher) -> bool:
        """Whether ``fetcher`` still serves image ``key`` (not dropped by a rescan, the store not closed)."""
        with self._lock:
            return not self._closed and self._manifests.get(key, (None, None, None))[2] is fetcher

    def _save_profile(self, key: str) -> None:
        with self._lock:
            self._recording.pop(key, None)
            entry, _, fetcher = self._manifests[key]
            recorded = fetcher.stop_recording()
        st = fetcher.refresh_requests()
        log.info("layer store: %s: %d chunks read in its first %g s, %d registry requests (%d profile chunks in "
                 "%d coalesced reads)", entry.ref, len(recorded), RECORD_SECONDS, st.requests, st.profile_chunks,
                 st.profile_batches)
        save_start(self.store, entry, recorded)

    def progress(self) -> dict[str, BackgroundProgress]:
        """The background fetch of each image served, by image reference."""
        with self._lock:
            return {str(self._manifests[k][0].ref): b.progress() for k, b in self._background.items()}

    def stats(self) -> dict[str, Any]:
        with self._lock:
            out: dict[str, Any] = {}
            for key, (e, _, f) in self._manifests.items():
                doc: dict[str, Any] = dict(f.refresh_requests().to_json())
                out[str(e.ref)] = doc
                bg = self._background.get(key)
                if bg is not None:
                    doc["background"] = bg.progress().to_json()
            return out

    def close(self) -> None:
        """Save the profiles still being recorded, stop the fetchers."""
        with self._erofs_lock:
            for m in self._erofs.values():
                m.close()
                try:
                    os.rmdir(m.where)
                except OSError:
                    pass
            self._erofs.clear()
            if self.erofs_dir is not None:
                try:
                    os.rmdir(self.erofs_dir)
                except OSError:
                    pass
        with self._lock:
            pending = list(self._recording.items())
        for key, timer in pending:
            timer.cancel()
            self._save_profile(key)
        with self._lock:
            self._closed = True  # a profile still being read queues nothing on a closed fetcher
            for _, _, f in self._manifests.values():
                f.close()
        self.metrics.close()


_DIR = stat.S_IFDIR | 0o555
_FILE = stat.S_IFREG | 0o444


class LayerStoreOperations(ImageOperations):
    """The tree containers/storage reads, over :class:`LayerStore`."""

    #: served by the low-level server as root, with failover (reader/kfuse.py PathServer)
    kfuse_paths = "layerstore"

    def __init__(self, layers: LayerStore) -> None:
        super().__init__(None)
        self.layers = layers
        self._t0 = time.time_ns()

    # -- paths --------------------------------------------------------------
    def _split(self, path: str) -> list[str]:
        parts = components(path)
        if parts:
            try:
                base64.b64decode(parts[0], validate=True)
            except (binascii.Error, ValueError):
                raise mfusepy.FuseOSError(errno.ENOENT) from None
        if len(parts) >= 2:
            if not parts[1].startswith("sha256:") or self.layers.layer(parts[1]) is None:
                raise mfusepy.FuseOSError(errno.ENOENT)
            if len(parts) >= 3 and parts[2] not in ("diff", "info", "blob"):
                raise mfusepy.FuseOSError(errno.ENOENT)  # `use` among them: "notification understood"
            if len(parts) > 3 and parts[2] != "diff":
                raise mfusepy.FuseOSError(errno.ENOTDIR)
        return parts

    def _target(self, path: str) -> tuple[ImageFS, str]:
        parts = self._split(path)
        if len(parts) < 3 or parts[2] != "diff":
            raise mfusepy.FuseOSError(errno.EINVAL)
        try:
            return self.layers.tree(parts[1]), "/" + "/".join(parts[3:])
        except ConvstoreError as e:
            log.error("layer store: cannot serve %s: %s", parts[1], e)
            raise mfusepy.FuseOSError(errno.EIO) from None

    # -- a layer's diff/ served node by node (kfuse PathServer) -----------------
    def subtree(self, path: str) -> tuple[str, ImageFS] | None:
        """(layer digest, its tree) when ``path`` is a layer's ``diff/``: the server answers below it by node."""
        parts = self._split(path)
        if len(parts) != 3 or parts[2] != "diff":
            return None
        return parts[1], self._target(path)[0]

    def subtree_current(self, digest: str, fs: ImageFS) -> bool:
        """Whether ``fs`` still serves layer ``digest`` (not dropped with its image by a rescan)."""
        return self.layers.served(digest) is fs

    def open_node(self, fs: ImageFS, node: Node, flags: int) -> int:
        """:meth:`open` of a file of a layer's tree, found by node."""
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise mfusepy.FuseOSError(errno.EROFS)
        self.layers.wait_profile(fs)
        fs.opened(node)
        return self._new_handle((fs, node))

    def _layer(self, digest: str) -> _Layer:
        lay = self.layers.layer(digest)
        if lay is None:  # gone with a rescan since the path was checked
            raise mfusepy.FuseOSError(errno.ENOENT)
        return lay

    def _is_tree(self, parts: list[str]) -> bool:
        return len(parts) >= 3 and parts[2] == "diff"

    def _synthetic(self, parts: list[str]) -> bytes | None:
        """The bytes of a synthetic file (None for a directory)."""
        if len(parts) == 3 and parts[2] == "info":
            return self._layer(parts[1]).info
        return None

    # -- callbacks ----------------------------------------------------------
    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        parts = self._split(path)
        if len(parts) == 3 and parts[2] == "diff" and self.layers.erofs_dir is not None \
                and parts[1] not in self.layers.erofs_refused:
            return Stat(stat.S_IFLNK | 0o777, 1, 1, 0, 0, len(self.layers.erofs_path(parts[1])), self._t0, 0).as_dict()
        if self._is_tree(parts):
            return super().getattr(path, fh)
        if len(parts) == 3 and parts[2] == "blob":
            size = self._layer(parts[1]).size
        else:
            data = self._synthetic(parts)
            if data is None:
                return Stat(_DIR, 1, 2, 0, 0, 0, self._t0, 0).as_dict()
            size = len(data)
        return Stat(_FILE, 1, 1, 0, 0, size, self._t0, 0).as_dict()

    def readdir(self, path: str, fh: int) -> list[str | tuple[str, int, int]]:
        parts = self._split(path)
        if self._is_tree(parts):
            return super().readdir(path, fh)
        if not parts:
            return [".", ".."]
        if len(parts) == 1:
            return [".", "..", *sorted(self.layers.known())]
        if len(parts) == 2:
            return [".", "..", "diff", "info", "blob"]
        raise mfusepy.FuseOSError(errno.ENOTDIR)

    def readlink(self, path: str) -> str:
        parts = self._split(path)
        if len(parts) == 3 and parts[2] == "diff" and self.layers.erofs_dir is not None \
                and parts[1] not in self.layers.erofs_refused:
            try:
                return self.layers.erofs(parts[1])
            except ConvstoreError as e:
                log.error("layer store: cannot mount %s with EROFS: %s", parts[1], e)
                raise mfusepy.FuseOSError(errno.EIO) from None
        if not self._is_tree(parts):
            raise mfusepy.FuseOSError(errno.EINVAL)
        return super().readlink(path)

    def access(self, path: str, amode: int) -> int:
        parts = self._split(path)
        if self._is_tree(parts):
            return super().access(path, amode)
        if amode & os.W_OK:
            raise mfusepy.FuseOSError(errno.EROFS)
        return 0

    def open(self, path: str, flags: int) -> int:
        parts = self._split(path)
        if self._is_tree(parts):
            self.layers.wait_profile(self._target(path)[0])
            return super().open(path, flags)
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise mfusepy.FuseOSError(errno.EROFS)
        if len(parts) == 3 and parts[2] == "blob":
            return self._new_handle(None)
        data = self._synthetic(parts)
        if data is None:
            raise mfusepy.FuseOSError(errno.EISDIR)
        self.layers.warm(parts[1])  # the engine reads the layer's info (pulling it): open its image now
        return self._new_handle(data)

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        h = self._handles.get(fh, False)
        if isinstance(h, bytes):
            return h[offset : offset + size]
        if h is None:  # the blob: convstore does not keep the original compressed bytes
            raise mfusepy.FuseOSError(errno.EIO)
        return super().read(path, size, offset, fh)

    def getxattr(self, path: str, name: str, position: int = 0) -> bytes:
        if not self._is_tree(self._split(path)):
            raise mfusepy.FuseOSError(errno.ENODATA)
        return super().getxattr(path, name, position)

    def listxattr(self, path: str) -> list[str]:
        if not self._is_tree(self._split(path)):
            return []
        return super().listxattr(path)

    def create(self, path: str, mode: int, fi: Any = None) -> int:
        raise mfusepy.FuseOSError(errno.ENOENT)  # `use`: the engine's "I use this layer"

    def rmdir(self, path: str) -> int:
        raise mfusepy.FuseOSError(errno.ENOENT)  # the engine's "I released this layer"

    def statfs(self, path: str) -> dict[str, int]:
        return {"f_bsize": 4096, "f_frsize": 4096, "f_blocks": 0, "f_bfree": 0, "f_bavail": 0, "f_files": 0,
                "f_ffree": 0, "f_namemax": 255}


class LayerMount:
    """A layer store's tree served by this process at ``mountpoint`` (in a
    thread, while in a ``with``): the containerd snapshotter's convstore
    layers are its ``diff/`` directories."""

    def __init__(self, layers: LayerStore, mountpoint: str) -> None:
        self.layers = layers
        self.mountpoint = os.path.abspath(mountpoint)
        # hold: a restarted snapshotter takes the mount over, its containers' reads go on
        self._mount = BackgroundMount(None, self.mountpoint, LayerStoreOperations(layers), hold=True)

    def diff_dir(self, digest: str) -> str:
        """The directory of layer ``digest``'s files (under the image reference ``containerd``: any serves)."""
        return os.path.join(self.mountpoint, base64.b64encode(b"containerd").decode(), digest, "diff")

    def __enter__(self) -> LayerMount:
        self._mount.__enter__()
        self._done = threading.Event()
        self._watcher = threading.Thread(target=self.layers.watch, args=(self._done,), daemon=True,
                                         name="convstore-layers-watch")
        self._watcher.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._watcher.join(timeout=30)
        self._mount.__exit__(*exc)


def serve_layerstore(layers: LayerStore, mountpoint: str, stats_file: str | None = None,
                     metrics_address: str | None = None) -> None:
    """Serve ``layers`` at ``mountpoint`` until unmounted (then closes them),
    reporting on ``metrics_address`` and in ``stats_file`` if given."""
    sdnotify.status("scanning the store")
    layers.scan()
    done = threading.Event()
    threading.Thread(target=layers.watch, args=(done,), daemon=True, name="convstore-layers-watch").start()
    try:
        with reporting(layers.metrics, metrics_address, stats_file):
            serve(None, mountpoint, LayerStoreOperations(layers), read_only=False,
                  on_ready=lambda: sdnotify.serving(f"serving the layer store at {mountpoint}",
                                                    lambda: mount_answers(mountpoint), log))
    finally:
        sdnotify.stopping(f"unmounted the layer store from {mountpoint}")
        done.set()
        layers.close()
