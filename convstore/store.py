"""The :class:`Store` facade: catalog, domains, manifests and chunks over an
:class:`~convstore.stores.base.ObjectStore`, with a master key provider.

Publication order (what makes a crash at any point harmless): chunks are
written, then made durable together; then the sealed manifest; then the
catalog entry, atomically.  An image is visible only through its catalog
entry, so a half-written image is never visible.  Orphaned chunks and
manifests are harmless garbage.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
import logging
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

import platformdirs

from . import lifecycle
from .catalog import ACTIVE, FAILED, INACTIVE, PENDING, Catalog, CatalogEntry, iso
from .chunks import Chunks
from .domains import DEFAULT_DOMAIN, Domain, Domains
from .manifest_store import ManifestStore
from .storeid import StoreIdentity, no_store
from .errors import (
    ConvstoreError,
    CorruptObject,
    RollbackDetected,
    ImageFailed,
    SourceChanged,
    ImageInactive,
    ImagePending,
    KeyFileMissing,
    SourceNotFound,
    StoreError,
)
from .keys import KeyProvider, open_key
from .keys.audit import AUDIT_LOG, AuditedKeyProvider, parse_audit
from .manifest import ROW_SIZE, ROW_SIZE_AT, LayerRecord, Manifest
from .options import StoreOptions, default_local_store, is_registry_url, resolve_store_location
from .refs import ImageRef
from .stores.base import ChunkSet, ChunkStore, ObjectStore
from .stores.local import LocalChunkStore, LocalStore
from .trust import TrustState, check_location, default_state_dir

if TYPE_CHECKING:
    from .chunking import ChunkParams
    from .maintenance import GCReport, RefreshChange, VerifyReport
    from .oci.policy import Policy
    from .oci.sources import ImageSource
    from .pack import PackResult
    from .progress import Progress
    from .rekey import RekeyReport
    from .rootfs import RootfsResult
    from .stores.slow import Link
    from .unpack import UnpackResult

log = logging.getLogger("convstore")

DEFAULT_INACTIVE_AFTER = 14 * 86400.0
READ_STAMP_INTERVAL = 3600.0  # last_read is written at most this often


def default_store_path() -> str:
    """``$CONVSTORE_STORE``, else ``<user data dir>/convstore/store``."""
    return os.environ.get("CONVSTORE_STORE") or default_local_store()


def default_cache_dir(url: str) -> str:
    """The local cache of the registry store at ``url``."""
    return os.path.join(platformdirs.user_cache_dir("convstore"), "registry",
                        hashlib.sha256(url.encode()).hexdigest()[:16])


def read_audit_log(options: StoreOptions, since: str | None = None,
                   image: str | None = None) -> list[dict[str, Any]]:
    """The audit log of the store ``options`` name; reading it needs no key.
    A local store keeps it inside; a registry store's clients each keep theirs
    beside their cache (a registry has no append)."""
    path = resolve_store_location(options.path)
    if is_registry_url(path):
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


class Store:
    """A convstore image store.  Open with :meth:`Store.open`."""

    def __init__(self, objects: ObjectStore, key: KeyProvider, *, chunk_store: ChunkStore,
                 clock: Callable[[], float] = time.time,
                 inactive_after: float = DEFAULT_INACTIVE_AFTER, key_cache_ttl: float = 300.0,
                 options: StoreOptions | None = None, state_dir: str | None = None, allow_rollback: bool = False,
                 create: bool = True):
        self.objects = objects
        self.chunk_store = chunk_store
        #: the simulated link of a throttled() view (measurement), else None
        self.link: Link | None = None
        self.key: KeyProvider = key if isinstance(key, AuditedKeyProvider) else \
            AuditedKeyProvider(key, self._audit, ttl=key_cache_ttl)
        self.clock = clock
        self.inactive_after = inactive_after
        #: how this store was opened: what a background worker inherits
        self.options = options or StoreOptions(path=getattr(objects, "root", None), key=self.key.spec)
        #: called with (source, ref) to start the re-pack of an INACTIVE image
        #: called with the (authenticated) entry of an INACTIVE image to start its re-pack
        self.reactivator: Callable[[CatalogEntry], None] = self._spawn_repack
        #: store.json: the id and the metadata key
        self.ident = StoreIdentity(objects, self.key, create=create, where=self.options.path or "this store")
        self.id = self.ident.id
        #: rollback protection: the newest versions this client has seen (see convstore.trust)
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

    def throttled(self, latency_s: float, bandwidth_bps: float) -> Store:
        """The same store behind a simulated link (latency per request, shared
        bandwidth; ``.link`` of the result counts requests and bytes)."""
        from .stores.slow import Link, SlowChunkStore, SlowStore

        link = Link(latency_s, bandwidth_bps)
        other = Store.__new__(Store)
        other.__dict__.update(self.__dict__)
        other.objects = SlowStore(self.objects, link)
        other.chunk_store = SlowChunkStore(self.chunk_store, link)
        other.link = link
        other._wire()
        return other

    @classmethod
    def open(cls, path: str | None = None, key: KeyProvider | str | None = None, *,
             kms_endpoint: str | None = None, clock: Callable[[], float] = time.time,
             inactive_after: float = DEFAULT_INACTIVE_AFTER, key_cache_ttl: float = 300.0,
             state_dir: str | None = None, allow_rollback: bool = False,
             insecure: bool = False, username: str | None = None, password: str | None = None,
             cache_dir: str | None = None, cache_bytes: int = 2 << 30, timeout: float = 60.0,
             options: StoreOptions | None = None, create: bool = True) -> Store:
        """Open (creating if needed, unless ``create`` is False) the store at
        ``path`` -- a local folder (default: ``$CONVSTORE_STORE``, else the
        user's data dir) or ``oci://HOST[:PORT]/REPO`` (a registry, read
        through a bounded local cache; ``timeout``: seconds a registry may stay
        silent before a request is retried, 4 attempts) -- with ``key`` (a
        provider or a ``--key`` spec; default: the user's key file).  A named
        key file that does not exist is created only with a new store."""
        path = resolve_store_location(path)
        objects: ObjectStore
        chunk_store: ChunkStore
        if is_registry_url(path):
            from .stores.cache import CachedChunkStore, CachedStore, DiskCache
            from .stores.registry import open_registry

            cache_dir = cache_dir or default_cache_dir(path)
            meta, chunks = open_registry(path, insecure=insecure, username=username, password=password,
                                         index_dir=os.path.join(cache_dir, "index"), timeout=timeout)
            cache = DiskCache(cache_dir, cache_bytes)
            objects, chunk_store = CachedStore(meta, cache), CachedChunkStore(chunks, cache)
        else:
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
        if not is_registry_url(path):
            kp = getattr(provider, "path", None)
            if kp and os.path.commonpath([os.path.realpath(path), os.path.realpath(kp)]) == os.path.realpath(path):
                raise StoreError(f"the key file {kp} lies inside the store {path}: keep master keys apart from data")
            chunk_store = LocalChunkStore(path)
        options = options or StoreOptions(
            path=path, key=provider.spec, kms_endpoint=kms_endpoint or getattr(provider, "endpoint", None),
            insecure=insecure, username=username, password=password, cache_dir=cache_dir, cache_bytes=cache_bytes,
            timeout=timeout, state_dir=state_dir, allow_rollback=allow_rollback)
        return cls(objects, provider, chunk_store=chunk_store, clock=clock, inactive_after=inactive_after,
                   key_cache_ttl=key_cache_ttl, options=options, state_dir=state_dir, allow_rollback=allow_rollback,
                   create=create)

    @classmethod
    def open_with(cls, options: StoreOptions) -> Store:
        """Open the store ``options`` describe (what the CLI and background workers use)."""
        fixed = options.now
        s = cls.open(options.path, options.key, kms_endpoint=options.kms_endpoint,
                     clock=(lambda: fixed) if fixed is not None else time.time,
                     inactive_after=options.inactive_after if options.inactive_after is not None
                     else DEFAULT_INACTIVE_AFTER, state_dir=options.state_dir,
                     allow_rollback=options.allow_rollback, insecure=options.insecure, username=options.username,
                     password=options.password, cache_dir=options.cache_dir, cache_bytes=options.cache_bytes,
                     timeout=options.timeout, options=options, create=options.create)
        # what a worker inherits names the store and key actually opened (defaults and $CONVSTORE_* resolved)
        s.options = replace(options, path=options.path or getattr(s.objects, "root", None),
                            key=options.key or s.key.spec,
                            kms_endpoint=options.kms_endpoint or getattr(s.key, "endpoint", None))
        if options.latency_ms or options.bandwidth_mbps:
            s = s.throttled(options.latency_ms / 1e3, (options.bandwidth_mbps or 1e6) * 1e6)
        return s

    def __repr__(self) -> str:
        return f"<Store {self.objects!r} id={self.id}>"

    # -- audit ------------------------------------------------------------
    def _audit(self, record: dict[str, Any]) -> None:
        """Append one key-use record to the store's audit log (JSON lines)."""
        if "error" in record:
            record["error"] = record["error"][:400]
        self.objects.append_line(AUDIT_LOG, json.dumps(record, sort_keys=True))

    def audit(self, since: str | None = None, image: str | None = None) -> list[dict[str, Any]]:
        """Audit records, optionally from an ISO time on, or for one image name."""
        return read_audit_log(self.options, since, image)

    # -- identity and the metadata key (convstore.storeid) -------------------
    def unlock_metadata(self, provider: KeyProvider) -> None:
        self.ident.unlock(provider)

    def metadata_key_id(self) -> str:
        return self.ident.metadata_key_id

    def rewrap_metadata_key(self, old: KeyProvider, new: KeyProvider) -> bool:
        return self.ident.rewrap(old, new)

    # -- convergence domains (convstore.domains) -------------------------------
    def domain(self, name: str = DEFAULT_DOMAIN) -> Domain:
        """The convergence domain ``name``, unlocked (the default one is created on first use)."""
        return self.convergence_domains.get(name)

    def create_domain(self, name: str) -> dict[str, Any]:
        """A new convergence domain with a fresh secret (epoch 1)."""
        return self.convergence_domains.create(name)

    def rotate_domain(self, name: str) -> dict[str, Any]:
        """Start a new epoch of ``name`` (new chunks no longer dedup with older ones)."""
        return self.convergence_domains.rotate(name)

    def domains(self) -> list[dict[str, Any]]:
        """The public fields of every domain record."""
        return self.convergence_domains.list()

    # -- manifests, profiles, layer index (convstore.manifest_store) ---------
    def put_manifest(self, manifest: Manifest) -> tuple[str, bytes]:
        """Seal, store durably, and return (digest, wrapped data key)."""
        return self.manifests.put(manifest)

    def load_manifest(self, entry: CatalogEntry) -> Manifest:
        """Open an entry's manifest without the read gate (maintenance)."""
        return self.manifests.load(entry)

    def save_profile(self, entry: CatalogEntry, profile: list[tuple[int, int]]) -> None:
        self.manifests.save_profile(entry, profile)

    def load_profile(self, entry: CatalogEntry) -> list[tuple[int, int]] | None:
        return self.manifests.load_profile(entry)

    def record_layers(self, domain: Domain, manifest: Manifest, digest: str, wrapped: bytes) -> None:
        self.manifests.record_layers(domain, manifest, digest, wrapped)

    def find_layer(self, domain: Domain, diff_id: str) -> tuple[Manifest, LayerRecord] | None:
        """An already stored layer with this diff_id whose chunks are all present, or None."""
        return self.manifests.find_layer(domain, diff_id, self.chunks)

    # -- catalog (convstore.catalog.Catalog) ------------------------------------
    def update_entry(self, ref: ImageRef | str,
                     change: Callable[[CatalogEntry | None], CatalogEntry | None]) -> CatalogEntry | None:
        """Read-modify-write one catalog entry under its lock; ``change``
        returns the new entry, or None to remove it."""
        return self.catalog.update(ImageRef.parse(ref) if isinstance(ref, str) else ref, change)

    def entry(self, ref: ImageRef | str) -> CatalogEntry:
        return self.catalog.entry(ImageRef.parse(ref) if isinstance(ref, str) else ref)

    def images(self, *, strict: bool = False, problems: dict[str, str] | None = None) -> list[CatalogEntry]:
        """Every catalog entry.  One that fails authentication is skipped with
        a warning (and noted in ``problems``), or with ``strict`` (what gc and
        rekey use) raises."""
        return self.catalog.list(strict=strict, problems=problems)

    def complete_images(self, *, strict: bool = False) -> list[CatalogEntry]:
        return [e for e in self.images(strict=strict) if e.complete]

    # -- lifecycle (the transitions themselves live in convstore.lifecycle) --
    def _change(self, ref: ImageRef, fn: Callable[[CatalogEntry | None], CatalogEntry | None]) -> CatalogEntry:
        e = self.update_entry(ref, fn)
        assert e is not None
        return e

    def begin_pack(self, ref: ImageRef, source: str, repack_of: str | None = None) -> CatalogEntry:
        """Mark ``ref`` PENDING (or note the pending update of a servable image).  ``repack_of``: a
        re-pack of that version (refused with :class:`ImageChanged` once ``ref`` points elsewhere)."""
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
        now = self.clock()
        return self._change(ref, lambda cur: lifecycle.finish_pack(
            cur, ref, now, manifest_digest=manifest_digest, key_id=self.key.key_id, wrapped_key=wrapped,
            created=created, source=source, logical_bytes=logical_bytes, layers=layers, domain=domain,
            packed_from=packed_from, source_digests=source_digests, repack_of=repack_of))

    def abort_pack(self, ref: ImageRef, error: BaseException, repack_of: str | None = None) -> None:
        """A pack failed: keep serving the previous version (a re-pack whose source is gone or now
        serves other content: FAILED)."""
        now = self.clock()
        self.update_entry(ref, lambda cur: lifecycle.abort_pack(cur, now, str(error),
                                                                isinstance(error, SourceNotFound),
                                                                isinstance(error, SourceChanged), repack_of))

    def gc_guard(self) -> AbstractContextManager[None]:
        """What a pack or copy into this store holds while it relies on chunks
        it found there: the gc lock, shared (gc takes it exclusively).  A
        registry has no locks and no convstore gc (its own garbage collection
        keeps every pack blob an image manifest references)."""
        if not self.objects.supports_locking:
            return contextlib.nullcontext()
        return self.objects.lock("gc", shared=True)

    def is_stale(self, e: CatalogEntry, now: float) -> bool:
        """Unread for ``inactive_after``.  Only stores that can record reads
        (local ones) age their images; a registry copy never goes INACTIVE."""
        return (self.objects.supports_locking and e.state == ACTIVE and e.complete
                and now - (e.last_read or e.state_since) > self.inactive_after)

    def open_image(self, ref: ImageRef | str) -> tuple[CatalogEntry, Manifest]:
        """The read gate: the manifest of a readable (ACTIVE) image.  Records
        the read; refuses PENDING and FAILED images; an image unused for
        ``inactive_after`` is INACTIVE, and its first read starts a re-pack."""
        e = self.entry(ref)
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
        return self.stamp_read(e, now), self.load_manifest(e)

    def stamp_read(self, e: CatalogEntry, now: float) -> CatalogEntry:
        """Record a use of an ACTIVE image (``last_read``, written at most hourly; local stores only)."""
        if now - e.last_read > READ_STAMP_INTERVAL and self.objects.supports_locking:
            e = self.update_entry(e.ref, lambda cur: lifecycle.mark_read(cur, now)) or e
        return e

    def _reactivate(self, e: CatalogEntry) -> None:
        now = self.clock()
        start = [False]

        def change(cur: CatalogEntry | None) -> CatalogEntry | None:
            new, start[0] = lifecycle.start_reactivation(cur, now, self.inactive_after)
            return new

        self.update_entry(e.ref, change)
        if start[0]:
            self.reactivator(e)

    def _spawn_repack(self, e: CatalogEntry) -> None:
        """Re-pack in a detached worker process (library code; it inherits
        this store's options on a pipe, never in argv).  The worker re-reads the
        authenticated catalog entry: the source, the digests it must still serve
        and the convergence domain come from there (:meth:`repack`)."""
        from .worker import spawn

        if self.options.key is None:
            raise StoreError(f"cannot reactivate {e.ref} automatically (the key provider cannot be reopened in "
                             f"another process): run convstore pack {e.source} {e.ref}")
        spawn({"op": "repack", "ref": str(e.ref)}, replace(self.options, allow_rollback=False))

    def domain_of(self, e: CatalogEntry) -> str:
        """The convergence domain ``e``'s image belongs in: as its entry records,
        else as its (authenticated) manifest records, else the default."""
        if e.domain:
            return e.domain
        try:
            name = str(self.load_manifest(e).domain.get("name") or DEFAULT_DOMAIN)
        except ConvstoreError:
            return DEFAULT_DOMAIN
        # a copy from another store names the source's domain, which need not exist here
        return name if name in {d["name"] for d in self.domains()} else DEFAULT_DOMAIN

    def manifest(self, ref: ImageRef | str) -> Manifest:
        """The manifest of a readable image (goes through the read gate)."""
        return self.open_image(ref)[1]

    def iter_manifests(self, include_inactive: bool = False) -> Iterator[tuple[CatalogEntry, Manifest]]:
        """Every complete image's manifest (no read is recorded)."""
        for e in self.complete_images():
            if e.state == INACTIVE and not include_inactive:
                continue
            yield e, self.load_manifest(e)

    def rm(self, ref: ImageRef | str) -> CatalogEntry | None:
        """Remove ``name:tag`` from the catalog (its chunks go at the next gc).
        An entry that fails authentication (or is a rollback) is removed too --
        the owner's remedy for a damaged entry; then None is returned."""
        r = ImageRef.parse(ref) if isinstance(ref, str) else ref
        removed: list[CatalogEntry] = []

        def change(cur: CatalogEntry | None) -> CatalogEntry | None:
            if cur is not None:
                removed.append(cur)
            return lifecycle.remove(cur, r)

        try:
            self.update_entry(r, change)
        except (CorruptObject, RollbackDetected):
            self.catalog.remove_damaged(r)
            return None
        return removed[0]

    # -- operations (implemented in their own modules) -------------------
    def pack(self, source: str | ImageSource, ref: str, *, level: int | None = None, params: ChunkParams | None = None,
             workers: int | None = None, domain: str = DEFAULT_DOMAIN, progress: Progress | None = None,
             reuse_layers: bool = True, insecure: bool | None = None, policy: Policy | None = None) -> PackResult:
        """Pack ``source`` (``oci:DIR[:TAG]``, ``docker-archive:FILE``, ``docker://...``) as ``ref``, if the trust
        ``policy`` (default: the containers tools' policy file) accepts it."""
        from .pack import DEFAULT_LEVEL, pack

        return pack(self, source, ref, level=DEFAULT_LEVEL if level is None else level, params=params,
                    workers=workers, domain=domain, progress=progress, reuse_layers=reuse_layers,
                    insecure=self.options.insecure if insecure is None else insecure,
                    policy=policy)

    def repack(self, ref: ImageRef | str, *, repair: bool = False, progress: Progress | None = None) -> PackResult:
        """Re-pack ``ref`` from the source its authenticated entry records, into its own domain,
        only if that source still serves the very manifest and config it was packed from
        (else :class:`SourceChanged`, and the image is FAILED).  ``repair``: read every layer again."""
        from .pack import repack

        return repack(self, ref, repair=repair, progress=progress)

    def unpack_oci(self, ref: str, dest: str, *, compress: str | None = None, workers: int | None = None,
                   progress: Progress | None = None) -> UnpackResult:
        from .unpack import unpack_oci

        return unpack_oci(self, ref, dest, compress=compress, workers=workers, progress=progress)

    def unpack_rootfs(self, ref: str, dest: str, *, progress: Progress | None = None) -> RootfsResult:
        from .rootfs import unpack_rootfs

        return unpack_rootfs(self, ref, dest, progress=progress)

    def gc(self, dry_run: bool = False) -> GCReport:
        from .maintenance import gc

        return gc(self, dry_run)

    def verify(self, ref: str | None = None, repair: bool = False, repair_from: Store | None = None) -> VerifyReport:
        """Check chunks and catalog; ``repair`` from ``repair_from`` (another store) or the images' sources."""
        from .maintenance import verify

        return verify(self, ref, repair, repair_from=repair_from)

    def refresh(self, ref: str | None = None) -> list[RefreshChange]:
        from .maintenance import refresh

        return refresh(self, ref)

    def rekey(self, new: KeyProvider | str, kms_endpoint: str | None = None) -> RekeyReport:
        """Re-wrap every data key and domain secret under ``new``."""
        from .rekey import rekey

        # the target is a new key by intent: a named key file that does not exist yet is created
        return rekey(self, new if isinstance(new, KeyProvider)
                     else open_key(new, kms_endpoint=kms_endpoint, create_file=True))

    def inspect(self, ref: str) -> ImageInfo:
        """An image's catalog entry, chunking and layers (no key bytes)."""
        e = self.entry(ref)
        m = self.load_manifest(e)
        return ImageInfo(
            entry=e.public(), domain=dict(m.domain), chunking=m.chunking.to_json(),
            compression_level=m.compression_level, config_digest=m.config_digest,
            config=json.loads(m.config_bytes), chunks=len(m.chunks), verification=m.verification,
            layers=tuple(LayerInfo(l.media_type, l.digest, l.size, l.diff_id, l.uncompressed_size, len(l.entries),
                                   len(l.chunks)) for l in m.layers))

    def stats(self) -> StoreStats:
        """Logical, unique-plaintext and stored bytes over every image.  Reads
        each manifest's chunk table only (logical sizes are in the catalog)."""
        logical = images = 0
        seen = ChunkSet(size_at=ROW_SIZE_AT)  # compact: 36 bytes per id, deduplicated bucket by bucket below
        for e in self.complete_images():
            images += 1
            logical += e.logical_bytes or 0
            seen.add_rows(self.manifests.chunk_table(e), ROW_SIZE)
        n_unique = unique_bytes = 0
        for first in range(256):
            sizes = seen.bucket_sizes(first)
            n_unique += len(sizes)
            unique_bytes += sum(sizes.values())
        chunk_bytes = self.chunks.usage()
        meta_bytes = self.objects.usage("manifests")
        stored = chunk_bytes + meta_bytes
        return StoreStats(images, logical, n_unique, unique_bytes, stored, chunk_bytes, meta_bytes,
                          round(logical / stored, 3) if stored else None)


@dataclass(frozen=True)
class LayerInfo:
    media_type: str
    digest: str | None
    size: int | None
    diff_id: str
    uncompressed_size: int
    files: int
    chunks: int


@dataclass(frozen=True)
class ImageInfo:
    """What ``inspect`` shows of one image."""

    entry: dict[str, Any]  # the catalog entry's public fields (CatalogEntry.public)
    domain: dict[str, Any]
    chunking: dict[str, Any]
    compression_level: int
    config_digest: str
    config: dict[str, Any]
    chunks: int
    layers: tuple[LayerInfo, ...]
    #: what the trust policy verified at pack (convstore.oci.policy), None if nothing was recorded
    verification: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        return {**d.pop("entry"), **d}


@dataclass(frozen=True)
class StoreStats:
    images: int
    logical_bytes: int
    unique_chunks: int
    unique_plaintext_bytes: int
    stored_bytes: int
    stored_chunk_bytes: int
    stored_manifest_bytes: int
    dedup_ratio: float | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)
