"""The public :class:`Store` facade: what users of the library call.

A :class:`Store` is a :class:`~convstore.core.Repository` (the store's state
and parts, :mod:`convstore.core`) with the operations on top: each method
below hands the repository to the module that implements it (pack, unpack,
rootfs, maintenance, rekey, transfer, info) and adds the conveniences the
command line and users rely on (``store.entry(ref)``, ``store.domains()``).
Library code below the facade never calls these: it takes a Repository and
uses its parts.  Opening a Store gives it the reactivator that starts a
background re-pack (:func:`convstore.worker.spawn_repack`); the core itself
starts no process.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from .core import lifecycle
from .core.catalog import INACTIVE, CatalogEntry
from .core.repository import (  # noqa: F401 (re-exported: the public names of convstore.store)
    DEFAULT_INACTIVE_AFTER,
    READ_STAMP_INTERVAL,
    Repository,
    default_cache_dir,
    read_audit_log,
)
from .core.domains import DEFAULT_DOMAIN, Domain
from .errors import CorruptObject, RollbackDetected
from .keys import KeyProvider, open_key
from .manifest import Manifest
from .options import default_local_store
from .refs import ImageRef

if TYPE_CHECKING:
    from .info import ImageInfo, LayerInfo, StoreStats  # noqa: F401 (re-exported below)
    from .chunking import ChunkParams
    from .maintenance import GCReport, RefreshChange, VerifyReport
    from .oci.policy import Policy
    from .oci.sources import ImageSource
    from .pack import PackResult
    from .progress import Progress
    from .rekey import RekeyReport
    from .rootfs import RootfsResult
    from .unpack import UnpackResult


def default_store_path() -> str:
    """``$CONVSTORE_STORE``, else ``<user data dir>/convstore/store``."""
    return os.environ.get("CONVSTORE_STORE") or default_local_store()


class Store(Repository):
    """A convstore image store.  Open with :meth:`Store.open`."""

    def start_reactivation(self, e: CatalogEntry) -> None:
        """Re-pack in a detached worker process (:func:`convstore.worker.spawn_repack`)."""
        from .worker import spawn_repack

        spawn_repack(self.options, e)

    # -- audit ------------------------------------------------------------
    def audit(self, since: str | None = None, image: str | None = None) -> list[dict[str, Any]]:
        """Audit records, optionally from an ISO time on, or for one image name."""
        return read_audit_log(self.options, since, image)

    # -- identity and the metadata key (convstore.core.identity) -------------------
    def unlock_metadata(self, provider: KeyProvider) -> None:
        self.ident.unlock(provider)

    def metadata_key_id(self) -> str:
        return self.ident.metadata_key_id

    def rewrap_metadata_key(self, old: KeyProvider, new: KeyProvider) -> bool:
        return self.ident.rewrap(old, new)

    # -- convergence domains (convstore.core.domains) -------------------------------
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

    # -- manifests, profiles, layer index (convstore.core.manifests) ---------
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

    # -- catalog (convstore.core.catalog.Catalog) ------------------------------------
    def update_entry(self, ref: ImageRef | str,
                     change: Callable[[CatalogEntry | None], CatalogEntry | None]) -> CatalogEntry | None:
        """Read-modify-write one catalog entry under its lock; ``change``
        returns the new entry, or None to remove it."""
        return self.catalog.update(ref, change)

    def entry(self, ref: ImageRef | str) -> CatalogEntry:
        return self.catalog.entry(ref)

    def images(self, *, strict: bool = False, problems: dict[str, str] | None = None) -> list[CatalogEntry]:
        """Every catalog entry.  One that fails authentication is skipped with
        a warning (and noted in ``problems``), or with ``strict`` (what gc and
        rekey use) raises."""
        return self.catalog.list(strict=strict, problems=problems)

    def complete_images(self, *, strict: bool = False) -> list[CatalogEntry]:
        return self.catalog.complete(strict=strict)

    def manifest(self, ref: ImageRef | str) -> Manifest:
        """The manifest of a readable image (goes through the read gate)."""
        return self.open_image(ref)[1]

    def iter_manifests(self, include_inactive: bool = False) -> Iterator[tuple[CatalogEntry, Manifest]]:
        """Every complete image's manifest (no read is recorded)."""
        for e in self.catalog.complete():
            if e.state == INACTIVE and not include_inactive:
                continue
            yield e, self.manifests.load(e)

    def rm(self, ref: ImageRef | str) -> CatalogEntry | None:
        """Remove ``name:tag`` from the catalog (its chunks go at the next gc).
        An entry that fails authentication (or is a rollback) is removed too --
        the owner's remedy for a damaged entry; then None is returned."""
        r = ImageRef.parse(ref) if isinstance(ref, str) else ref
        removed: list[CatalogEntry] = []
        try:
            self.clear_orphaned_pack(r)
        except (CorruptObject, RollbackDetected):
            pass  # a damaged entry: removed below

        def change(cur: CatalogEntry | None) -> CatalogEntry | None:
            if cur is not None:
                removed.append(cur)
            return lifecycle.remove(cur, r)

        try:
            self.catalog.update(r, change)
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

    def verify(self, ref: str | None = None, repair: bool = False, repair_from: Repository | None = None
               ) -> VerifyReport:
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
        from . import info

        return info.inspect(self, ref)

    def stats(self) -> StoreStats:
        """Logical, unique-plaintext and stored bytes over every image."""
        from . import info

        return info.stats(self)


def __getattr__(name: str) -> Any:
    """``ImageInfo``, ``LayerInfo``, ``StoreStats`` (convstore.info), imported on first use: three frozen
    dataclasses cost every command's start ~3 ms, and ``convstore run`` never needs them."""
    if name in ("ImageInfo", "LayerInfo", "StoreStats"):
        from . import info

        return getattr(info, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
