"""The :class:`Repository`: one opened store's state and parts, below the
operations.

It holds the object and chunk stores, the store's identity and metadata key
(:mod:`convstore.core.identity`), the catalog, the convergence domains, the sealed
manifests and layer index, the chunk seam, this client's trust state and the
audit log; and the few methods that span parts: the lifecycle calls of a pack
(:meth:`begin_pack`, :meth:`finish_pack`, :meth:`abort_pack`), the read gate
(:meth:`open_image`), and the gc guard.  Operations call a part for what the
part owns (``repo.catalog.entry(ref)``, ``repo.manifests.load(e)``,
``repo.chunks.read(c)``) and the repository only for what spans parts.

Publication order (what makes a crash at any point harmless): chunks are
written, then made durable together; then the sealed manifest; then the
catalog entry, atomically.  An image is visible only through its catalog
entry, so a half-written image is never visible.  Orphaned chunks and
manifests are harmless garbage.

The core starts no process: the re-pack of an INACTIVE image that a read
finds is started by the :attr:`Repository.reactivator` its opener gives it
(the :class:`convstore.Store` facade and the background worker give one
that spawns a worker).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import replace
from typing import TYPE_CHECKING, Any, TypeVar

import platformdirs

from . import lifecycle
from .catalog import ACTIVE, FAILED, INACTIVE, PENDING, Catalog, CatalogEntry, iso, pid_alive
from .chunks import Chunks
from .domains import DEFAULT_DOMAIN, Domain, Domains
from ..errors import (
    ConvstoreError,
    ImageFailed,
    ImageInactive,
    ImageNotFound,
    ImagePending,
    InvalidReference,
    KeyFileMissing,
    SourceChanged,
    SourceNotFound,
    StoreError,
)
from ..keys import KeyProvider, open_key
from ..keys.audit import AUDIT_LOG, AuditedKeyProvider, parse_audit
from ..manifest import LayerRecord, Manifest
from .manifests import ManifestStore
from ..options import StoreOptions, is_registry_url, is_remote_url, is_s3_url, resolve_store_location
from ..refs import ImageRef
from .identity import StoreIdentity, no_store
from .leases import PACK_WAIT, Leases
from ..stores.base import ChunkStore, ObjectStore
from ..stores.local import LocalChunkStore, LocalStore
from .trust import TrustState, check_location, default_state_dir

if TYPE_CHECKING:
    from ..stores.slow import Link

DEFAULT_INACTIVE_AFTER = 14 * 86400.0
READ_STAMP_INTERVAL = 3600.0  # last_read is written at most this often
GC_LOCK = "gc"  # held shared by packs and copies, exclusively by gc and rekey

R = TypeVar("R", bound="Repository")


def default_cache_dir(url: str) -> str:
    """The local cache of the registry or S3 store at ``url``."""
    return os.path.join(platformdirs.user_cache_dir("convstore"), "s3" if is_s3_url(url) else "registry",
                        hashlib.sha256(url.encode()).hexdigest()[:16])


def read_audit_log(options: StoreOptions, since: str | None = None,
                   image: str | None = None) -> list[dict[str, Any]]:
    """The audit log of the store ``options`` name; reading it needs no key.
    A local store keeps it inside; a registry store's clients each keep theirs
    beside their cache (a registry has no append)."""
    path = resolve_store_location(options.path)
    if is_remote_url(path):
        log_path = os.path.join(options.cache_dir or default_cache_dir(path), AUDIT_LOG)
    else:
        log_path = os.path.join(path, AUDIT_LOG)
    try:
        with open(log_path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        if not os.path.isdir(os.path.dirname(os.path.dirname(log_path))):
            raise StoreError(f"no store at {path}") from None
        return []
    return parse_audit(data, since, image)


class Repository:
    """One opened store.  Open with :meth:`open` or :meth:`open_with`."""

    def __init__(self, objects: ObjectStore, key: KeyProvider, *, chunk_store: ChunkStore,
                 clock: Callable[[], float] = time.time,
                 inactive_after: float = DEFAULT_INACTIVE_AFTER, key_cache_ttl: float = 300.0,
                 options: StoreOptions | None = None, state_dir: str | None = None, allow_rollback: bool = False,
                 create: bool = True, reactivator: Callable[[CatalogEntry], None] | None = None):
        self.objects = objects
        self.chunk_store = chunk_store
        #: the simulated link of a throttled() view (measurement), else None
        self.link: Link | None = None
        self.key: KeyProvider = key if isinstance(key, AuditedKeyProvider) else \
            AuditedKeyProvider(key, self.record_audit, ttl=key_cache_ttl)
        self.clock = clock
        self.inactive_after = inactive_after
        #: how this store was opened: what a background worker inherits
        self.options = options or StoreOptions(path=getattr(objects, "root", None), key=self.key.spec)
        #: called with the (authenticated) entry of an INACTIVE image to start its re-pack
        self.reactivator: Callable[[CatalogEntry], None] = reactivator or self.start_reactivation
        #: store.json: the id and the metadata key
        self.ident = StoreIdentity(objects, self.key, create=create, where=self.options.path or "this store")
        self.id = self.ident.id
        #: rollback protection: the newest versions this client has seen (see convstore.core.trust)
        sdir = state_dir or (options.state_dir if options else None) or default_state_dir()
        self.trust = TrustState(sdir, self.id, allow_rollback=allow_rollback)
        location = self.options.path or getattr(objects, "root", None)
        if location:
            check_location(sdir, location, self.id, created=self.ident.created, allow=allow_rollback)
        self._wire()

    def _wire(self) -> None:
        """The parts, over this view's object and chunk stores."""
        #: the catalog: authenticated name:tag entries
        self.catalog = Catalog(self.objects, self.ident, self.trust)
        #: convergence domains
        self.convergence_domains = Domains(self.objects, self.key, self.ident, self.trust)
        #: sealed manifests, start-up profiles, the layer index
        self.manifests = ManifestStore(self.objects, self.key, self.ident)
        #: the chunk seam: the one encrypt->store and fetch->decrypt->check path
        self.chunks = Chunks(self.chunk_store, self.objects)
        #: the gc lock of a store without locks (a registry): leases (wall-clock time, whatever ``clock`` says)
        self.leases = Leases(self.objects, self.ident)

    def throttled(self: R, latency_s: float, bandwidth_bps: float) -> R:
        """The same store behind a simulated link (latency per request, shared
        bandwidth; ``.link`` of the result counts requests and bytes)."""
        from ..stores.slow import Link, SlowChunkStore, SlowStore

        link = Link(latency_s, bandwidth_bps)
        other = type(self).__new__(type(self))
        other.__dict__.update(self.__dict__)
        other.objects = SlowStore(self.objects, link)
        other.chunk_store = SlowChunkStore(self.chunk_store, link)
        other.link = link
        other._wire()
        return other

    @classmethod
    def open(cls: type[R], path: str | None = None, key: KeyProvider | str | None = None, *,
             kms_endpoint: str | None = None, clock: Callable[[], float] = time.time,
             inactive_after: float = DEFAULT_INACTIVE_AFTER, key_cache_ttl: float = 300.0,
             state_dir: str | None = None, allow_rollback: bool = False,
             insecure: bool = False, username: str | None = None, password: str | None = None,
             cache_dir: str | None = None, cache_bytes: int = 2 << 30, timeout: float = 60.0,
             s3_endpoint: str | None = None, options: StoreOptions | None = None, create: bool = True,
             site_cache: str | None = None, read_deadline: float = 10.0, offline_max_age: float = 86400.0,
             reactivator: Callable[[CatalogEntry], None] | None = None) -> R:
        """Open (creating if needed, unless ``create`` is False) the store at
        ``path`` -- a local folder (default: ``$CONVSTORE_STORE``, else the
        user's data dir), ``oci://HOST[:PORT]/REPO`` (a registry, read
        through a bounded local cache; ``timeout``: seconds a registry may stay
        silent before a request is retried, 4 attempts; ``read_deadline``: seconds
        a read may wait with nothing arriving (READ_DEADLINE); ``offline_max_age``: how old a
        node-cache copy of the catalog may be to serve while the registry is
        unavailable, 0: never) or
        ``s3://BUCKET/PREFIX`` (an S3 bucket, cached alike; ``s3_endpoint``, else
        ``$CONVSTORE_S3_ENDPOINT``, else AWS; credentials as the AWS tools take them) -- with ``key`` (a
        provider or a ``--key`` spec; default: the user's key file).  A named
        key file that does not exist is created only with a new store.
        ``site_cache``: a shared site tier (``http[s]://HOST[:PORT]``) chunk
        reads go through first (:mod:`convstore.stores.sitetier`)."""
        path = resolve_store_location(path)
        objects: ObjectStore
        chunk_store: ChunkStore
        if is_registry_url(path):
            from ..stores.cache import CachedChunkStore, CachedStore, DiskCache
            from ..stores.registry import open_registry

            cache_dir = cache_dir or default_cache_dir(path)
            meta, chunks = open_registry(path, insecure=insecure, username=username, password=password,
                                         index_dir=os.path.join(cache_dir, "index"), timeout=timeout,
                                         deadline=read_deadline)
            cache = DiskCache(cache_dir, cache_bytes)
            origin: ChunkStore = chunks
            origin_meta: ObjectStore = meta
            if site_cache:
                from ..stores.sitetier import open_site_tier

                origin_meta, origin = open_site_tier(path, site_cache, chunks, meta, username=username,
                                                     password=password)
            objects, chunk_store = CachedStore(origin_meta, cache, offline_max_age), CachedChunkStore(origin, cache)
        elif is_s3_url(path):
            from ..stores.cache import CachedChunkStore, CachedStore, DiskCache
            from ..stores.s3 import open_s3

            cache_dir = cache_dir or default_cache_dir(path)
            s3meta, s3chunks = open_s3(path, s3_endpoint, index_dir=os.path.join(cache_dir, "index"), timeout=timeout)
            cache = DiskCache(cache_dir, cache_bytes)
            s3origin: ChunkStore = s3chunks
            s3objects: ObjectStore = s3meta
            if site_cache:  # packs and sealed manifests through the tier; other metadata from the origin
                from ..stores.sitetier import open_site_tier

                s3objects, s3origin = open_site_tier(path, site_cache, s3chunks, s3meta)
            objects, chunk_store = CachedStore(s3objects, cache), CachedChunkStore(s3origin, cache)
        else:
            if site_cache:
                raise InvalidReference(f"--site-cache: {path} is a local store; a site cache fronts a registry "
                                       f"store (oci://HOST/REPO)")
            if not create and not os.path.isdir(path):
                raise StoreError(f"{path} is not a folder, so not a store") if os.path.exists(path) \
                    else no_store(path)
            objects = LocalStore(path)
        try:
            provider = key if isinstance(key, KeyProvider) else open_key(key, kms_endpoint=kms_endpoint)
        except KeyFileMissing:
            # a registry that cannot be reached, an old layout or no store at all is said before the missing key
            try:
                objects.get("store.json")
            except KeyError:
                if not create:
                    raise no_store(path) from None
            else:
                raise  # the store exists: its key must too
            # a new store with a new key: the key named for it is created with it (and the CLI says so)
            provider = open_key(key if isinstance(key, str) else None, kms_endpoint=kms_endpoint, create_file=True)
        if not is_remote_url(path):
            kp = getattr(provider, "path", None)
            if kp and os.path.commonpath([os.path.realpath(path), os.path.realpath(kp)]) == os.path.realpath(path):
                raise StoreError(f"the key file {kp} lies inside the store {path}: keep master keys apart from data")
            chunk_store = LocalChunkStore(path)
        options = options or StoreOptions(
            path=path, key=provider.spec, kms_endpoint=kms_endpoint or getattr(provider, "endpoint", None),
            insecure=insecure, username=username, password=password, cache_dir=cache_dir, cache_bytes=cache_bytes,
            timeout=timeout, s3_endpoint=s3_endpoint, state_dir=state_dir, allow_rollback=allow_rollback,
            site_cache=site_cache, read_deadline=read_deadline, offline_max_age=offline_max_age)
        return cls(objects, provider, chunk_store=chunk_store, clock=clock, inactive_after=inactive_after,
                   key_cache_ttl=key_cache_ttl, options=options, state_dir=state_dir, allow_rollback=allow_rollback,
                   create=create, reactivator=reactivator)

    @classmethod
    def open_with(cls: type[R], options: StoreOptions,
                  reactivator: Callable[[CatalogEntry], None] | None = None) -> R:
        """Open the store ``options`` describe (what the CLI and background workers use)."""
        fixed = options.now
        s = cls.open(options.path, options.key, kms_endpoint=options.kms_endpoint,
                     clock=(lambda: fixed) if fixed is not None else time.time,
                     inactive_after=options.inactive_after if options.inactive_after is not None
                     else DEFAULT_INACTIVE_AFTER, state_dir=options.state_dir,
                     allow_rollback=options.allow_rollback, insecure=options.insecure, username=options.username,
                     password=options.password, cache_dir=options.cache_dir, cache_bytes=options.cache_bytes,
                     timeout=options.timeout, s3_endpoint=options.s3_endpoint, options=options, create=options.create,
                     reactivator=reactivator, site_cache=options.site_cache, read_deadline=options.read_deadline,
                     offline_max_age=options.offline_max_age)
        # what a worker inherits names the store and key actually opened (defaults and $CONVSTORE_* resolved)
        s.options = replace(options, path=options.path or getattr(s.objects, "root", None),
                            key=options.key or s.key.spec,
                            kms_endpoint=options.kms_endpoint or getattr(s.key, "endpoint", None))
        if options.latency_ms or options.bandwidth_mbps:
            s = s.throttled(options.latency_ms / 1e3, (options.bandwidth_mbps or 1e6) * 1e6)
        return s

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.objects!r} id={self.id}>"

    # -- audit ------------------------------------------------------------
    def record_audit(self, record: dict[str, Any]) -> None:
        """Append one key-use record to the store's audit log (JSON lines)."""
        if "error" in record:
            record["error"] = record["error"][:400]
        self.objects.append_line(AUDIT_LOG, json.dumps(record, sort_keys=True))

    # -- what spans parts ----------------------------------------------------
    def find_layer(self, domain: Domain, diff_id: str) -> tuple[Manifest, LayerRecord] | None:
        """An already stored layer with this diff_id whose chunks are all present, or None."""
        return self.manifests.find_layer(domain, diff_id, self.chunks)

    def domain_of(self, e: CatalogEntry) -> str:
        """The convergence domain ``e``'s image belongs in: as its entry records,
        else as its (authenticated) manifest records, else the default."""
        if e.domain:
            return e.domain
        try:
            name = str(self.manifests.load(e).domain.get("name") or DEFAULT_DOMAIN)
        except ConvstoreError:
            return DEFAULT_DOMAIN
        # a copy from another store names the source's domain, which need not exist here
        return name if name in {d["name"] for d in self.convergence_domains.list()} else DEFAULT_DOMAIN

    # -- lifecycle (the transitions themselves live in convstore.core.lifecycle) --
    def _change(self, ref: ImageRef, fn: Callable[[CatalogEntry | None], CatalogEntry | None]) -> CatalogEntry:
        e = self.catalog.update(ref, fn)
        assert e is not None
        return e

    def pending_alive(self, pending: dict[str, Any] | None) -> bool:
        """Whether the pack that set a pending mark still runs: on this host, its pid; on another host
        of a store without locks, whether it still holds a live lease (a pack holds one from before its
        pending mark until it publishes); otherwise it cannot be told and is assumed to."""
        if not pending:
            return False
        import socket  # here: the module's enums cost every command ~2 ms of imports (docs/benchmarks.md)

        if self.objects.supports_locking or pending.get("host") == socket.gethostname():
            return pid_alive(pending)
        self.leases.sync()
        now = self.leases.now()
        return any(l.host == pending.get("host") and l.pid == pending.get("pid") and l.live(now)
                   for l in self.leases.all()[0])  # LeaseUnreadable: cannot tell, nothing cleared

    def clear_orphaned_pack(self, ref: ImageRef) -> None:
        """Drop the pending mark another machine's pack left when it died (its lease expired), which
        would otherwise refuse every later pack and rm of ``ref`` (stores without locks)."""
        if self.objects.supports_locking:
            return
        try:
            e = self.catalog.entry(ref)
        except ImageNotFound:
            return
        import socket

        if e.pending and e.pending.get("host") != socket.gethostname() and not self.pending_alive(e.pending):
            now = self.clock()
            self.catalog.update(ref, lambda cur: cur and lifecycle.clear_dead_pack(cur, now, self.pending_alive))

    def begin_pack(self, ref: ImageRef, source: str, repack_of: str | None = None) -> CatalogEntry:
        """Mark ``ref`` PENDING (or note the pending update of a servable image).  ``repack_of``: a
        re-pack of that version (refused with :class:`ImageChanged` once ``ref`` points elsewhere)."""
        self.clear_orphaned_pack(ref)
        now = self.clock()
        return self._change(ref, lambda cur: lifecycle.begin_pack(cur, ref, now, source, repack_of))

    def finish_pack(self, ref: ImageRef, manifest_digest: str, wrapped: bytes, created: str, source: str,
                    logical_bytes: int, layers: int, domain: str, packed_from: str = "",
                    source_digests: tuple[str, str] = ("", ""), repack_of: str | None = None) -> CatalogEntry:
        """Make every chunk durable, then atomically point ``ref`` at the new version: ACTIVE (a re-pack
        of ``repack_of``: only if ``ref`` still points at that version)."""
        self.chunk_store.flush()
        self.objects.flush()
        self.ident.check_current(self.key)  # a rekey that ran meanwhile: never publish under a retired key
        if not self.objects.supports_locking:
            self.leases.check_held()  # a lease that lapsed: gc elsewhere may have taken what this relies on
        now = self.clock()
        return self._change(ref, lambda cur: lifecycle.finish_pack(
            cur, ref, now, manifest_digest=manifest_digest, key_id=self.key.key_id, wrapped_key=wrapped,
            created=created, source=source, logical_bytes=logical_bytes, layers=layers, domain=domain,
            packed_from=packed_from, source_digests=source_digests, repack_of=repack_of))

    def abort_pack(self, ref: ImageRef, error: BaseException, repack_of: str | None = None) -> None:
        """A pack failed: keep serving the previous version (a re-pack whose source is gone or now
        serves other content: FAILED)."""
        now = self.clock()
        self.catalog.update(ref, lambda cur: lifecycle.abort_pack(cur, now, str(error),
                                                                  isinstance(error, SourceNotFound),
                                                                  isinstance(error, SourceChanged), repack_of))

    def gc_guard(self) -> AbstractContextManager[Any]:
        """What a pack or copy into this store holds while it relies on chunks
        it found there: the gc lock, shared (gc takes it exclusively).  A
        store without locks (a registry) holds a shared lease instead
        (:mod:`convstore.core.leases`), waiting up to ``PACK_WAIT`` for a running gc."""
        if not self.objects.supports_locking:
            return self._leased()
        return self.objects.lock(GC_LOCK, shared=True)

    @contextlib.contextmanager
    def _leased(self) -> Iterator[None]:
        """A shared lease, then a fresh look at the chunk index: what this process loaded before (a
        long-lived one, or a pack's up-to-date check) may name chunks a gc swept meanwhile."""
        with self.leases.hold("pack", exclusive=False, wait=PACK_WAIT):
            self.chunk_store.refresh()
            yield

    def gc_lock(self, *, optional: bool = False, purpose: str = "gc") -> AbstractContextManager[Any]:
        """The gc lock, exclusive: what gc and rekey hold (no pack or copy can
        publish meanwhile).  A store without locks (a registry) takes an
        exclusive lease: :class:`~convstore.errors.StoreBusy` while a pack or
        copy into it holds one (``optional`` is kept for callers; a lease is always taken)."""
        if not self.objects.supports_locking:
            return self.leases.hold(purpose, exclusive=True)
        return self.objects.lock(GC_LOCK)

    def is_stale(self, e: CatalogEntry, now: float) -> bool:
        """Unread for ``inactive_after``.  Only stores that can record reads
        (local ones) age their images; a registry copy never goes INACTIVE."""
        return (self.objects.supports_locking and self.objects.records_reads and e.state == ACTIVE and e.complete
                and now - (e.last_read or e.state_since) > self.inactive_after)

    # -- the read gate -------------------------------------------------------
    def open_image(self, ref: ImageRef | str, head_only: bool = False) -> tuple[CatalogEntry, Manifest]:
        """The read gate: the manifest of a readable (ACTIVE) image.  Records
        the read; refuses PENDING and FAILED images; an image unused for
        ``inactive_after`` is INACTIVE, and its first read starts a re-pack.
        ``head_only``: the manifest without files and chunks (:meth:`Manifest.decode`)."""
        e = self.open_entry(ref)
        return e, self.manifests.load(e, head_only)

    def open_entry(self, ref: ImageRef | str) -> CatalogEntry:
        """:meth:`open_image`'s gate alone: the entry of a readable image, its read recorded (the caller
        opens its manifest)."""
        e = self.catalog.entry(ref)
        now = self.clock()
        if not e.complete:
            raise ImagePending(f"image {e.ref} is being packed (PENDING since {iso(e.state_since)}); "
                               f"it cannot be read yet")
        if e.state == FAILED:
            raise ImageFailed(f"image {e.ref} is FAILED: {e.reason}")
        if e.state in (INACTIVE, PENDING) or self.is_stale(e, now):
            self._reactivate(e)
            raise ImageInactive(f"image {e.ref} is inactive and is being reactivated from {e.source}; "
                                f"retry when it is ACTIVE")
        return self.stamp_read(e, now)

    def stamp_read(self, e: CatalogEntry, now: float) -> CatalogEntry:
        """Record a use of an ACTIVE image (``last_read``, written at most hourly; local stores only)."""
        if now - e.last_read > READ_STAMP_INTERVAL and self.objects.supports_locking and self.objects.records_reads:
            e = self.catalog.update(e.ref, lambda cur: lifecycle.mark_read(cur, now)) or e
        return e

    def _reactivate(self, e: CatalogEntry) -> None:
        now = self.clock()
        start = [False]

        def change(cur: CatalogEntry | None) -> CatalogEntry | None:
            new, start[0] = lifecycle.start_reactivation(cur, now, self.inactive_after)
            return new

        self.catalog.update(e.ref, change)
        if start[0]:
            self.reactivator(e)

    def start_reactivation(self, e: CatalogEntry) -> None:
        """The reactivator of a repository opened without one: the core starts
        no process, so the image waits for a pack."""
        raise StoreError(f"cannot reactivate {e.ref} automatically: run convstore pack {e.source} {e.ref}")
